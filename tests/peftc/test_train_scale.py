"""Training at scale: ``python -m peftc``, devices, precision, gradient checkpointing, torch.compile, data parallel.

Tiny models saved into tmp dirs (MiniLM's tokenizer); what needs CUDA skips with its reason.
"""

from __future__ import annotations

import os
import subprocess
import sys

import peftc


def _run(*args, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def test_python_dash_m_peftc_is_the_cli(tmp_path):
    done = _run("-m", "peftc", "--version")
    assert done.returncode == 0 and peftc.__version__ in done.stdout, done
    done = _run("-m", "peftc", "train", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"))
    assert done.returncode == 1, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0], done.stderr
    assert not (tmp_path / "run").exists()
