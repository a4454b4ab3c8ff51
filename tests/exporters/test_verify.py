"""Verification of exports: held-out cases, real-position comparison, figures and failures."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import tiny_bert, tiny_gpt2
from onnx_export_cases import CAPTURE_SHAPE
from peftc.exporters.verify import DEFAULT_ATOL, VerifyCase, compare_outputs, make_cases, run_torch, verify_artifact

from peftc.errors import ExportVerificationError
from peftc.program import capture


def _bound_program(built, merge: bool = False):
    """The family's adapted eval program, rebuilt from the saved base and adapter dirs."""
    from peftc.passes import insertion_pipeline, merge_pipeline

    from peftc.adapters import AdapterState
    from peftc.models import load_model

    program = capture(load_model(built.base_dir, built.task).model, built.task, mode="eval")
    state = AdapterState.load(built.adapter_dir)
    insertion_pipeline(state.config, state)(program)
    if merge:
        merge_pipeline()(program)
    return program


def test_default_tolerance_is_1e_4():
    assert DEFAULT_ATOL == 1e-4


@pytest.mark.parametrize("factory,task", [(tiny_gpt2, "causal-lm"), (tiny_bert, "seq-cls")], ids=["gpt2", "bert"])
def test_cases_are_held_out_and_padded(factory, task):
    program = capture(factory(), task, mode="eval")
    cases = make_cases(program)
    shapes = [c.shape for c in cases]
    assert CAPTURE_SHAPE not in shapes
    assert [1, 7] in shapes  # a batch of one
    assert len({s[0] for s in shapes}) == len(shapes) and len({s[1] for s in shapes}) == len(shapes)
    padded = [c for c in cases if c.padded]
    assert len(padded) == 1
    mask = padded[0].inputs["attention_mask"]
    pads = (mask == 0).sum(-1).tolist()
    assert len(set(pads)) == len(pads) and min(pads) == 0 and all(p < mask.shape[1] for p in pads)
    for case in cases:
        assert list(case.inputs) == program.input_names
        ids, mask = case.inputs["input_ids"], case.inputs["attention_mask"]
        assert (ids[mask == 1] != 0).all() and (ids[mask == 0] == 0).all()  # pad id 0 only on padding
        assert int(ids.max()) < 128
        if "position_ids" in case.inputs:
            assert torch.equal(case.inputs["position_ids"], (mask.cumsum(-1) - 1).clamp(min=0))


def test_cases_stay_within_the_model_positions():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=6)).eval()
    program = capture(model, "causal-lm", mode="eval", inputs=(torch.ones(2, 4, dtype=torch.long),) * 3)
    assert max(c.shape[1] for c in make_cases(program)) <= 6
    assert all((c.inputs["attention_mask"].sum(-1) > 0).all() for c in make_cases(program))


def test_llm_runner_cases_are_one_generation_in_order():
    """The in-program-cache layout (``tokens``, ``input_pos``) gets a generation's calls, not random tensors.

    Its cache is program state: cases with random positions would read what earlier runs left, and
    the merged and unmerged programs (run one after the other) would disagree where neither is wrong.
    """
    from peftc.exporting.llm import llm_runner

    model = tiny_gpt2()
    program = capture(model, "causal-lm", mode="eval", transform=llm_runner(16))
    cases = make_cases(program)
    assert [c.name for c in cases] == ["prefill", "decode0", "decode1", "decode2", "reprefill", "redecode"]
    positions = [c.inputs["input_pos"].tolist() for c in cases]
    assert positions == [[0, 1, 2, 3, 4], [5], [6], [7], [0, 1], [2]]
    first, again = run_torch(program, cases, program.input_names), run_torch(program, cases, program.input_names)
    for a, b in zip(first, again, strict=True):  # each call reads only what the calls before it wrote
        np.testing.assert_allclose(a, b, atol=1e-6)


def _case(mask_rows: list[list[int]]) -> VerifyCase:
    mask = torch.tensor(mask_rows)
    return VerifyCase("c", {"input_ids": torch.ones_like(mask), "attention_mask": mask})


def test_causal_lm_compares_real_positions_only():
    case = _case([[0, 0, 1, 1], [1, 1, 1, 1]])
    ref = np.zeros((2, 4, 5), dtype=np.float32)
    out = ref.copy()
    out[0, :2] = 7.0  # fully masked rows: never read, runtimes fill them differently
    report = compare_outputs([out], [ref], [case], "causal-lm")
    assert report.passed and report.cases[0].max_abs_diff == 0.0 and report.cases[0].compared == 6
    out[0, 2, 3] = 0.5  # a real position
    report = compare_outputs([out], [ref], [case], "causal-lm")
    assert not report.passed and report.cases[0].max_abs_diff == pytest.approx(0.5)


def test_seq_cls_compares_every_row():
    case = _case([[0, 0, 1, 1], [1, 1, 1, 1]])
    ref = np.zeros((2, 3), dtype=np.float32)
    out = ref.copy()
    out[0, 1] = 2e-4  # the padded row counts for classification
    report = compare_outputs([out], [ref], [case], "seq-cls", atol=1e-4)
    assert not report.passed and report.cases[0].compared == 2
    assert report.cases[0].max_abs_diff == pytest.approx(2e-4)
    assert compare_outputs([out], [ref], [case], "seq-cls", atol=3e-4).passed


def test_rtol_scales_each_outputs_bound_with_its_own_reference():
    """``atol + rtol × max |reference|`` per output: logits of magnitude 8 and presents of magnitude 100."""
    case = _case([[1, 1]])
    logits = np.full((1, 2, 3), 8.0, dtype=np.float32)
    present = np.full((1, 2, 2, 4), 100.0, dtype=np.float32)  # [batch, heads, positions, head_dim]
    off = [logits + 0.05, present + 0.5]  # 0.05 <= 0.02 + 0.01 * 8, 0.5 <= 0.02 + 0.01 * 100
    report = compare_outputs([off], [[logits, present]], [case], "causal-lm", atol=2e-2, rtol=1e-2)
    assert report.passed and report.max_abs_diff == pytest.approx(0.5)
    assert report.cases[0].limit == pytest.approx(0.1)  # the logits came closest to their bound (0.05 of 0.1)
    assert report.to_dict()["rtol"] == 1e-2 and str(report.tolerance) == "atol 0.02 + rtol 0.01 × max |reference|"
    assert not compare_outputs([off], [[logits, present]], [case], "causal-lm", atol=2e-2).passed  # rtol 0

    off = [logits + 0.11, present]  # the presents' scale does not stretch the logits' bound
    report = compare_outputs([off], [[logits, present]], [case], "causal-lm", atol=2e-2, rtol=1e-2)
    assert not report.passed
    with pytest.raises(ExportVerificationError, match=r"max abs diff 1\.100e-01 > 1\.000e-01 \(atol 0\.02 \+ rtol"):
        report.raise_if_failed()


def test_nan_and_shape_mismatch_fail():
    case = _case([[1, 1]])
    ref = np.zeros((1, 2, 3), dtype=np.float32)
    nan = ref.copy()
    nan[0, 1, 0] = np.nan
    report = compare_outputs([nan], [ref], [case], "causal-lm")
    assert not report.passed and math.isnan(report.cases[0].max_abs_diff)
    assert report.to_dict()["cases"][0]["max_abs_diff"] == "nan"  # valid JSON
    report = compare_outputs([ref[:, :1]], [ref], [case], "causal-lm")
    assert not report.passed and "shape" in report.cases[0].note


def test_failure_raises_with_figures():
    case = _case([[1, 1]])
    ref = np.zeros((1, 2, 3), dtype=np.float32)
    report = compare_outputs([ref + 0.25], [ref], [case], "causal-lm", candidate="X", reference="Y")
    with pytest.raises(ExportVerificationError, match=r"X does not reproduce Y: case 'c' \[1, 2\].*2\.500e-01") as info:
        report.raise_if_failed(hint="do this")
    assert info.value.exit_code == 3 and info.value.report is report
    assert str(info.value).endswith("do this") and "\n" not in str(info.value)


def test_verify_onnx_passes_on_the_exported_program(export_cases):
    built = export_cases.build("gpt2")
    program = _bound_program(built)
    report = verify_artifact("onnx", built.export(False) / "model.onnx", program)
    assert report.passed and [c.name for c in report.cases] == ["batch1", "reshaped", "left-padded"]
    assert report.candidate == "ONNX Runtime (model.onnx)" and report.reference == "the torch program"
    assert 0.0 < report.max_abs_diff < 1e-5  # ORT and torch reorder float sums: small, not zero
    left_padded = report.cases[-1]
    assert left_padded.padded and left_padded.compared == 4 * 12 - (3 + 6 + 11)


def test_verify_onnx_catches_a_different_model(export_cases):
    built = export_cases.build("gpt2")
    base_program = capture(tiny_gpt2(), "causal-lm", mode="eval")  # no adapter
    path = built.export(True) / "model.onnx"
    with pytest.raises(ExportVerificationError) as info:
        verify_artifact("onnx", path, base_program)
    assert info.value.report.max_abs_diff > 1e-2
    report = verify_artifact("onnx", path, base_program, raise_on_failure=False)
    assert not report.passed and all(not c.passed for c in report.cases)


def test_verify_onnx_compares_with_a_given_reference(export_cases):
    built = export_cases.build("gpt2")
    program = _bound_program(built, merge=True)
    cases = make_cases(program)
    reference = run_torch(program, cases, program.input_names)
    path = built.export(True) / "model.onnx"
    assert verify_artifact("onnx", path, program, cases, reference).passed
    shifted = [r + 1e-3 for r in reference]
    report = verify_artifact("onnx", path, program, cases, shifted, raise_on_failure=False, reference_name="shifted")
    assert not report.passed and report.reference == "shifted"
    assert all(abs(c.max_abs_diff - 1e-3) < 1e-5 for c in report.cases)
