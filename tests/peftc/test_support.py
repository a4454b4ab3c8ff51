"""peftc.support: the support matrix's cells, its per-cell checks and its report.

The reporting tests use made-up results (no model); the cell tests run one cell per task family that
works end to end (HF PEFT's files → peftc with parity, a training step, HF PEFT loading peftc's
adapter, merge, a verified ONNX export), ~10-40 s each, so they are slow. The whole matrix is
``python -m peftc.support --out docs/support.md`` (README, "Support matrix").
"""

from __future__ import annotations

import pytest

from peftc import support
from peftc.support import Cell, CellResult, cells, check_cell, render


def _cell(key: str) -> Cell:
    return next(c for c in cells() if c.key == key)


def test_the_table_has_hf_peft_s_107_cells():
    all_cells = cells()
    assert len(all_cells) == 107
    assert len({c.key for c in all_cells}) == 107
    per_task = {}
    for c in all_cells:
        per_task[c.task] = per_task.get(c.task, 0) + 1
    assert per_task == {
        "causal-lm": 40,
        "seq2seq": 10,
        "seq-cls": 36,
        "token-cls": 16,
        "text-to-image": 1,
        "image-cls": 2,
        "image-to-text": 1,
        "semantic-segmentation": 1,
    }


def test_report_marks_each_cell_and_gives_failing_reasons():
    ok = CellResult(_cell("causal-lm/gpt2/lora"), "pass", "", {"load": "max |Δ| vs HF PEFT 0", "onnx": "verified"})
    bad = CellResult(
        _cell("causal-lm/gpt2/prefix-tuning"), "fail", "onnx: ExportVerificationError: 2e-3 > 1e-4", {"load": "0"}
    )
    noref = CellResult(_cell("seq-cls/roberta/prefix-tuning"), "noref", "no HF PEFT reference (its forward fails)")
    text = render([ok, bad, noref], "python -m peftc.support --out docs/support.md")
    assert "python -m peftc.support --out docs/support.md" in text.splitlines()[2]  # how to regenerate it
    assert "**3 cells: 1 ✅, 1 ❌, 1 ⚪.**" in text
    assert "| GPT-2 | ✅ | ❌ |  |  |  |" in text  # cells not run (or not in HF PEFT's table) stay blank
    assert "- GPT-2 × Prefix Tuning: ❌ onnx: ExportVerificationError: 2e-3 > 1e-4" in text
    assert "- RoBERTa × Prefix Tuning: ⚪ no HF PEFT reference (its forward fails)" in text
    assert "Token Classification" not in text  # sections with no cell run are left out


def test_a_failing_cell_is_reported_with_its_step_and_first_line(monkeypatch):
    def broken(family, task):
        raise RuntimeError("no such model\nsecond line never shown")

    monkeypatch.setattr(support, "build_model", broken)
    result = check_cell(_cell("seq-cls/bert/lora"))
    assert result.status == "fail"
    assert result.reason == "build: RuntimeError: no such model"


def test_a_task_peftc_lacks_is_not_implemented_until_the_task_registry_has_it(monkeypatch):
    from peftc.tasks import TASKS

    # the registry decides, not the runner: without its entry, a task that runs today is "not implemented"
    monkeypatch.delitem(TASKS, "image-to-text", raising=False)
    result = check_cell(_cell("image-to-text/blip2/lora"))
    assert result.status == "fail" and result.reason.startswith("task: task not implemented")
    monkeypatch.delitem(TASKS, "image-cls")
    assert check_cell(_cell("image-cls/vit/lora")).reason.startswith("task: task not implemented")


def test_a_cell_over_its_time_limit_fails_with_the_step_it_was_in(monkeypatch):
    def slow(family, task):
        raise support._TimeLimit

    monkeypatch.setattr(support, "build_model", slow)
    result = check_cell(_cell("seq-cls/bert/lora"))
    assert (result.status, result.reason) == ("fail", "build: time limit reached")


def test_only_that_matches_nothing_is_an_error(capsys):
    assert support.main(["--only", "no/such/cell"]) == 2
    assert "matched no cell" in capsys.readouterr().err


#: One cell per task family, end to end (OPT/GPT-J token-cls: tests/peftc/test_token_cls_heads.py; BLIP-2's export and
#: generation: tests/peftc/test_blip2.py).
SLICE = [
    "causal-lm/opt/prompt-tuning",
    "seq-cls/bert/lora",
    "token-cls/roberta/prefix-tuning",
    "seq2seq/bart/p-tuning",
    "image-cls/vit/lora",
    "semantic-segmentation/segformer/lora",
    "text-to-image/stable_diffusion/lora",
]


@pytest.mark.slow
@pytest.mark.parametrize("key", SLICE)
def test_matrix_slice(tmp_path, key):
    result = check_cell(_cell(key), tmp_path)
    print(key, result.status, result.reason, result.checks)
    assert result.status == "pass", result.reason
    assert "vs HF PEFT" in result.checks["load"] and result.checks["onnx"].startswith("verified")


def test_docs_support_md_was_generated_by_this_runner():
    """docs/support.md is regenerated whenever the cells change: it records the runner's sha256."""
    from pathlib import Path

    doc = Path(__file__).resolve().parents[2] / "docs" / "support.md"
    recorded = support.recorded_digest(doc.read_text(encoding="utf-8"))
    assert recorded == support.runner_digest(), (
        "peftc/support.py changed since docs/support.md was generated: "
        "run `python -m peftc.support --out docs/support.md --jobs 2` and commit the result"
    )


def test_render_records_the_runner_digest():
    text = render([], "python -m peftc.support")
    assert support.recorded_digest(text) == support.runner_digest()
    assert support.recorded_digest("# Support matrix\n") is None
