"""Artifact manifests: what an exported directory holds, and the proof that it verified.

Every artifact directory carries two JSON files:

- ``manifest.json`` — the interface (inputs and outputs with dtypes, dynamic dims by name and
  static dims), the method and adapter (name, peft_type, sha256 of the adapter weights file),
  whether the adapter is merged, the opset, the versions of peftc / torch / transformers / onnx /
  onnxruntime that produced it, the task, the base model, and the sha256 of every other file in
  the directory (so a deployment can check what it ships);
- ``report.json`` — the verification figures (max abs diff per held-out case, tolerance, pass),
  plus merged-vs-unmerged torch figures for a merged export.

``report.json`` is written first, so its hash is in the manifest. A runtime reads ``manifest.json``
to learn the I/O without parsing the model.
"""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftc.files import read_json, sha256_file, write_atomic

if TYPE_CHECKING:  # pragma: no cover
    from peftc.program import Program

__all__ = [
    "MANIFEST_FILE",
    "MANIFEST_VERSION",
    "REPORT_FILE",
    "adapter_info",
    "build_manifest",
    "check_manifest",
    "file_hashes",
    "onnx_io",
    "program_io",
    "read_manifest",
    "versions",
    "write_json",
]

MANIFEST_FILE = "manifest.json"
REPORT_FILE = "report.json"
MANIFEST_VERSION = 1
_VERSIONED = ("peftc", "torch", "transformers", "onnx", "onnxscript", "onnxruntime", "safetensors")


def versions() -> dict[str, str]:
    """Installed versions of the packages that shape an artifact (and Python's)."""
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            if name == "peftc":
                from peftc import __version__

                out[name] = __version__
    return out


def onnx_io(model: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Inputs and outputs of an ``onnx.ModelProto``: name, dtype, shape, dynamic and static dims."""
    from onnx import helper

    def describe(value: Any) -> dict[str, Any]:
        tensor = value.type.tensor_type
        shape: list[int | str | None] = []
        dynamic: dict[str, str] = {}
        static: dict[str, int] = {}
        for axis, dim in enumerate(tensor.shape.dim):
            if dim.HasField("dim_value"):
                shape.append(dim.dim_value)
                static[str(axis)] = dim.dim_value
            elif dim.HasField("dim_param"):
                shape.append(dim.dim_param)
                dynamic[str(axis)] = dim.dim_param
            else:
                shape.append(None)
                dynamic[str(axis)] = "?"
        return {
            "name": value.name,
            "dtype": helper.tensor_dtype_to_np_dtype(tensor.elem_type).name,
            "shape": shape,
            "dynamic_dims": dynamic,
            "static_dims": static,
        }

    inits = {i.name for i in model.graph.initializer}
    inputs = [describe(v) for v in model.graph.input if v.name not in inits]
    outputs = [describe(v) for v in model.graph.output]
    return inputs, outputs


def program_io(program: Program) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Inputs and outputs of a program as the manifest lists them (the shape :func:`onnx_io` gives).

    For artifacts without an ONNX graph to read (TorchScript, AOTInductor): each entry has ``name``,
    ``dtype`` (numpy name), ``shape`` (ints and dim names; a derived dim reads e.g.
    ``"sequence + 4"`` for prompt-tuning logits), ``dynamic_dims`` and ``static_dims`` (axis -> name / size).
    Taken from the graph's shape metadata, with the program's dim names (``batch``, ``sequence``).
    """
    import sympy
    import torch
    from torch import fx

    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    symbols: dict[str, str] = {}
    for node, name in zip(placeholders, program.input_names, strict=False):
        val = node.meta.get("val")
        for axis, dim_name in program.dynamic_dims.get(name, {}).items():
            if val is not None and axis < val.dim() and isinstance(val.shape[axis], torch.SymInt):
                symbols.setdefault(str(val.shape[axis].node.expr), dim_name)

    def describe(name: str, val: Any, fallback: dict[int, str]) -> dict[str, Any]:
        if not isinstance(val, torch.Tensor):
            dims = {str(a): d for a, d in fallback.items()}
            shape = [fallback.get(a) for a in range(max(fallback, default=-1) + 1)]
            return {"name": name, "dtype": "int64", "shape": shape, "dynamic_dims": dims, "static_dims": {}}
        shape: list[int | str] = []
        dynamic: dict[str, str] = {}
        static: dict[str, int] = {}
        for axis, dim in enumerate(val.shape):
            if isinstance(dim, torch.SymInt):
                expr = dim.node.expr
                expr = expr.xreplace({s: sympy.Symbol(symbols[str(s)]) for s in expr.free_symbols if str(s) in symbols})
                shape.append(str(expr))
                dynamic[str(axis)] = str(expr)
            else:
                shape.append(int(dim))
                static[str(axis)] = int(dim)
        dtype = str(val.dtype).removeprefix("torch.")
        return {"name": name, "dtype": dtype, "shape": shape, "dynamic_dims": dynamic, "static_dims": static}

    inputs = [
        describe(name, node.meta.get("val"), program.dynamic_dims.get(name, {}))
        for node, name in zip(placeholders, program.input_names, strict=False)
    ]
    values: list[Any] = []
    fx.node.map_arg(program.graph.output_node().args[0], lambda n: values.append(n.meta.get("val")))
    outputs = [describe(name, val, {}) for name, val in zip(program.output_names, values, strict=False)]
    return inputs, outputs


def file_hashes(directory: str | Path, exclude: tuple[str, ...] = (MANIFEST_FILE,)) -> dict[str, str]:
    """sha256 of every file under ``directory`` (relative POSIX paths, sorted), except ``exclude``."""
    directory = Path(directory)
    out = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel not in exclude:
            out[rel] = sha256_file(path)
    return out


def adapter_info(adapter_dir: str | Path, name: str, peft_type: str, config: dict[str, Any]) -> dict[str, Any]:
    """Manifest entry of the adapter: name, method, source and the sha256 of its weights file."""
    from peftc.adapters import CONFIG_FILE, WEIGHTS_FILE

    adapter_dir = Path(adapter_dir)
    return {
        "name": name,
        "peft_type": peft_type,
        "source": str(adapter_dir.resolve()),
        "weights_file": WEIGHTS_FILE,
        "sha256": sha256_file(adapter_dir / WEIGHTS_FILE),
        "config_sha256": sha256_file(adapter_dir / CONFIG_FILE),
        "config": config,
    }


def build_manifest(
    directory: str | Path,
    *,
    format: str,
    task: str,
    inputs: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
    base_model: dict[str, Any],
    adapter: dict[str, Any] | None,
    merged: bool,
    opset: int | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of the files already in ``directory`` (hash them last, after every write).

    Args:
        directory: the artifact directory; every file but ``manifest.json`` is hashed.
        format: ``onnx``, ``torchscript``…
        task: the peftc task (``causal-lm``, ``seq-cls``).
        inputs: graph inputs as :func:`onnx_io` describes them.
        outputs: graph outputs, likewise.
        base_model: where the base came from (``source``, ``model_type``, ``architecture``…).
        adapter: :func:`adapter_info` of the adapter, ``None`` for a bare base export.
        merged: whether the adapter is folded into the weights.
        opset: ONNX opset, when the format has one.
        extra: more top-level keys (e.g. ``optimum_task``).
    """
    manifest: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "format": format,
        "task": task,
        "inputs": inputs,
        "outputs": outputs,
        "method": adapter["peft_type"] if adapter else None,
        "adapter": adapter,
        "merged": bool(merged),
        "opset": opset,
        "base_model": base_model,
        "versions": versions(),
    }
    manifest.update(extra or {})
    manifest["files"] = file_hashes(directory)
    return manifest


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as indented JSON with a trailing newline (atomically: :func:`peftc.files.write_atomic`)."""
    return write_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Read ``manifest.json`` of an artifact directory (a one-line ``PeftcError`` when unreadable)."""
    return read_json(Path(directory) / MANIFEST_FILE, what="artifact manifest")


def check_manifest(directory: str | Path) -> list[str]:
    """Files whose sha256 differs from the manifest, or that are missing or unlisted (empty: intact)."""
    directory = Path(directory)
    listed = read_manifest(directory)["files"]
    actual = file_hashes(directory)
    problems = [f"{name}: missing" for name in sorted(set(listed) - set(actual))]
    problems += [f"{name}: not in the manifest" for name in sorted(set(actual) - set(listed))]
    common = sorted(set(listed) & set(actual))
    problems += [f"{name}: sha256 differs" for name in common if listed[name] != actual[name]]
    return problems
