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

from .base import InPlacePass, PassResult, SiteDecision, add_call, add_param, finish
from .targets import (
    LINEAR_TYPES,
    LORA_DEFAULT_TARGETS,
    LinearSite,
    find_linear_sites,
    layer_index,
    matches,
    suffix_names,
)
from peftc.adapters import AdapterState, graph_path, peft_key
from peftc.config import LoraConfig
from peftc.errors import AdapterMismatchError, ConfigError, TargetNotFoundError
from peftc.program import Program, Site

__all__ = ["LoraPass", "resolve_targets"]

logger = logging.getLogger(__name__)
aten = torch.ops.aten


def resolve_targets(config: LoraConfig, program: Program, table: dict[str, list[str]] = LORA_DEFAULT_TARGETS):
    """``target_modules`` as given, else HF PEFT's default for the model type."""
    if config.target_modules is not None:
        return config.target_modules
    model_type = getattr(program.model_config, "model_type", None)
    if model_type not in table:
        raise ConfigError(
            f"no default target_modules for model type {model_type!r}; pass --target-modules "
            f"(linear modules here: {', '.join(suffix_names(_linear_names(program)))})"
        )
    return table[model_type]


def _linear_names(program: Program) -> list[str]:
    return [name for name, cls in program.module_types.items() if cls in LINEAR_TYPES]


class LoraPass(InPlacePass):
    """Adds s·B(A(x)) beside every targeted linear and Conv1D layer."""

    def __init__(self, config: LoraConfig, state: AdapterState | None = None):
        self.config = config
        self.state = state

    # -- finding -----------------------------------------------------------------------------
    def plan(self, program: Program) -> list[SiteDecision]:
        cfg = self.config
        targets = resolve_targets(cfg, program)
        saved = cfg.modules_to_save or []
        calls: dict[str, list[LinearSite]] = {}
        for site in find_linear_sites(program):
            calls.setdefault(site.name, []).append(site)
        decisions = []
        for name, cls in program.module_types.items():
            if not matches(name, targets):
                continue
            reason = self._check(program, name, cls, calls.get(name), saved)
            details = None
            if not reason:
                fin, fout = calls[name][0].features(program.graph_module)
                details = {"in": fin, "out": fout, "rank": cfg.rank_for(name), "scale": cfg.scale_for(name)}
            decisions.append(SiteDecision(name, cls, "skip" if reason else "rewrite", reason, details))
        return decisions

    def _check(self, program: Program, name: str, cls: str, calls: list[LinearSite] | None, saved: list[str]) -> str:
        cfg = self.config
        if cls not in LINEAR_TYPES:
            return f"{cls} is not a Linear or Conv1D layer"
        if matches(name, cfg.exclude_modules):
            return "listed in exclude_modules"
        if any(name == s or name.endswith("." + s) or name.startswith(s + ".") for s in saved):
            return "in modules_to_save (trained in full instead)"
        if cfg.layers_to_transform is not None:
            wanted = [cfg.layers_to_transform] if isinstance(cfg.layers_to_transform, int) else cfg.layers_to_transform
            if layer_index(name, cfg.layers_pattern) not in wanted:
                return f"layer not in layers_to_transform={wanted}"
        if not calls:
            return "not called in the captured graph for this task"
        return ""

    # -- changing ----------------------------------------------------------------------------
    def sites_or_raise(self, program: Program) -> list[SiteDecision]:
        """The sites to rewrite; :class:`TargetNotFoundError` listing what could be targeted when none."""
        decisions = self.plan(program)
        chosen = [d for d in decisions if d.action == "rewrite"]
        if not chosen:
            linear = suffix_names(_linear_names(program))
            skipped = "; ".join(f"{d.name}: {d.reason}" for d in decisions[:3])
            raise TargetNotFoundError(
                f"target_modules={resolve_targets(self.config, program)!r} matched no adaptable module"
                + (f" ({skipped})" if skipped else "")
                + f"; linear modules here: {', '.join(linear)}"
            )
        return chosen

    def run(self, program: Program) -> PassResult:
        chosen = self.sites_or_raise(program)
        state = self.state or AdapterState(self.config)
        fresh = self.state is None
        used: set[str] = set()
        by_name = {d.name for d in chosen}
        for site in list(find_linear_sites(program)):
            if site.name not in by_name:
                continue
            a, b = self._tensors(program, site, state, fresh)
            used.update((peft_key(site.name, "lora_A.weight"), peft_key(site.name, "lora_B.weight")))
            self._insert(program, site, a, b)
        if not fresh:
            _check_all_used(state, used, "lora_")
        program.adapter = state
        finish(program)
        logger.info("LoRA: %d sites, %d adapter parameters", len(by_name), state.num_parameters())
        return PassResult(program, True)

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


def _check_all_used(state: AdapterState, used: set[str], marker: str) -> None:
    unused = sorted(k for k in state.tensors if marker in k and k not in used)
    if unused:
        raise AdapterMismatchError(
            f"adapter tensor {unused[0]} (and {len(unused) - 1} more) matches no targeted module of this model; "
            "the adapter was made for another base model or with other target_modules"
        )


def is_lora_node(node: fx.Node) -> bool:
    return str(node.meta.get("peftc_role", "")).startswith("lora_")
