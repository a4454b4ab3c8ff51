"""manifest.json and report.json of ONNX artifacts: interface, provenance, hashes, figures."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper
from onnx_export_cases import ATOL, CAPTURE_SHAPE, FAMILY_PARAMS, ID2LABEL
from peftc.exporters.manifest import check_manifest, file_hashes, onnx_io

import peftc


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


@pytest.mark.parametrize("merge", [False, True], ids=["unmerged", "merged"])
def test_manifest_hashes_every_file(export_cases, merge):
    out = export_cases.build("gpt2").export(merge)
    files = _manifest(out)["files"]
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert sorted(files) == [f for f in on_disk if f != "manifest.json"]
    assert {"model.onnx", "config.json", "report.json", "adapter/adapter_model.safetensors"} <= set(files)
    for name, digest in files.items():
        assert digest == _sha256(out / name), name
    assert check_manifest(out) == []


def test_check_manifest_reports_tampering(export_cases):
    copy = export_cases.scratch("tampered") / "artifact"
    shutil.copytree(export_cases.build("gpt2").export(True), copy)
    (copy / "config.json").write_text("{}")
    (copy / "extra.bin").write_bytes(b"x")
    (copy / "report.json").unlink()
    assert check_manifest(copy) == [
        "report.json: missing",
        "extra.bin: not in the manifest",
        "config.json: sha256 differs",
    ]


@pytest.mark.parametrize("merge", [False, True], ids=["unmerged", "merged"])
def test_manifest_records_method_adapter_versions_and_base(export_cases, merge):
    built = export_cases.build("gpt2")
    manifest = _manifest(built.export(merge))
    assert manifest["format"] == "onnx" and manifest["opset"] == 18
    assert manifest["task"] == "causal-lm" and manifest["optimum_task"] == "text-generation"
    assert manifest["merged"] is merge
    assert manifest["method"] == "LORA"
    adapter = manifest["adapter"]
    assert adapter["peft_type"] == "LORA" and adapter["name"] == built.run_dir.name
    assert adapter["sha256"] == _sha256(built.adapter_dir / "adapter_model.safetensors")
    assert adapter["sha256"] == manifest["files"]["adapter/adapter_model.safetensors"]
    assert adapter["config"]["r"] == 4
    versions = manifest["versions"]
    assert versions["torch"] == torch.__version__
    assert versions["onnx"] == onnx.__version__
    assert versions["onnxruntime"] == onnxruntime.__version__
    assert versions["peftc"] == peftc.__version__
    base = manifest["base_model"]
    assert base["source"] == str(built.base_dir) and base["model_type"] == "gpt2"
    assert base["architecture"] == "GPT2LMHeadModel"


def test_manifest_interface_matches_the_onnx_file(export_cases):
    out = export_cases.build("gpt2").export(True)
    manifest = _manifest(out)
    assert [i["name"] for i in manifest["inputs"]] == ["input_ids", "attention_mask", "position_ids"]
    for value in manifest["inputs"]:
        assert value["dtype"] == "int64" and value["shape"] == ["batch", "sequence"]
        assert value["dynamic_dims"] == {"0": "batch", "1": "sequence"} and value["static_dims"] == {}
    (logits,) = manifest["outputs"]
    assert logits == {
        "name": "logits",
        "dtype": "float32",
        "shape": ["batch", "sequence", 128],
        "dynamic_dims": {"0": "batch", "1": "sequence"},
        "static_dims": {"2": 128},
    }
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [i["name"] for i in manifest["inputs"]]
    props = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert props["peftc.merged"] == "true" and props["peftc.peft_type"] == "LORA"


@pytest.mark.parametrize("merge", [False, True], ids=["unmerged", "merged"])
def test_report_holds_the_verification_figures(export_cases, merge):
    report = json.loads((export_cases.build("gpt2").export(merge) / "report.json").read_text())
    assert report["verified"] is True and report["atol"] == ATOL
    assert report["max_abs_diff"] == max(c["max_abs_diff"] for c in report["onnx_vs_torch"]["cases"])
    onnx_vs_torch = report["onnx_vs_torch"]
    assert onnx_vs_torch["reference"] == "the unmerged adapted torch program"
    assert onnx_vs_torch["compared_at"] == "real (unpadded) positions"
    shapes = [c["shape"] for c in onnx_vs_torch["cases"]]
    assert CAPTURE_SHAPE not in shapes and any(c["padded"] for c in onnx_vs_torch["cases"])
    for case in onnx_vs_torch["cases"]:
        assert case["passed"] and 0.0 <= case["max_abs_diff"] <= ATOL
    if merge:
        merged = report["merged_vs_unmerged"]
        assert merged["passed"] and merged["candidate"] == "the merged torch program"
        assert all(c["max_abs_diff"] <= ATOL for c in merged["cases"])
    else:
        assert report["merged_vs_unmerged"] is None


def test_config_and_tokenizer_are_in_the_artifact(export_cases):
    from transformers import AutoConfig, AutoTokenizer

    built = export_cases.build("gpt2")
    out = built.export(True)
    config = AutoConfig.from_pretrained(out)
    assert config.model_type == "gpt2" and config.architectures == ["GPT2LMHeadModel"]
    assert "_attn_implementation" not in json.loads((out / "config.json").read_text())
    text = "w1 w2 w3"
    assert (
        AutoTokenizer.from_pretrained(out)(text)["input_ids"]
        == AutoTokenizer.from_pretrained(built.base_dir)(text)["input_ids"]
    )


@pytest.mark.slow
def test_seq_cls_artifact_carries_the_label_map(export_cases):
    out = export_cases.build("bert").export(True)
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {str(k): v for k, v in ID2LABEL.items()}
    manifest = _manifest(out)
    assert manifest["base_model"]["id2label"] == config["id2label"]
    assert manifest["optimum_task"] == "text-classification"
    assert [i["name"] for i in manifest["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert manifest["outputs"][0]["shape"] == ["batch", 3]
    report = json.loads((out / "report.json").read_text())
    assert report["onnx_vs_torch"]["compared_at"] == "every row"


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_every_family_manifest_verifies(export_cases, family):
    out = export_cases.build(family).export(False)
    assert check_manifest(out) == []
    assert json.loads((out / "report.json").read_text())["verified"] is True


def test_onnx_io_of_a_handmade_model():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    w = helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 2])  # an initializer listed as input
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", None])
    init = helper.make_tensor("w", TensorProto.FLOAT, [4, 2], [0.0] * 8)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x, w], [y], [init])
    inputs, outputs = onnx_io(helper.make_model(graph))
    assert inputs == [
        {
            "name": "x",
            "dtype": "float32",
            "shape": ["batch", 4],
            "dynamic_dims": {"0": "batch"},
            "static_dims": {"1": 4},
        }
    ]
    assert outputs[0]["shape"] == ["batch", None] and outputs[0]["dynamic_dims"] == {"0": "batch", "1": "?"}


def test_file_hashes_skip_the_manifest(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("b")
    (tmp_path / "manifest.json").write_text("{}")
    assert file_hashes(tmp_path) == {
        "a.txt": hashlib.sha256(b"a").hexdigest(),
        "sub/b.txt": hashlib.sha256(b"b").hexdigest(),
    }
