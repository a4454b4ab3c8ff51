"""The examples run: ``examples/python_api.py`` end to end in a fresh process."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
def test_python_api_example_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "python_api.py"), str(tmp_path / "work")],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    merged = re.search(r"merged vs adapted: max abs diff (\S+)", result.stdout)
    assert merged and float(merged.group(1)) <= 1e-5
    assert "verified=True" in result.stdout  # the artifact's verification, as inspect renders it
    generated = re.search(r"generated: (.+)", result.stdout)
    assert generated and len(generated.group(1).split()) > 3  # the prompt and new tokens
