import torch, pytest
import peftc.train as tm
from test_train import *  # noqa
from test_train import test_resume_reaches_the_uninterrupted_adapter as inner

def test_mutant(tmp_path, bert_dir, cls_data, monkeypatch):
    monkeypatch.setattr(torch, "set_rng_state", lambda s: None)
    inner(tmp_path, bert_dir, cls_data, monkeypatch)
