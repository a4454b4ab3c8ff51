"""``peftc.plot``: training curves from ``metrics.jsonl``, and a resumed run drawn as one line."""

from __future__ import annotations

import json
import struct
import sys
import xml.etree.ElementTree as ET

import pytest

from peftc.errors import ConfigError, DataError, OutputExistsError
from peftc.plot import describe_curves, plot_curves, read_metrics, resume_segments, series

pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'peftc[plot]')")


def train(step, loss, lr=1e-3):
    return {"type": "train", "step": step, "epoch": step / 40, "loss": loss, "lr": lr, "grad_norm": 0.5}


def evaluation(step, loss, **metric):
    return {"type": "eval", "step": step, "epoch": step / 40, "loss": loss, "examples": 16, **metric}


def write_metrics(path, records, extra_lines=()):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# -- resumed runs ----------------------------------------------------------------------------------


def steps(records, kind="train"):
    return [(r["step"], r["loss"]) for r in records if r["type"] == kind]


def test_a_run_that_never_resumed_is_kept_as_is():
    records = [train(10, 3.0), train(20, 2.0), evaluation(20, 2.1, accuracy=0.5), train(30, 1.5)]
    assert resume_segments(records) == records


def test_resume_keeps_the_last_record_for_each_step():
    # crashed after step 40 (checkpoint at 20), resumed: 30 and 40 are logged again
    records = [train(10, 3.0), train(20, 2.5), train(30, 2.2), train(40, 2.1)]
    records += [train(30, 2.0), train(40, 1.8), train(50, 1.6)]
    assert steps(resume_segments(records)) == [(10, 3.0), (20, 2.5), (30, 2.0), (40, 1.8), (50, 1.6)]


def test_resume_drops_records_of_every_type_after_the_resume_point():
    records = [train(10, 3.0), evaluation(10, 2.9, accuracy=0.4), train(20, 2.5), evaluation(20, 2.4, accuracy=0.5)]
    records += [train(20, 2.45), train(30, 2.0), evaluation(30, 1.9, accuracy=0.7)]
    out = resume_segments(records)
    assert steps(out) == [(10, 3.0), (20, 2.45), (30, 2.0)]
    # the eval at step 20 belongs to the abandoned attempt (the resumed train record at 20 came after it)
    assert steps(out, "eval") == [(10, 2.9), (30, 1.9)]


def test_a_shorter_resumed_run_leaves_no_stale_tail():
    # the first attempt reached 50; the resumed one (from 20) stops at 30: 40 and 50 must not survive
    records = [train(s, 3.0 - s / 100) for s in (10, 20, 30, 40, 50)] + [train(30, 1.0)]
    assert steps(resume_segments(records)) == [(10, 2.9), (20, 2.8), (30, 1.0)]


def test_eval_and_train_at_the_same_step_are_not_a_resume():
    records = [
        train(10, 3.0),
        evaluation(10, 2.8, perplexity=16.4),
        train(20, 2.0),
        evaluation(20, 1.9, perplexity=6.7),
    ]
    assert resume_segments(records) == records
    assert series(records, "eval", "perplexity") == ([10, 20], [16.4, 6.7])


def test_read_metrics_skips_lines_a_crash_cut_short(tmp_path):
    path = write_metrics(tmp_path / "run" / "metrics.jsonl", [train(10, 3.0)], ['{"type": "train", "st', "[1]", ""])
    assert read_metrics(tmp_path / "run") == [train(10, 3.0)]
    assert read_metrics(path) == [train(10, 3.0)]
    with pytest.raises(DataError, match="does not exist"):
        read_metrics(tmp_path / "nothing")


# -- pictures --------------------------------------------------------------------------------------


@pytest.fixture
def resumed_run(tmp_path):
    records = [train(10, 3.75), train(20, 3.5), evaluation(20, 3.6, accuracy=0.55), train(30, 3.25), train(40, 3.0)]
    records += [evaluation(40, 3.2, accuracy=0.62), train(50, 2.75), train(60, 2.5)]  # crashed; checkpoint at 30
    records += [train(40, 2.5), train(50, 2.4), train(60, 2.3), evaluation(60, 2.9, accuracy=0.71)]  # resumed
    run = tmp_path / "run"
    write_metrics(run / "metrics.jsonl", records)
    (run / "run.json").write_text(json.dumps({"task": "seq-cls", "method": "lora", "model": {"spec": "minilm"}}))
    return run


def test_png_of_a_resumed_run(resumed_run, tmp_path):
    out = plot_curves(resumed_run, tmp_path / "curves.png")
    assert out == tmp_path / "curves.png" and out.stat().st_size > 10_000
    assert png_size(out) == (800, 600)  # 8 × 6 inches at 100 dpi
    shown = describe_curves(read_metrics(resumed_run))
    assert shown["train/loss"] == {"points": 6, "last_step": 60, "last": 2.3}
    assert shown["eval/accuracy"] == {"points": 2, "last_step": 60, "last": 0.71}  # the eval at 40 was replaced
    big = plot_curves(resumed_run, tmp_path / "big.png", size=(10, 4), dpi=150)
    assert png_size(big) == (1500, 600)


def test_svg_is_well_formed_and_reproducible(resumed_run, tmp_path):
    first = plot_curves(resumed_run / "metrics.jsonl", tmp_path / "a.svg", title="my run").read_text()
    second = plot_curves(resumed_run, tmp_path / "b.svg", title="my run").read_text()
    assert first == second
    root = ET.fromstring(first)
    assert root.tag.endswith("svg") and len(first) < 200_000


def test_train_only_and_perplexity_runs(tmp_path):
    run = tmp_path / "lm"
    write_metrics(run / "metrics.jsonl", [train(s, 10.0 / s) for s in (1, 2, 3)])
    assert png_size(plot_curves(run, tmp_path / "one-panel.png")) == (800, 600)
    write_metrics(run / "metrics.jsonl", [train(10, 5.0), evaluation(10, 4.0, perplexity=54.6)])
    assert plot_curves(run, tmp_path / "ppl.png").stat().st_size > 0


def test_errors(resumed_run, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"unknown format '.jpg'; use a name ending in .png or .svg"):
        plot_curves(resumed_run, tmp_path / "x.jpg")
    with pytest.raises(ConfigError, match="does not exist; create it"):
        plot_curves(resumed_run, tmp_path / "missing" / "x.png")
    (tmp_path / "x.png").write_bytes(b"old")
    with pytest.raises(OutputExistsError, match="pass --force"):
        plot_curves(resumed_run, tmp_path / "x.png")
    assert plot_curves(resumed_run, tmp_path / "x.png", force=True).stat().st_size > 3
    empty = tmp_path / "empty"
    write_metrics(empty / "metrics.jsonl", [evaluation(10, 2.0, accuracy=0.5)])
    with pytest.raises(DataError, match="holds no training-loss record"):
        plot_curves(empty, tmp_path / "e.png")
    with pytest.raises(DataError, match="does not exist"):
        plot_curves(tmp_path / "no-run", tmp_path / "n.png")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ConfigError) as exc:
        plot_curves(resumed_run, tmp_path / "m.png")
    assert str(exc.value) == "--plot needs matplotlib, which is not installed; pip install 'peftc[plot]'"
