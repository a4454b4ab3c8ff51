"""Merge (IA)³: fold each vector ``l`` into its layer's weight (and bias) and remove the mul.

As HF PEFT's ``IA3Layer.merge``: ``W' = W ⊙ transpose(l, fan_in_fan_out)``, computed in W's dtype.
For ``nn.Linear`` (W ``[out, in]``) an attention ``l [out, 1]`` scales rows and a feed-forward
``l [1, in]`` scales columns; for ``Conv1D`` (W ``[in, out]``) ``l`` is transposed first. Attention
targets also scale the bias, ``b' = b ⊙ l.reshape(b.shape)``; feed-forward targets leave it alone.
The merged graph is the base model's graph op for op. Folded tensors are new, so the base model's
parameters never change; a tied weight is untied at the merged site only.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from peftc.adapters import graph_path, peft_key
from peftc.program import Program, get_tensor

from .base import InPlacePass, PassResult, SiteDecision, finish, remove_attr
from .ia3 import IA3_MARKER, IA3Config
from .merge import bind_folded

__all__ = ["MergeIA3Pass"]

aten = torch.ops.aten
_LINEAR_OPS = (aten.linear.default, aten.addmm.default)


class MergeIA3Pass(InPlacePass):
    """Folds l into W (and b, for output scaling) at every IA3 site and removes the mul."""

    def plan(self, program: Program) -> list[SiteDecision]:
        decisions = []
        for site in program.sites.values():
            if site.method != IA3Config.peft_type:
                continue
            ff = any(
                n.meta.get("peftc_site") == site.name and n.meta.get("peftc_role") == "ia3_in"
                for n in program.graph.nodes
            )
            decisions.append(SiteDecision(site.name, site.module_type, "rewrite", details={"feedforward": ff}))
        return decisions

    def run(self, program: Program) -> PassResult:
        sites = [s for s in program.sites.values() if s.method == IA3Config.peft_type]
        if not sites:
            return PassResult(program, False)
        graph, gm = program.graph, program.graph_module
        for site in sites:
            path = graph_path(peft_key(site.name, IA3_MARKER))
            l_vec = gm.get_parameter(path).detach()
            tagged = [n for n in graph.nodes if n.meta.get("peftc_site") == site.name]
            bases, ff = [], False
            for mul in [n for n in tagged if n.meta.get("peftc_role") in ("ia3_in", "ia3_out")]:
                ff = mul.meta["peftc_role"] == "ia3_in"
                casts = [u for u in mul.users if u.meta.get("peftc_role") == "ia3_cast"]
                end = casts[0] if casts else mul
                if ff:
                    users = [u for u in end.users if u.op == "call_function" and u.target in _LINEAR_OPS]
                    if len(users) != 1:
                        raise ValueError(f"IA3 input scale of {site.name} does not feed exactly one linear")
                    bases.append(users[0])
                    end.replace_all_uses_with(mul.args[0])
                else:
                    bases.append(mul.args[0])
                    end.replace_all_uses_with(mul.args[0])
            if bases:
                self._fold(program, site.name, bases, l_vec, ff, site.fan_in_fan_out)
            for node in reversed(tagged):
                graph.erase_node(node)
            remove_attr(gm, path)
            del program.sites[site.name]
        finish(program)
        return PassResult(program, True)

    @staticmethod
    def _fold(
        program: Program, name: str, bases: list[fx.Node], l_vec: torch.Tensor, ff: bool, fan_in_fan_out: bool
    ) -> None:
        """Scale the weight (and, for output scaling, the bias) used by every call of module ``name``."""
        gm, first = program.graph_module, bases[0]
        is_linear = first.target == aten.linear.default
        slots = [(1 if is_linear else 2, "weight")]
        bias_index = 2 if is_linear else 0
        if not ff and len(first.args) > bias_index and first.args[bias_index] is not None:
            slots.append((bias_index, "bias"))
        for index, param in slots:
            node = first.args[index]
            if not isinstance(node, fx.Node) or node.op != "get_attr":
                raise ValueError(f"the {param} of IA3 site {name} is not a parameter of the graph")
            t = get_tensor(gm, node.target).detach()
            scale = (l_vec.T if fan_in_fan_out else l_vec) if param == "weight" else l_vec.reshape(t.shape)
            merged = nn.Parameter(torch.mul(t, scale).to(t.dtype), requires_grad=False)
            bind_folded(program, name, param, bases, index, merged)
