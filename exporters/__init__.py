"""Exporters from a captured program to deployable artifacts (installed as ``peftc.exporters``).

``onnx`` writes the file, ``verify`` checks it against the torch program with ONNX Runtime,
``manifest`` describes the artifact directory; :func:`peftc.exporting.export` runs the whole stage.
"""

from .manifest import MANIFEST_FILE, REPORT_FILE, build_manifest, check_manifest, onnx_io, read_manifest
from .onnx import DEFAULT_OPSET, MODEL_FILE, export_program_onnx
from .verify import DEFAULT_ATOL, VerificationReport, compare_outputs, make_cases, verify_onnx

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_OPSET",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "REPORT_FILE",
    "VerificationReport",
    "build_manifest",
    "check_manifest",
    "compare_outputs",
    "export_program_onnx",
    "make_cases",
    "onnx_io",
    "read_manifest",
    "verify_onnx",
]
