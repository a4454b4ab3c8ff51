"""TensorBoard: scalars in event files under ``RUN/tensorboard`` through ``torch.utils.tensorboard``.

View with ``tensorboard --logdir RUN/tensorboard``. A resumed run opens its writer with
``purge_step`` = the checkpoint step + 1, so TensorBoard hides what a crashed run logged after the
checkpoint and the curve continues as one line. The run's options go in once as a text summary.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from peftc.reporting.base import ReporterSpec, register_reporter, scalars

__all__ = ["LOG_SUBDIR", "TensorBoardReporter"]

#: Where the event files go inside the run directory (unless ``logdir`` is given).
LOG_SUBDIR = "tensorboard"


class TensorBoardReporter:
    """Writes every record's scalars as TensorBoard summaries (``train/loss`` at ``step``)."""

    def __init__(
        self,
        run_dir: str | Path,
        config: Mapping[str, Any] | None = None,
        resume_step: int | None = None,
        logdir: str | Path | None = None,
    ):
        self.logdir = Path(logdir) if logdir is not None else Path(run_dir) / LOG_SUBDIR
        self._config = dict(config or {})
        self._resume_step = resume_step
        self._writer: Any = None

    def _open(self) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        purge = self._resume_step + 1 if self._resume_step is not None else None
        writer = SummaryWriter(log_dir=str(self.logdir), purge_step=purge)
        if self._config and purge is None:
            text = json.dumps(self._config, indent=2, sort_keys=True, default=str)
            writer.add_text("config", "```\n" + text + "\n```", global_step=0)
        return writer

    def log(self, record: Mapping[str, Any]) -> None:
        step, values = scalars(record)
        if not values:
            return
        if self._writer is None:
            self._writer = self._open()
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None


def _factory(run_dir: Path, config: Mapping[str, Any] | None = None, resume_step: int | None = None):
    return TensorBoardReporter(run_dir, config=config, resume_step=resume_step)


SPEC = register_reporter(
    ReporterSpec(
        name="tensorboard",
        requires="tensorboard",
        extra="tensorboard",
        factory=_factory,
        where=f"TensorBoard (RUN/{LOG_SUBDIR}; view with: tensorboard --logdir RUN/{LOG_SUBDIR})",
    )
)
