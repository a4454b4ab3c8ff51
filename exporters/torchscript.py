"""TorchScript exporter: a captured program to ``model.pt`` that LibTorch (C++) loads with ``torch::jit::load``.

**Why ``torch.jit.script`` of the ATen graph, not ``torch.jit.trace``.** A program's graph comes from
``torch.export``: every size it depends on is an explicit ``aten.sym_size.int(x, d)`` node. Under
``torch.jit.trace`` that op returns a plain Python ``int``, which the tracer records as a constant —
only ``Tensor.size()`` called through the Python bindings yields a traced size. A traced GPT-2 program
therefore only runs at the capture shape (measured: ``shape '[-1, 8]' is invalid for input of size 27``
on a 3 × 9 batch). Scripting keeps every size a runtime value: the graph is rewritten into code the
TorchScript compiler accepts, the same rewrite PyTorch's own ``torch._functorch.compilers.ts_compile``
applies to ATen graphs:

- ``OpOverload`` targets (``aten.view.default``) become their packets (``aten.view``); TorchScript
  resolves the overload from the argument types again. ``aten.sym_size.int`` becomes ``aten.size.int``;
- ``torch.device`` arguments become strings (TorchScript converts ``"cpu"`` to a device);
- assertion-only nodes (``_assert_tensor_metadata``, ``_assert_scalar``) and the export guard
  (``_guards_fn``) are dropped: they check shapes and dtypes the verification checks anyway;
- higher-order ``wrap_with_set_grad_enabled`` / ``wrap_with_autocast`` regions (LLaMA's rotary
  embedding) are inlined: the artifact is an fp32 inference graph, where both are no-ops;
- the graph's inputs take the program's names (``input_ids``, ``attention_mask``…; a name that is not
  an identifier, ``past_key_values.0.key``, becomes ``past_key_values_0_key``): the C++ example reads
  them from the ``forward`` schema. Parameters are stored detached (``requires_grad=False``).

Measured on the tiny GPT-2 / LLaMA / BERT models: max |TorchScript − program| = 0.0 on batch 1, a new
batch/sequence shape and a left-padded batch, for LoRA merged and unmerged, AdaLoRA and IA3 merged and
unmerged, prompt tuning and P-tuning (MLP and LSTM encoders), and a KV-cache (with-past) graph
(prefill and decode steps; several outputs come back as a tuple).

``model.pt`` also carries ``peftc.json`` (``torch.jit.save``'s extra files): the input and output
names, the task and the dynamic dims, so a runtime learns the interface without Python.

The format's exporter (:data:`TORCHSCRIPT`, registered as ``--format torchscript``) takes one float32
graph with one adapter in it, merged or as ops (:func:`check_one_float32_graph`), and a KV-cache graph
only when asked (the C++ example feeds no cache).
"""

from __future__ import annotations

import copy
import json
import keyword
import logging
import operator
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from peftc.errors import CaptureError, ConfigError
from peftc.program import Program, get_tensor

from .registry import ExportRequest, GraphlessFileExporter, WriteOptions, register_exporter
from .verify import VerifyCase, numpy_outputs

__all__ = [
    "EXTRA_FILE",
    "MODEL_FILE",
    "TORCHSCRIPT",
    "argument_name",
    "check_one_float32_graph",
    "export_program_torchscript",
    "load_torchscript",
    "run_torchscript",
    "script_program",
    "scriptable_graph_module",
]

logger = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
#: Name of the JSON file stored inside ``model.pt`` (``torch.jit.save(..., _extra_files=...)``).
EXTRA_FILE = "peftc.json"

_SIZE_OPS = {
    "sym_size.int": torch.ops.aten.size.int,
    "sym_numel.default": torch.ops.aten.numel.default,
    "sym_stride.int": torch.ops.aten.stride.int,
}
#: Python-level symbolic helpers torch.export may emit, and the builtins TorchScript knows instead.
_SYM_BUILTINS = {torch.sym_max: max, torch.sym_min: min, torch.sym_float: float, torch.sym_int: int}
_SAFE_BUILTINS = {
    operator.getitem,
    operator.add,
    operator.sub,
    operator.mul,
    operator.floordiv,
    operator.truediv,
    operator.mod,
    operator.neg,
    operator.eq,
    operator.ne,
    operator.lt,
    operator.le,
    operator.gt,
    operator.ge,
    max,
    min,
    float,
    int,
}
_INLINED_HOPS = ("wrap_with_set_grad_enabled", "wrap_with_autocast")


def export_program_torchscript(program: Program, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Script ``program`` and save it as a TorchScript file with dynamic batch and sequence dims.

    Args:
        program: an eval-mode :class:`~peftc.program.Program`, merged (``merge_pipeline()(program)``)
            or with its LoRA / IA3 / AdaLoRA branch still as ops.
        path: the ``.pt`` file to write; its parent directory must exist.
        metadata: extra string-valued entries for the embedded ``peftc.json`` (``peftc.*`` keys).

    Returns:
        ``path``.

    Raises:
        ConfigError: a train-mode program (it bakes in dropout).
        CaptureError: the graph holds an op TorchScript cannot compile (the message names the node).
    """
    path = Path(path)
    scripted = script_program(program)
    info = {
        "input_names": list(program.input_names),
        "argument_names": [argument_name(n) for n in program.input_names],  # forward()'s, same order
        "output_names": list(program.output_names),
        "task": program.task.name,
        "dynamic_dims": {name: {str(k): v for k, v in dims.items()} for name, dims in program.dynamic_dims.items()},
        "max_sequence": program.max_positions(),
        **{str(k): str(v) for k, v in (metadata or {}).items()},
    }
    torch.jit.save(scripted, str(path), _extra_files={EXTRA_FILE: json.dumps(info, indent=2)})
    logger.info("wrote %s (TorchScript, inputs %s)", path, ", ".join(program.input_names))
    return path


def script_program(program: Program) -> torch.jit.ScriptModule:
    """``torch.jit.script`` of :func:`scriptable_graph_module` (see the module docstring for why not trace)."""
    gm = scriptable_graph_module(program)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's deprecation notice
            return torch.jit.script(gm)
    except Exception as e:  # the TorchScript frontend raises RuntimeError and friends
        first = str(e).strip().splitlines()
        raise CaptureError(
            f"TorchScript cannot compile the {program.task.name} program: {type(e).__name__}: "
            f"{' '.join(first[:2]) if first else ''}; export with --format onnx or aoti instead"
        ) from e


def scriptable_graph_module(program: Program) -> fx.GraphModule:
    """A copy of the program's graph module rewritten into code ``torch.jit.script`` compiles.

    The program is not changed; parameters and buffers are shared with it through detached
    tensors (no copy of the weights, no autograd history in the artifact).

    Raises:
        ConfigError: a train-mode program.
        CaptureError: a node TorchScript has no equivalent for (named in the message).
    """
    if program.mode != "eval":
        raise ConfigError(
            f"cannot export a {program.mode}-mode program (it bakes in dropout); capture the model with mode='eval'"
        )
    source = program.graph_module
    graph = copy.deepcopy(source.graph)
    graph.set_codegen(fx.graph.CodeGen())  # plain positional forward: no pytree flatten/unflatten
    attrs: dict[str, Any] = {}
    _inline_regions(graph, source, attrs)
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
        elif node.op == "call_function":
            _rewrite_call(graph, node)
    _name_inputs(graph, program.input_names)
    output = graph.output_node()
    values = output.args[0]
    if isinstance(values, (tuple, list)) and len(values) == 1:
        output.args = (values[0],)
    graph.eliminate_dead_code()
    for node in graph.nodes:
        if node.op == "get_attr" and node.target not in attrs:
            attrs[node.target] = get_tensor(source, node.target)
        elif node.op == "call_module":
            raise CaptureError(
                f"TorchScript export cannot call submodule {node.target!r} ({node.format_node()}); "
                "export with --format onnx or aoti instead"
            )
    root = {name: _detached(value) for name, value in attrs.items()}
    gm = fx.GraphModule(root, graph, class_name="PeftcProgram")
    graph.lint()
    return gm


def _detached(value: Any) -> Any:
    if isinstance(value, nn.Parameter):
        return nn.Parameter(value.detach(), requires_grad=False)
    if isinstance(value, torch.Tensor):
        return value.detach()
    return value


def _inline_regions(graph: fx.Graph, owner: nn.Module, attrs: dict[str, Any], prefix: str = "") -> None:
    """Replace every higher-order ``wrap_with_*`` call by the nodes of its subgraph (recursively)."""
    for node in list(graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.HigherOrderOperator):
            continue
        name = node.target.__name__
        if name not in _INLINED_HOPS:
            raise CaptureError(
                f"TorchScript export cannot inline the higher-order op {name} ({node.format_node()}); "
                "export with --format onnx or aoti instead"
            )
        # wrap_with_set_grad_enabled(enabled, submod, *args); wrap_with_autocast(dev, dtype, on, cache, submod, *args)
        index = next(i for i, a in enumerate(node.args) if isinstance(a, fx.Node) and a.op == "get_attr")
        sub_node, args = node.args[index], node.args[index + 1 :]
        sub = get_tensor(owner, sub_node.target)
        sub_graph = copy.deepcopy(sub.graph)
        sub_prefix = f"{prefix}{sub_node.target}."
        _inline_regions(sub_graph, sub, attrs, sub_prefix)
        env: dict[fx.Node, Any] = {}
        placeholders = [n for n in sub_graph.nodes if n.op == "placeholder"]
        env.update(zip(placeholders, args, strict=True))
        result: Any = None
        with graph.inserting_before(node):
            for sub_n in sub_graph.nodes:
                if sub_n.op == "placeholder":
                    continue
                if sub_n.op == "output":
                    result = fx.node.map_arg(sub_n.args[0], env.__getitem__)
                    break
                if sub_n.op == "get_attr":
                    qualified = f"{sub_prefix}{sub_n.target}".replace(".", "_")
                    attrs.setdefault(qualified, get_tensor(sub, sub_n.target))
                    env[sub_n] = graph.get_attr(qualified)
                    env[sub_n].meta = dict(sub_n.meta)
                else:
                    env[sub_n] = graph.node_copy(sub_n, env.__getitem__)
        for user in list(node.users):
            if user.op == "call_function" and user.target is operator.getitem and isinstance(result, (tuple, list)):
                user.replace_all_uses_with(result[user.args[1]])
                graph.erase_node(user)
        if node.users:
            node.replace_all_uses_with(result)
        graph.erase_node(node)
        if not sub_node.users:
            graph.erase_node(sub_node)


def _rewrite_call(graph: fx.Graph, node: fx.Node) -> None:
    """One call_function node in the form TorchScript compiles, or dropped when it only asserts."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        schema = target._schema
        if not schema.returns and (schema.name.startswith("aten::_assert") or "constrain_range" in schema.name):
            graph.erase_node(node)
            return
        key = f"{target.overloadpacket.__name__}.{target._overloadname}"
        target = _SIZE_OPS.get(key, target)
        node.target = target.overloadpacket
    elif target in _SYM_BUILTINS:
        node.target = _SYM_BUILTINS[target]
    elif target not in _SAFE_BUILTINS:
        raise CaptureError(
            f"TorchScript export has no equivalent for {getattr(target, '__name__', target)!r} "
            f"({node.format_node()}); export with --format onnx or aoti instead"
        )
    node.args = _ts_value(node.args)
    node.kwargs = {k: _ts_value(v) for k, v in node.kwargs.items()}


def _ts_value(value: Any) -> Any:
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_ts_value(v) for v in value)
    return value


def _name_inputs(graph: fx.Graph, names: Sequence[str]) -> None:
    """Name the forward arguments after the inputs (``past_key_values.0.key`` -> ``past_key_values_0_key``)."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(names):
        raise CaptureError(f"the graph takes {len(placeholders)} inputs but the program names {len(names)}: {names}")
    for node, name in zip(placeholders, names, strict=True):
        node.target = argument_name(name)
        node._rename(node.target)


def argument_name(name: str) -> str:
    """The ``forward`` argument of a graph input in ``model.pt``: the input name as a Python identifier."""
    out = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return f"_{out}" if not out or out[0].isdigit() or keyword.iskeyword(out) else out


def load_torchscript(path: str | Path) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """Load ``model.pt`` and its embedded ``peftc.json`` (empty dict when the file has none)."""
    extra = {EXTRA_FILE: ""}
    module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    info = json.loads(extra[EXTRA_FILE]) if extra[EXTRA_FILE] else {}
    return module.eval(), info


def run_torchscript(path: str | Path, cases: Sequence[VerifyCase], input_names: Sequence[str]) -> list[Any]:
    """Outputs of a TorchScript file (``torch.jit.load``) on every case, inputs in ``input_names`` order.

    One array per case, or a list of arrays per case for a graph with several outputs (KV-cache
    graphs: logits, then the presents), as :func:`~peftc.exporters.verify.run_torch` returns them.
    """
    module, _ = load_torchscript(path)
    with torch.inference_mode():
        return [numpy_outputs(module(*c.ordered(input_names))) for c in cases]


def check_one_float32_graph(request: ExportRequest, what: str, format: str) -> None:
    """What the LibTorch formats (TorchScript, AOTInductor) refuse: they take one float32 graph with one adapter.

    Raises:
        ConfigError: adapters as inputs, a dtype other than float32, or several graphs (seq2seq, image-to-text).
    """
    if request.adapters_as_inputs:
        raise ConfigError(
            f"--adapters-as-inputs makes ONNX Runtime adapter files; {what} takes one adapter: "
            "export each adapter on its own, or use --format onnx"
        )
    if request.dtype != "float32":
        raise ConfigError(f"--dtype {request.dtype} is supported for --format onnx only; export {what} in float32")
    if request.graphs > 1:
        raise ConfigError(
            f"this model exports as {request.graphs} ONNX graphs (seq2seq: encoder and decoder; image-to-text: the "
            f"whole forward and three generation graphs); --format {format} takes causal-lm, seq-cls and token-cls "
            "models"
        )


class TorchScriptExporter(GraphlessFileExporter):
    """``--format torchscript``: ``model.pt`` for LibTorch's ``torch::jit::load`` (C++, see examples/cpp)."""

    name = "torchscript"
    runtime = "TorchScript"
    summary = "model.pt (TorchScript) for LibTorch/C++ (see examples/cpp)"
    cache_by_default = False  # the C++ example feeds no cache: a KV-cache graph only when asked
    model_file_name = MODEL_FILE

    def check(self, request: ExportRequest) -> None:
        check_one_float32_graph(request, self.runtime, self.name)

    def write(self, program: Program, path: Path, metadata: dict[str, str], options: WriteOptions) -> None:
        export_program_torchscript(program, path, metadata=metadata)

    def run_file(self, path: Path, cases: Sequence[VerifyCase], input_names: Sequence[str]) -> list[Any]:
        return run_torchscript(path, cases, input_names)

    def manifest_entries(self, path: Path, program: Program, options: WriteOptions) -> dict[str, Any]:
        # forward() argument names: the input names as identifiers
        return {"opset": None, "argument_names": [argument_name(n) for n in program.input_names]}


#: The TorchScript exporter, as registered.
TORCHSCRIPT = register_exporter(TorchScriptExporter())
