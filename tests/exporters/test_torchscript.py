"""TorchScript export: torch.jit.load of model.pt vs HF PEFT on held-out shapes, interface, negatives."""

from __future__ import annotations

import json
import operator
import zipfile

import pytest
import torch
from conftest import captured
from cpp_cases import ATOL, SHAPES, hf_logits, make_inputs, max_diff
from peftc.exporters.manifest import program_io
from peftc.exporters.torchscript import EXTRA_FILE, export_program_torchscript, load_torchscript, run_torchscript
from peftc.exporters.verify import make_cases, run_torch, verify_artifact

from peftc.errors import CaptureError, ConfigError, ExportVerificationError


@pytest.mark.parametrize("merge", [False, True], ids=["unmerged", "merged"])
def test_torchscript_matches_hf_peft_on_new_shapes(cpp_cases, merge, tmp_path):
    built = cpp_cases.gpt2_lora()
    program = built.program(merge)
    path = export_program_torchscript(program, tmp_path / "model.pt")
    module = torch.jit.load(str(path))
    for batch, seq, pads in SHAPES:
        inputs = make_inputs(program.input_names, batch, seq, pads)
        with torch.no_grad():
            got = module(*inputs.values()).numpy()
        assert max_diff(got, hf_logits(built.peft_model, inputs), inputs) <= ATOL, (batch, seq, pads)
        # the adapter is not the identity: the artifact is far from the bare base model
        assert max_diff(got, hf_logits(built.base_model, inputs), inputs) > 1e-2


def test_verify_torchscript_reports_every_case(cpp_cases, tmp_path):
    program = cpp_cases.gpt2_lora().program(merge=True)
    path = export_program_torchscript(program, tmp_path / "model.pt")
    report = verify_artifact("torchscript", path, program)
    assert report.passed
    assert [c.name for c in report.cases] == ["batch1", "reshaped", "left-padded"]
    assert [c.shape for c in report.cases] == [[1, 7], [3, 5], [4, 12]]
    # scripting keeps the ATen ops: same kernels, same order -> bit-identical here
    assert report.max_abs_diff <= 1e-6, report.summary()


def test_verify_torchscript_fails_against_another_model(cpp_cases, tmp_path):
    program = cpp_cases.gpt2_lora().program(merge=True)
    path = export_program_torchscript(program, tmp_path / "model.pt")
    base, _ = captured("gpt2", "causal-lm")
    cases = make_cases(program)
    reference = run_torch(base, cases, base.input_names)
    with pytest.raises(ExportVerificationError) as info:
        verify_artifact("torchscript", path, program, cases, reference, reference_name="the base")
    assert not info.value.report.passed
    assert "TorchScript (model.pt) does not reproduce the base" in str(info.value)


def test_interface_is_named_and_program_untouched(cpp_cases, tmp_path):
    program = cpp_cases.gpt2_lora().program(merge=False)
    lora = [t for k, t in program.adapter.tensors.items() if "lora_" in k]
    for tensor in lora:
        tensor.requires_grad_(True)  # as during training
    nodes_before = len(program.graph.nodes)
    path = export_program_torchscript(program, tmp_path / "model.pt", metadata={"peftc.peft_type": "LORA"})
    module, info = load_torchscript(path)
    arguments = [a.name for a in module.forward.schema.arguments][1:]  # skip self
    assert arguments == program.input_names == ["input_ids", "attention_mask", "position_ids"]
    assert info["input_names"] == info["argument_names"] == program.input_names
    assert info["output_names"] == ["logits"]
    assert info["task"] == "causal-lm" and info["peftc.peft_type"] == "LORA"
    assert info["dynamic_dims"]["input_ids"] == {"0": "batch", "1": "sequence"}
    with zipfile.ZipFile(path) as archive:  # stored as a plain file a runtime can read without torch
        assert any(name.endswith(f"extra/{EXTRA_FILE}") for name in archive.namelist())
        json.loads(archive.read(next(n for n in archive.namelist() if n.endswith(EXTRA_FILE))))
    assert not any(p.requires_grad for p in module.parameters())
    # exporting neither rewrote the program's graph nor froze its (trainable) adapter tensors
    assert len(program.graph.nodes) == nodes_before
    assert lora and all(t.requires_grad for t in lora)


def test_ia3_unmerged_program(tmp_path):
    from peftc.passes import insertion_pipeline

    from peftc.config import IA3Config

    program, _ = captured("gpt2", "causal-lm")
    base = run_torch(program, make_cases(program), program.input_names)
    insertion_pipeline(IA3Config(task_type="CAUSAL_LM"))(program)
    with torch.no_grad():
        for tensor in program.adapter.tensors.values():
            tensor.mul_(1.5)  # l = 1 at init is the identity
    path = export_program_torchscript(program, tmp_path / "model.pt")
    report = verify_artifact("torchscript", path, program)
    assert report.max_abs_diff <= ATOL
    far = run_torchscript(path, make_cases(program), program.input_names)
    assert max(abs(a - b).max() for a, b in zip(far, base, strict=True)) > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "task"), [("llama", "causal-lm"), ("bert", "seq-cls"), ("llama", "seq-cls")], ids=lambda x: x
)
@pytest.mark.parametrize("merge", [False, True], ids=["unmerged", "merged"])
def test_other_families(family, task, merge, tmp_path):
    """LLaMA (GQA, rotary embedding inside a higher-order region) and BERT (token_type_ids, seq-cls)."""
    from peftc.passes import insertion_pipeline, merge_pipeline

    from peftc.config import LoraConfig

    program, _ = captured(family, task)
    seq_cls = task == "seq-cls"
    config = LoraConfig(r=4, task_type="SEQ_CLS" if seq_cls else "CAUSAL_LM")
    insertion_pipeline(config)(program)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for key, tensor in program.adapter.tensors.items():
            if "lora_B" in key:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.1)
    if merge:
        merge_pipeline()(program)
    path = export_program_torchscript(program, tmp_path / "model.pt")
    assert verify_artifact("torchscript", path, program).max_abs_diff <= ATOL


def test_train_mode_program_is_refused(tmp_path):
    program, _ = captured("gpt2", "causal-lm", mode="train")
    with pytest.raises(ConfigError, match="train-mode program"):
        export_program_torchscript(program, tmp_path / "model.pt")
    assert not (tmp_path / "model.pt").exists()


def test_node_without_torchscript_equivalent_is_named(cpp_cases, tmp_path):
    program = cpp_cases.gpt2_lora().program(merge=True)
    output = program.graph.output_node()
    with program.graph.inserting_before(output):
        odd = program.graph.call_function(operator.pos, (1,))  # a Python builtin TorchScript export does not map
    odd.name = "odd_node"
    with pytest.raises(CaptureError, match="no equivalent for 'pos'.*odd_node.*--format onnx or aoti"):
        export_program_torchscript(program, tmp_path / "model.pt")


def test_program_io_describes_inputs_and_outputs_like_onnx_io():
    from peftc.passes import insertion_pipeline

    from peftc.config import PromptTuningConfig

    program, _ = captured("bert", "seq-cls")
    inputs, outputs = program_io(program)
    assert [i["name"] for i in inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(i["dtype"] == "int64" and i["shape"] == ["batch", "sequence"] for i in inputs)
    assert outputs == [
        {
            "name": "logits",
            "dtype": "float32",
            "shape": ["batch", 3],
            "dynamic_dims": {"0": "batch"},
            "static_dims": {"1": 3},
        }
    ]
    program, _ = captured("gpt2", "causal-lm")
    insertion_pipeline(PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))(program)
    _, outputs = program_io(program)
    assert outputs[0]["shape"] == ["batch", "sequence + 4", 128]  # virtual tokens lengthen the logits


def test_peftc_export_format_torchscript(export_cases):
    """``peftc export --format torchscript --merge``: a verified artifact directory."""
    from onnx_export_cases import hf_logits, make_inputs

    from peftc.exporting import export

    built = export_cases.build("gpt2")
    out = export(built.run_dir, format="torchscript", merge=True, out=built.run_dir.parent / "export-torchscript")
    manifest = json.loads((out / "manifest.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert manifest["format"] == "torchscript" and manifest["model_file"] == "model.pt" and manifest["merged"]
    assert [i["name"] for i in manifest["inputs"]] == ["input_ids", "attention_mask", "position_ids"]
    assert manifest["outputs"][0]["shape"] == ["batch", "sequence", 128]
    assert report["verified"] and report["torchscript_vs_torch"]["max_abs_diff"] <= ATOL
    module = torch.jit.load(str(out / "model.pt"))
    inputs = make_inputs("causal-lm", manifest["argument_names"], 3, 9, [3, 0, 1])
    with torch.no_grad():
        got = module(*inputs.values()).numpy()
    assert max_diff(got, hf_logits(built.hf_peft(), inputs), inputs) <= ATOL
