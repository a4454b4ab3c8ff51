"""Swappable adapters for ONNX Runtime: adapter tensors as graph inputs, adapters as ``.onnx_adapter`` files.

A swappable export (``peftc export SRC [SRC2 ...] --adapters-as-inputs``) is one ``model.onnx`` whose
LoRA tensors are named graph inputs (``<module>.lora_A`` ``[lora_rank, in]`` and ``<module>.lora_B``
``[out, lora_rank]``, B pre-scaled by ``s``; see :mod:`peftc.passes.lift`) backed by initializers of
rank 0, so the file runs as the base model when nothing is fed (DoRA adds ``<module>.lora_magnitude_vector``
``[out]``, default ``‖W‖``). Each adapter is an ONNX Runtime
adapter file (``onnxruntime.AdapterFormat``) holding tensors under exactly those names; a run
activates one with ``RunOptions.add_active_adapter(LoraAdapter)`` — no session rebuild, and adapters
of any rank work with the same session.

This module writes and reads adapter files, describes a model's swappable inputs, and checks that an
adapter fits a model (:func:`check_adapter`, for runtime use: ONNX Runtime itself reports a bad
adapter only as a shape error deep inside a run, or not at all for a missing tensor).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from peftc.errors import AdapterFormatError, AdapterMismatchError
from peftc.methods import method_of_tensor

__all__ = [
    "ADAPTER_SUFFIX",
    "OnnxAdapterFiles",
    "adapter_inputs",
    "check_adapter",
    "check_adapter_fits",
    "read_adapter",
    "run_onnx_adapter",
    "write_adapter",
]

ADAPTER_SUFFIX = ".onnx_adapter"
_FORMAT_VERSION = 1


def write_adapter(path: str | Path, tensors: dict[str, np.ndarray], model_version: int = 1) -> Path:
    """Write ``tensors`` (input name -> array) as an ONNX Runtime adapter file.

    Args:
        path: the file to write (``<name>.onnx_adapter`` by convention).
        tensors: graph input name -> array, e.g. :func:`peftc.passes.lift.lifted_tensors` as numpy.
        model_version: stored in the file (``AdapterFormat.set_model_version``).
    """
    import onnxruntime as ort

    arrays = {name: np.ascontiguousarray(a) for name, a in tensors.items()}  # kept alive until written
    values = {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in arrays.items()}
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(_FORMAT_VERSION)
    fmt.set_model_version(int(model_version))
    fmt.set_parameters(values)
    fmt.export_adapter(str(path))
    del values, arrays
    return Path(path)


def read_adapter(path: str | Path) -> dict[str, tuple[list[int], str]]:
    """Tensor name -> (shape, ONNX type string such as ``tensor(float)``) of an adapter file.

    Raises:
        AdapterFormatError: the file is missing or is not an ONNX Runtime adapter.
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise AdapterFormatError(f"adapter file {path} does not exist")
    try:
        params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    except Exception as e:  # ORT raises its own exception types
        raise AdapterFormatError(f"{path} is not an ONNX Runtime adapter file: {str(e).strip().splitlines()[0]}") from e
    return {name: (list(value.shape()), value.data_type()) for name, value in params.items()}


def adapter_inputs(model_path: str | Path) -> dict[str, dict[str, Any]]:
    """The swappable inputs of an ONNX model: graph inputs backed by an initializer (their default).

    Returns:
        Input name -> ``{"shape": [int | dim name], "dtype": "tensor(float)", "default_shape": [int]}``.
    """
    import onnx

    from peftc.errors import PeftcError

    if not Path(model_path).is_file():
        raise PeftcError(f"model file {model_path} does not exist; pass the model.onnx of a swappable export")
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise PeftcError(f"{model_path} is not an ONNX model: {type(e).__name__}") from e
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    out = {}
    for value in model.graph.input:
        if value.name not in inits:
            continue
        tensor = value.type.tensor_type
        shape = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in tensor.shape.dim]
        dtype = f"tensor({onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name})"
        dtype = dtype.replace("float32", "float").replace("float64", "double")
        out[value.name] = {"shape": shape, "dtype": dtype, "default_shape": inits[value.name]}
    return out


def check_adapter_fits(
    inputs: dict[str, dict[str, Any]], tensors: dict[str, tuple[list[int], str]], adapter: str = "adapter"
) -> None:
    """Refuse ``tensors`` (name -> (shape, dtype)) that do not fit swappable ``inputs``; see :func:`check_adapter`."""
    for name in sorted(tensors):
        if name not in inputs:
            raise AdapterMismatchError(
                f"{adapter} has tensor {name!r} but the model has no such swappable input "
                f"(it has {len(inputs)}, e.g. {next(iter(inputs), None)!r}); the adapter was made for other "
                "target modules or another base model"
            )
    for name, spec in inputs.items():
        if name not in tensors:
            if method_of_tensor(name) is not None:  # a method's own tensor (LoRA's A, B, DoRA's magnitude, IA3's l)
                raise AdapterMismatchError(
                    f"{adapter} has no tensor {name!r} that the model takes; the adapter was made for other "
                    "target modules or another base model"
                )
            continue  # a saved module (a head) left out keeps the model's default
        shape, dtype = tensors[name]
        if dtype != spec["dtype"]:
            raise AdapterMismatchError(f"{adapter} tensor {name!r} is {dtype} but the model takes {spec['dtype']}")
        want = spec["shape"]
        fits = len(shape) == len(want) and all(isinstance(w, str) or w == s for s, w in zip(shape, want, strict=True))
        if not fits:
            raise AdapterMismatchError(
                f"{adapter} tensor {name!r} has shape {shape} but the model takes {want}; "
                "the adapter was made for another base model"
            )
    ranks: dict[str, int] = {}  # one value per named rank dim within one adapter
    for name, spec in inputs.items():
        if name not in tensors:
            continue
        for s, w in zip(tensors[name][0], spec["shape"], strict=True):
            if isinstance(w, str) and w.startswith("lora_rank"):
                if ranks.setdefault(w, s) != s:
                    raise AdapterMismatchError(
                        f"{adapter} tensor {name!r} has {w}={s} but another of its tensors has {w}={ranks[w]}"
                    )


def check_adapter(model_path: str | Path, adapter_path: str | Path) -> dict[str, tuple[list[int], str]]:
    """Check that an ``.onnx_adapter`` fits a swappable ``model.onnx`` before activating it.

    Every adapter tensor must be a swappable input of the model with the same dtype and static dims
    (the rank dim is free, the same within each A/B pair), and every LoRA input must be present.

    Args:
        model_path: the swappable ``model.onnx``.
        adapter_path: the ``.onnx_adapter`` file.

    Returns:
        The adapter's tensors: name -> (shape, dtype).

    Raises:
        AdapterMismatchError: naming the first tensor that does not fit.
        AdapterFormatError: the adapter file cannot be read.
    """
    inputs = adapter_inputs(model_path)
    if not inputs:
        raise AdapterMismatchError(f"{model_path} has no swappable adapter inputs; export it with --adapters-as-inputs")
    tensors = read_adapter(adapter_path)
    check_adapter_fits(inputs, tensors, adapter=Path(adapter_path).name)
    return tensors


def run_onnx_adapter(
    path: str | Path,
    cases: Sequence[Any],
    adapter_path: str | Path | None = None,
    output: str | Sequence[str] = "logits",
) -> list:
    """Outputs of ``path`` under ONNX Runtime with ``adapter_path`` activated (``None``: the base)."""
    from .onnx import run_onnx

    return run_onnx(path, cases, output=output, adapter_path=adapter_path)


class OnnxAdapterFiles:
    """The ONNX exporter's swappable adapters (:attr:`peftc.exporters.registry.Exporter.adapter_files`)."""

    suffix = ADAPTER_SUFFIX

    def write(self, path: Path, tensors: dict[str, np.ndarray]) -> Path:
        return write_adapter(path, tensors)

    def check(self, model_path: Path, adapter_path: Path) -> dict[str, tuple[list[int], str]]:
        return check_adapter(model_path, adapter_path)

    def inputs(self, model_path: Path) -> dict[str, dict[str, Any]]:
        return adapter_inputs(model_path)
