"""LoHa insertion and merge: ``h = base(x) + x·ΔWᵀ`` with ``ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha/r``.

LoHa (low-rank Hadamard product, FedPara) as HF PEFT 0.21's ``peft.tuners.loha`` computes it: the four
factors w1a, w2a ``[out, r]`` and w1b, w2b ``[r, in]`` build a full weight update ΔW ``[out, in]``
(``make_weight``: ``((w1a @ w1b) * (w2a @ w2b)) * scale``), and the layer adds ``F.linear(x, ΔW)`` (no
bias) to the base layer's output. The branch is inserted as graph nodes in that order of operations:
two ``mm``, ``mul`` (Hadamard), ``mul(alpha/r)``, ``linear(x, ΔW)``, ``add`` to the base call.

Training programs reproduce HF PEFT's two dropouts, which are not ``nn.Dropout``: ``module_dropout``
skips the whole branch for a forward with probability p (``torch.rand(1) > p``, no rescaling), and
``rank_dropout`` zeroes rows of ΔW (``rand(out) > p``) and divides by the kept fraction
(``drop / drop.mean()``). The random numbers are drawn in HF PEFT's order (the gate's ``rand(1)``, then
the rows' ``rand(out)``, per site in call order), so with the same seed a train program with one of the
two dropouts on gives HF PEFT's training-mode output exactly. With both on, HF PEFT draws no row mask for
a skipped branch, which a graph without control flow cannot mirror: the random streams part after the
first skip (the distribution is the same). Eval programs have no random ops.

GPT-2's ``Conv1D`` (``aten.addmm(b, x2d, W)``, weight stored ``[in, out]``): HF PEFT 0.21's LoHa refuses it
(``TypeError``). peftc adapts it as the equivalent ``nn.Linear``: ΔW is ``[out, in]`` as for Linear, the branch
``linear(x2d, ΔW)`` is added to the addmm output (before Conv1D's reshape), and a merge folds ΔWᵀ into the
weight. The saved adapter is HF PEFT's LoHa adapter of that model with its ``Conv1D`` layers converted to
``nn.Linear`` (same module names and keys), the only model HF PEFT loads it into.

HF PEFT 0.21's LoHa also adapts ``nn.Conv1d``/``nn.Conv2d`` (with the CP-decomposed ``hada_t1``/``hada_t2``
under ``use_effective_conv2d``), which peftc does not: a LoHa config whose targets match a convolution is
refused here (HF PEFT would adapt a module peftc leaves alone), and so is an adapter holding ``hada_t1``.

Tensors are keyed as HF PEFT saves them: ``base_model.model.<module>.hada_w1_a`` … (``ParameterDict``
entries, no ``.weight``). Fresh ones start as ``reset_adapter_parameters`` makes them: w1a, w1b, w2a
kaiming-uniform (a=√5), w2b zero, so ΔW = 0 (``init_weights=False``: all four kaiming-uniform).
Default ``target_modules`` are HF PEFT's LoHa table, a copy of its LoRA table.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx, nn

from peftc.adapters import AdapterState, graph_path, peft_key
from peftc.config import MethodConfig, help_field, pattern_value
from peftc.errors import AdapterMismatchError, ConfigError, TargetNotFoundError
from peftc.methods import LiftedTensor, Method, register_method
from peftc.program import Program, Site

from .base import PassManager, PassResult, add_call, add_param
from .merge import MergeLowRankPass
from .modules_to_save import ModulesToSavePass
from .targets import LORA_DEFAULT_TARGETS, LinearAdapterPass, LinearSite, layer_index, matches, suffix_names

__all__ = [
    "LOHA",
    "LOHA_DEFAULT_TARGETS",
    "LOHA_TYPES",
    "PARTS",
    "LoHaConfig",
    "LoHaPass",
    "MergeLoHaPass",
    "loha_delta",
    "loha_input_names",
    "loha_lift",
]

logger = logging.getLogger(__name__)
aten = torch.ops.aten

#: A site's tensors, in HF PEFT's order (``ParameterDict`` entries, saved without ``.weight``).
PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
#: Module classes LoHa adapts: ``nn.Linear`` and its subclasses seen in transformers, and GPT-2's ``Conv1D``
#: (as the equivalent ``nn.Linear``; HF PEFT 0.21 refuses it).
LOHA_TYPES = ("Linear", "NonDynamicallyQuantizableLinear", "Conv1D")
#: HF PEFT 0.21 ``TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING`` (a copy of the LoRA table).
LOHA_DEFAULT_TARGETS: dict[str, list[str]] = dict(LORA_DEFAULT_TARGETS)


@dataclass
class LoHaConfig(MethodConfig):
    """LoHa: ``h = base(x) + x·ΔWᵀ``, ``ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha / r`` (HF PEFT 0.21's ``LoHaConfig``)."""

    peft_type: ClassVar[str] = "LOHA"

    r: int = help_field("LoHa rank (of both Hadamard factors).", default=8)
    alpha: float = help_field("LoHa scaling numerator: ΔW is scaled by alpha / r.", default=8)
    rank_dropout: float = help_field(
        "While training, drop each output row of ΔW with this probability and rescale by the kept fraction.",
        default=0.0,
    )
    module_dropout: float = help_field(
        "While training, skip the whole LoHa branch of a layer with this probability (no rescaling).", default=0.0
    )
    use_effective_conv2d: bool = help_field(
        "HF PEFT: CP-decompose Conv1d/Conv2d kernels > 1. Only changes conv layers, which peftc's LoHa does not "
        "adapt, so it has no effect here.",
        default=False,
    )
    target_modules: list[str] | str | None = help_field(
        "Modules to adapt (nn.Linear, and GPT-2's Conv1D as the equivalent nn.Linear): a list matches a whole name "
        "or a '.name' suffix, a string is a full regex. Default: HF PEFT's table for the model type.",
        default=None,
    )
    exclude_modules: list[str] | str | None = help_field("Modules never to adapt (same matching rules).", default=None)
    init_weights: bool = help_field(
        "True: w2b zero (ΔW = 0 at the start), the other factors kaiming-uniform. False: all four random.",
        default=True,
    )
    layers_to_transform: list[int] | int | None = help_field("Only adapt these layer indices.", default=None)
    layers_pattern: list[str] | str | None = help_field("Name of the layer list, e.g. 'h' or 'layers'.", default=None)
    modules_to_save: list[str] | None = help_field(
        "Modules trained in full and saved with the adapter (the head, for seq-cls).", default=None
    )
    rank_pattern: dict[str, int] = help_field("Per-module rank overrides: {name or regex: r}.", default_factory=dict)
    alpha_pattern: dict[str, float] = help_field(
        "Per-module alpha overrides: {name or regex: alpha}.", default_factory=dict
    )

    def validate(self) -> None:
        super().validate()
        if self.r <= 0:
            raise ConfigError(f"LoHa r must be a positive integer, got r={self.r}")
        for key, rank in self.rank_pattern.items():
            if rank <= 0:
                raise ConfigError(f"LoHa rank_pattern[{key!r}] must be a positive integer, got {rank}")
        if not 0.0 <= self.rank_dropout < 1.0:
            raise ConfigError(
                f"rank_dropout must be in [0, 1), got {self.rank_dropout} (1 drops every row: HF PEFT's ΔW is NaN)"
            )
        if not 0.0 <= self.module_dropout < 1.0:
            raise ConfigError(
                f"module_dropout must be in [0, 1), got {self.module_dropout} (1 skips LoHa at every training step)"
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("layers_pattern is set but layers_to_transform is not; set both (as HF PEFT requires)")
        for name in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, name), set):
                setattr(self, name, sorted(getattr(self, name)))

    def rank_for(self, name: str) -> int:
        return int(pattern_value(name, self.rank_pattern, self.r))

    def alpha_for(self, name: str) -> float:
        return float(pattern_value(name, self.alpha_pattern, self.alpha))

    def scale_for(self, name: str) -> float:
        """HF's ``scaling``: ``alpha / r`` of the module (no rank-stabilised variant)."""
        return self.alpha_for(name) / self.rank_for(name)


def loha_delta(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor, scale: float):
    """ΔW ``[out, in]`` = ``((w1a @ w1b) * (w2a @ w2b)) * scale`` in float32 (HF PEFT's ``make_weight``)."""
    return ((w1a.float() @ w1b.float()) * (w2a.float() @ w2b.float())) * scale


class LoHaPass(LinearAdapterPass):
    """Adds x·((w1a·w1b) ⊙ (w2a·w2b)·s)ᵀ beside every targeted linear and Conv1D layer."""

    default_targets = LOHA_DEFAULT_TARGETS
    marker = "hada_"

    def __init__(self, config: LoHaConfig, state: AdapterState | None = None):
        super().__init__(config, state)
        self._warned_conv1d = False

    # -- finding -----------------------------------------------------------------------------
    def _skip_reason(self, name: str, cls: str, calls: list[LinearSite] | None) -> str:
        """HF PEFT's order: excluded modules are never targets; a matched module must be a Linear or Conv1D."""
        cfg = self.config
        if matches(name, cfg.exclude_modules):
            return "listed in exclude_modules"
        saved = cfg.modules_to_save or []
        if any(name == s or name.endswith("." + s) or name.startswith(s + ".") for s in saved):
            return "in modules_to_save (trained in full instead)"
        if cfg.layers_to_transform is not None:
            wanted = [cfg.layers_to_transform] if isinstance(cfg.layers_to_transform, int) else cfg.layers_to_transform
            if layer_index(name, cfg.layers_pattern) not in wanted:
                return f"layer not in layers_to_transform={wanted}"
        if cls not in LOHA_TYPES:
            return _unsupported_reason(cls)
        if not calls:
            return "not called in the captured graph for this task"
        return ""

    def sites_or_raise(self, program: Program) -> dict[str, Any]:
        """The sites to rewrite; a matched module LoHa cannot adapt is an error (HF PEFT raises too)."""
        decisions = self.plan(program)
        for d in decisions:
            if d.action == "skip" and d.reason == _unsupported_reason(d.module_type):
                raise ConfigError(
                    f"LoHa target_modules={self.targets(program)!r} matches {d.name}: {d.reason}; "
                    f"linear modules here: {', '.join(_linear_suffixes(program)) or 'none'}"
                )
        chosen = {d.name: d for d in decisions if d.action == "rewrite"}
        if not chosen:
            skipped = "; ".join(f"{d.name}: {d.reason}" for d in decisions[:3])
            raise TargetNotFoundError(
                f"LoHa target_modules={self.targets(program)!r} matched no adaptable module"
                + (f" ({skipped})" if skipped else "")
                + f"; linear modules here: {', '.join(_linear_suffixes(program)) or 'none'}"
            )
        return chosen

    # -- changing ----------------------------------------------------------------------------
    def run(self, program: Program) -> PassResult:
        if self.state is not None:
            _refuse_conv_tensors(self.state)
        return super().run(program)

    def rewrite_site(self, program: Program, site: LinearSite, decision, state: AdapterState, fresh: bool) -> set:
        if site.fan_in_fan_out and not self._warned_conv1d:
            self._warned_conv1d = True
            logger.warning(
                "LoHa on %s (%s): HF PEFT 0.21 does not apply LoHa to transformers' Conv1D; peftc adapts it as the "
                "equivalent nn.Linear, so HF PEFT loads this adapter only into the model with its Conv1D layers "
                "converted to nn.Linear",
                site.name,
                site.module_type,
            )
        tensors = self._tensors(program, site, state, fresh)
        self._insert(program, site, tensors)
        return {peft_key(site.name, p) for p in PARTS}

    def _tensors(self, program: Program, site: LinearSite, state: AdapterState, fresh: bool) -> list[nn.Parameter]:
        cfg = self.config
        fin, fout = site.features(program.graph_module)
        r = cfg.rank_for(site.name)
        keys = [peft_key(site.name, p) for p in PARTS]
        if fresh and keys[0] not in state.tensors:
            w = site.weight_tensor(program.graph_module)
            state.tensors.update(zip(keys, _init_loha(cfg.init_weights, r, fin, fout, w.dtype), strict=True))
        shapes = ((fout, r), (r, fin), (fout, r), (r, fin))
        for key, shape in zip(keys, shapes, strict=True):
            if key not in state.tensors:
                raise AdapterMismatchError(
                    f"adapter has no tensor {key} for targeted module {site.name}; was it made for another model?"
                )
            if tuple(state.tensors[key].shape) != shape:
                raise AdapterMismatchError(
                    f"adapter tensor {key} has shape {list(state.tensors[key].shape)} but module {site.name} "
                    f"needs {list(shape)} (r={r}, in={fin}, out={fout}); the adapter was made for another base "
                    "model or with another r / rank_pattern"
                )
        program.sites[site.name] = Site(
            site.name,
            LoHaConfig.peft_type,
            site.module_type,
            fin,
            fout,
            r,
            cfg.scale_for(site.name),
            site.fan_in_fan_out,
        )
        return [state.tensors[k] for k in keys]

    def _insert(self, program: Program, site: LinearSite, tensors: list[nn.Parameter]) -> None:
        cfg, graph, base = self.config, program.graph, site.node
        tag = site.name

        def call(target: Any, args: tuple, role: str, **kwargs: Any) -> fx.Node:
            return add_call(program, target, args, base, tag, role, kwargs)

        # inserting_before(next) keeps new nodes in creation order (inserting_after reverses them).
        with graph.inserting_before(base.next):
            w1a, w1b, w2a, w2b = (
                add_param(program, graph_path(peft_key(site.name, part)), t, tag, like=site.x)
                for part, t in zip(PARTS, tensors, strict=True)
            )
            w1 = call(aten.mm.default, (w1a, w1b), "loha_w1")
            w2 = call(aten.mm.default, (w2a, w2b), "loha_w2")
            hadamard = call(aten.mul.Tensor, (w1, w2), "loha_hadamard")
            delta = call(aten.mul.Tensor, (hadamard, cfg.scale_for(site.name)), "loha_scale")
            gate = None
            if program.mode == "train" and (cfg.module_dropout > 0 or cfg.rank_dropout > 0):
                # HF draws the gate's rand(1) on every training forward, before rank dropout's rand(out).
                row = call(aten.select.int, (delta, 1, 0), "loha_rng_like")  # [out], on ΔW's device
                first = call(aten.slice.Tensor, (row, 0, 0, 1), "loha_rng_like")  # [1]
                u = call(aten.rand_like.default, (first,), "loha_module_rand", dtype=torch.float32)
                kept = call(aten.gt.Scalar, (u, cfg.module_dropout), "loha_module_keep")
                gate = call(aten._to_copy.default, (kept,), "loha_module_gate", dtype=tensors[0].dtype)
                if cfg.rank_dropout > 0:
                    u = call(aten.rand_like.default, (row,), "loha_rank_rand", dtype=torch.float32)
                    kept = call(aten.gt.Scalar, (u, cfg.rank_dropout), "loha_rank_keep")
                    drop = call(aten._to_copy.default, (kept,), "loha_rank_mask", dtype=tensors[0].dtype)
                    drop = call(aten.view.default, (drop, [-1, 1]), "loha_rank_mask")
                    mean = call(aten.mean.default, (drop,), "loha_rank_mean")
                    drop = call(aten.div.Tensor, (drop, mean), "loha_rank_mask")
                    delta = call(aten.mul.Tensor, (delta, drop), "loha_rank_dropout")
            # Conv1D too: site.x is addmm's 2-D input and ΔW is [out, in], so x·ΔWᵀ adds to addmm's [N, out].
            branch = call(aten.linear.default, (site.x, delta), "loha_linear")
            if gate is not None:
                branch = call(aten.mul.Tensor, (branch, gate), "loha_module_dropout")
            out = call(aten.add.Tensor, (base, branch), "loha_out")
        base.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)


def _unsupported_reason(cls: str) -> str:
    if cls in ("Conv1d", "Conv2d"):
        return f"a {cls}: HF PEFT's LoHa adapts it but peftc's LoHa adapts nn.Linear and GPT-2's Conv1D only"
    return f"a {cls}, not an nn.Linear or Conv1D (HF PEFT's LoHa refuses it too)"


def _linear_suffixes(program: Program) -> list[str]:
    return suffix_names([name for name, cls in program.module_types.items() if cls in LOHA_TYPES])


def _refuse_conv_tensors(state: AdapterState) -> None:
    """A loaded adapter with conv-only tensors (HF's CP decomposition) names what peftc lacks."""
    conv = sorted(k for k in state.tensors if ".hada_t1" in k or ".hada_t2" in k)
    if conv:
        raise AdapterMismatchError(
            f"adapter tensor {conv[0]} is a LoHa conv kernel factor (use_effective_conv2d on a Conv1d/Conv2d); "
            "peftc's LoHa adapts nn.Linear and GPT-2's Conv1D layers only"
        )


def _init_loha(init_weights: bool, r: int, fin: int, fout: int, dtype: torch.dtype) -> list[nn.Parameter]:
    """w1a, w1b, w2a, w2b as HF PEFT's ``create_adapter_parameters`` + ``reset_adapter_parameters[_random]``."""
    shapes = ((fout, r), (r, fin), (fout, r), (r, fin))
    w1a, w1b, w2a, w2b = (torch.empty(shape, dtype=dtype) for shape in shapes)
    for t in (w1a, w1b, w2a):
        nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    if init_weights:
        nn.init.zeros_(w2b)
    else:
        nn.init.kaiming_uniform_(w2b, a=math.sqrt(5))
    return [nn.Parameter(t) for t in (w1a, w1b, w2a, w2b)]


class MergeLoHaPass(MergeLowRankPass):
    """Folds ((w1a·w1b) ⊙ (w2a·w2b))·s into W at every LoHa site and removes the branch."""

    method = LoHaConfig.peft_type
    parts = PARTS
    out_role = "loha_out"

    def delta(self, program: Program, site: Site, tagged: list[fx.Node]) -> torch.Tensor:
        gm = program.graph_module
        factors = (gm.get_parameter(graph_path(peft_key(site.name, p))) for p in PARTS)
        return loha_delta(*factors, site.scale)


def loha_input_names(module: str) -> tuple[str, ...]:
    """Graph input names of LoHa site ``module``'s factors (w1a pre-scaled by ``s``)."""
    return tuple(f"{module}.{p}" for p in PARTS)


def loha_lift(program: Program, site: Site, state: AdapterState) -> list[LiftedTensor]:
    """w1a·s, w2a ``[out, r]`` and w1b, w2b ``[r, in]`` as inputs; rank-0 defaults make ΔW = 0 (the base).

    Conv1D sites alike: their branch builds ΔW ``[out, in]`` as a Linear's does.
    """
    out: list[LiftedTensor] = []
    for part, name in zip(PARTS, loha_input_names(site.name), strict=True):
        key = peft_key(site.name, part)
        t = state.tensors[key].detach()
        rank_dim = 1 if part.endswith("_a") else 0
        value = (t.float() * site.scale).to(t.dtype) if part == "hada_w1_a" else t.clone()
        default = t.new_zeros(t.shape[0], 0) if rank_dim == 1 else t.new_zeros(0, t.shape[1])
        out.append(LiftedTensor(name, graph_path(key), value.contiguous(), default, rank_dim=rank_dim))
    return out


def _describe(parts: dict[str, list[int]]) -> dict[str, Any]:
    a, b = parts.get("hada_w1_a"), parts.get("hada_w1_b")
    out: dict[str, Any] = {}
    if b:
        out.update(rank=b[0], **{"in": b[-1]})
    if a:
        out["out"] = a[0]
    return out


def _pipeline(config: LoHaConfig, state: AdapterState | None) -> PassManager:
    return PassManager("loha-insert", [LoHaPass(config, state), ModulesToSavePass(config.modules_to_save)])


LOHA = register_method(
    Method(
        peft_type=LoHaConfig.peft_type,
        config_class=LoHaConfig,
        label="LoHa",
        cli_names={"loha": {}},
        pipeline=_pipeline,
        markers=("hada_",),
        merge_pass=MergeLoHaPass,
        lift=loha_lift,
        lift_bypass=("loha_scale",),
        describe_site=_describe,
    )
)
