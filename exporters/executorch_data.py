"""ExecuTorch program–data separation: one ``model.pte``, base weights in ``model.ptd``, one ``.ptd`` per adapter.

``peftc export SRC1 SRC2 … --format executorch --adapters-as-inputs`` lifts the adapters' tensors
(:mod:`peftc.passes.lift`: LoRA's A ``[r, in]`` and B pre-scaled by ``s`` ``[out, r]``, IA3's ``l``…)
and the ExecuTorch exporter turns them back into **named constants** of one fixed shape: every rank is
padded with zeros to the largest rank of the sources (exact: the padding rows and columns add
nothing). The program then reads

- the base weights from ``model.ptd`` (tag ``model``: the XNNPACK delegate's constants, keyed by the
  hash of their bytes, and the portable kernels' ones, keyed by name), and
- the adapter's tensors from one adapter file, keyed by name (``peftc_adapter.<input>``):
  ``adapter.ptd`` holds the no-op adapter (the base model: zeros, IA3's ones), ``adapters/<name>.ptd``
  each source's.

The adapter's ops stay out of the XNNPACK delegate (:func:`keep_adapters_out`): XNNPACK keys its constants by
the hash of their bytes, so a delegated adapter would only ever find the adapter it was lowered with.
They run with ExecuTorch's portable kernels on rank-``r`` matrices — a small cost next to the base
model's delegated matmuls.

A device loads the one program with two data files: in C++
``executorch::extension::Module(“model.pte”, {“model.ptd”, “adapters/<name>.ptd”})``. ExecuTorch's
Python runtime takes one data file, so :func:`merged_data` writes the pair as one ``.ptd`` (same keys,
same bytes) for verification here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftc.errors import AdapterFormatError, AdapterMismatchError

__all__ = [
    "ADAPTER_TAG",
    "DATA_SUFFIX",
    "ExecuTorchAdapterFiles",
    "keep_adapters_out",
    "MODEL_TAG",
    "constant_attr",
    "is_adapter_constant",
    "merged_data",
    "read_data",
    "write_data",
]

DATA_SUFFIX = ".ptd"
#: Tag (file stem) of the base weights and of the no-op adapter written with the program.
MODEL_TAG = "model"
ADAPTER_TAG = "adapter"
#: Submodule of the exported module holding the adapter constants (their names in the .ptd files).
ADAPTER_MODULE = "peftc_adapter"
_ALIGNMENT = 64


def constant_attr(input_name: str) -> str:
    """The attribute (under :data:`ADAPTER_MODULE`) holding a lifted input as a constant: dots become ``__``."""
    return re.sub(r"[^0-9A-Za-z_]", "_", input_name.replace(".", "__"))


def is_adapter_constant(name: str) -> bool:
    """Whether a placeholder/constant name of the lowered program is an adapter tensor."""
    return ADAPTER_MODULE in name


def _serializer():
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer

    return FlatTensorSerializer()


def read_data(path: str | Path) -> tuple[list[bytes], dict[str, Any]]:
    """Buffers and named entries (key -> ``DataEntry``) of a ``.ptd`` file.

    Raises:
        AdapterFormatError: a missing file or one that is not ExecuTorch data.
    """
    from executorch.exir._serialize._cord import Cord

    path = Path(path)
    if not path.is_file():
        raise AdapterFormatError(f"ExecuTorch data file {path} does not exist")
    try:
        payload = _serializer().deserialize(Cord(path.read_bytes()))
    except Exception as e:  # the deserializer raises several types
        raise AdapterFormatError(f"{path} is not an ExecuTorch .ptd data file: {e}") from e
    return [bytes(b) for b in payload.buffers], dict(payload.named_data)


def _write(path: Path, buffers: Sequence[bytes], entries: dict[str, Any]) -> Path:
    from executorch.exir._serialize.data_serializer import DataEntry, DataPayload

    named = {k: DataEntry(e.buffer_index, max(e.alignment, _ALIGNMENT), e.tensor_layout) for k, e in entries.items()}
    cord = _serializer().serialize(DataPayload(buffers=list(buffers), named_data=named))
    with open(path, "wb") as f:
        cord.write_to_file(f)
    return path


def write_data(path: str | Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``tensors`` (key -> tensor) as a ``.ptd`` file, each under its key with its layout."""
    from executorch.exir._serialize.data_serializer import DataEntry
    from executorch.exir.tensor_layout import TensorLayout

    buffers, entries = [], {}
    for key, tensor in tensors.items():
        tensor = tensor.detach().contiguous()
        entries[key] = DataEntry(len(buffers), _ALIGNMENT, TensorLayout.from_tensor(tensor))
        buffers.append(tensor.numpy().tobytes())
    return _write(Path(path), buffers, entries)


def merged_data(paths: Sequence[str | Path], out: str | Path) -> Path:
    """One ``.ptd`` holding every entry of ``paths`` (what C++ ``Module(pte, {a.ptd, b.ptd})`` sees as one map).

    Raises:
        AdapterMismatchError: two files hold the same key.
    """
    buffers: list[bytes] = []
    entries: dict[str, Any] = {}
    for path in paths:
        own, named = read_data(path)
        for key, entry in named.items():
            if key in entries:
                raise AdapterMismatchError(f"{Path(path).name} and an earlier data file both hold {key!r}")
            entry.buffer_index += len(buffers)
            entries[key] = entry
        buffers += own
    return _write(Path(out), buffers, entries)


def keep_adapters_out(partitioner_cls: type) -> type:
    """A subclass of an ExecuTorch config-based partitioner whose groups never read an adapter constant."""

    class KeepingAdaptersOut(partitioner_cls):
        def get_matched_nodes_from_configs(self, ep):  # ExecuTorch's signature
            groups = super().get_matched_nodes_from_configs(ep)
            return [g for g in groups if not any(_reads_adapter(n) for n in g)]

        def ops_to_not_decompose(self, ep):  # what is left out is decomposed to Edge ops as usual
            ops, keep = super().ops_to_not_decompose(ep)
            return ops, (lambda node: (keep is None or keep(node)) and not _reads_adapter(node))

    KeepingAdaptersOut.__name__ = f"{partitioner_cls.__name__}KeepingAdaptersOut"
    return KeepingAdaptersOut


def _reads_adapter(node: torch.fx.Node) -> bool:
    """Whether ``node`` is an adapter constant or reads one (through views, transposes and copies)."""
    if node.op == "placeholder":
        return is_adapter_constant(node.name)
    for arg in node.all_input_nodes:
        while arg.op == "call_function" and len(arg.all_input_nodes) == 1:  # t(B), view(A), _to_copy(l)…
            arg = arg.all_input_nodes[0]
        if arg.op == "placeholder" and is_adapter_constant(arg.name):
            return True
    return False


class ExecuTorchAdapterFiles:
    """The ExecuTorch exporter's swappable adapters: ``adapters/<name>.ptd`` (see the module docstring).

    The layout of the adapter constants (key, padded shape, rank axis) is read from the program's
    ``peftc_json`` (``adapter_constants``): a file is written for the ``model.pte`` of its artifact
    (``<artifact>/adapters/<name>.ptd``, or any ``.pte`` beside it given with ``model``).
    """

    suffix = DATA_SUFFIX

    def write(self, path: Path, tensors: dict[str, np.ndarray], model: Path | None = None) -> Path:
        """Write one adapter's lifted tensors (input name -> array), zero-padded to the program's shapes."""
        layout = _layout(model or _model_of(path))
        missing = sorted(set(layout) - set(tensors))
        if missing:
            raise AdapterMismatchError(f"{path.name}: no tensor for the program's adapter inputs {missing}")
        out = {}
        for name, spec in layout.items():
            value = torch.from_numpy(np.ascontiguousarray(tensors[name])).float()
            out[spec["key"]] = _pad(value, spec["shape"], spec.get("rank_dim"), name)
        return write_data(path, out)

    def check(self, model_path: Path, adapter_path: Path) -> dict[str, tuple[list[int], str]]:
        """Refuse an adapter file whose keys or shapes are not the program's.

        Raises:
            AdapterMismatchError: a missing key or a shape the program was not lowered for.
        """
        layout = _layout(model_path)
        _, entries = read_data(adapter_path)
        found: dict[str, tuple[list[int], str]] = {}
        for name, spec in layout.items():
            entry = entries.get(spec["key"])
            if entry is None:
                raise AdapterMismatchError(f"{adapter_path.name} has no tensor {spec['key']!r} ({name})")
            sizes = list(entry.tensor_layout.sizes)
            if sizes != list(spec["shape"]):
                raise AdapterMismatchError(
                    f"{adapter_path.name}: {name} has shape {sizes}, the program was lowered for {spec['shape']}"
                )
            found[name] = (sizes, "float32")
        return found

    def inputs(self, model_path: Path) -> dict[str, dict[str, Any]]:
        """The program's adapter constants: name -> ``shape``, ``dtype``, ``default_shape``, ``key``."""
        return {
            name: {"shape": spec["shape"], "dtype": "float32", "default_shape": spec["shape"], "key": spec["key"]}
            for name, spec in _layout(model_path).items()
        }


def _model_of(path: Path) -> Path:
    from .executorch import MODEL_FILE

    for candidate in (path.parent / MODEL_FILE, path.parent.parent / MODEL_FILE):
        if candidate.is_file():
            return candidate
    raise AdapterMismatchError(f"no {MODEL_FILE} beside {path} to take the adapter layout from")


def _layout(model: Path) -> dict[str, dict[str, Any]]:
    from .executorch import read_info

    layout = read_info(model).get("adapter_constants")
    if not layout:
        raise AdapterMismatchError(f"{model.name} keeps no adapter in data files (export it with --adapters-as-inputs)")
    return layout


def _pad(value: torch.Tensor, shape: Sequence[int], rank_dim: int | None, name: str) -> torch.Tensor:
    """``value`` zero-padded along ``rank_dim`` to ``shape`` (its other sizes must match)."""
    shape = list(shape)
    if list(value.shape) == shape:
        return value.contiguous()
    fits = rank_dim is not None and value.dim() == len(shape)
    fits = fits and all(s == t for i, (s, t) in enumerate(zip(value.shape, shape, strict=True)) if i != rank_dim)
    if not fits or value.shape[rank_dim] > shape[rank_dim]:
        raise AdapterMismatchError(
            f"{name} has shape {list(value.shape)}; the program takes {shape} (rank padded along axis {rank_dim}): "
            "export the adapters together, or re-export with this one among the sources"
        )
    out = value.new_zeros(shape)
    out.narrow(rank_dim, 0, value.shape[rank_dim]).copy_(value)
    return out
