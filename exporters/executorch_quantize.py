"""Quantized weights for an ExecuTorch ``model.pte`` (``--format executorch --quantize int8|int4``).

ExecuTorch quantizes the torch graph, not the written file: torchao's PT2E flow
(:func:`torchao.quantization.pt2e.quantize_pt2e.prepare_pt2e` / ``convert_pt2e``) with ExecuTorch's
own ``XNNPACKQuantizer`` annotates every linear layer, and the quantized graph is lowered to the
XNNPACK delegate like the float one (no kernels of ours). Both schemes are XNNPACK's dynamically
quantized linears:

- ``int8``: weights int8, symmetric, one scale per output channel; activations int8 per tensor,
  quantized at run time (XNNPACK's ``qd8-f32-qc8w`` kernels);
- ``int4``: the same with weights in ``[-8, 7]`` (``qd8-f32-qc4w``): one scale per output channel,
  not per block — the PT2E quantizer has no block-wise weights (ONNX's ``int4`` has blocks of 32).

Attention's activation × activation products, embeddings and norms stay float. A linear whose
weight is the adapter's (``keep`` mode) is quantized with the base, as in ONNX; an adapter lifted to a
data file (``--adapters-as-inputs``) would be folded into the program by the quantizer, so that mode
is refused.

The export pipeline verifies the float ``.pte`` first and measures the quantized one afterwards
(:mod:`peftc.exporting.quantize`), when the torch weights are gone; so the exporter lowers both while
it has the program (:func:`staged_path`: the quantized file waits beside the float one) and
:meth:`ExecuTorchQuantizer.quantize` puts it in place.
"""

from __future__ import annotations

import logging
import operator
import warnings
from pathlib import Path

import torch
from torch import fx

from .registry import QuantizedFile, Scheme

__all__ = ["SCHEMES", "ExecuTorchQuantizer", "addmm_to_linear", "quantize_module", "staged_path"]

logger = logging.getLogger(__name__)

#: ``--quantize`` values for ``--format executorch``.
SCHEMES = {
    "int8": Scheme(
        "int8", 8, "torchao PT2E + ExecuTorch XNNPACKQuantizer (int8 per-channel weights, dynamic int8 activations)",
        (), False,
    ),
    "int4": Scheme(
        "int4", 4, "torchao PT2E + ExecuTorch XNNPACKQuantizer (int4 per-channel weights, dynamic int8 activations)",
        (), False,
    ),
}  # fmt: skip
_WEIGHT_RANGE = {"int8": (-127, 127), "int4": (-8, 7)}
#: The key of the quantized-linear count in the ``.pte``'s ``peftc_json``.
QUANTIZED_WEIGHTS = "peftc.quantized_weights"


def staged_path(path: Path, scheme: str) -> Path:
    """Where the exporter leaves the quantized ``.pte`` until the quantize stage puts it at ``path``."""
    return path.with_name(f".{path.name}.{scheme}")


def quantize_module(
    exported: torch.export.ExportedProgram, inputs: tuple[torch.Tensor, ...], scheme: str
) -> tuple[fx.GraphModule, int]:
    """``exported``'s module with its linear layers quantized for XNNPACK (``scheme``), and how many were.

    The weights' scales come from the weights themselves (per output channel) and the activations'
    at run time (dynamic), so one calibration run on ``inputs`` only sets up the observers.
    """
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    module = exported.module()
    addmm_to_linear(module)
    low, high = _WEIGHT_RANGE[scheme]
    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True, weight_qmin=low, weight_qmax=high)
    quantizer = XNNPACKQuantizer().set_global(config)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_pt2e(module, quantizer)
        prepared(*inputs)
        converted = convert_pt2e(prepared)
    return converted, sum(1 for n in converted.graph.nodes if _quantized_linear(n))


def _quantized_linear(node: fx.Node) -> bool:
    """A linear whose weight is dequantized from integers (what the XNNPACK delegate runs as a quantized linear)."""
    if node.op != "call_function" or node.target is not torch.ops.aten.linear.default:
        return False
    weight = node.args[1]
    return isinstance(weight, fx.Node) and "dequantize" in str(weight.target)


def addmm_to_linear(module: fx.GraphModule) -> int:
    """Rewrite ``addmm(b, x, W)`` with a constant ``W [in, out]`` as ``linear(x, Wᵀ, b)``; how many were rewritten.

    transformers' ``Conv1D`` (GPT-2's projections) computes ``addmm``, which the XNNPACK quantizer does
    not annotate; as a linear over the transposed weight (a new constant, the same arithmetic) it is
    quantized like every other projection. The ONNX side does the same to ``Gemm`` (``gemm_to_matmul``).
    """
    count = 0
    for node in list(module.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.addmm.default or node.kwargs:
            continue
        bias, x, weight = node.args[:3]
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr") or len(node.args) > 3:
            continue
        value = operator.attrgetter(weight.target)(module)
        name = f"{weight.target.replace('.', '_')}_t"
        module.register_buffer(name, value.detach().t().contiguous())
        with module.graph.inserting_before(node):
            transposed = module.graph.get_attr(name)
            linear = module.graph.call_function(torch.ops.aten.linear.default, (x, transposed, bias))
        linear.meta = dict(node.meta)
        node.replace_all_uses_with(linear)
        module.graph.erase_node(node)
        count += 1
    if count:
        module.graph.eliminate_dead_code()
        module.graph.lint()
        module.recompile()
    return count


class ExecuTorchQuantizer:
    """The ExecuTorch exporter's quantizer (``EXECUTORCH.quantizer``): puts the staged quantized ``.pte`` in place."""

    schemes = SCHEMES
    #: An adapter lifted to a data file cannot stay float: the quantizer folds it into the program.
    lifted_adapters = False

    def quantize(
        self, path: Path, scheme: str, block_size: int | None = None, metadata: dict[str, str] | None = None
    ) -> QuantizedFile:
        """Replace the verified float ``path`` with the quantized program lowered beside it.

        ``block_size`` does not apply (per-channel scales); ``metadata`` is already in the staged
        file's ``peftc_json`` (it was lowered with it).
        """
        from .executorch import read_info

        staged = staged_path(path, scheme)
        if not staged.is_file():
            raise FileNotFoundError(f"{staged} was not written: the exporter lowers the quantized program first")
        float_size = path.stat().st_size
        staged.replace(path)
        quantized = int(read_info(path).get(QUANTIZED_WEIGHTS, 0))
        return QuantizedFile(float_size, path.stat().st_size, quantized, 0)
