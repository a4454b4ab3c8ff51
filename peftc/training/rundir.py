"""The run directory's writer: created lazily, once the first optimizer step has succeeded.

The layout is documented in :mod:`peftc.runs` (which also reads it back for export). Writing rules:

* nothing is written before :meth:`RunWriter.open` (called after the first optimizer step), so a bad
  flag, data file or model leaves no trace on disk; records logged before it are kept in memory;
* an existing non-empty directory is replaced only with ``force`` (checked again when opening);
* ``metrics.jsonl`` gets one JSON object per line (``{"type": "train" | "eval", "step": …}``); a resumed
  run first drops what a crashed run logged after its checkpoint;
* ``run.json`` and ``base_model/`` are written atomically.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from peftc.files import atomic_dir, check_output_dir, write_atomic
from peftc.models import LoadedModel, save_base_model
from peftc.runs import RUN_FILE

__all__ = ["ADAPTER_DIR", "BASE_MODEL_DIR", "METRICS_FILE", "RunWriter"]

METRICS_FILE = "metrics.jsonl"
ADAPTER_DIR = "adapter"
BASE_MODEL_DIR = "base_model"


class RunWriter:
    """Owns a run directory: opens it lazily, appends metrics, writes ``run.json``.

    Args:
        path: the run directory.
        force: replace a non-empty ``path`` when opening.
        resumed: ``path`` is a run being resumed (already open: nothing is replaced).
        loaded: the base model; a generated preset's (tiny-gpt2) is saved into ``base_model/``, since it
            exists nowhere else.
    """

    def __init__(self, path: Path, force: bool, resumed: bool, loaded: LoadedModel | None = None):
        self.path = path
        self.force = force
        self.opened = resumed
        self.loaded = loaded
        self.pending: list[dict[str, Any]] = []

    def open(self) -> None:
        """Create the directory (replacing an old one under ``force``) and flush the pending records."""
        if self.opened:
            return
        check_output_dir(self.path, self.force)
        if self.path.exists() and any(self.path.iterdir()):
            shutil.rmtree(self.path)  # force: the new run has taken its first step; replace the old one
        self.path.mkdir(parents=True, exist_ok=True)
        if self.loaded is not None and self.loaded.preset == "tiny-gpt2":
            with atomic_dir(self.path / BASE_MODEL_DIR) as tmp:
                save_base_model(self.loaded, tmp)
        self.opened = True
        for record in self.pending:
            self._append(record)
        self.pending = []

    def log(self, record: dict[str, Any]) -> None:
        """Append one record to ``metrics.jsonl`` (kept in memory until the directory is open)."""
        if self.opened:
            self._append(record)
        else:
            self.pending.append(record)

    def _append(self, record: dict[str, Any]) -> None:
        with open(self.path / METRICS_FILE, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """Drop records a crashed run logged after the checkpoint it resumes from."""
        path = self.path / METRICS_FILE
        if not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except ValueError:
                continue  # a line cut short by the crash
        write_atomic(path, "".join(x + "\n" for x in kept))

    def write_run(self, run: dict[str, Any]) -> None:
        """Replace ``run.json`` atomically (see :mod:`peftc.runs` for what it holds)."""
        self.open()
        write_atomic(self.path / RUN_FILE, json.dumps(run, indent=2, sort_keys=True))
