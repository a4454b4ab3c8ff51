"""The reporter interface, the registry of tracker backends, and ``--report-to`` parsing.

A :class:`Reporter` receives every record the training loop writes to ``metrics.jsonl`` —
``{"type": "train", "step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s"?, "peak_memory_mb"?}``
and ``{"type": "eval", "step", "epoch", "loss", "accuracy"|"perplexity", "examples"}`` — and sends it
to one experiment tracker through that tracker's own library. Each backend module registers one
:class:`ReporterSpec` (name, the module it needs, the pip extra that brings it, a factory), so
``make_reporters("tensorboard,mlflow", run_dir)`` asks the registry and names no backend itself.

Scalars are named ``<type>/<field>`` (``train/loss``, ``eval/accuracy``) at the record's ``step``,
the layout every tracker's UI groups by prefix. Under ``torchrun`` only rank 0 reports: the other
ranks still validate ``--report-to`` (so a typo fails everywhere, not only on rank 0) and get an
empty :class:`Reporters`.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from peftc.errors import ConfigError

__all__ = [
    "NO_REPORT",
    "Reporter",
    "ReporterSpec",
    "Reporters",
    "available_reporters",
    "check_installed",
    "make_reporters",
    "parse_report_to",
    "process_rank",
    "register_reporter",
    "report_to_help",
    "scalars",
]

logger = logging.getLogger(__name__)

#: The ``--report-to`` value that turns reporting off (the default).
NO_REPORT = "none"
#: Record fields that are not scalars to plot: the x axis and the record kind.
_NOT_SCALARS = frozenset({"type", "step"})


@runtime_checkable
class Reporter(Protocol):
    """One experiment tracker: receives metrics records, and is closed once at the end of training."""

    def log(self, record: Mapping[str, Any]) -> None:
        """Send one ``metrics.jsonl`` record (a dict with ``type`` and ``step``) to the tracker."""

    def close(self) -> None:
        """Flush and finish the tracker's run; called once, also when training fails."""


@dataclass(frozen=True)
class ReporterSpec:
    """A tracker backend as ``--report-to`` knows it.

    Attributes:
        name: the ``--report-to`` name (``tensorboard``).
        requires: the importable module the backend needs (``tensorboard``); checked before training.
        extra: the peftc pip extra that installs it (``pip install 'peftc[tensorboard]'``).
        factory: ``factory(run_dir, config=..., resume_step=...)`` → a :class:`Reporter`. Backends
            open their tracker lazily, at the first record, so nothing is written before the run
            directory exists.
        where: one line saying where the records go, for ``--help`` and the log.
    """

    name: str
    requires: str
    extra: str
    factory: Callable[..., Reporter]
    where: str = ""


_REGISTRY: dict[str, ReporterSpec] = {}


def register_reporter(spec: ReporterSpec) -> ReporterSpec:
    """Add a backend to the registry (each backend module calls this once, when imported)."""
    if spec.name == NO_REPORT or (spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec):
        raise ValueError(f"reporter {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def available_reporters() -> list[ReporterSpec]:
    """Every registered backend, in registration order."""
    import peftc.reporting  # noqa: F401  (imports the backend modules, which register themselves)

    return list(_REGISTRY.values())


def process_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's global rank: ``RANK`` (set by ``torchrun``), else ``LOCAL_RANK``, else 0.

    ``torch.distributed`` is asked first when it is initialised (a launcher that sets no variables).
    """
    if env is None:
        env = os.environ
        import sys

        dist = getattr(sys.modules.get("torch"), "distributed", None)
        if dist is not None and dist.is_available() and dist.is_initialized():
            return int(dist.get_rank())
    for var in ("RANK", "LOCAL_RANK"):
        value = env.get(var, "").strip()
        if value:
            try:
                return int(value)
            except ValueError as e:
                raise ConfigError(f"{var}={value!r} is not an integer rank; unset it or set it as torchrun does") from e
    return 0


def parse_report_to(spec: str | Iterable[str] | None) -> list[ReporterSpec]:
    """The backends a ``--report-to`` value names (``"tensorboard,mlflow"``, ``"none"``, a list).

    Raises:
        ConfigError: an unknown name, or ``none`` together with a tracker.
    """
    if spec is None:
        return []
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip().lower() for n in names if n.strip()]
    known = {s.name: s for s in available_reporters()}
    choices = ", ".join([NO_REPORT, *known])
    unknown = [n for n in names if n != NO_REPORT and n not in known]
    if unknown:
        raise ConfigError(f"--report-to {','.join(names)}: unknown tracker {unknown[0]!r}; choose from {choices}")
    if NO_REPORT in names and len(set(names)) > 1:
        raise ConfigError(f"--report-to {','.join(names)}: 'none' turns reporting off; give it alone or drop it")
    out: list[ReporterSpec] = []
    for n in names:
        if n != NO_REPORT and known[n] not in out:
            out.append(known[n])
    return out


def check_installed(spec: ReporterSpec) -> None:
    """Raise :class:`ConfigError` when the library ``spec`` needs is not importable."""
    try:
        found = importlib.util.find_spec(spec.requires) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ConfigError(
            f"--report-to {spec.name}: the {spec.requires!r} package is not installed; "
            f"pip install 'peftc[{spec.extra}]'"
        )


class Reporters:
    """Several reporters as one: ``log`` sends a record to each, ``close`` closes each once.

    A tracker failing mid-run (a full disk, a dropped connection) is logged and that tracker is
    dropped; training goes on, since ``metrics.jsonl`` still has every record.
    """

    def __init__(self, reporters: Iterable[tuple[str, Reporter]] = ()):
        self._reporters = list(reporters)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self._reporters]

    def __len__(self) -> int:
        return len(self._reporters)

    def __bool__(self) -> bool:
        return bool(self._reporters)

    def log(self, record: Mapping[str, Any]) -> None:
        for name, reporter in list(self._reporters):
            try:
                reporter.log(record)
            except Exception as e:  # a tracker must not end a training run
                logger.warning("--report-to %s failed (%s: %s); no more records go to it", name, type(e).__name__, e)
                self._drop(name, reporter)

    def close(self) -> None:
        for name, reporter in self._reporters:
            try:
                reporter.close()
            except Exception as e:
                logger.warning("--report-to %s: closing failed (%s: %s)", name, type(e).__name__, e)
        self._reporters = []

    def _drop(self, name: str, reporter: Reporter) -> None:
        self._reporters = [(n, r) for n, r in self._reporters if r is not reporter]
        try:
            reporter.close()
        except Exception:  # already failing; the warning above said so
            logger.debug("closing %s after its failure also failed", name, exc_info=True)

    def __enter__(self) -> Reporters:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_reporters(
    report_to: str | Iterable[str] | None,
    run_dir: str | Path,
    config: Mapping[str, Any] | None = None,
    resume_step: int | None = None,
    rank: int | None = None,
) -> Reporters:
    """The reporters ``--report-to`` asks for; empty for ``none`` and on every rank but 0.

    Names and libraries are checked on every rank, before any training, so a wrong value fails at
    once and everywhere with one line.

    Args:
        report_to: comma-separated tracker names (``"tensorboard,mlflow"``), ``"none"`` or ``None``.
        run_dir: the run directory; trackers keep their local files under it.
        config: the run's options, recorded as the tracker run's parameters.
        resume_step: the checkpoint step a resumed run continues from (``None`` for a new run):
            trackers continue the same tracker run and hide what a crashed run logged after it.
        rank: the process rank (default: :func:`process_rank`).

    Raises:
        ConfigError: an unknown name, or a tracker whose library is not installed.
    """
    specs = parse_report_to(report_to)
    for spec in specs:
        check_installed(spec)
    if not specs or (process_rank() if rank is None else rank) != 0:
        return Reporters()
    run_dir = Path(run_dir)
    made = [(s.name, s.factory(run_dir, config=dict(config or {}), resume_step=resume_step)) for s in specs]
    logger.info("reporting to %s", ", ".join(s.where or s.name for s in specs))
    return Reporters(made)


def scalars(record: Mapping[str, Any]) -> tuple[int, dict[str, float]]:
    """``(step, {"train/loss": …, "train/lr": …})`` from one metrics record.

    Every finite number except ``step`` becomes ``<type>/<field>``; strings, booleans, nested values
    and non-finite numbers (a loss that diverged is reported by the loop, not plotted) are skipped.
    """
    kind = str(record.get("type") or "train")
    step = int(record.get("step") or 0)
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in _NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[f"{kind}/{key}"] = float(value)
    return step, out


def report_to_help() -> str:
    """The ``--report-to`` help text, from the registry."""
    names = ", ".join(s.name for s in available_reporters())
    return (
        f"Send the training metrics to experiment trackers too: a comma list of {names}, or none (the default). "
        "TensorBoard writes RUN/tensorboard; MLflow uses MLFLOW_TRACKING_URI or a local store in RUN/mlflow; "
        "W&B runs offline under RUN/wandb unless WANDB_MODE or WANDB_API_KEY is set."
    )
