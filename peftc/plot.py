"""Training curves of a run as a picture (``peftc inspect RUN --plot curves.png``), with matplotlib.

Reads ``metrics.jsonl`` (one JSON object per line: ``{"type": "train", "step", "loss", "lr", …}`` and
``{"type": "eval", "step", "loss", "accuracy"|"perplexity", …}``). The top panel has the training
and the eval loss against the optimizer step on one axis (the same quantity: the gap between them is
what over-fitting looks like) and the learning rate on a second axis; the bottom panel, when the run
evaluated one, the task metric (accuracy; perplexity on a log scale when it spans a wide range).

A resumed run continues the same file (``peftc train --resume`` truncates it to the checkpoint, but a
file can still hold both attempts): a record whose step is not past the last one of its type, or is
behind any record read before, is where a resumed attempt took over, and the records it replaces —
at its step or later — are dropped (:func:`resume_segments`). Each curve is then one line with the
last record kept for each step. Lines cut short by a crash are skipped.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from peftc.errors import ConfigError, DataError, OutputExistsError
from peftc.files import write_atomic

__all__ = ["METRICS_FILE", "PLOT_FORMATS", "plot_curves", "read_metrics", "resume_segments", "series"]

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"  # the name peftc.training writes
PLOT_FORMATS = (".png", ".svg")
_TASK_METRICS = ("accuracy", "perplexity")
_COLORS = {"train": "#1f77b4", "eval": "#d62728", "lr": "#999999", "metric": "#2ca02c"}


def metrics_path(source: str | Path) -> Path:
    """``source`` itself when it is a file, else ``source/metrics.jsonl``.

    Raises:
        DataError: no metrics file is there.
    """
    path = Path(source)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise DataError(f"{path} does not exist; pass a run directory written by peftc train or its {METRICS_FILE}")
    return path


def read_metrics(source: str | Path) -> list[dict[str, Any]]:
    """The records of a run dir's ``metrics.jsonl`` (or of the file given), in file order.

    Blank lines and lines that are not a JSON object with a numeric ``step`` are skipped (a crash can
    cut the last line short); how many were skipped is logged.
    """
    path = metrics_path(source)
    records, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), (int, float)):
            bad += 1
            continue
        records.append(record)
    if bad:
        logger.info("%s: skipped %d unreadable line(s)", path, bad)
    return records


def resume_segments(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The records of one continuous run: what a resume replaced is dropped, order kept.

    A record at step ``s`` that does not move forward — a record of its type is already at ``s`` or
    later, or any record is past ``s`` — is where a resumed run took over: every record at ``s`` or
    later is dropped before it is appended (the loop logs a step's train record before its eval, so a
    resumed run's records at ``s`` all come after this one). What is left has, per type, strictly
    increasing steps: the last record for each step.
    """
    kept: list[dict[str, Any]] = []
    last: dict[str, float] = {}  # type -> last step kept
    for record in records:
        kind, step = record.get("type", "train"), record["step"]
        if step <= last.get(kind, -math.inf) or step < max(last.values(), default=-math.inf):
            kept = [r for r in kept if r["step"] < step]
            last = {}
            for r in kept:
                last[r.get("type", "train")] = r["step"]
        kept.append(dict(record))
        last[kind] = step
    return kept


def series(records: Iterable[Mapping[str, Any]], kind: str, key: str) -> tuple[list[float], list[float]]:
    """``(steps, values)`` of ``key`` in the records of type ``kind`` that have it as a finite number."""
    xs, ys = [], []
    for r in records:
        value = r.get(key)
        if r.get("type", "train") == kind and isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                xs.append(r["step"])
                ys.append(float(value))
    return xs, ys


def _check_out(out: str | Path, force: bool) -> Path:
    out = Path(out)
    if out.suffix.lower() not in PLOT_FORMATS:
        raise ConfigError(f"--plot {out}: unknown format {out.suffix or '(none)'!r}; use a name ending in .png or .svg")
    if out.is_dir():
        raise ConfigError(f"--plot {out} is a directory; give a file name such as {out / 'curves.png'}")
    if not out.parent.is_dir():
        raise ConfigError(f"--plot {out}: directory {out.parent} does not exist; create it or choose another path")
    if out.exists() and not force:
        raise OutputExistsError(f"--plot: {out} exists; pass --force to replace it, or choose another file")
    return out


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise ConfigError("--plot needs matplotlib, which is not installed; pip install 'peftc[plot]'") from e
    return matplotlib


def plot_curves(
    source: str | Path,
    out: str | Path,
    title: str | None = None,
    size: tuple[float, float] = (8.0, 6.0),
    dpi: int = 100,
    force: bool = False,
) -> Path:
    """Draw a run's training curves to ``out`` (``.png`` or ``.svg``); returns ``out``.

    Args:
        source: a run directory (its ``metrics.jsonl`` is read) or a metrics file.
        out: the picture to write (atomically: a temp file, then a rename).
        title: the figure's title (default: the run directory's name).
        size: figure size in inches; a PNG is ``size × dpi`` pixels.
        dpi: PNG resolution.
        force: replace an existing ``out``.

    Raises:
        ConfigError: ``out`` has another suffix or cannot be written there; matplotlib is missing.
        OutputExistsError: ``out`` exists and ``force`` is not set.
        DataError: no metrics file, or it holds no training record.
    """
    out = _check_out(out, force)
    _matplotlib()
    path = metrics_path(source)
    records = resume_segments(read_metrics(path))
    train_x, train_y = series(records, "train", "loss")
    if not train_x:
        raise DataError(f"{path} holds no training-loss record; a run logs one every --log-every steps")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    eval_x, eval_y = series(records, "eval", "loss")
    metric = next((m for m in _TASK_METRICS if series(records, "eval", m)[0]), None)
    panels = 2 if metric else 1
    fig = Figure(figsize=size, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False, height_ratios=[3, 2][:panels])[:, 0]
    ax = axes[0]
    marker = "." if len(train_x) < 30 else None
    ax.plot(train_x, train_y, color=_COLORS["train"], lw=1.6, marker=marker, label="training loss")
    if eval_x:
        ax.plot(eval_x, eval_y, color=_COLORS["eval"], lw=1.4, marker="o", ms=4, label="eval loss")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    lr_x, lr_y = series(records, "train", "lr")
    handles, labels = ax.get_legend_handles_labels()
    if lr_x:
        twin = ax.twinx()
        (lr_line,) = twin.plot(lr_x, lr_y, color=_COLORS["lr"], lw=1, ls="--", label="learning rate")
        twin.set_ylabel("learning rate", color=_COLORS["lr"])
        twin.tick_params(axis="y", colors=_COLORS["lr"])
        twin.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        twin.set_ylim(bottom=0)
        handles, labels = [*handles, lr_line], [*labels, "learning rate"]
    ax.legend(handles, labels, loc="upper right", fontsize=8, framealpha=0.85)
    if metric:
        ax = axes[1]
        mx, my = series(records, "eval", metric)
        ax.plot(mx, my, color=_COLORS["metric"], lw=1.6, marker="s", ms=4)
        ax.set_ylabel(f"eval {metric}")
        ax.grid(True, alpha=0.3)
        if metric == "accuracy":
            ax.set_ylim(max(0.0, min(min(my) - 0.05, 0.5)), 1.0)
        elif min(my) > 0 and max(my) / min(my) > 20:
            ax.set_yscale("log")
    axes[-1].set_xlabel("optimizer step")
    fig.suptitle(_title(path, title, records, train_x, train_y, eval_y, metric), fontsize=10)
    _save(fig, out)
    return out


def _title(
    path: Path,
    title: str | None,
    records: list[dict[str, Any]],
    train_x: list[float],
    train_y: list[float],
    eval_y: list[float],
    metric: str | None,
) -> str:
    """``title`` or "run · model · method · task", then the final figures."""
    if title is None:
        parts = [path.parent.name if path.name == METRICS_FILE else path.stem]
        run = path.parent / "run.json"
        if run.is_file():
            try:
                info = json.loads(run.read_text())
                parts += [str((info.get("model") or {}).get("spec") or ""), str(info.get("method") or "")]
                parts.append(str(info.get("task") or ""))
            except (ValueError, AttributeError):
                pass
        title = " · ".join(p for p in parts if p)
    final = f"final training loss {train_y[-1]:.4g} at step {train_x[-1]:g}"
    if metric:
        final += f"; eval {metric} {series(records, 'eval', metric)[1][-1]:.4g}"
    elif eval_y:
        final += f"; eval loss {eval_y[-1]:.4g}"
    return f"{title}\n{final}" if title else final


def _save(fig: Any, out: Path) -> None:
    """Write ``fig`` whole (reproducible SVG: fixed ids, no date) then rename it into place."""
    import io

    import matplotlib

    buf = io.BytesIO()
    if out.suffix.lower() == ".svg":
        with matplotlib.rc_context({"svg.hashsalt": "peftc", "svg.fonttype": "path"}):
            fig.savefig(buf, format="svg", metadata={"Date": None})
    else:
        fig.savefig(buf, format="png", metadata={"Software": None})
    write_atomic(out, buf.getvalue())


def describe_curves(records: list[Mapping[str, Any]]) -> dict[str, Any]:
    """What a plot shows, as numbers (for ``--json``): points per curve and the last values."""
    records = resume_segments(records)
    out: dict[str, Any] = {}
    for kind, key in [("train", "loss"), ("train", "lr"), ("eval", "loss"), *[("eval", m) for m in _TASK_METRICS]]:
        xs, ys = series(records, kind, key)
        if xs:
            out[f"{kind}/{key}"] = {"points": len(xs), "last_step": xs[-1], "last": ys[-1]}
    return out
