"""LoRA insertion: ``h = base(x) + s·B(A(dropout(x)))`` beside every targeted linear layer.

A is ``[r, in]``, B is ``[out, r]``, ``s = lora_alpha / r`` (rsLoRA: ``lora_alpha / √r``), with
per-module ``rank_pattern``/``alpha_pattern``. ``nn.Linear`` appears in the graph as
``aten.linear(x, W, b)``; GPT-2's ``Conv1D`` as ``aten.addmm(b, x2d, W)`` with W stored
``[in, out]`` (fan_in_fan_out) — the branch is added to the addmm output, before Conv1D's reshape,
which is exactly HF PEFT's sum. Dropout on the branch input is inserted only into train programs.
Fresh adapters start as HF PEFT's do: A kaiming-uniform(a=√5), B zero.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import fx, nn

from peftc.adapters import AdapterState, graph_path, peft_key
from peftc.config import LoraConfig
from peftc.errors import AdapterMismatchError
from peftc.program import Program, Site

from .base import add_call, add_param
from .targets import LORA_DEFAULT_TARGETS, LinearAdapterPass, LinearSite

__all__ = ["LoraPass"]

logger = logging.getLogger(__name__)
aten = torch.ops.aten


class LoraPass(LinearAdapterPass):
    """Adds s·B(A(x)) beside every targeted linear and Conv1D layer."""

    default_targets = LORA_DEFAULT_TARGETS
    marker = "lora_"

    def __init__(self, config: LoraConfig, state: AdapterState | None = None):
        super().__init__(config, state)

    def site_details(self, program: Program, name: str, calls: list[LinearSite]) -> dict:
        fin, fout = calls[0].features(program.graph_module)
        return {"in": fin, "out": fout, "rank": self.config.rank_for(name), "scale": self.config.scale_for(name)}

    # -- changing ----------------------------------------------------------------------------
    def rewrite_site(self, program: Program, site: LinearSite, decision, state: AdapterState, fresh: bool) -> set:
        a, b = self._tensors(program, site, state, fresh)
        self._insert(program, site, a, b)
        return {peft_key(site.name, "lora_A.weight"), peft_key(site.name, "lora_B.weight")}

    def _tensors(self, program: Program, site: LinearSite, state: AdapterState, fresh: bool):
        cfg = self.config
        fin, fout = site.features(program.graph_module)
        r = cfg.rank_for(site.name)
        key_a, key_b = peft_key(site.name, "lora_A.weight"), peft_key(site.name, "lora_B.weight")
        if fresh and key_a not in state.tensors:
            w = site.weight_tensor(program.graph_module)
            state.tensors[key_a], state.tensors[key_b] = _init_lora(cfg, r, fin, fout, w.dtype)
        for key, shape in ((key_a, (r, fin)), (key_b, (fout, r))):
            if key not in state.tensors:
                raise AdapterMismatchError(
                    f"adapter has no tensor {key} for targeted module {site.name}; was it made for another model?"
                )
            if tuple(state.tensors[key].shape) != shape:
                raise AdapterMismatchError(
                    f"adapter tensor {key} has shape {list(state.tensors[key].shape)} but module {site.name} "
                    f"needs {list(shape)} (r={r}, in={fin}, out={fout}); the adapter was made for another base model"
                )
        program.sites[site.name] = Site(
            site.name, "LORA", site.module_type, fin, fout, r, cfg.scale_for(site.name), site.fan_in_fan_out
        )
        return state.tensors[key_a], state.tensors[key_b]

    def _insert(self, program: Program, site: LinearSite, a: nn.Parameter, b: nn.Parameter) -> None:
        cfg, graph, base = self.config, program.graph, site.node
        scale = cfg.scale_for(site.name)
        tag = site.name
        # inserting_before(next) keeps new nodes in creation order (inserting_after reverses them).
        with graph.inserting_before(base.next):
            a_node = add_param(program, graph_path(peft_key(site.name, "lora_A.weight")), a, tag)
            b_node = add_param(program, graph_path(peft_key(site.name, "lora_B.weight")), b, tag)
            x = site.x
            if program.mode == "train" and cfg.lora_dropout > 0:
                x = add_call(program, aten.dropout.default, (x, cfg.lora_dropout, True), base, tag, "lora_dropout")
            ax = add_call(program, aten.linear.default, (x, a_node), base, tag, "lora_A")
            bax = add_call(program, aten.linear.default, (ax, b_node), base, tag, "lora_B")
            scaled = add_call(program, aten.mul.Tensor, (bax, scale), base, tag, "lora_scale")
            out = add_call(program, aten.add.Tensor, (base, scaled), base, tag, "lora_out")
        base.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)


def _init_lora(cfg: LoraConfig, r: int, fin: int, fout: int, dtype: torch.dtype):
    a = torch.empty(r, fin, dtype=dtype)
    b = torch.zeros(fout, r, dtype=dtype)
    if cfg.init_lora_weights == "gaussian":
        nn.init.normal_(a, std=1 / r)
    else:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if cfg.init_lora_weights is False:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
    return nn.Parameter(a), nn.Parameter(b)


def is_lora_node(node: fx.Node) -> bool:
    return str(node.meta.get("peftc_role", "")).startswith("lora_")
