"""Atomic output, JSON reading with clear errors, and file hashing.

Every directory peftc writes (adapters, run dirs, artifacts) is built in a temporary sibling and
renamed into place at the end, so a crash or a failed verification never leaves half an output,
and an existing non-empty directory is replaced only with ``force``; single files are replaced
atomically (:func:`write_atomic`). JSON files a user hands peftc are read by :func:`read_json`,
which names the file and what is wrong with it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from peftc.errors import OutputExistsError, PeftcError

__all__ = ["atomic_dir", "check_output_dir", "current_umask", "json_lines", "read_json", "sha256_file", "write_atomic"]


def check_output_dir(path: str | Path, force: bool) -> Path:
    """Refuse a non-empty existing ``path`` unless ``force``; a file in the way is always refused."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"output {path} exists and is not a directory; choose another --out")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise OutputExistsError(
            f"output directory {path} is not empty; pass --force to replace it or choose another --out"
        )
    return path


@contextlib.contextmanager
def atomic_dir(path: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` when the block succeeds."""
    path = check_output_dir(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it private (0700); the output follows the umask
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{tmp.name[-8:]}")
        path.rename(old)
    tmp.rename(path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def current_umask() -> int:
    """The process umask (read by setting and restoring it: Python has no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Replace ``path`` with ``data`` atomically: a reader sees the old file or the new one, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it private (0600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_json(path: str | Path, what: str = "file", error: type[PeftcError] = PeftcError) -> Any:
    """The JSON value in ``path``; ``error`` (one line naming the file, ``what`` it is, and the fault) otherwise."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise error(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start}); expected JSON") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{what} {path} is not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from e


def json_lines(path: Path, raw: bytes, fail: Callable[[int, str], Exception]) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of a JSON-lines file's bytes ``raw``.

    A line that is not UTF-8 is a :class:`~peftc.errors.DataError` naming its line; a line that is not JSON,
    or not a JSON object, raises ``fail(lineno, what)`` (the reader's one-line message with its example).
    Blank lines (a trailing newline, a separator) carry no example and are skipped.
    """
    from peftc.errors import DataError

    for lineno, line_bytes in enumerate(raw.splitlines(), start=1):
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{lineno}: not UTF-8 text ({e.reason}); save the file as UTF-8") from e
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise fail(lineno, f"not valid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(obj, dict):
            raise fail(lineno, f"expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj
