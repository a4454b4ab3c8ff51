"""One ``peftc train`` per run directory: ``--out/.peftc.lock``.

Two runs writing the same directory would interleave their checkpoints, metrics and adapter. A run
takes the lock before it looks at ``--out`` and holds it until it returns (also on errors, Ctrl-C and
SIGTERM); a second run on the same directory is refused, naming the owner.

The file is created atomically (``O_CREAT | O_EXCL``) and holds the owner's pid, host and start time
for messages. What makes the lock hold is an exclusive ``flock`` on it for the life of the owner: the
kernel drops it when the owner dies, however it dies, so a lock file whose ``flock`` can be taken is
stale (its pid is gone: SIGKILL, a lost node) and is taken over, with a line saying so. After taking
the ``flock`` the owner checks that the path still names the file it locked (a releasing owner unlinks
it), so two takers never both win.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from peftc.errors import ConfigError, OutputExistsError, RunLockedError

try:  # POSIX; elsewhere the pid check alone decides staleness
    import fcntl
except ImportError:  # pragma: no cover - not on Linux/macOS
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_FILE", "RunLock", "run_lock"]

logger = logging.getLogger(__name__)

LOCK_FILE = ".peftc.lock"


class RunLock:
    """The lock of one run directory, held by this process (see :func:`run_lock`).

    Attributes:
        path: ``run_dir/.peftc.lock``.
        took_over: the owner recorded in a stale lock this one replaced (``None`` when there was none).
    """

    def __init__(self, path: Path, fd: int, took_over: dict[str, Any] | None):
        self.path = path
        self._fd: int | None = fd
        self.took_over = took_over

    def release(self) -> None:
        """Unlink the lock file (if it is still this lock's) and drop the ``flock``."""
        if self._fd is None:
            return
        try:
            if _same_file(self.path, self._fd):
                self.path.unlink()
        except OSError:  # pragma: no cover - the directory went away (--force of another tool); nothing to free
            pass
        finally:
            os.close(self._fd)
            self._fd = None


def read_owner(path: Path) -> dict[str, Any]:
    """The ``{"pid", "host", "started", "command"}`` a lock file records (``{}`` when unreadable)."""
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


@contextlib.contextmanager
def run_lock(run_dir: Path, command: str = "peftc train") -> Iterator[RunLock]:
    """Hold ``run_dir/.peftc.lock`` for the block; create ``run_dir`` when missing (removed again if left empty).

    Raises:
        RunLockedError: another live process holds the lock (the message names its pid, host and start).
        OutputExistsError: ``run_dir`` is a file.
        ConfigError: ``run_dir`` or its lock cannot be created (permissions, a read-only file system).
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise OutputExistsError(f"output {run_dir} exists and is not a directory; choose another --out")
    try:
        created = _make_dirs(run_dir)
    except OSError as e:
        raise ConfigError(f"--out {run_dir}: cannot create it ({e.strerror or e}); choose a writable --out") from e
    try:
        lock = _acquire(run_dir / LOCK_FILE, command)
    except OSError as e:
        _remove_empty(created)
        raise ConfigError(
            f"--out {run_dir}: cannot create its lock {LOCK_FILE} ({e.strerror or e}); choose a writable --out"
        ) from e
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield lock
    finally:
        lock.release()
        _remove_empty(created)


def _acquire(path: Path, command: str) -> RunLock:
    for _ in range(20):  # each retry follows a lock released or taken over between two system calls
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
            created = True
        except FileExistsError:
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                continue  # released meanwhile
            created = False
        if not _try_flock(fd):
            os.close(fd)
            raise RunLockedError(_busy_message(path, read_owner(path)))
        if not _same_file(path, fd):  # unlinked (released) between our open and our flock: start again
            os.close(fd)
            continue
        previous = None if created else read_owner(path)
        if previous and fcntl is None and _alive(previous):  # pragma: no cover - no flock: trust the pid
            os.close(fd)
            raise RunLockedError(_busy_message(path, previous))
        _write_owner(fd, command)
        if previous:
            logger.warning(
                "taking over the stale lock %s of pid %s on %s (started %s), which is no longer running",
                path,
                previous.get("pid"),
                previous.get("host"),
                previous.get("started"),
            )
        return RunLock(path, fd, previous or None)
    raise RunLockedError(f"{path}: the lock keeps changing hands; is another peftc train starting on this --out?")


def _try_flock(fd: int) -> bool:
    if fcntl is None:  # pragma: no cover
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _same_file(path: Path, fd: int) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _write_owner(fd: int, command: str) -> None:
    owner = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command,
    }
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(owner) + "\n").encode())


def _alive(owner: dict[str, Any]) -> bool:  # pragma: no cover - only without flock
    pid = owner.get("pid")
    if owner.get("host") != socket.gethostname() or not isinstance(pid, int):
        return True  # another host's process cannot be checked from here: assume it runs
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _busy_message(path: Path, owner: dict[str, Any]) -> str:
    run_dir = path.parent
    if not owner:
        who = "another process (the lock file is being written)"
    else:
        who = f"pid {owner.get('pid')} on {owner.get('host')} (started {owner.get('started')}: {owner.get('command')})"
    return (
        f"{run_dir} is in use by {who}; two runs on one --out would interleave their checkpoints: wait for it "
        f"to finish, stop it, or choose another --out"
    )


def _make_dirs(path: Path) -> list[Path]:
    """``mkdir -p path``; the directories this call created, deepest first."""
    missing = []
    for p in [path, *path.parents]:
        if p.exists():
            break
        missing.append(p)
    path.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_empty(created: list[Path]) -> None:
    """Remove the directories :func:`_make_dirs` created, deepest first, as long as they are empty."""
    for p in created:
        try:
            p.rmdir()  # only an empty directory goes: a run that wrote something keeps it
        except OSError:
            return
