"""Merge: fold each LoRA branch into its base weight, ``W' = W + s·B·A`` (Conv1D: ``W + s·(B·A)ᵀ``).

The merged graph is the base model's graph op for op; only weights differ. The folded weight is a
new tensor, so the base model's parameters are never changed. A tied weight (GPT-2's lm_head and
wte) is untied at the merged site only, so the other user of the tensor keeps the base value.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from .base import InPlacePass, PassResult, SiteDecision, finish, remove_attr, set_attr
from peftc.adapters import graph_path, peft_key
from peftc.program import MODEL_PREFIX, Program

__all__ = ["MergeLoraPass"]

aten = torch.ops.aten


class MergeLoraPass(InPlacePass):
    """Folds s·B·A into W at every LoRA site and removes the branch."""

    def plan(self, program: Program) -> list[SiteDecision]:
        return [
            SiteDecision(s.name, s.module_type, "rewrite", details={"rank": s.rank, "scale": s.scale})
            for s in program.sites.values()
            if s.method == "LORA"
        ]

    def run(self, program: Program) -> PassResult:
        sites = [s for s in program.sites.values() if s.method == "LORA"]
        if not sites:
            return PassResult(program, False)
        graph, gm = program.graph, program.graph_module
        for site in sites:
            tagged = [n for n in graph.nodes if n.meta.get("peftc_site") == site.name]
            outs = [n for n in tagged if n.meta.get("peftc_role") == "lora_out"]
            a = gm.get_parameter(graph_path(peft_key(site.name, "lora_A.weight")))
            b = gm.get_parameter(graph_path(peft_key(site.name, "lora_B.weight")))
            with torch.no_grad():
                delta = (b.float() @ a.float()) * site.scale
            for out in outs:
                base: fx.Node = out.args[0]
                out.replace_all_uses_with(base)
                self._fold(program, site.name, base, delta.T if site.fan_in_fan_out else delta)
            for node in reversed(tagged):
                graph.erase_node(node)
            remove_attr(gm, graph_path(peft_key(site.name, "lora_A")))
            remove_attr(gm, graph_path(peft_key(site.name, "lora_B")))
            del program.sites[site.name]
        finish(program)
        return PassResult(program, True)

    @staticmethod
    def _fold(program: Program, name: str, base: fx.Node, delta: torch.Tensor) -> None:
        index = 1 if base.target == aten.linear.default else 2
        weight_node: fx.Node = base.args[index]
        own_path = f"{MODEL_PREFIX}{name}.weight"
        owner, _, attr = weight_node.target.rpartition(".")
        w = getattr(program.graph_module.get_submodule(owner), attr)
        if weight_node.target == own_path and getattr(w, "_peftc_merged", False):
            return  # a module called twice: its weight is already folded
        merged = nn.Parameter((w.detach().float() + delta).to(w.dtype), requires_grad=False)
        merged._peftc_merged = True
        set_attr(program.graph_module, own_path, merged)
        if weight_node.target != own_path:  # tied weight: give this site its own tensor
            with program.graph.inserting_before(base):
                new_node = program.graph.get_attr(own_path)
            base.replace_input_with(weight_node, new_node)
