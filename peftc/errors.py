"""The peftc error family.

Every error a user can cause is a :class:`PeftcError`. Its message is one line that says what was
wrong, with what value, and what to do. The CLI prints it as ``<label>: <message>`` and exits with the
class's ``exit_code``; the traceback is shown only with ``--debug``.

Exit codes of the ``peftc`` command: 0 done; 1 error (every :class:`PeftcError` without a code of its
own, and internal errors); 2 usage (a bad flag or value, from click); 3 an export that does not verify
(:class:`ExportVerificationError`); 75 training stopped by SIGTERM after writing a checkpoint
(:class:`TrainingStopped`: rerun with ``--resume``; 75 is ``EX_TEMPFAIL``, "try again later");
130 interrupted (Ctrl-C, :class:`TrainingInterrupted`).
"""

from __future__ import annotations

__all__ = [
    "AdapterFormatError",
    "AdapterMismatchError",
    "CaptureError",
    "ConfigError",
    "DataError",
    "ExportVerificationError",
    "ModelLoadError",
    "OutputExistsError",
    "PassError",
    "PeftcError",
    "RunLockedError",
    "TargetNotFoundError",
    "TrainingInterrupted",
    "TrainingStopped",
]


class PeftcError(Exception):
    """Base class of every error peftc raises on purpose."""

    exit_code = 1
    #: what the CLI prints before the message
    label = "error"


class ModelLoadError(PeftcError):
    """A model directory or preset could not be loaded."""


class CaptureError(PeftcError):
    """``torch.export`` could not capture the model for the task."""


class ConfigError(PeftcError):
    """A method or training configuration is invalid."""


class TargetNotFoundError(PeftcError):
    """``target_modules`` (or another selector) matched nothing in the model."""


class AdapterFormatError(PeftcError):
    """An adapter directory is missing files or holds unreadable/corrupt ones."""


class AdapterMismatchError(PeftcError):
    """An adapter does not fit the base model (names or shapes)."""


class DataError(PeftcError):
    """A data file is missing, unreadable or has a malformed line."""


class PassError(PeftcError):
    """A graph pass failed; the message names the pass, the pipeline so far and the node."""


class ExportVerificationError(PeftcError):
    """An exported artifact does not reproduce the torch program within tolerance."""

    exit_code = 3


class OutputExistsError(PeftcError):
    """The output location exists and is not empty, and ``force`` was not given."""


class RunLockedError(PeftcError):
    """Another live ``peftc train`` holds the run directory's lock (``--out/.peftc.lock``)."""


class TrainingStopped(PeftcError):
    """Training stopped on SIGTERM at a step boundary, after writing a checkpoint; ``--resume`` continues it.

    Attributes:
        run_dir: the run directory.
        step: the step of the checkpoint written (``None`` when stopped before the first step).
    """

    exit_code = 75
    label = "stopped"

    def __init__(self, message: str, run_dir: object = None, step: int | None = None):
        super().__init__(message)
        self.run_dir = run_dir
        self.step = step


class TrainingInterrupted(PeftcError):
    """``peftc train`` was interrupted (Ctrl-C); the message says which checkpoint ``--resume`` continues from."""

    exit_code = 130
    label = "interrupted"
