"""The run directory's writer (created lazily, once the first optimizer step has succeeded) and what it holds.

The layout is documented in :mod:`peftc.runs` (which also reads it back for export). Writing rules:

* nothing is written before :meth:`RunWriter.open` (called after the first optimizer step), so a bad
  flag, data file or model leaves no trace on disk (the run's lock, :mod:`peftc.training.lock`, goes
  with the run, and so does a directory made only for it); records logged before it are kept in memory;
* an existing non-empty directory is replaced only with ``force`` (checked again when opening) — and
  never when it holds exports (``export-*``, or any directory with a ``manifest.json``): they are
  deliverables, made from the old adapter, which ``--force`` would either delete or leave beside a new
  adapter they do not match; the user moves them out first (:func:`check_no_exports`);
* ``started.json`` (the run's options) marks a run that has taken its first step and not finished: a
  ``--resume`` finding it and nothing else a run writes before its first checkpoint (:func:`unfinished_leftovers`)
  starts the run afresh; it is removed when ``run.json`` is written;
* ``metrics.jsonl`` gets one JSON object per line (``{"type": "train" | "eval", "step": …}``); a resumed
  run first drops what a crashed run logged after its checkpoint;
* ``run.json`` and ``base_model/`` are written atomically.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from peftc import __version__
from peftc.errors import OutputExistsError
from peftc.files import atomic_dir, write_atomic
from peftc.models import LoadedModel, save_base_model
from peftc.runs import RUN_FILE
from peftc.training.checkpoints import CHECKPOINTS
from peftc.training.lock import LOCK_FILE

__all__ = [
    "ADAPTER_DIR",
    "BASE_MODEL_DIR",
    "METRICS_FILE",
    "STARTED_FILE",
    "RunWriter",
    "check_no_exports",
    "contents",
    "exports_in",
    "started_options",
    "unfinished_leftovers",
]

METRICS_FILE = "metrics.jsonl"
ADAPTER_DIR = "adapter"
BASE_MODEL_DIR = "base_model"
STARTED_FILE = "started.json"

#: What a run writes before its first checkpoint (and the checkpoints folder, while it holds no complete one).
_BEFORE_FIRST_CHECKPOINT = (STARTED_FILE, METRICS_FILE, BASE_MODEL_DIR, CHECKPOINTS)
#: peftc's temporary siblings: atomic_dir's ``.NAME.tmp-XXXX`` / ``.NAME.old-XXXX``, write_atomic's ``.NAME.tmp-XXXX``.
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-[A-Za-z0-9_]+$")


def contents(run_dir: Path) -> list[Path]:
    """The entries of ``run_dir`` other than the run lock (``[]`` when it does not exist)."""
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if p.name != LOCK_FILE)


def exports_in(run_dir: Path) -> list[str]:
    """Names of the artifact directories inside ``run_dir``: ``export-*`` (export's default) or with a manifest."""
    return [
        p.name
        for p in contents(run_dir)
        if p.is_dir() and not p.is_symlink() and (p.name.startswith("export-") or (p / "manifest.json").is_file())
    ]


def check_no_exports(run_dir: Path) -> None:
    """Refuse to replace a run directory that holds exports (see the module docstring for why).

    Raises:
        OutputExistsError: naming the exports and how to keep them.
    """
    found = exports_in(run_dir)
    if found:
        raise OutputExistsError(
            f"--force would delete the exports in {run_dir} ({', '.join(found)}), and they were made from the "
            f"adapter being replaced (a new adapter would not match them): move them out of {run_dir} "
            f"(e.g. mv {run_dir / found[0]} .) or delete them, then rerun; or choose another --out"
        )


def unfinished_leftovers(run_dir: Path) -> bool:
    """True when ``run_dir`` holds something, and only what a peftc run writes before its first checkpoint.

    That is ``started.json``, ``metrics.jsonl``, ``base_model/``, a ``checkpoints/`` with no complete
    checkpoint, and peftc's temporary siblings of those (a write cut short); anything else is not a run's.
    """
    found = contents(run_dir)
    if not found or not (run_dir / STARTED_FILE).is_file():
        return False
    for p in found:
        match = _TEMP.match(p.name)
        name = match.group("name") if match else p.name
        if name not in _BEFORE_FIRST_CHECKPOINT:
            return False
        if p.name == CHECKPOINTS and (
            not p.is_dir() or any(not _TEMP.match(c.name) or not c.is_dir() for c in p.iterdir())
        ):
            return False
    return True


def started_options(run_dir: Path) -> dict[str, Any] | None:
    """The options ``started.json`` records (``None`` when it is missing or unreadable)."""
    try:
        data = json.loads((run_dir / STARTED_FILE).read_text())
    except (OSError, ValueError):
        return None
    options = data.get("train_config") if isinstance(data, dict) else None
    return options if isinstance(options, dict) else None


class RunWriter:
    """Owns a run directory: opens it lazily, appends metrics, writes ``run.json``.

    Args:
        path: the run directory.
        force: replace what ``path`` holds when opening (``--force``, or the leftovers of an unfinished run
            of the same options that ``--resume`` starts afresh); never exports, never the run lock.
        resumed: ``path`` is a run being resumed (already open: nothing is replaced).
        loaded: the base model; a generated preset's (tiny-gpt2) is saved into ``base_model/``, since it
            exists nowhere else.
        options: the run's options, recorded in ``started.json`` until the run finishes.
    """

    def __init__(
        self,
        path: Path,
        force: bool,
        resumed: bool,
        loaded: LoadedModel | None = None,
        options: dict[str, Any] | None = None,
    ):
        self.path = path
        self.force = force
        self.opened = resumed
        self.loaded = loaded
        self.options = options
        self.pending: list[dict[str, Any]] = []

    def open(self) -> None:
        """Create the directory (replacing what it held under ``force``) and flush the pending records."""
        if self.opened:
            return
        if self.path.exists() and not self.path.is_dir():
            raise OutputExistsError(f"output {self.path} exists and is not a directory; choose another --out")
        old = contents(self.path)
        if old and not self.force:
            raise OutputExistsError(
                f"output directory {self.path} is not empty; pass --force to replace it or choose another --out"
            )
        if old:
            check_no_exports(self.path)
            for p in old:  # the new run has taken its first step: replace the old one (the lock is ours: kept)
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        started = {"peftc_version": __version__, "train_config": self.options}
        write_atomic(self.path / STARTED_FILE, json.dumps(started, indent=2, sort_keys=True))
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
        (self.path / STARTED_FILE).unlink(missing_ok=True)  # finished: run.json says so now
