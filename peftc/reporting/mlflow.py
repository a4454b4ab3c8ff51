"""MLflow: metrics and the run's options in an MLflow run, through ``mlflow.tracking.MlflowClient``.

Where the run goes: the tracking server or store the user configured with ``MLFLOW_TRACKING_URI``;
otherwise a local store inside the run directory, ``sqlite:///RUN/mlflow/mlflow.db`` with artifacts
in ``RUN/mlflow/artifacts`` (view with ``mlflow ui --backend-store-uri sqlite:///RUN/mlflow/mlflow.db``).
SQLite rather than a ``./mlruns`` folder because MLflow 3 refuses its filesystem store unless
``MLFLOW_ALLOW_FILE_STORE=true`` is set; the database is still one local file, and MLflow 2 reads it too.
The experiment is ``MLFLOW_EXPERIMENT_NAME`` or ``peftc``; the MLflow run is named after the run
directory. Its id is kept in ``RUN/mlflow/run.json`` so ``--resume`` continues the same MLflow run.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from peftc.files import write_atomic
from peftc.reporting.base import ReporterSpec, register_reporter, scalars

__all__ = ["DEFAULT_EXPERIMENT", "MLflowReporter", "STORE_SUBDIR", "local_tracking_uri"]

STORE_SUBDIR = "mlflow"
DEFAULT_EXPERIMENT = "peftc"
_RUN_FILE = "run.json"
_PARAM_MAX = 500  # MLflow 2's limit on a parameter value (MLflow 3 allows 6000)


def local_tracking_uri(run_dir: str | Path) -> str:
    """The tracking URI of the store peftc keeps inside ``run_dir`` when none is configured."""
    return f"sqlite:///{(Path(run_dir) / STORE_SUBDIR / 'mlflow.db').resolve().as_posix()}"


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "."))
        elif value is not None:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[name] = text[:_PARAM_MAX]
    return out


class MLflowReporter:
    """Logs every record's scalars as MLflow metrics (``train/loss`` at ``step``) in one MLflow run."""

    def __init__(
        self,
        run_dir: str | Path,
        config: Mapping[str, Any] | None = None,
        resume_step: int | None = None,
        tracking_uri: str | None = None,
        experiment: str | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.store_dir = self.run_dir / STORE_SUBDIR
        self.configured = tracking_uri is not None or bool(os.environ.get("MLFLOW_TRACKING_URI"))
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or local_tracking_uri(run_dir)
        self.experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        self._config = dict(config or {})
        self._resume_step = resume_step
        self._client: Any = None
        self.run_id: str | None = None

    def _open(self) -> None:
        from mlflow.tracking import MlflowClient

        self.store_dir.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(tracking_uri=self.tracking_uri)
        saved = self._saved_run()
        if self._resume_step is not None and saved is not None:
            self.run_id = saved
            client.update_run(saved, status="RUNNING")
        else:
            found = client.get_experiment_by_name(self.experiment)
            if found is not None:
                experiment_id = found.experiment_id
            elif self.configured:
                experiment_id = client.create_experiment(self.experiment)
            else:  # artifacts beside the database, not in the working directory
                artifacts = (self.store_dir / "artifacts").resolve().as_uri()
                experiment_id = client.create_experiment(self.experiment, artifact_location=artifacts)
            tags = {"peftc.run_dir": str(self.run_dir)}
            run = client.create_run(experiment_id, run_name=self.run_dir.name, tags=tags)
            self.run_id = run.info.run_id
            if self._config:
                from mlflow.entities import Param

                params = [Param(k, v) for k, v in sorted(_flatten(self._config).items())]
                for i in range(0, len(params), 100):  # log_batch takes at most 100 params
                    client.log_batch(self.run_id, params=params[i : i + 100])
            record = {"tracking_uri": self.tracking_uri, "experiment": self.experiment, "run_id": self.run_id}
            write_atomic(self.store_dir / _RUN_FILE, json.dumps(record, indent=2))
        self._client = client

    def _saved_run(self) -> str | None:
        try:
            saved = json.loads((self.store_dir / _RUN_FILE).read_text())
        except (OSError, ValueError):
            return None
        return saved.get("run_id") if saved.get("tracking_uri") == self.tracking_uri else None

    def log(self, record: Mapping[str, Any]) -> None:
        step, values = scalars(record)
        if not values:
            return
        if self._client is None:
            self._open()
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self) -> None:
        if self._client is not None:
            self._client.set_terminated(self.run_id, status="FINISHED")
            self._client = None


def _factory(run_dir: Path, config: Mapping[str, Any] | None = None, resume_step: int | None = None):
    return MLflowReporter(run_dir, config=config, resume_step=resume_step)


SPEC = register_reporter(
    ReporterSpec(
        name="mlflow",
        requires="mlflow",
        extra="mlflow",
        factory=_factory,
        where="MLflow (MLFLOW_TRACKING_URI, else sqlite:///RUN/mlflow/mlflow.db)",
    )
)
