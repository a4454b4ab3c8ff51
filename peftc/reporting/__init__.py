"""Experiment trackers for training runs (``peftc train --report-to tensorboard,mlflow,wandb``).

Every ``metrics.jsonl`` record also goes to the trackers the user named, each through its own
library: TensorBoard (``torch.utils.tensorboard``, ``RUN/tensorboard``), MLflow (``MlflowClient``;
``MLFLOW_TRACKING_URI`` or a local store in the run dir), Weights & Biases (``wandb``; offline unless
configured). A backend is one module that registers a :class:`ReporterSpec`; its library is imported
only when it is used, and a missing one is a one-line :class:`~peftc.errors.ConfigError` naming the
extra to install. :class:`StepMeter` measures tokens/s and peak memory for the loop's records.

    >>> reporters = make_reporters("tensorboard", "run")        # doctest: +SKIP
    >>> reporters.log({"type": "train", "step": 10, "loss": 2.3, "lr": 1e-3, "grad_norm": 0.9})  # doctest: +SKIP
    >>> reporters.close()                                        # doctest: +SKIP
"""

from __future__ import annotations

from peftc.reporting import mlflow as _mlflow  # noqa: F401  (registers "mlflow")
from peftc.reporting import tensorboard as _tensorboard  # noqa: F401  (registers "tensorboard")
from peftc.reporting import wandb as _wandb  # noqa: F401  (registers "wandb")
from peftc.reporting.base import (
    NO_REPORT,
    Reporter,
    Reporters,
    ReporterSpec,
    available_reporters,
    check_installed,
    make_reporters,
    parse_report_to,
    process_rank,
    register_reporter,
    report_to_help,
    scalars,
)
from peftc.reporting.meter import StepMeter, count_tokens, peak_memory_mb

__all__ = [
    "NO_REPORT",
    "Reporter",
    "ReporterSpec",
    "Reporters",
    "StepMeter",
    "available_reporters",
    "check_installed",
    "count_tokens",
    "make_reporters",
    "parse_report_to",
    "peak_memory_mb",
    "process_rank",
    "register_reporter",
    "report_to_help",
    "scalars",
]
