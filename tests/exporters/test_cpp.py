"""examples/cpp built against the wheel's LibTorch: it loads model.pt and model.pt2 and prints HF PEFT's logits.

The build (CMake, or the documented g++ line without CMake) runs once per process; without a C++
compiler or LibTorch headers every test here skips with that reason.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import captured
from cpp_cases import ATOL, hf_logits, ids_arg, make_inputs, max_diff, parse_logits
from peftc.exporters.torchscript import export_program_torchscript

pytestmark = pytest.mark.slow  # building the example costs about a minute of g++

NAMES = ["input_ids", "attention_mask", "position_ids"]


def _ragged_batch() -> dict[str, torch.Tensor]:
    """Three rows, two of them shorter: the C++ side left-pads them and derives the mask."""
    return make_inputs(NAMES, 3, 9, [0, 4, 2], seed=3)


@pytest.fixture(scope="module")
def merged_pt(cpp_cases):
    return export_program_torchscript(
        cpp_cases.gpt2_lora().program(merge=True), cpp_cases.scratch("cpp-ts") / "model.pt"
    )


def _check_against_python(cpp_cases, model_path, inputs):
    built = cpp_cases.gpt2_lora()
    done = cpp_cases.run_cpp(str(model_path), "--ids", ids_arg(inputs["input_ids"], inputs["attention_mask"]))
    assert done.returncode == 0, done.stderr
    got = parse_logits(done.stdout)
    assert got.shape == (3, 9, 128)
    assert max_diff(got, hf_logits(built.peft_model, inputs), inputs) <= ATOL
    assert max_diff(got, hf_logits(built.base_model, inputs), inputs) > 1e-2  # the adapter is in there
    program = built.program(merge=True)
    with torch.no_grad():
        want = program(*inputs.values()).numpy()
    assert max_diff(got, want, inputs) <= ATOL


def test_cpp_runs_torchscript(cpp_cases, merged_pt):
    _check_against_python(cpp_cases, merged_pt, _ragged_batch())


def test_cpp_runs_aoti_package(cpp_cases):
    _check_against_python(cpp_cases, cpp_cases.aoti_package(), _ragged_batch())


def test_cpp_explicit_mask_and_input_names_on_seq_cls(cpp_cases, tmp_path):
    """BERT seq-cls (token_type_ids, no positions): --mask given, --inputs overriding the schema's names."""
    from peftc.passes import insertion_pipeline

    from peftc.config import LoraConfig

    program, _ = captured("bert", "seq-cls")
    insertion_pipeline(LoraConfig(r=4, task_type="SEQ_CLS"))(program)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for key, tensor in program.adapter.tensors.items():
            if "lora_B" in key:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.1)
    path = export_program_torchscript(program, tmp_path / "model.pt")
    inputs = make_inputs(program.input_names, 2, 6, [0, 0], seed=4)
    inputs["attention_mask"][1, 4:] = 0  # right padding, given explicitly
    ids = ";".join(",".join(map(str, row)) for row in inputs["input_ids"].tolist())
    mask = ";".join(",".join(map(str, row)) for row in inputs["attention_mask"].tolist())
    done = cpp_cases.run_cpp(str(path), "--ids", ids, "--mask", mask, "--inputs", ",".join(program.input_names))
    assert done.returncode == 0, done.stderr
    with torch.no_grad():
        want = program(*inputs.values()).numpy()
    got = parse_logits(done.stdout)
    assert got.shape == (2, 3)
    assert np.abs(got - want).max() <= ATOL


def test_cpp_bench_reports_latency(cpp_cases, merged_pt):
    done = cpp_cases.run_cpp(str(merged_pt), "--ids", "5,6,7,8", "--threads", "1", "--bench", "3")
    assert done.returncode == 0, done.stderr
    assert "latency_ms median=" in done.stderr and "runs=3" in done.stderr


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["{model}", "--ids", "1,x"], 2, "--ids: 'x' is not an integer"),
        (["{model}"], 2, "no --ids given"),
        (["{model}", "--ids", "1,2;3", "--mask", "1,1;1"], 2, "every row of --ids and --mask needs 2 entries"),
        (["{model}", "--ids", "1,2", "--inputs", "input_ids,labels"], 2, "input named 'labels'"),
        (["{missing}", "--ids", "1,2"], 1, "does not exist"),
        (["{model}.onnx", "--ids", "1,2"], 2, "must end in .pt (TorchScript) or .pt2"),
    ],
    ids=["bad-id", "no-ids", "ragged-mask", "unknown-input", "missing-file", "wrong-suffix"],
)
def test_cpp_errors_are_one_line(cpp_cases, merged_pt, tmp_path, args, code, message):
    args = [a.format(model=merged_pt, missing=tmp_path / "none.pt") for a in args]
    if args[0].endswith(".onnx"):
        (tmp_path / "m.onnx").write_bytes(b"")
        args[0] = str(tmp_path / "m.onnx")
    done = cpp_cases.run_cpp(*args)
    assert done.returncode == code, (done.returncode, done.stderr)
    first = done.stderr.splitlines()[0]
    assert first.startswith("peftc_run: error: ") and message in first, done.stderr
    assert done.stdout == ""
