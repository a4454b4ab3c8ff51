"""Session-scoped fixtures of the exporter tests: artifacts built once per session, under pytest's temporary dirs.

``export_cases`` (:class:`onnx_export_cases.ExportCases`) holds the tiny models' base and run
directories, their exports and the HF PEFT references; ``cpp_cases`` (:class:`cpp_cases.CppCases`)
the HF PEFT GPT-2 adapter, the AOTInductor package and the C++ example binary. Both live under
``tmp_path_factory`` (one base directory per session, and per worker under pytest-xdist), which
pytest cleans up; nothing is shared between processes.

pytest imports every ``conftest.py`` outside a package as the module ``conftest``, and this one
replaces ``tests/conftest.py`` under that name once it is loaded. Test modules import the tiny
model factories with ``from conftest import …``, so this module re-exports them (from its own
load of ``tests/conftest.py``, which pytest still runs as the root conftest).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


def _root_conftest():
    """``tests/conftest.py`` as a plain module (its factories; its fixtures stay the root conftest's)."""
    name = "peftc_tests_root_conftest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "conftest.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


_root = _root_conftest()
FAMILIES = _root.FAMILIES
batch_for = _root.batch_for
captured = _root.captured
real_positions = _root.real_positions
tiny_bart = _root.tiny_bart
tiny_bert = _root.tiny_bert
tiny_bert_token = _root.tiny_bert_token
tiny_gpt2 = _root.tiny_gpt2
tiny_llama = _root.tiny_llama
tiny_t5 = _root.tiny_t5


@pytest.fixture(scope="session")
def export_cases(tmp_path_factory):
    """The session's shared export artifacts (:class:`onnx_export_cases.ExportCases`)."""
    from onnx_export_cases import ExportCases

    return ExportCases(tmp_path_factory.mktemp("exports"))


@pytest.fixture(scope="session")
def cpp_cases(export_cases):
    """The session's HF PEFT GPT-2 adapter, AOTInductor package and C++ binary (:class:`cpp_cases.CppCases`)."""
    from cpp_cases import CppCases

    return CppCases(export_cases)
