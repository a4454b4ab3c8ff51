"""Weights & Biases: metrics and the run's options in a W&B run, through the ``wandb`` library.

Offline by default: the run is written under ``RUN/wandb/`` and nothing leaves the machine (upload
it later with ``wandb sync RUN/wandb/offline-run-*``). A user who configured W&B — ``WANDB_MODE``
(``online``, ``offline``, ``disabled``) or ``WANDB_API_KEY`` in the environment — gets what they
configured. The project is ``WANDB_PROJECT`` or ``peftc``; the W&B run is named after the run
directory, and its id is kept in ``RUN/wandb/peftc-run.json`` so ``--resume`` continues it.
W&B wants its step to only grow: on a resume, points a crashed run logged after the checkpoint stay
and the repeated steps are dropped by W&B (with its warning).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from peftc.files import write_atomic
from peftc.reporting.base import ReporterSpec, register_reporter, scalars

__all__ = ["DEFAULT_PROJECT", "WandbReporter", "wandb_mode"]

DEFAULT_PROJECT = "peftc"
_ID_FILE = "peftc-run.json"


def wandb_mode(env: Mapping[str, str] | None = None) -> str | None:
    """``"offline"`` unless the user configured W&B (``WANDB_MODE`` or ``WANDB_API_KEY``): then ``None``,
    which lets ``wandb.init`` follow that configuration."""
    env = os.environ if env is None else env
    return None if env.get("WANDB_MODE") or env.get("WANDB_API_KEY") else "offline"


class WandbReporter:
    """Logs every record's scalars to one W&B run (``train/loss`` at ``step``)."""

    def __init__(
        self,
        run_dir: str | Path,
        config: Mapping[str, Any] | None = None,
        resume_step: int | None = None,
        project: str | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.project = project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
        self.mode = wandb_mode()
        self._config = dict(config or {})
        self._resume_step = resume_step
        self._run: Any = None

    @property
    def _id_path(self) -> Path:
        return self.run_dir / "wandb" / _ID_FILE

    def _open(self) -> Any:
        import wandb

        (self.run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        run_id = None
        if self._resume_step is not None:
            try:
                run_id = json.loads(self._id_path.read_text()).get("run_id")
            except (OSError, ValueError):
                run_id = None
        kwargs: dict[str, Any] = {
            "project": self.project,
            "name": self.run_dir.name,
            "dir": str(self.run_dir),
            "config": self._config,
        }
        if self.mode is not None:
            kwargs["mode"] = self.mode
        if run_id:
            kwargs.update(id=run_id, resume="allow")
        run = wandb.init(**kwargs)
        if getattr(run, "id", None):
            write_atomic(self._id_path, json.dumps({"run_id": run.id, "project": self.project}, indent=2))
        return run

    def log(self, record: Mapping[str, Any]) -> None:
        step, values = scalars(record)
        if not values:
            return
        if self._run is None:
            self._run = self._open()
        self._run.log(values, step=step)

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


def _factory(run_dir: Path, config: Mapping[str, Any] | None = None, resume_step: int | None = None):
    return WandbReporter(run_dir, config=config, resume_step=resume_step)


SPEC = register_reporter(
    ReporterSpec(
        name="wandb",
        requires="wandb",
        extra="wandb",
        factory=_factory,
        where="Weights & Biases (offline under RUN/wandb unless WANDB_MODE or WANDB_API_KEY is set)",
    )
)
