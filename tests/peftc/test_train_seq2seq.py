"""``peftc train --task seq2seq`` on tiny T5 and BART: data, the whole-forward capture, loss, HF PEFT parity.

The references are independent: transformers' own seq2seq loss (``model(labels=...)``) and
``shift_tokens_right``, the eager model's logits, and HF PEFT's ``PeftModelForSeq2SeqLM`` loading the
trained adapter (``PeftModel.from_pretrained``) against peftc's eval program (max |Δ| ≤ 1e-5), on right- and
left-padded source batches.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny_bart, tiny_t5

from peftc.errors import DataError
from peftc.training import TrainConfig, train

FACTORIES = {"t5": tiny_t5, "bart": tiny_bart}
WORDS = [f"w{i}" for i in range(60)]


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _tokenizer(model):
    """A word-level tokenizer whose pad and eos ids are the model's (ids < 128, the tiny vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    cfg = model.config
    special = {cfg.pad_token_id: "<pad>", cfg.eos_token_id: "</s>"}
    free = [i for i in range(4) if i not in special]
    vocab = {name: i for i, name in special.items()} | {"<unk>": free[0], "<s>": free[1]}  # ids 0..3, no holes
    for i, w in enumerate(WORDS):
        vocab[w] = 4 + i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", cfg.eos_token_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


@pytest.fixture(scope="module", params=list(FACTORIES))
def model_dir(request, tmp_path_factory):
    model = FACTORIES[request.param]()
    root = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(root, safe_serialization=True)
    _tokenizer(model).save_pretrained(root)
    return request.param, str(root)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Six pairs: the target is the source's words reversed (a mapping the adapter can learn)."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in (3, 5, 4, 6, 2, 5):
        words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=gen)]
        rows.append({"source": " ".join(words), "target": " ".join(reversed(words[: max(1, n - 1)]))})
    return _jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", rows)


def test_read_and_collate_match_transformers(tmp_path, data):
    from transformers.models.bart.modeling_bart import shift_tokens_right

    from peftc.dataset import collate, count_targets, encode, read_jsonl

    model = tiny_bart()
    tok = _tokenizer(model)
    ds = read_jsonl(data, "seq2seq")
    assert len(ds) == 6 and ds.targets is not None and ds.targets[0].split()[0] == ds.texts[0].split()[-2]
    enc = encode(ds, tok, "seq2seq", max_length=4, pad_id=1, decoder_start_id=2)
    batch = collate(enc, [0, 1, 3], ["input_ids", "attention_mask", "decoder_input_ids"])
    assert batch["input_ids"].shape[1] == 4  # sources cut at max_length
    labels = batch["labels"]
    assert (labels == -100).any() and labels.shape[1] <= 4
    want = shift_tokens_right(labels, model.config.pad_token_id, model.config.decoder_start_token_id)
    assert torch.equal(batch["decoder_input_ids"], want)
    assert count_targets(batch, "seq2seq") == int((labels != -100).sum())
    # the task's loss is transformers' own (mean CE over label tokens)
    from peftc.tasks import get_task

    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
    assert float(get_task("seq2seq").loss(out.logits, batch)) == pytest.approx(float(out.loss), abs=1e-6)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"source": "w1 w2"}, "missing field 'target'"),
        ({"target": "w1"}, "missing field 'source'"),
        ({"source": "w1", "target": 3}, "field 'target' must be a string"),
        ({"source": " ", "target": "w1"}, "field 'source' is empty"),
    ],
)
def test_bad_lines_name_the_file_and_line(tmp_path, line, message):
    from peftc.dataset import read_jsonl

    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"source": "w1", "target": "w2"}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(DataError, match=rf"bad\.jsonl:2: {message}.*\"source\"") as e:
        read_jsonl(path, "seq2seq")
    assert "\n" not in str(e.value)


def test_task_is_inferred_from_an_encoder_decoder_config(model_dir):
    from peftc.training.options import infer_task

    assert infer_task(model_dir[1]) == "seq2seq"


def test_capture_is_the_eager_forward():
    from peftc.program import capture

    model = tiny_bart()
    prog = capture(model, "seq2seq", mode="eval")
    assert prog.input_names == ["input_ids", "attention_mask", "decoder_input_ids"]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (3, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    dec = torch.randint(3, 128, (3, 5), generator=gen)  # decoder length ≠ encoder length
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        assert float((prog(ids, mask, dec) - want).abs().max()) <= 1e-5


def _peftc_program(model_dir: str, adapter: Path):
    from peftc.passes import insertion_pipeline

    from peftc.adapters import AdapterState
    from peftc.models import load_model
    from peftc.program import capture

    prog = capture(load_model(model_dir, "seq2seq").model, "seq2seq", mode="eval")
    state = AdapterState.load(adapter)
    insertion_pipeline(state.config, state)(prog)
    return prog


def _left_padded(batch: dict) -> dict:
    """The same encoder sources padded on the left (each row's real tokens moved to the end)."""
    ids, mask = batch["input_ids"].clone(), batch["attention_mask"].clone()
    for row in range(ids.shape[0]):
        shift = int((mask[row] == 0).sum())
        ids[row], mask[row] = ids[row].roll(shift), mask[row].roll(shift)
    assert (mask[:, 0] == 0).any()
    return {**batch, "input_ids": ids, "attention_mask": mask}


# both slow (16-23 s each with the 3-graph export): the quick tier keeps seq2seq's capture and collate tests
@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow) for m in ("lora", "prefix-tuning")])
def test_train_loss_drops_and_hf_peft_loads_it(tmp_path, model_dir, data, method):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSeq2SeqLM

    from peftc.dataset import collate, encode, read_jsonl

    family, path = model_dir
    extra = {"lora_dropout": 0.0} if method == "lora" else {"num_virtual_tokens": 3}
    out = tmp_path / "run"
    res = train(TrainConfig(model=path, task="seq2seq", method=method, data=data, eval_data=data, out=str(out),
                            max_steps=8, batch_size=6, lr=5e-2, warmup_ratio=0.0, log_every=1, progress=False,
                            **extra))  # fmt: skip
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["type"] == "train"]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.05, losses  # batch = the data: a fixed batch
    assert res.eval_metrics["perplexity"] == pytest.approx(torch.tensor(res.eval_metrics["loss"]).exp().item())
    run = json.loads((out / "run.json").read_text())
    assert run["task"] == "seq2seq" and run["input_names"] == ["input_ids", "attention_mask", "decoder_input_ids"]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_2_SEQ_LM"

    base = AutoModelForSeq2SeqLM.from_pretrained(path).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    assert isinstance(ref, peft.PeftModelForSeq2SeqLM)
    from transformers import AutoTokenizer

    enc = encode(read_jsonl(data, "seq2seq"), AutoTokenizer.from_pretrained(path), "seq2seq", 128,
                 base.config.pad_token_id, base.config.decoder_start_token_id)  # fmt: skip
    batch = collate(enc, list(range(len(enc))), run["input_names"])
    assert (batch["attention_mask"][:, -1] == 0).any()  # right-padded sources (the tokenizer's side)
    prog, untrained_model = _peftc_program(path, out / "adapter"), AutoModelForSeq2SeqLM.from_pretrained(path).eval()
    for padded in (batch, _left_padded(batch)):  # the encoder's sources padded on either side
        with torch.no_grad():
            want = ref(**{k: padded[k] for k in run["input_names"]}).logits
            untrained = untrained_model(**{k: padded[k] for k in run["input_names"]}).logits
            got = prog.forward_batch(padded)
        assert float((got - want).abs().max()) <= 1e-5
        assert float((got - untrained).abs().max()) > 1e-3  # the trained adapter changes the logits
    if method == "lora":  # the run exports (merged): the export verifies both graphs with ONNX Runtime
        pytest.importorskip("onnxruntime")
        from peftc.exporting import export

        artifact = export(out, format="onnx", merge=True, out=tmp_path / "onnx")
        assert (artifact / "encoder_model.onnx").is_file() and (artifact / "decoder_model.onnx").is_file()
        report = (artifact / "report.json").read_text()  # export raises when a graph fails verification
        assert "encoder" in report and "decoder" in report
