"""Many adapters in one batch: each row of a run gets its own adapter, chosen by the input ``adapter_index``.

``adapter_index`` is an ``int64[batch]`` graph input: ``-1`` is the base model, ``i`` the ``i``-th
source. Every site's tensors of all ``n`` sources are stacked into one constant of the graph with a
leading slot axis of ``n + 1``, slot 0 being the base model's (LoRA: zeros, IA3: ones, a saved
head: the base head). A row's slot is ``adapter_index + 1``, gathered per row; the adapter is then
applied with batched matmuls over rows:

- LoRA (:func:`peftc.passes.lora.lora_stack`): ``A`` ``[n+1, r_max, in]``, ``B·s`` ``[n+1, out, r_max]``
  (each source's scale folded into its B, ranks zero-padded to the largest: the padding contributes
  exactly 0), ``h_b = base(x)_b + (x_b A_bᵀ) B_bᵀ``;
- IA3 (:func:`peftc.passes.ia3.ia3_stack`): ``l`` ``[n+1, features]``, ones in slot 0;
- saved ``nn.Linear`` heads (``modules_to_save``, a seq-cls classifier): ``W`` ``[n+1, out, in]``,
  ``b`` ``[n+1, out]``, the base head in slot 0 (a saved parameter read by any other op is refused).

Activations are viewed as ``[batch, -1, features]`` for the row products, which holds for
``[batch, seq, f]`` (``nn.Linear``) and for the ``[batch·seq, f]`` of GPT-2's Conv1D (rows are
batch-major). An index outside ``[-1, n)`` maps to slot ``n + 1``, which does not exist: torch raises
``IndexError`` and ONNX Runtime's Gather fails the run ("out of bounds"): a graph cannot raise a
clearer error, so peftc's own helpers (:func:`check_adapter_index`) refuse such indices before a run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import fx
from torch.utils import _pytree as pytree

from peftc.adapters import AdapterState, graph_path, peft_key
from peftc.errors import ConfigError
from peftc.methods import adapter_markers, get_method
from peftc.program import MODEL_PREFIX, Program

from .base import InPlacePass, PassResult, add_call, add_param, fake_mode_of, finish, remove_attr

__all__ = [
    "ADAPTER_INDEX",
    "MixedBatchPass",
    "check_adapter_index",
    "per_row",
    "restore_shape",
    "row_index",
    "stacked_param",
]

aten = torch.ops.aten

#: The graph input that picks each row's adapter.
ADAPTER_INDEX = "adapter_index"


def check_adapter_index(index: Any, n: int, batch: int | None = None) -> np.ndarray:
    """``index`` as an ``int64[batch]`` array, refusing values outside ``[-1, n)`` and a wrong length.

    Raises:
        ConfigError: a value out of range (the ONNX graph cannot raise it clearly), or not one per row.
    """
    array = np.asarray(index)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ConfigError(
            f"adapter_index must be a 1-D integer array (one per row), got {array.dtype}{list(array.shape)}"
        )
    if batch is not None and array.shape[0] != batch:
        raise ConfigError(
            f"adapter_index has {array.shape[0]} entries but the batch has {batch} rows; give one per row"
        )
    bad = array[(array < -1) | (array >= n)]
    if bad.size:
        raise ConfigError(
            f"adapter_index {int(bad[0])} is out of range: -1 (the base model) or 0..{n - 1} (the {n} adapters)"
        )
    return array.astype(np.int64)


def stacked_param(program: Program, path: str, tensor: torch.Tensor, site: str, like: fx.Node) -> fx.Node:
    """Register a stacked tensor ``[n+1, …]`` at ``path`` (a constant of the graph) and return its get_attr node."""
    return add_param(program, path, torch.nn.Parameter(tensor.contiguous(), requires_grad=False), site, like=like)


def row_index(program: Program) -> fx.Node:
    """The node holding each row's slot (``adapter_index + 1``; out of range → ``n + 1``), made by the pass."""
    for node in program.graph.nodes:
        if node.meta.get("peftc_role") == "mixed_slot":
            return node
    raise ValueError("the mixed-batch slot node is missing; run MixedBatchPass")


def per_row(program: Program, x: fx.Node, slot: fx.Node, like: fx.Node, site: str) -> fx.Node:
    """``x`` ``[batch, …, f]`` or ``[batch·seq, f]`` viewed as ``[batch, -1, f]`` (batch-major rows)."""
    batch = add_call(program, aten.sym_size.int, (slot, 0), like, site, "mixed_batch")
    features = x.meta["val"].shape[-1]
    return add_call(program, aten.reshape.default, (x, [batch, -1, int(features)]), like, site, "mixed_view")


def restore_shape(
    program: Program, y: fx.Node, lead_of: fx.Node, like: fx.Node, site: str, last: int | None = None
) -> fx.Node:
    """``y`` ``[batch, -1, f]`` reshaped to the leading dims of ``lead_of`` and ``f`` (default: its last dim)."""
    ndim = lead_of.meta["val"].dim()
    dims: list[Any] = [
        add_call(program, aten.sym_size.int, (lead_of, i), like, site, "mixed_size") for i in range(ndim - 1)
    ]
    dims.append(int(lead_of.meta["val"].shape[-1]) if last is None else int(last))
    return add_call(program, aten.reshape.default, (y, dims), like, site, "mixed_restore")


def gather(program: Program, param: fx.Node, slot: fx.Node, like: fx.Node, site: str) -> fx.Node:
    """Each row's slice of a stacked tensor: ``param[slot]`` (ONNX Gather on axis 0)."""
    return add_call(program, aten.index_select.default, (param, 0, slot), like, site, "mixed_gather")


def erase(program: Program, nodes: Sequence[fx.Node]) -> None:
    """Erase ``nodes`` (users first) and the attributes of get_attr nodes among them that nothing reads now."""
    gm = program.graph_module
    paths = []
    for node in nodes:
        if node.op == "get_attr":
            paths.append(node.target)
        program.graph.erase_node(node)
    still = {n.target for n in program.graph.nodes if n.op == "get_attr"}
    for path in paths:
        if path not in still:
            remove_attr(gm, path)


class MixedBatchPass(InPlacePass):
    """Replaces every site's adapter by all sources' tensors stacked, gathered per row by ``adapter_index``.

    Args:
        states: the sources' adapters, in ``adapter_index`` order; the program holds the first one bound.

    After the pass ``program.input_names`` has ``adapter_index`` right after the text inputs (before
    any ``past_key_values.*``), with the batch dim of the first input. Nothing bound → ``modified=False``.

    Raises:
        ConfigError: a site whose method has no stack rule, or a saved parameter that is not a Linear head's.
    """

    def __init__(self, states: Sequence[AdapterState]):
        self.states = list(states)

    def run(self, program: Program) -> PassResult:
        if not program.sites or program.adapter is None or ADAPTER_INDEX in program.input_names:
            return PassResult(program, False)
        for site in program.sites.values():
            method = get_method(site.method)
            if method.stack is None:
                raise ConfigError(
                    f"{method.label} adapters cannot share one batch ({method.stack_refusal or 'no stack rule'}); "
                    "export them without --mixed-batch"
                )
        slot = _add_index(program, len(self.states))
        for site in list(program.sites.values()):
            get_method(site.method).stack(program, site, self.states, slot)
        _stack_saved(program, self.states, slot)
        finish(program)
        return PassResult(program, True)


def _add_index(program: Program, n: int) -> fx.Node:
    """The ``adapter_index`` placeholder (after the text inputs) and the slot node computed from it."""
    graph = program.graph
    placeholders = [p for p in graph.nodes if p.op == "placeholder"]
    position = next((i for i, name in enumerate(program.input_names) if name.startswith("past_key_values.")), None)
    position = len(program.input_names) if position is None else position
    first = placeholders[0]
    if position < len(placeholders):
        with graph.inserting_before(placeholders[position]):
            node = graph.placeholder(ADAPTER_INDEX)
    else:
        with graph.inserting_after(placeholders[-1]):
            node = graph.placeholder(ADAPTER_INDEX)
    node.meta["peftc_role"] = "mixed_index"
    node.meta["peftc_input"] = ADAPTER_INDEX
    mode = fake_mode_of([first])
    if mode is not None:
        with mode:
            node.meta["val"] = torch.empty((first.meta["val"].shape[0],), dtype=torch.long)
    batch = int(program.example_inputs[0].shape[0])
    example = torch.arange(batch, dtype=torch.long) % (n + 1) - 1
    program.input_names.insert(position, ADAPTER_INDEX)
    first_dims = program.dynamic_dims.get(program.input_names[0], {})
    program.dynamic_dims[ADAPTER_INDEX] = {0: first_dims.get(0, "batch")}
    inputs = list(program.example_inputs)
    inputs.insert(position, example)
    program.example_inputs = tuple(inputs)
    _sync_signature(program)

    last = [p for p in graph.nodes if p.op == "placeholder"][-1]
    with graph.inserting_after(last):
        plus = add_call(program, aten.add.Tensor, (node, 1), node, "adapter_index", "mixed_plus")
    with graph.inserting_after(plus):
        valid = add_call(program, aten.ge.Scalar, (node, -1), node, "adapter_index", "mixed_valid")
    with graph.inserting_after(valid):
        slot = add_call(program, aten.where.ScalarOther, (valid, plus, n + 1), node, "adapter_index", "mixed_slot")
    return slot


def _sync_signature(program: Program) -> None:
    """Keep the pytree signature of torch.export's unlifted module in step with the placeholders."""
    graph = program.graph
    info = getattr(graph._codegen, "pytree_info", None)
    if info is None:
        return
    names = [p.name for p in graph.nodes if p.op == "placeholder"]
    in_spec = pytree.tree_structure((tuple(range(len(names))), {}))
    graph._codegen.pytree_info = info._replace(orig_args=names, in_spec=in_spec)
    if hasattr(program.graph_module, "_in_spec"):
        program.graph_module._in_spec = in_spec


def _saved_name(key: str) -> str:
    return graph_path(key).removeprefix(MODEL_PREFIX).replace(".base_layer.", ".")


def _stack_saved(program: Program, states: Sequence[AdapterState], slot: fx.Node) -> None:
    """Saved Linear heads (``modules_to_save``): weight ``[n+1, out, in]`` and bias ``[n+1, out]`` per row."""
    markers = adapter_markers()
    keys = [k for k in states[0].tensors if not any(m in k for m in markers) and not k.endswith("num_batches_tracked")]
    if not keys:
        return
    base_model = program.source.model if program.source is not None else None
    if base_model is None:
        raise ValueError("mixed-batch heads need the program's source model (the base head of slot 0)")
    by_path = {MODEL_PREFIX + _saved_name(k): k for k in keys}
    getters = [n for n in program.graph.nodes if n.op == "get_attr" and n.target in by_path]
    linears = {}
    for getter in getters:
        for user in getter.users:
            ok = user.target == aten.linear.default and (
                user.args[1] is getter or (len(user.args) > 2 and user.args[2] is getter)
            )
            if not ok:
                raise ConfigError(
                    f"--mixed-batch stacks saved nn.Linear heads only, but the adapter's copy of "
                    f"{getter.target.removeprefix(MODEL_PREFIX)} is read by {user.target}; export these adapters "
                    "with --adapters-as-inputs instead"
                )
            linears[user] = None
    for linear in linears:
        _stack_linear(program, linear, states, by_path, base_model, slot)


def _stack_values(states, key: str, base: torch.Tensor) -> torch.Tensor:
    return torch.stack([base.detach().float()] + [s.tensors[key].detach().float() for s in states]).to(base.dtype)


def _stack_linear(program, linear: fx.Node, states, by_path: dict[str, str], base_model, slot: fx.Node) -> None:
    graph = program.graph
    x, w = linear.args[0], linear.args[1]
    b = linear.args[2] if len(linear.args) > 2 else None
    site = w.target.removeprefix(MODEL_PREFIX).rpartition(".")[0]
    params = {}
    for node in (w, b):
        if node is None:
            continue
        name = node.target.removeprefix(MODEL_PREFIX)
        base = base_model.get_parameter(name)
        if node.target in by_path:
            params[node] = _stack_values(states, by_path[node.target], base)
        else:  # a head whose bias is not saved: the base bias in every slot
            params[node] = base.detach().unsqueeze(0).expand(len(states) + 1, *base.shape).clone()
    with graph.inserting_before(linear):
        ws = stacked_param(program, f"{w.target}__stacked", params[w], site, like=linear)
        xr = per_row(program, x, slot, linear, site)
        wr = gather(program, ws, slot, linear, site)
        wt = add_call(program, aten.transpose.int, (wr, 1, 2), linear, site, "mixed_t")
        y = add_call(program, aten.bmm.default, (xr, wt), linear, site, "mixed_head")
        if b is not None:
            bs = stacked_param(program, f"{b.target}__stacked", params[b], site, like=linear)
            br = add_call(
                program, aten.unsqueeze.default, (gather(program, bs, slot, linear, site), 1), linear, site, "mixed_u"
            )
            y = add_call(program, aten.add.Tensor, (y, br), linear, site, "mixed_bias")
        out = restore_shape(program, y, x, linear, site, last=int(params[w].shape[1]))
    linear.replace_all_uses_with(out)
    erase(program, [linear] + [n for n in (w, b) if n is not None and not n.users])


def stacked_lora(states: Sequence[AdapterState], site: str, fin: int, fout: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA's A ``[n+1, r_max, in]`` and ``B·s`` ``[n+1, out, r_max]`` of ``site``, slot 0 zeros (the base)."""
    key_a, key_b = peft_key(site, "lora_A.weight"), peft_key(site, "lora_B.weight")
    ranks = [int(s.tensors[key_a].shape[0]) for s in states]
    r_max = max(ranks)
    dtype = states[0].tensors[key_a].dtype
    a = torch.zeros(len(states) + 1, r_max, fin)
    b = torch.zeros(len(states) + 1, fout, r_max)
    for i, (state, r) in enumerate(zip(states, ranks, strict=True), start=1):
        a[i, :r] = state.tensors[key_a].detach().float()
        b[i, :, :r] = state.tensors[key_b].detach().float() * state.config.scale_for(site)
    return a.to(dtype), b.to(dtype)
