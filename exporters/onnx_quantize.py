"""Quantized weights for an exported ``model.onnx``: ONNX Runtime's own quantizers, rewriting the file in place.

Two schemes, both weight quantizations by ONNX Runtime's maintained tools (no kernels of ours):

- ``int4``: :class:`onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer` — each
  constant weight ``W [K, N]`` of a ``MatMul`` is cut into blocks of ``block_size`` values along
  ``K`` and each block stored as 4-bit integers with one float scale and a 4-bit zero point
  (asymmetric: ``w ≈ scale·(q − zp)``, ``q ∈ [0, 15]``); the node becomes ``MatMulNBits``, the
  operator onnxruntime-genai's CPU and GPU models use. Activations stay float (``accuracy_level``
  unset: dequantized weights times float activations).
- ``int8``: :func:`onnxruntime.quantization.quantize_dynamic` — weights to int8, symmetric, one
  scale per output channel; activations are quantized per tensor at run time
  (``DynamicQuantizeLinear`` → ``MatMulInteger``). Only ``MatMul``\\ s whose second input is a
  constant are touched (``MatMulConstBOnly``): attention's ``Q·Kᵀ`` and ``P·V`` stay float.

The dynamo exporter writes ``nn.Linear`` as ``Gemm(x, W, b, transB=1)`` on 2-D views, which neither
quantizer takes; :func:`gemm_to_matmul` first rewrites each such ``Gemm`` with a constant weight into
``MatMul(x, Wᵀ)`` (+ ``Add(b)``), the same arithmetic.

A weight is left in float when it is a graph input: an initializer that is also an input is a
runtime-overridable default (a swappable export's adapter tensors), not a constant.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
from onnx import helper, numpy_helper

from .registry import QuantizedFile, Scheme

__all__ = ["SCHEMES", "OnnxQuantizer", "QuantizedFile", "Scheme", "gemm_to_matmul", "quantized_ops"]

logger = logging.getLogger(__name__)


#: ``--quantize`` values.
SCHEMES = {
    "int4": Scheme("int4", 4, "onnxruntime MatMulNBitsQuantizer (block-wise, asymmetric)", ("MatMulNBits",), True),
    "int8": Scheme(
        "int8", 8, "onnxruntime quantize_dynamic (int8 per-channel weights, dynamic int8 activations)",
        ("MatMulInteger", "DynamicQuantizeLinear"), False,
    ),
}  # fmt: skip


def file_bytes(path: Path) -> int:
    """Bytes of an ONNX file and its external data file(s) beside it."""
    model = onnx.load(str(path), load_external_data=False)
    data = {
        entry.value
        for t in model.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
        for entry in t.external_data
        if entry.key == "location"
    }
    return path.stat().st_size + sum((path.parent / d).stat().st_size for d in data)


def gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Rewrite ``Gemm(x, W[, b])`` with a constant ``W`` (not a graph input) as ``MatMul(x, W')`` (+ ``Add(b)``).

    ``W' = Wᵀ`` for ``transB=1`` (a new initializer ``<W>.T``; ``W`` goes when nothing else reads it). Only the
    plain form is rewritten (``alpha = beta = 1``, ``transA = 0``), which is what the exporter writes
    for linear layers. Returns the number of nodes rewritten.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    inputs = {i.name for i in graph.input}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    nodes: list[onnx.NodeProto] = []
    rewritten = 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        w = node.input[1] if node.op_type == "Gemm" and len(node.input) > 1 else None
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if w is None or w not in inits or w in inputs or not plain:
            nodes.append(node)
            continue
        if attrs.get("transB", 0):
            new_name = f"{w}.T"
            if new_name not in inits:  # a weight read by several Gemms is transposed once
                inits[new_name] = numpy_helper.from_array(numpy_helper.to_array(inits[w]).T.copy(), new_name)
                graph.initializer.append(inits[new_name])
            readers[w] -= 1
            w = new_name
        has_bias = len(node.input) > 2 and node.input[2]
        product = f"{node.output[0]}.matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], w], [product], name=f"{node.name}.matmul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}.bias"))
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    unused = {name for name, n in readers.items() if n == 0 and name in inits}  # the transposed weights' originals
    if unused:
        kept = [t for t in graph.initializer if t.name not in unused]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        info = [v for v in graph.value_info if v.name not in unused]  # the exporter records their (old) shapes
        del graph.value_info[:]
        graph.value_info.extend(info)
    return rewritten


def _float_matmuls(model: onnx.ModelProto) -> tuple[list[str], int]:
    """Names of the ``MatMul`` nodes whose weight is a graph input (no quantizer may touch them), and how
    many initializers are graph inputs (defaults of runtime inputs: a swappable export's adapter tensors)."""
    inits = {t.name for t in model.graph.initializer}
    inputs = {i.name for i in model.graph.input}
    exclude = [n.name for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inputs]
    return exclude, len(inits & inputs)


def quantized_ops(model: onnx.ModelProto) -> dict[str, int]:
    """Count of quantized ops per type in ``model`` (MatMulNBits, MatMulInteger, DynamicQuantizeLinear)."""
    ops = {op for s in SCHEMES.values() for op in s.ops}
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in ops:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


class OnnxQuantizer:
    """The ONNX exporter's quantizer (``ONNX.quantizer``): rewrites a written ``.onnx`` with quantized weights."""

    schemes = SCHEMES
    #: Weights that are graph inputs (a swappable export's adapter tensors) stay float.
    lifted_adapters = True

    def quantize(
        self,
        path: Path,
        scheme: str,
        block_size: int = 32,
        metadata: dict[str, str] | None = None,
    ) -> QuantizedFile:
        """Quantize ``path`` in place (and its external data: kept external when the float file had it).

        Args:
            path: the float ``.onnx`` file (verified already).
            scheme: ``int4`` or ``int8`` (:data:`SCHEMES`).
            block_size: int4 block length along the input dim (a power of two ≥ 16).
            metadata: ``metadata_props`` entries to add.
        """
        float_size = file_bytes(path)
        external = any(
            t.data_location == onnx.TensorProto.EXTERNAL
            for t in onnx.load(str(path), load_external_data=False).graph.initializer
        )
        model = onnx.load(str(path))
        gemm_to_matmul(model)
        exclude, float_weights = _float_matmuls(model)
        with _quiet_quantizers():
            if scheme == "int4":
                quantized = self._int4(model, block_size, exclude)
            elif scheme == "int8":
                quantized = self._int8(model, exclude, external)
            else:  # pragma: no cover - the pipeline checks the scheme first
                raise ValueError(f"unknown scheme {scheme!r}")
        quantized.metadata_props.extend(
            onnx.StringStringEntryProto(key=k, value=v) for k, v in (metadata or {}).items()
        )
        _save(quantized, path, external)
        onnx.checker.check_model(str(path))
        counts = quantized_ops(quantized)
        n = counts.get("MatMulNBits", 0) + counts.get("MatMulInteger", 0)
        return QuantizedFile(float_size, file_bytes(path), n, float_weights)

    @staticmethod
    def _int4(model: onnx.ModelProto, block_size: int, exclude: list[str]) -> onnx.ModelProto:
        with _keep_root_logger():  # the module calls logging.basicConfig(level=INFO) when imported
            from onnxruntime.quantization.matmul_nbits_quantizer import (
                DefaultWeightOnlyQuantConfig,
                MatMulNBitsQuantizer,
            )

        config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=False, bits=4)
        quantizer = MatMulNBitsQuantizer(
            model, block_size=block_size, is_symmetric=False, bits=4, nodes_to_exclude=exclude, algo_config=config
        )
        quantizer.process()
        return quantizer.model.model

    @staticmethod
    def _int8(model: onnx.ModelProto, exclude: list[str], external: bool) -> onnx.ModelProto:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "model.onnx"
            quantize_dynamic(
                model,
                out,
                op_types_to_quantize=["MatMul"],
                per_channel=True,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude,
                use_external_data_format=external,
                extra_options={"MatMulConstBOnly": True},
            )
            return onnx.load(str(out))


@contextlib.contextmanager
def _keep_root_logger() -> Iterator[None]:
    """Undo what an import does to the root logger (handlers, level): the caller's logging is not ours to set."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        root.setLevel(level)


class _DropPreprocessingHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


@contextlib.contextmanager
def _quiet_quantizers() -> Iterator[None]:
    """The quantizers log each node at INFO and advise (on the root logger) a pre-processing that
    targets static quantization of CNNs; neither is the user's business."""
    log = logging.getLogger("onnxruntime.quantization")
    level = log.level
    hint = _DropPreprocessingHint()
    log.setLevel(logging.WARNING)
    logging.getLogger().addFilter(hint)
    try:
        yield
    finally:
        log.setLevel(level)
        logging.getLogger().removeFilter(hint)


def _save(model: onnx.ModelProto, path: Path, external: bool) -> None:
    """Write ``model`` over ``path``: external data to ``<name>.data`` if the float file had it, else inline."""
    data = path.parent / f"{path.name}.data"
    if data.exists():
        os.remove(data)  # the float weights; the quantized ones replace them
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
    else:
        onnx.save_model(model, str(path))
