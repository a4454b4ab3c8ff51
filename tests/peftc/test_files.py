"""Output files follow the user's umask (a server in another account reads them), and JSON errors name the file."""

from __future__ import annotations

import json
import os
import stat

import pytest

from peftc.errors import ConfigError, OutputExistsError
from peftc.files import atomic_dir, read_json, write_atomic


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_dir_and_write_atomic_follow_the_umask(tmp_path, umask_022):
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("x")
        write_atomic(tmp / "b.json", "{}")
    assert _mode(tmp_path / "out") == 0o755
    assert _mode(tmp_path / "out" / "a.txt") == 0o644
    assert _mode(tmp_path / "out" / "b.json") == 0o644
    os.umask(0o077)
    write_atomic(tmp_path / "c.json", "{}")
    assert _mode(tmp_path / "c.json") == 0o600


def test_atomic_dir_leaves_nothing_on_failure_and_keeps_the_old_output(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "old").write_text("kept")
    with pytest.raises(RuntimeError), atomic_dir(out, force=True) as tmp:
        (tmp / "new").write_text("half")
        raise RuntimeError("verification failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "old").read_text() == "kept"
    with pytest.raises(OutputExistsError, match="pass --force"), atomic_dir(out):
        pass


def test_read_json_names_the_file_and_the_fault(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"a": 1,}')
    with pytest.raises(ConfigError, match=r"my config .*x\.json is not valid JSON \(line 1, column 9\)"):
        read_json(path, "my config", ConfigError)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        read_json(path, "my config", ConfigError)
    with pytest.raises(ConfigError, match="cannot read my config"):
        read_json(tmp_path / "missing.json", "my config", ConfigError)
    path.write_text(json.dumps({"ok": [1, 2]}))
    assert read_json(path) == {"ok": [1, 2]}
