"""ONNX export, merged and unmerged: ONNX Runtime vs HF PEFT, graph structure, atomic output."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx_export_cases import (
    ATOL,
    FAMILY_PARAMS,
    TEST_SHAPES,
    hf_logits,
    make_inputs,
    max_diff,
    onnx_input_names,
    ort_logits,
)

from peftc.errors import ConfigError, ExportVerificationError, OutputExistsError
from peftc.exporting import export

pytest.importorskip("peft", reason="HF PEFT is the reference for these tests")


def histogram(path: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


@pytest.mark.parametrize("merge", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_onnx_matches_hf_peft(export_cases, family, merge):
    built = export_cases.build(family)
    path = built.export(merge) / "model.onnx"
    names = onnx_input_names(path)
    peft_model, base_model = built.hf_peft(), built.hf_base()
    for batch, seq, pads in TEST_SHAPES:
        inputs = make_inputs(built.task, names, batch, seq, pads)
        got = ort_logits(path, inputs)
        want = hf_logits(peft_model, inputs)
        assert max_diff(built.task, got, want, inputs) <= ATOL, (batch, seq, pads)
        # the adapter is not the identity: the export is far from the bare base model
        assert max_diff(built.task, got, hf_logits(base_model, inputs), inputs) > 1e-2


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_merged_graph_is_base_graph_op_for_op(export_cases, family):
    built = export_cases.build(family)
    merged = built.export(True) / "model.onnx"
    base = export_cases.base_onnx(family)
    assert histogram(merged) == histogram(base)
    assert not [i.name for i in onnx.load(str(merged)).graph.initializer if "lora_" in i.name]
    # same graph, other weights: the merged export computes something else than the base
    inputs = make_inputs(built.task, onnx_input_names(merged), 3, 9, [3, 0, 1])
    assert max_diff(built.task, ort_logits(merged, inputs), ort_logits(base, inputs), inputs) > 1e-2


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_unmerged_graph_keeps_the_lora_branch(export_cases, family):
    from safetensors import safe_open

    built = export_cases.build(family)
    with safe_open(str(built.adapter_dir / "adapter_model.safetensors"), "pt") as f:
        n_sites = sum(k.endswith("lora_A.weight") for k in f.keys())
    assert n_sites >= 2
    extra = histogram(built.export(False) / "model.onnx") - histogram(built.export(True) / "model.onnx")
    # per site: x·Aᵀ, (·)·Bᵀ, ·s, + base  ->  two matmuls, one Mul, one Add; nothing else differs
    assert sum(extra.values()) == 4 * n_sites, extra
    assert extra["MatMul"] + extra["Gemm"] == 2 * n_sites, extra
    assert extra["Mul"] == extra["Add"] == n_sites, extra


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_dims_are_named_batch_and_sequence(export_cases, family):
    built = export_cases.build(family)
    model = onnx.load(str(built.export(True) / "model.onnx"), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    assert [i.name for i in inputs][:2] == ["input_ids", "attention_mask"]
    for value in inputs:
        dims = [d.dim_param for d in value.type.tensor_type.shape.dim]
        assert dims == ["batch", "sequence"], (value.name, dims)
        assert value.type.tensor_type.elem_type == onnx.TensorProto.INT64
    (logits,) = model.graph.output
    dims = logits.type.tensor_type.shape.dim
    assert logits.name == "logits" and dims[0].dim_param == "batch"
    if built.task == "causal-lm":
        assert dims[1].dim_param == "sequence" and dims[2].dim_value == 128
    else:
        assert dims[1].dim_value == 3


def _hf_peft_adapter_dir(export_cases, family: str) -> tuple[Path, torch.nn.Module]:
    """An adapter saved by HF PEFT itself (its own config and key names), B and head perturbed."""
    import peft

    built = export_cases.build(family)
    seq_cls = built.task == "seq-cls"
    config = peft.LoraConfig(
        r=4,
        lora_alpha=16,
        task_type="SEQ_CLS" if seq_cls else "CAUSAL_LM",
        target_modules=["query", "key", "value"] if seq_cls else ["c_attn", "c_proj"],
    )
    model = peft.get_peft_model(built.hf_base(), config).eval()
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    out = export_cases.scratch(f"{family}-hf-peft") / "adapter"
    model.save_pretrained(out)
    return out, model


@pytest.mark.parametrize(
    "family",
    [pytest.param("gpt2", id="gpt2-causal-lm"), pytest.param("bert", id="bert-seq-cls", marks=pytest.mark.slow)],
)
def test_export_from_hf_peft_adapter_dir(export_cases, family):
    built = export_cases.build(family)
    adapter_dir, peft_model = _hf_peft_adapter_dir(export_cases, family)
    out = export(adapter_dir, merge=True, model=str(built.base_dir), out=adapter_dir.parent / "onnx", with_past=False)
    path = out / "model.onnx"
    for batch, seq, pads in TEST_SHAPES:
        inputs = make_inputs(built.task, onnx_input_names(path), batch, seq, pads)
        assert max_diff(built.task, ort_logits(path, inputs), hf_logits(peft_model, inputs), inputs) <= ATOL
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["merged"] is True and manifest["task"] == built.task


def test_non_empty_out_is_refused_without_force_and_untouched(export_cases):
    built = export_cases.build("gpt2")
    out = export_cases.scratch("refused") / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--force"):
        export(built.run_dir, out=out, with_past=False)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"
    # with force the old content is replaced by a complete artifact
    export(built.run_dir, out=out, force=True, with_past=False)
    assert not (out / "keep.txt").exists()
    assert {"model.onnx", "manifest.json", "report.json", "config.json"} <= {p.name for p in out.iterdir()}


def test_out_over_the_source_is_refused_even_with_force(export_cases):
    built = export_cases.build("gpt2")
    for out in (built.run_dir, built.run_dir.parent, built.adapter_dir):
        with pytest.raises(OutputExistsError, match="which this export reads"):
            export(built.run_dir, out=out, force=True, with_past=False)
    with pytest.raises(OutputExistsError, match="which this export reads"):
        export(built.run_dir, out=built.base_dir, force=True)
    assert (built.adapter_dir / "adapter_model.safetensors").is_file() and (built.base_dir / "config.json").is_file()


def test_default_out_is_inside_the_run_dir():
    from peftc.exporting import default_out

    assert default_out("some/run") == Path("some/run/export-onnx")


def test_failed_verification_leaves_no_artifact(export_cases, monkeypatch):
    import peftc.exporters.onnx as onnx_exporter

    built = export_cases.build("gpt2")
    real = onnx_exporter.run_onnx

    def corrupted(path, cases, output="logits"):
        return [o + 1e-2 for o in real(path, cases, output)]

    monkeypatch.setattr(onnx_exporter, "run_onnx", corrupted)
    parent = export_cases.scratch("failing")
    out = parent / "out"
    with pytest.raises(ExportVerificationError) as info:
        export(built.run_dir, out=out, with_past=False)
    assert info.value.exit_code == 3
    assert "max abs diff" in str(info.value) and "nothing was written" in str(info.value)
    report = info.value.report
    assert not report.passed and all(abs(c.max_abs_diff - 1e-2) < 1e-4 for c in report.cases)
    assert list(parent.iterdir()) == []  # no artifact, no temporary directory


@pytest.mark.slow
def test_failed_forced_export_keeps_the_previous_artifact(export_cases, monkeypatch):
    import peftc.exporters.onnx as onnx_exporter

    built = export_cases.build("gpt2")
    real = onnx_exporter.run_onnx
    monkeypatch.setattr(onnx_exporter, "run_onnx", lambda *a, **k: [o * 1.5 for o in real(*a, **k)])
    parent = export_cases.scratch("failing-forced")
    out = parent / "out"
    out.mkdir()
    (out / "previous.txt").write_text("old")
    with pytest.raises(ExportVerificationError):
        export(built.run_dir, out=out, force=True, with_past=False)
    assert [p.name for p in parent.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["previous.txt"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"format": "tflite"}, "supported: onnx, torchscript, aoti"),
        ({"opset": 17}, "opset"),
        ({"atol": -1.0}, "atol"),
        ({"rtol": -0.5}, r"rtol=-0.5 must be a non-negative number \(default for float32: 0\)"),
    ],
)
def test_bad_options_are_config_errors(kwargs, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        export(tmp_path / "no-such-run", out=tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_merged_and_unmerged_exports_agree(export_cases):
    built = export_cases.build("gpt2")
    merged, unmerged = built.export(True) / "model.onnx", built.export(False) / "model.onnx"
    inputs = make_inputs(built.task, onnx_input_names(merged), 3, 9, [3, 0, 1])
    assert max_diff(built.task, ort_logits(merged, inputs), ort_logits(unmerged, inputs), inputs) <= ATOL
    assert np.isfinite(ort_logits(merged, inputs)).all()


def test_large_models_get_external_data(export_cases, monkeypatch):
    import peftc.exporters.onnx as onnx_exporter

    monkeypatch.setattr(onnx_exporter, "EXTERNAL_DATA_THRESHOLD", 0)  # every model counts as large
    built = export_cases.build("gpt2")
    out = export(built.run_dir, merge=True, out=export_cases.scratch("external") / "out", with_past=False)
    data = out / "model.onnx.data"
    assert data.is_file() and data.stat().st_size > (out / "model.onnx").stat().st_size
    manifest = json.loads((out / "manifest.json").read_text())
    assert "model.onnx.data" in manifest["files"]
    inputs = make_inputs(built.task, onnx_input_names(out / "model.onnx"), 3, 9, [3, 0, 1])
    got = ort_logits(out / "model.onnx", inputs)
    assert max_diff(built.task, got, hf_logits(built.hf_peft(), inputs), inputs) <= ATOL


def test_train_mode_programs_are_not_exported(tmp_path):
    from conftest import tiny_gpt2
    from peftc.exporters.onnx import export_program_onnx

    from peftc.program import capture

    program = capture(tiny_gpt2(), "causal-lm", mode="train")
    with pytest.raises(ConfigError, match="mode='eval'"):
        export_program_onnx(program, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()
