"""Exporters from a captured program to deployable artifacts (installed as ``peftc.exporters``).

One module per format registers one :class:`~.registry.Exporter` (``onnx``, ``torchscript``, ``aoti``,
``executorch``): it writes a program to its model file, loads and runs that file, and describes its
inputs and outputs.
``verify`` holds the one verification step (held-out cases, :func:`~.verify.verify_artifact`),
``onnx_quantize`` rewrites a verified ``model.onnx`` with ONNX Runtime's int4/int8 quantizers
(``--quantize``), ``manifest`` describes an artifact directory, ``swappable`` the ONNX Runtime adapter files, ``genai``
onnxruntime-genai's ``genai_config.json`` for KV-cache ONNX files, ``executorch_data`` ExecuTorch's
``.ptd`` data files (base weights, one file per adapter). Formats whose file has no graph peftc reads
back (TorchScript, AOTInductor, ExecuTorch) share :class:`~.registry.GraphlessFileExporter`.
:func:`peftc.exporting.export` runs the whole stage and asks the registry for the format.

Adding a format is one module that calls :func:`register_exporter` plus its name in
:data:`EXPORTER_MODULES`.
"""

from .genai import GENAI_CONFIG_FILE, genai_config
from .manifest import MANIFEST_FILE, REPORT_FILE, build_manifest, check_manifest, onnx_io, read_manifest
from .onnx import DEFAULT_OPSET, MODEL_FILE, export_program_onnx
from .registry import (
    AdapterFiles,
    Exporter,
    ExportRequest,
    GraphlessFileExporter,
    RuntimeConfig,
    WriteOptions,
    exporters,
    formats,
    get_exporter,
    register_exporter,
)
from .verify import DEFAULT_ATOL, VerificationReport, compare_outputs, make_cases, verify_artifact

#: The format modules, in the order ``--format`` lists them; each registers its exporter when imported.
EXPORTER_MODULES = ("onnx", "torchscript", "aoti", "executorch")

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_OPSET",
    "EXPORTER_MODULES",
    "GENAI_CONFIG_FILE",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "REPORT_FILE",
    "AdapterFiles",
    "ExportRequest",
    "Exporter",
    "GraphlessFileExporter",
    "RuntimeConfig",
    "VerificationReport",
    "WriteOptions",
    "build_manifest",
    "check_manifest",
    "compare_outputs",
    "export_program_onnx",
    "exporters",
    "formats",
    "genai_config",
    "get_exporter",
    "make_cases",
    "onnx_io",
    "read_manifest",
    "register_exporter",
    "verify_artifact",
]
