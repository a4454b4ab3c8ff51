"""Lift adapter tensors out of the graph: each site's tensors become graph inputs (swappable adapters).

After an insertion pass a site reads its tensors as ``get_attr`` parameters. This pass turns them into
graph placeholders, so one exported graph serves any adapter made for the same base and targets: an
adapter is just a set of input tensors (in ONNX Runtime, an ``.onnx_adapter`` file activated per run).
*Which* tensors become inputs, under which names, with which defaults, is each method's lift rule
(:attr:`peftc.methods.Method.lift`): LoRA lifts A ``[lora_rank, in]`` and B pre-scaled by ``s``
``[out, lora_rank]`` and the scale op goes (``lift_bypass``); rank-0 defaults give the base model
(``x·A[0,in]ᵀ`` is empty, its product with ``B'[out,0]ᵀ`` is zero); a DoRA site adds its magnitude
``m`` ``[out]`` (default ``‖W‖``, so ``m/‖W + B'A‖ = 1``). IA3 lifts ``l`` (static shape, default
ones). A method without a rule is refused with its reason.

With ``lift_saved`` (seq-cls heads and trained biases, ``modules_to_save``) the adapter's full copies of
base parameters are inputs too: ``<module>.<param>`` (``classifier.weight``), static shape, the base
model's value as the default.

The rank dim is symbolic and named :data:`RANK_DIM` (``lora_rank``) when every site has the same rank;
with per-module ranks (``rank_pattern``) each site gets its own ``lora_rank.<module>``. The example
tensors the program keeps for export have rank ≥ 2 (zero-padded: the padding rows and columns
contribute nothing), because ``torch.export`` specialises dims of size 0 and 1.
"""

from __future__ import annotations

import torch
from torch import fx
from torch.utils import _pytree as pytree

from peftc.adapters import AdapterState, graph_path, is_buffer_key
from peftc.errors import ConfigError
from peftc.methods import LiftedTensor, adapter_markers, get_method
from peftc.program import MODEL_PREFIX, Program

from .base import InPlacePass, PassResult, SiteDecision, fake_mode_of, finish, remove_attr

__all__ = ["RANK_DIM", "LiftAdaptersToInputsPass", "lifted_inputs", "lifted_tensors"]

#: Name of the symbolic rank dim of every lifted input (uniform ranks).
RANK_DIM = "lora_rank"
#: Smallest rank of the example tensors used for export (torch.export specialises 0 and 1).
MIN_EXPORT_RANK = 2


def lifted_inputs(program: Program, state: AdapterState | None = None) -> list[tuple[str | None, LiftedTensor]]:
    """``(site name, tensor)`` of every site's lifted tensors for ``state`` (default ``program.adapter``),
    then ``(None, tensor)`` for the adapter's copies of base parameters (default: the base model's value).

    Raises:
        ConfigError: a site's method cannot be lifted (its reason).
    """
    state = state if state is not None else program.adapter
    out: list[tuple[str | None, LiftedTensor]] = []
    for site in program.sites.values():
        method = get_method(site.method)
        if method.lift is None:
            raise ConfigError(
                f"{method.label} adapters cannot be graph inputs ({method.lift_refusal}); export without "
                "--adapters-as-inputs"
            )
        out += [(site.name, t) for t in method.lift(program, site, state)]
    markers = adapter_markers()
    base_model = program.source.model if program.source is not None else None
    for key, tensor in state.tensors.items():
        if key.endswith(".num_batches_tracked"):
            continue  # a BatchNorm's step counter: no eval graph reads it
        if not any(m in key for m in markers):
            name = _saved_input_name(key)
            value = tensor.detach().clone().contiguous()
            base = value
            if base_model is not None:  # a saved module's BatchNorm statistics are buffers
                base = (base_model.get_buffer if is_buffer_key(key) else base_model.get_parameter)(name).detach()
            out.append((None, LiftedTensor(name, MODEL_PREFIX + name, value, base.clone().contiguous())))
    return out


def lifted_tensors(program: Program, state: AdapterState | None = None) -> dict[str, torch.Tensor]:
    """Input name -> tensor that make a lifted graph compute ``state``'s adapter (scales folded in)."""
    return {t.input_name: t.value for _, t in lifted_inputs(program, state)}


def _saved_input_name(key: str) -> str:
    """``base_model.model.classifier.weight`` -> ``classifier.weight`` (a site's ``base_layer.`` dropped)."""
    return graph_path(key).removeprefix(MODEL_PREFIX).replace(".base_layer.", ".")


class LiftAdaptersToInputsPass(InPlacePass):
    """Turns every site's adapter tensors into graph inputs, by each method's lift rule.

    Args:
        lift_saved: also lift the adapter's full copies of base parameters (``modules_to_save``
            heads, trained biases) to inputs named ``<module>.<param>``, so they swap too.

    After the pass, ``program.input_names`` ends with the lifted names, ``program.dynamic_dims`` gives
    their rank dims, ``program.example_inputs`` holds example tensors (rank ≥ 2, zero-padded),
    ``program.input_defaults`` the base model's values, and ``program(*inputs, *lifted)`` computes the
    adapted model for ``lifted_tensors(program, state)``. The adapter's tensors are no longer in the
    graph module. Nothing to lift → ``modified=False``.
    """

    def __init__(self, lift_saved: bool = True):
        self.lift_saved = lift_saved

    def plan(self, program: Program) -> list[SiteDecision]:
        decisions = []
        for site in program.sites.values():
            method = get_method(site.method)
            if method.lift is None:
                decisions.append(SiteDecision(site.name, site.module_type, "skip", method.lift_refusal or ""))
            else:
                names = [t.input_name for t in method.lift(program, site, program.adapter)]  # type: ignore[arg-type]
                decisions.append(SiteDecision(site.name, site.module_type, "rewrite", details={"inputs": names}))
        return decisions

    def run(self, program: Program) -> PassResult:
        if not program.sites or program.adapter is None:
            return PassResult(program, False)
        if any(n.op == "placeholder" and n.meta.get("peftc_role") == "lifted_input" for n in program.graph.nodes):
            return PassResult(program, False)  # already lifted
        graph, gm = program.graph, program.graph_module
        pairs = [(s, t) for s, t in lifted_inputs(program) if s is not None or self.lift_saved]
        lifted = [t for _, t in pairs]
        uniform = len({int(t.value.shape[t.rank_dim]) for t in lifted if t.rank_dim is not None}) <= 1
        examples: list[torch.Tensor] = []
        dims: list[dict[int, str]] = []
        for site, t in pairs:
            if t.rank_dim is None:
                examples.append(t.value)
                dims.append({})
            else:
                examples.append(_padded(t.value, t.rank_dim))
                dims.append({t.rank_dim: RANK_DIM if uniform else f"{RANK_DIM}.{site}"})

        replace = {t.graph_path: t.input_name for t in lifted}
        bypass = {role for s in program.sites.values() for role in get_method(s.method).lift_bypass}
        placeholders = _add_placeholders(program, [(t.input_name, e) for t, e in zip(lifted, examples, strict=True)])
        for node in list(graph.nodes):
            if node.op == "get_attr" and node.target in replace:
                node.replace_all_uses_with(placeholders[replace[node.target]])
                graph.erase_node(node)
            elif node.op == "call_function" and node.meta.get("peftc_role") in bypass and node.meta.get("peftc_site"):
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
        for path in replace:
            remove_attr(gm, path)
        for t, d in zip(lifted, dims, strict=True):
            program.input_names.append(t.input_name)
            program.dynamic_dims[t.input_name] = dict(d)
            program.input_defaults[t.input_name] = t.default
        program.example_inputs = (*program.example_inputs, *examples)
        finish(program)
        return PassResult(program, True)


def _padded(value: torch.Tensor, rank_dim: int) -> torch.Tensor:
    """``value`` zero-padded along ``rank_dim`` to at least :data:`MIN_EXPORT_RANK` (an export example)."""
    r = int(value.shape[rank_dim])
    if r >= MIN_EXPORT_RANK:
        return value
    shape = list(value.shape)
    shape[rank_dim] = MIN_EXPORT_RANK
    out = value.new_zeros(shape)
    out.narrow(rank_dim, 0, r).copy_(value)
    return out


def _add_placeholders(program: Program, specs: list[tuple[str, torch.Tensor]]) -> dict[str, fx.Node]:
    """Append graph inputs after the existing ones and keep the pytree signature in step."""
    graph = program.graph
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    fake_mode = fake_mode_of(n for n in graph.nodes if n.op == "placeholder")
    out: dict[str, fx.Node] = {}
    for name, tensor in specs:
        with graph.inserting_after(last):
            node = graph.placeholder(name.replace(".", "_"))
        node.meta["peftc_role"] = "lifted_input"
        node.meta["peftc_input"] = name
        if fake_mode is not None:
            node.meta["val"] = fake_mode.from_tensor(tensor, static_shapes=True)
        out[name] = last = node
    codegen = graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is not None:  # torch.export's unlifted module flattens its inputs with an in_spec
        n = len([p for p in graph.nodes if p.op == "placeholder"])
        in_spec = pytree.tree_structure((tuple(range(n)), {}))
        names = [p.name for p in graph.nodes if p.op == "placeholder"]
        codegen.pytree_info = info._replace(orig_args=names, in_spec=in_spec)
        if hasattr(program.graph_module, "_in_spec"):
            program.graph_module._in_spec = in_spec
    return out
