"""OPT / GPT-J token classification: peftc's own head (:mod:`peftc.heads`), trained, saved and exported.

transformers 4.57 has no ``OPTForTokenClassification`` / ``GPTJForTokenClassification``. The references
are independent of peftc's capture: transformers' ``GPT2ForTokenClassification`` (how the head is built),
the eager wrapper module, and HF PEFT (``get_peft_model`` / ``PeftModel.from_pretrained``) applied to
the same wrapper, against peftc's program on left- and right-padded batches (max |Δ| ≤ 1e-5).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from test_token_cls_data import ROWS, WORDS  # the token-cls data fixtures (CoNLL words and labels)

from peftc.heads import needs_token_classification_head, token_classification_class


def _config(family: str):
    from transformers import GPTJConfig, OPTConfig

    if family == "opt":  # word_embed_proj_dim < hidden: the head reads the projected output (32 wide)
        return OPTConfig(num_hidden_layers=2, hidden_size=64, ffn_dim=128, num_attention_heads=4, vocab_size=128,
                         max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=0, num_labels=4)  # fmt: skip
    return GPTJConfig(n_layer=2, n_embd=64, n_head=4, rotary_dim=8, vocab_size=128, n_positions=64, pad_token_id=0,
                      num_labels=4, resid_pdrop=0.05)  # fmt: skip


def _model(family: str):
    torch.manual_seed(0)
    cfg = _config(family)
    return token_classification_class(cfg)(cfg).eval()


@pytest.fixture(scope="module", params=["opt", "gptj"])
def model_dir(request, tmp_path_factory):
    """A saved tiny base of the family (peftc's head class) with a fast WordPiece tokenizer (ids < 128)."""
    from transformers import BertTokenizerFast

    root = tmp_path_factory.mktemp(request.param)
    _model(request.param).save_pretrained(root, safe_serialization=True)
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(root)
    return request.param, root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The token-cls data fixture's lines as a JSON-lines file."""
    path = tmp_path_factory.mktemp("ner") / "ner.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return str(path)


def _batch(padding: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """Three rows of 7 tokens, rows 0 and 2 padded by 3 on ``padding``'s side."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (3, 7), generator=gen)
    mask = torch.ones_like(ids)
    pads = slice(0, 3) if padding == "left" else slice(4, 7)
    for row in (0, 2):
        ids[row, pads], mask[row, pads] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


def _peftc_logits(base: torch.nn.Module, adapter: Path, batch: dict) -> torch.Tensor:
    from peftc.passes import insertion_pipeline

    from peftc.adapters import AdapterState
    from peftc.program import capture

    prog = capture(base, "token-cls", mode="eval")
    state = AdapterState.load(adapter)
    insertion_pipeline(state.config, state)(prog)
    with torch.no_grad():
        return prog.forward_batch(batch)


def _hf_peft(base: torch.nn.Module, adapter: Path):
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, str(adapter)).eval()


def _real(batch: dict) -> torch.Tensor:
    return batch["attention_mask"].bool()


def test_head_is_built_like_transformers_gpt2_token_classifier(tmp_path):
    """Backbone under the family's prefix, the config's dropout, a linear over the backbone's output width."""
    from transformers import BertConfig, GPT2Config, T5Config

    from peftc.models import load_model
    from peftc.training.options import infer_task

    opt, gptj = _model("opt"), _model("gptj")
    assert type(opt).__name__ == "OPTForTokenClassification" and type(gptj).__name__ == "GPTJForTokenClassification"
    names = [n for n, _ in opt.named_parameters()]
    assert names[0].startswith("model.decoder.") and names[-2:] == ["classifier.weight", "classifier.bias"]
    assert next(n for n, _ in gptj.named_parameters()).startswith("transformer.")
    # the backbone's names are those of the family's own sequence classifier (what HF PEFT's keys are made from)
    from transformers import GPTJForSequenceClassification, OPTForSequenceClassification

    for ours, seq_cls in ((opt, OPTForSequenceClassification), (gptj, GPTJForSequenceClassification)):
        theirs = {n for n in seq_cls(ours.config).state_dict() if not n.startswith("score.")}
        assert theirs == {n for n in ours.state_dict() if not n.startswith("classifier.")}
    assert opt.classifier.in_features == 32 and opt.dropout.p == 0.1  # word_embed_proj_dim; GPT-2's fallback
    assert gptj.classifier.in_features == 64 and gptj.dropout.p == 0.05  # resid_pdrop
    # eager forward = backbone → dropout → classifier (the definition, checked against the backbone alone)
    batch = _batch("left")
    with torch.no_grad():
        hidden = opt.model(**batch).last_hidden_state
        assert torch.equal(opt(**batch).logits, opt.classifier(hidden))
    assert not any(needs_token_classification_head(c) for c in (GPT2Config(), BertConfig(), T5Config()))
    with pytest.raises(ValueError, match="'gpt2' needs no peftc token-classification head"):
        token_classification_class(GPT2Config())
    opt.save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_model(tmp_path, "token-cls").model  # AutoModelForTokenClassification has no class: peftc's
    assert type(loaded) is type(opt) and infer_task(str(tmp_path)) == "token-cls"
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, opt(**batch).logits)
    # a causal-LM checkpoint of the family loads into it: the backbone's weights, a new (seeded) head
    from transformers import OPTForCausalLM

    OPTForCausalLM(_config("opt")).save_pretrained(tmp_path / "lm", safe_serialization=True)
    lm, head = OPTForCausalLM.from_pretrained(tmp_path / "lm"), load_model(tmp_path / "lm", "token-cls")
    assert type(head.model) is type(opt) and sorted(head.missing_keys) == ["classifier.bias", "classifier.weight"]
    assert torch.equal(head.model.model.decoder.layers[0].fc1.weight, lm.model.decoder.layers[0].fc1.weight)


def test_train_lowers_the_loss_and_hf_peft_loads_the_adapter(tmp_path, model_dir, data, capsys):
    """``peftc train --task token-cls``; the saved adapter (LoRA + classifier) equals HF PEFT on the wrapper."""
    from safetensors.torch import load_file

    from peftc.cli import main

    family, path = model_dir
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--model", str(path), "--task", "token-cls", "--method", "lora", "--data", data,
              "--out", str(out), "--max-steps", "6", "--batch-size", "4", "--lr", "5e-2", "--lora-dropout", "0",
              "--warmup-ratio", "0", "--log-every", "1", "--no-progress"])  # fmt: skip
    assert exit_.value.code == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["type"] == "train"]
    assert losses[-1] < losses[0] - 0.05, losses  # batch = the data: a fixed batch
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(tensors)
    assert any("lora_A" in k for k in tensors) and any("lora_B" in k for k in tensors)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["task_type"] == "TOKEN_CLS"

    cls = token_classification_class(_config(family))
    ref = _hf_peft(cls.from_pretrained(path).eval(), out / "adapter")
    untrained = cls.from_pretrained(path).eval()
    for padding in ("right", "left"):
        batch = _batch(padding)
        got = _peftc_logits(cls.from_pretrained(path), out / "adapter", batch)
        with torch.no_grad():
            want, base = ref(**batch).logits, untrained(**batch).logits
        real = _real(batch)
        assert float((got - want)[real].abs().max()) <= 1e-5, padding
        assert float((got - base)[real].abs().max()) > 1e-3  # the trained adapter (and head) change the logits
    if family != "opt":
        return  # one family exports in the quick tier (GPT-J's ONNX: test_support_cells)
    pytest.importorskip("optimum.onnxruntime")
    from optimum.onnxruntime import ORTModelForTokenClassification

    from peftc.exporting import export

    artifact = export(out, format="onnx", merge=True, out=tmp_path / "onnx")  # raises unless it verifies
    ort = ORTModelForTokenClassification.from_pretrained(artifact)
    with torch.no_grad():
        assert float((ort(**batch).logits - want)[real].abs().max()) <= 1e-4  # optimum's client vs HF PEFT


@pytest.mark.parametrize("method", ["lora", "prefix-tuning"])
def test_hf_peft_on_the_wrapper_equals_peftc(tmp_path, model_dir, method):
    """HF PEFT's ``get_peft_model`` on the same wrapper (perturbed adapter) vs peftc binding its files."""
    peft = pytest.importorskip("peft")
    family, _ = model_dir
    if method == "lora":
        config = peft.LoraConfig(task_type="TOKEN_CLS", r=4, lora_alpha=8)
    else:  # decoders take the prefix as past_key_values, through the wrapper's own forward
        config = peft.PrefixTuningConfig(task_type="TOKEN_CLS", num_virtual_tokens=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.get_peft_model(_model(family), config).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in hf.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    hf.save_pretrained(tmp_path, safe_serialization=True)
    for padding in ("right", "left"):
        batch = _batch(padding)
        got = _peftc_logits(_model(family), tmp_path, batch)
        with torch.no_grad():
            want, base = hf(**batch).logits, _model(family)(**batch).logits
        real = _real(batch)
        assert float((got - want)[real].abs().max()) <= 1e-5, padding
        assert float((got - base)[real].abs().max()) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("key", ["token-cls/opt/prefix-tuning", "token-cls/gptj/lora"])
def test_support_cells(tmp_path, key):
    """The support matrix's cells (HF PEFT on peftc's head): load, a training step, save, merge, ONNX verified."""
    from peftc.support import cells, check_cell

    result = check_cell(next(c for c in cells() if c.key == key), tmp_path)
    assert result.status == "pass", result.reason
    assert "HF PEFT on peftc's" in result.checks["load"] and result.checks["onnx"].startswith("verified")
