"""Lift LoRA tensors out of the graph: each site's A and B become graph inputs (swappable adapters).

After :class:`~peftc.passes.lora.LoraPass` a site computes ``base(x) + s·B(A(x))`` with A and B as
``get_attr`` parameters. This pass turns them into graph placeholders and folds the scale into B, so
the branch is ``base(x) + (x·Aᵀ)·B'ᵀ`` with ``B' = s·B`` and no scale op is left. One exported graph
then serves any adapter made for the same base and targets: an adapter is just a set of input
tensors (in ONNX Runtime, an ``.onnx_adapter`` file activated per run), and rank-0 tensors give the
base model (``x·A[0,in]ᵀ`` is empty, its product with ``B'[out,0]ᵀ`` is zero).

Input names are stable and derived from the HF module name (see :func:`lora_input_names`):

- ``<module>.lora_A`` — A, shape ``[lora_rank, in]``;
- ``<module>.lora_B`` — B pre-scaled by ``s``, shape ``[out, lora_rank]``;
- IA3 sites (optional, same pass): ``<module>.ia3_l``, static shape, default ones (the base);
- with ``lift_saved`` (seq-cls heads and trained biases, ``modules_to_save``): ``<module>.<param>``
  (``classifier.weight``), static shape, the base model's value as the default.

The rank dim is symbolic and named :data:`RANK_DIM` (``lora_rank``) when every site has the same
rank; with per-module ranks (``rank_pattern``) each site gets its own ``lora_rank.<module>``. The
example tensors the program keeps for export have rank ≥ 2 (zero-padded: the padding rows of A and
columns of B contribute nothing), because ``torch.export`` specialises dims of size 0 and 1.
"""

from __future__ import annotations

import torch
from torch import fx
from torch.utils import _pytree as pytree

from peftc.adapters import AdapterState, graph_path, peft_key
from peftc.program import MODEL_PREFIX, Program

from .base import InPlacePass, PassResult, SiteDecision, finish, remove_attr
from .ia3 import IA3_MARKER
from .modules_to_save import ADAPTER_MARKERS

__all__ = ["RANK_DIM", "LiftLoraToInputsPass", "ia3_input_name", "lifted_tensors", "lora_input_names"]

#: Name of the symbolic rank dim of every lifted LoRA input (uniform ranks).
RANK_DIM = "lora_rank"
#: Smallest rank of the example tensors used for export (torch.export specialises 0 and 1).
MIN_EXPORT_RANK = 2


def lora_input_names(module: str) -> tuple[str, str]:
    """Graph input names of the A and (pre-scaled) B tensors of LoRA site ``module``."""
    return f"{module}.lora_A", f"{module}.lora_B"


def ia3_input_name(module: str) -> str:
    """Graph input name of the IA3 vector of site ``module`` (static shape, default: ones)."""
    return f"{module}.{IA3_MARKER}"


def lifted_tensors(program: Program, state: AdapterState | None = None) -> dict[str, torch.Tensor]:
    """The input tensors that make a lifted graph compute ``state``'s adapter (B pre-scaled).

    Args:
        program: a program with LoRA sites (lifted or not): gives the sites, their scales and, for
            ``modules_to_save``, which base parameters the adapter carries.
        state: the adapter; default ``program.adapter``.

    Returns:
        Input name -> tensor (detached, contiguous), in site order then saved parameters.
    """
    state = state if state is not None else program.adapter
    out: dict[str, torch.Tensor] = {}
    for site in program.sites.values():
        if site.method == "IA3":
            out[ia3_input_name(site.name)] = (
                state.tensors[peft_key(site.name, IA3_MARKER)].detach().clone().contiguous()
            )
            continue
        if site.method != "LORA":
            continue
        name_a, name_b = lora_input_names(site.name)
        a = state.tensors[peft_key(site.name, "lora_A.weight")].detach()
        b = state.tensors[peft_key(site.name, "lora_B.weight")].detach()
        out[name_a] = a.clone().contiguous()
        out[name_b] = (b.float() * site.scale).to(b.dtype).contiguous()
    for key, tensor in state.tensors.items():
        if any(m in key for m in ADAPTER_MARKERS):
            continue
        out[_saved_input_name(key)] = tensor.detach().clone().contiguous()
    return out


def _saved_input_name(key: str) -> str:
    """``base_model.model.classifier.weight`` -> ``classifier.weight`` (a site's ``base_layer.`` dropped)."""
    return graph_path(key).removeprefix(MODEL_PREFIX).replace(".base_layer.", ".")


class LiftLoraToInputsPass(InPlacePass):
    """Turns every LoRA site's A and B into graph inputs, with B pre-scaled and the scale op removed.

    Args:
        lift_saved: also lift the adapter's full copies of base parameters (``modules_to_save``
            heads, trained biases) to inputs named ``<module>.<param>``, so they swap too.

    After the pass, ``program.input_names`` ends with the lifted names, ``program.dynamic_dims`` gives
    their rank dim, ``program.example_inputs`` holds example tensors (rank ≥ 2, zero-padded) and
    ``program(*inputs, *lifted)`` computes the adapted model for ``lifted_tensors(program, state)``.
    The adapter's tensors are no longer in the graph module. Nothing to lift → ``modified=False``.
    """

    def __init__(self, lift_saved: bool = True):
        self.lift_saved = lift_saved

    def plan(self, program: Program) -> list[SiteDecision]:
        return [
            SiteDecision(s.name, s.module_type, "rewrite", details={"inputs": list(lora_input_names(s.name))})
            for s in program.sites.values()
            if s.method == "LORA"
        ]

    def run(self, program: Program) -> PassResult:
        sites = [s for s in program.sites.values() if s.method == "LORA"]
        ia3_sites = [s for s in program.sites.values() if s.method == "IA3"]
        if not (sites or ia3_sites) or program.adapter is None:
            return PassResult(program, False)
        if any(name.endswith((".lora_A", f".{IA3_MARKER}")) for name in program.input_names):
            return PassResult(program, False)  # already lifted
        graph, gm = program.graph, program.graph_module
        values = lifted_tensors(program)
        uniform = len({s.rank for s in sites}) <= 1
        new: list[tuple[str, torch.Tensor, dict[int, str]]] = []
        replace: dict[str, str] = {}  # graph path of a get_attr -> input name
        for site in sites:
            name_a, name_b = lora_input_names(site.name)
            dim = RANK_DIM if uniform else f"{RANK_DIM}.{site.name}"
            a, b = values[name_a], values[name_b]
            r = max(int(a.shape[0]), MIN_EXPORT_RANK)
            a_ex = torch.zeros(r, a.shape[1], dtype=a.dtype)
            a_ex[: a.shape[0]] = a
            b_ex = torch.zeros(b.shape[0], r, dtype=b.dtype)
            b_ex[:, : b.shape[1]] = b
            new += [(name_a, a_ex, {0: dim}), (name_b, b_ex, {1: dim})]
            replace[graph_path(peft_key(site.name, "lora_A.weight"))] = name_a
            replace[graph_path(peft_key(site.name, "lora_B.weight"))] = name_b
        for site in ia3_sites:
            name = ia3_input_name(site.name)
            new.append((name, values[name], {}))
            replace[graph_path(peft_key(site.name, IA3_MARKER))] = name
        if self.lift_saved:
            for key in program.adapter.tensors:
                if not any(m in key for m in ADAPTER_MARKERS):
                    name = _saved_input_name(key)
                    new.append((name, values[name], {}))
                    replace[MODEL_PREFIX + name] = name

        placeholders = _add_placeholders(program, [(n, t) for n, t, _ in new])
        for node in list(graph.nodes):
            if node.op == "get_attr" and node.target in replace:
                node.replace_all_uses_with(placeholders[replace[node.target]])
                graph.erase_node(node)
            elif node.op == "call_function" and node.meta.get("peftc_role") == "lora_scale":
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
        for path in replace:
            remove_attr(gm, path)
        for name, _, dims in new:
            program.input_names.append(name)
            program.dynamic_dims[name] = dict(dims)
        program.example_inputs = (*program.example_inputs, *(t for _, t, _ in new))
        finish(program)
        return PassResult(program, True)


def _add_placeholders(program: Program, specs: list[tuple[str, torch.Tensor]]) -> dict[str, fx.Node]:
    """Append graph inputs after the existing ones and keep the pytree signature in step."""
    graph = program.graph
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    fake_mode = _fake_mode(graph)
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


def _fake_mode(graph: fx.Graph):
    from torch._guards import detect_fake_mode

    vals = [n.meta.get("val") for n in graph.nodes if n.op == "placeholder"]
    return detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
