"""AOTInductor export: the .pt2 package vs HF PEFT on held-out shapes, metadata, and refusals before compiling."""

from __future__ import annotations

import pytest
import torch
from conftest import captured
from cpp_cases import ATOL, SHAPES, hf_logits, make_inputs, max_diff
from peftc.exporters.aoti import export_program_aoti, load_aoti
from peftc.exporters.verify import verify_artifact

from peftc.errors import ConfigError


@pytest.mark.slow
def test_aoti_matches_hf_peft_on_new_shapes(cpp_cases):
    built = cpp_cases.gpt2_lora()
    runner = load_aoti(cpp_cases.aoti_package())
    names = ["input_ids", "attention_mask", "position_ids"]
    for batch, seq, pads in SHAPES:
        inputs = make_inputs(names, batch, seq, pads)
        with torch.inference_mode():
            got = runner(*inputs.values())
        got = (got[0] if isinstance(got, (list, tuple)) else got).numpy()
        assert max_diff(got, hf_logits(built.peft_model, inputs), inputs) <= ATOL, (batch, seq, pads)
        assert max_diff(got, hf_logits(built.base_model, inputs), inputs) > 1e-2


@pytest.mark.slow
def test_verify_aoti_and_metadata(cpp_cases):
    program = cpp_cases.gpt2_lora().program(merge=True)
    report = verify_artifact("aoti", cpp_cases.aoti_package(), program)
    assert report.passed and [c.shape for c in report.cases] == [[1, 7], [3, 5], [4, 12]]
    assert report.candidate == "AOTInductor (model.pt2)"
    assert report.max_abs_diff <= 1e-5, report.summary()  # generated kernels reorder sums: ~2e-7 measured
    metadata = load_aoti(cpp_cases.aoti_package()).get_metadata()
    assert metadata["peftc.input_names"] == "input_ids,attention_mask,position_ids"
    assert metadata["peftc.output_names"] == "logits" and metadata["peftc.task"] == "causal-lm"


def test_train_mode_program_is_refused(tmp_path):
    program, _ = captured("gpt2", "causal-lm", mode="train")
    with pytest.raises(ConfigError, match="train-mode program"):
        export_program_aoti(program, tmp_path / "model.pt2")


def test_package_must_be_pt2(tmp_path):
    program, _ = captured("gpt2", "causal-lm")
    with pytest.raises(ConfigError, match=r"must be a \.pt2 file, got 'model.so'"):
        export_program_aoti(program, tmp_path / "model.so")


def test_missing_compiler_is_a_clear_error(tmp_path, monkeypatch):
    import peftc.exporters.aoti as aoti

    monkeypatch.setattr(aoti, "compiler_available", lambda: None)
    program, _ = captured("gpt2", "causal-lm")
    with pytest.raises(ConfigError, match="needs a C\\+\\+ compiler.*--format torchscript"):
        export_program_aoti(program, tmp_path / "model.pt2")
    assert not (tmp_path / "model.pt2").exists()


@pytest.mark.slow
def test_peftc_export_format_aoti(cpp_cases):
    """``peftc export --format aoti --merge``: a verified artifact directory (the one the tests above run)."""
    import json

    out = cpp_cases.aoti_package().parent
    manifest = json.loads((out / "manifest.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert manifest["format"] == "aoti" and manifest["model_file"] == "model.pt2" and manifest["opset"] is None
    assert manifest["aoti"]["platform"] and manifest["aoti"]["cpu_isa"]
    assert report["verified"] and report["aoti_vs_torch"]["max_abs_diff"] <= ATOL
    assert load_aoti(out / "model.pt2").get_metadata()["peftc.merged"] == "true"
