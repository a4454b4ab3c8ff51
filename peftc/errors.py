"""The peftc error family.

Every error a user can cause is a :class:`PeftcError`. Its message is one line that says what was
wrong, with what value, and what to do. The CLI prints it as-is and exits non-zero; the traceback
is shown only with ``--debug``.
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
    "TargetNotFoundError",
]


class PeftcError(Exception):
    """Base class of every error peftc raises on purpose."""

    exit_code = 1


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
