"""Merge infrastructure: fold a weight-update branch into its base weight, ``W' = W + ΔW`` (Conv1D: ``W + ΔWᵀ``).

:class:`MergeLowRankPass` is the one fold loop every method with an additive weight update uses (LoRA:
``ΔW = s·B·A``; AdaLoRA, LoHa, LoKr their own ``ΔW``): a subclass names its method and computes
``delta``; the loop removes the branch and binds the folded weight. (DoRA, a LoRA variant, folds
``ΔW = m/‖W + s·BA‖·(W + s·BA) − W`` through LoRA's pass.) The merged graph is the base
model's graph op for op; only weights differ. The folded weight is a new tensor, so the base model's
parameters are never changed. A tied weight (GPT-2's lm_head and
wte) is untied at the merged site only, so the other user of the tensor keeps the base value.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from peftc.adapters import graph_path, peft_key
from peftc.program import MODEL_PREFIX, Program, Site, get_tensor

from .base import InPlacePass, PassResult, SiteDecision, finish, remove_attr, set_attr

__all__ = ["MergeLowRankPass", "bind_folded"]

aten = torch.ops.aten


class MergeLowRankPass(InPlacePass):
    """Folds ΔW into W at every site of ``method`` and removes the branch (subclasses give ``delta``)."""

    #: The ``Site.method`` (peft_type) this pass folds.
    method: str = ""
    #: Attributes of a site that hold the branch's tensors (``lora_A`` …); removed once folded.
    parts: tuple[str, ...] = ()
    #: ``peftc_role`` of the node that adds the branch to the base output (``base + branch``).
    out_role: str = "lora_out"

    def delta(self, program: Program, site: Site, tagged: list[fx.Node]) -> torch.Tensor:
        """The branch as a weight update ``[out, in]``, in float32."""
        raise NotImplementedError

    def site_parts(self, site: Site) -> tuple[str, ...]:
        """The parts removed from ``site`` once folded (default :attr:`parts`; a LoRA variant adds its own)."""
        return self.parts

    def plan(self, program: Program) -> list[SiteDecision]:
        return [
            SiteDecision(s.name, s.module_type, "rewrite", details={"rank": s.rank, "scale": s.scale})
            for s in program.sites.values()
            if s.method == self.method
        ]

    def run(self, program: Program) -> PassResult:
        sites = [s for s in program.sites.values() if s.method == self.method]
        if not sites:
            return PassResult(program, False)
        graph, gm = program.graph, program.graph_module
        for site in sites:
            tagged = [n for n in graph.nodes if n.meta.get("peftc_site") == site.name]
            with torch.no_grad():
                delta = self.delta(program, site, tagged)
            bases: list[fx.Node] = []
            for out in (n for n in tagged if n.meta.get("peftc_role") == self.out_role):
                bases.append(out.args[0])
                out.replace_all_uses_with(out.args[0])
            if bases:
                self._fold(program, site.name, bases, delta.T if site.fan_in_fan_out else delta)
            for node in reversed(tagged):
                graph.erase_node(node)
            for part in self.site_parts(site):
                remove_attr(gm, graph_path(peft_key(site.name, part)))
            del program.sites[site.name]
        finish(program)
        return PassResult(program, True)

    @staticmethod
    def _fold(program: Program, name: str, bases: list[fx.Node], delta: torch.Tensor) -> None:
        index = 1 if bases[0].target == aten.linear.default else 2
        w = get_tensor(program.graph_module, bases[0].args[index].target)
        merged = nn.Parameter((w.detach().float() + delta).to(w.dtype), requires_grad=False)
        bind_folded(program, name, "weight", bases, index, merged)


def bind_folded(
    program: Program, name: str, param: str, bases: list[fx.Node], index: int, folded: torch.Tensor
) -> None:
    """Bind ``folded`` at ``<name>.<param>`` and make argument ``index`` of every call in ``bases`` read it.

    Shared by every merge pass. A tied tensor (GPT-2's lm_head and wte) reaches the graph as *one*
    get_attr named after either module: its other users move to another name of the same tensor
    (``transformer.wte.weight``) and keep the base value, and the merged calls get their own node.
    """
    graph, gm = program.graph, program.graph_module
    own_path = f"{MODEL_PREFIX}{name}.{param}"
    nodes = {b.args[index] for b in bases}
    for node in nodes:
        if not isinstance(node, fx.Node) or node.op != "get_attr":
            raise ValueError(f"the {param} of site {name} is not a parameter of the graph")
        others = [u for u in node.users if u not in bases]
        if others and node.target == own_path:
            alias = _other_name(gm, get_tensor(gm, node.target), own_path)
            with graph.inserting_before(node):
                alias_node = graph.get_attr(alias)
            alias_node.meta.update(node.meta)
            for user in others:
                user.replace_input_with(node, alias_node)
    set_attr(gm, own_path, folded)
    own_node = None
    for base in bases:
        node = base.args[index]
        if node.target != own_path:  # tied tensor named after the other module: this site gets its own
            if own_node is None:
                with graph.inserting_before(bases[0]):
                    own_node = graph.get_attr(own_path)
                own_node.meta.update(node.meta)
            base.replace_input_with(node, own_node)


def _other_name(gm: fx.GraphModule, tensor: torch.Tensor, own_path: str) -> str:
    """Another registered name of ``tensor`` (its tied twin), or a new one holding it."""
    for path, t in gm.named_parameters(remove_duplicate=False):
        if t is tensor and path != own_path:
            return path
    path = f"{own_path}_unmerged"
    set_attr(gm, path, tensor)
    return path
