"""AdaLoRA insertion and merge: an SVD-shaped LoRA branch whose rank is pruned while training.

HF PEFT 0.21's ``SVDLinear`` computes ``h = W x + b + (dropout(x) @ (A ⊙ E)ᵀ @ Bᵀ) · s / (ranknum + 1e-5)``
with A ``[r, in]`` (right singular vectors), E ``[r, 1]`` (singular values), B ``[out, r]`` (left
singular vectors), ``s = lora_alpha`` (``init_r`` when alpha ≤ 0) and ``ranknum = init_r``, a constant
that HF PEFT does not save (after pruning it keeps the value ``init_r``, so the scale never changes).
The branch is inserted as graph nodes in that order of operations: ``mul(A, E)``, two ``linear``,
``mul(s)``, ``div(ranknum + 1e-5)`` (the float32 value HF PEFT divides by), added to the base call
(``aten.linear`` for ``nn.Linear``, ``aten.addmm`` for GPT-2's Conv1D before its reshape).

Tensors are keyed as HF PEFT saves them: ``base_model.model.<module>.lora_A`` / ``lora_B`` / ``lora_E``
(no ``.weight``: they are ``ParameterDict`` entries). Fresh ones start as HF PEFT's do: E zero, A and B
``N(0, 0.02)``. A saved adapter whose config carries ``rank_pattern`` (``{"<module>.lora_E": [bool] *
init_r}``) holds tensors cut to the kept triplets; they bind at that rank (HF's
``resize_modules_by_rank_pattern``). Tensors still at ``init_r`` (a mid-training checkpoint: pruned
triplets are zeros in E) bind too.

Training support (the RankAllocator, the orthogonal regularisation, the final resize) is the method's
training hooks, in :mod:`peftc.passes.adalora_training`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx, nn

from peftc.adapters import AdapterState, graph_path, peft_key
from peftc.config import MethodConfig, help_field
from peftc.errors import AdapterMismatchError, ConfigError
from peftc.methods import LiftedTensor, Method, register_method
from peftc.program import Program, Site

from .base import PassManager, add_call, add_param, fake_like
from .lora import LoraConfig, low_rank_facts
from .merge import MergeLowRankPass
from .modules_to_save import ModulesToSavePass
from .targets import LORA_DEFAULT_TARGETS, LinearAdapterPass, LinearSite

__all__ = [
    "ADALORA",
    "ADALORA_DEFAULT_TARGETS",
    "AdaLoraConfig",
    "AdaLoraPass",
    "MergeAdaLoraPass",
]

logger = logging.getLogger(__name__)
aten = torch.ops.aten


@dataclass
class AdaLoraConfig(LoraConfig):
    """AdaLoRA: ``h = Wx + b + dropout(x)(A⊙E)ᵀBᵀ·lora_alpha/(ranknum + 1e-5)`` with ranks pruned while training.

    HF PEFT 0.21's ``AdaLoraConfig`` (a ``LoraConfig`` subclass). Every target starts at ``init_r``;
    the RankAllocator prunes the total budget to ``target_r`` per module between ``tinit`` and
    ``total_step - tfinal`` and records the kept triplets in ``rank_pattern``
    (``{"<module>.lora_E": [bool] * init_r}``). ``r``, ``use_rslora`` and ``alpha_pattern`` are ignored,
    as in HF PEFT.
    """

    peft_type: ClassVar[str] = "ADALORA"

    target_r: int = help_field("Target average rank per module after pruning.", default=8)
    init_r: int = help_field("Initial rank of every module.", default=12)
    tinit: int = help_field("Steps of initial fine-tuning before any pruning.", default=0)
    tfinal: int = help_field("Steps of final fine-tuning after the budget reached target_r.", default=0)
    deltaT: int = help_field("Steps between two budget allocations (masking).", default=1)
    beta1: float = help_field("EMA coefficient of the sensitivity smoothing.", default=0.85)
    beta2: float = help_field("EMA coefficient of the uncertainty quantification.", default=0.85)
    orth_reg_weight: float = help_field("Weight of the orthogonal regularisation of A and B in the loss.", default=0.5)
    total_step: int | None = help_field(
        "Total training steps (required by HF PEFT; peftc train fills in the run's step count when unset).",
        default=None,
    )
    rank_pattern: dict[str, list[bool]] | None = help_field(
        "Triplets kept by the RankAllocator: {'<module>.lora_E': [bool] * init_r}; written by training.",
        default=None,
    )

    def validate(self) -> None:
        MethodConfig.validate(self)
        if self.use_dora:
            raise ConfigError("AdaLoRA does not support DoRA (use_dora=True), as in HF PEFT; set use_dora to false")
        for name in ("r", "init_r", "target_r", "deltaT"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"AdaLoRA {name} must be a positive integer, got {name}={getattr(self, name)}")
        if self.target_r > self.init_r:
            raise ConfigError(
                f"AdaLoRA target_r={self.target_r} exceeds init_r={self.init_r}; pruning only lowers the rank, "
                "so set target_r <= init_r"
            )
        for name in ("tinit", "tfinal"):
            if getattr(self, name) < 0:
                raise ConfigError(f"AdaLoRA {name} must be >= 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(f"AdaLoRA {name} must be in (0, 1), got {getattr(self, name)}")
        if self.orth_reg_weight < 0:
            raise ConfigError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        if self.total_step is not None:
            if self.total_step <= 0:
                raise ConfigError(f"AdaLoRA total_step must be a positive integer, got {self.total_step}")
            if self.tinit >= self.total_step - self.tfinal:
                raise ConfigError(
                    f"AdaLoRA schedule tinit={self.tinit}, tfinal={self.tfinal}, total_step={self.total_step} leaves "
                    "no budgeting phase; need tinit < total_step - tfinal: lower tinit/tfinal or raise total_step"
                )
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.init_lora_weights not in (True, False):
            raise ConfigError(f"AdaLoRA init_lora_weights must be true or false, got {self.init_lora_weights!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("layers_pattern is set but layers_to_transform is not; set both (as HF PEFT requires)")
        for key, mask in (self.rank_pattern or {}).items():
            if len(mask) != self.init_r:
                raise ConfigError(
                    f"rank_pattern[{key!r}] has {len(mask)} entries but init_r={self.init_r}; "
                    "the adapter was saved with another init_r"
                )
        if isinstance(self.target_modules, set):
            self.target_modules = sorted(self.target_modules)

    def rank_for(self, name: str) -> int:
        """Kept rank of module ``name``: ``sum(rank_pattern['<name>.lora_E'])``, else ``init_r``."""
        pattern = self.rank_pattern or {}
        mask = pattern.get(f"{name}.lora_E", pattern.get(f"{name}.lora_E.default"))  # saved / in-memory HF key
        return self.init_r if mask is None else int(sum(bool(m) for m in mask))

    def alpha_for(self, name: str) -> float:
        return float(self.lora_alpha)

    def scale_for(self, name: str) -> float:
        """HF's ``scaling``: ``lora_alpha`` (``init_r`` when alpha <= 0); the forward also divides by ranknum."""
        return float(self.lora_alpha) if self.lora_alpha > 0 else float(self.init_r)


#: HF PEFT 0.21 ``TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING`` for the families peftc covers.
ADALORA_DEFAULT_TARGETS: dict[str, list[str]] = {
    **{
        k: v
        for k, v in LORA_DEFAULT_TARGETS.items()
        if k not in ("blip-2", "xlm-roberta", "electra", "chatglm", "mistral", "mixtral", "phi", "falcon")
    },
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "llama4": ["q_proj", "v_proj"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "gemma3_text": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
}

#: A site's tensors (HF PEFT's ``ParameterDict`` entries, saved without ``.weight``).
PARTS = ("lora_A", "lora_B", "lora_E")
_PARTS = PARTS


def ranknum_denominator(init_r: int | float, dtype: torch.dtype = torch.float32) -> float:
    """``ranknum + 1e-5`` computed as HF PEFT does (a ``dtype`` tensor plus 1e-5), as a Python float."""
    return float(torch.tensor([float(init_r)], dtype=dtype) + 1e-5)


class AdaLoraPass(LinearAdapterPass):
    """Adds (x·(A⊙E)ᵀ·Bᵀ)·s/(ranknum+1e-5) beside every targeted linear and Conv1D layer."""

    default_targets = ADALORA_DEFAULT_TARGETS
    marker = "lora_"

    def __init__(self, config: AdaLoraConfig, state: AdapterState | None = None):
        super().__init__(config, state)

    def rewrite_site(self, program: Program, site: LinearSite, decision, state: AdapterState, fresh: bool) -> set:
        tensors, denom = self._tensors(program, site, state, fresh)
        self._insert(program, site, tensors, denom)
        return {peft_key(site.name, p) for p in (*_PARTS, "ranknum")}

    def _tensors(self, program: Program, site: LinearSite, state: AdapterState, fresh: bool):
        cfg = self.config
        fin, fout = site.features(program.graph_module)
        keys = {p: peft_key(site.name, p) for p in _PARTS}
        w = site.weight_tensor(program.graph_module)
        if fresh and keys["lora_A"] not in state.tensors:
            state.tensors.update(zip(keys.values(), _init_adalora(cfg, cfg.init_r, fin, fout, w.dtype), strict=True))
        r = cfg.rank_for(site.name)
        missing = [k for k in keys.values() if k not in state.tensors]
        if missing:
            raise AdapterMismatchError(
                f"adapter has no tensor {missing[0]} for targeted module {site.name}; was it made for another model?"
            )
        held = state.tensors[keys["lora_A"]].shape[0]
        if held != r and not (cfg.rank_pattern and held == cfg.init_r):
            raise AdapterMismatchError(
                f"adapter tensor {keys['lora_A']} has rank {held} but module {site.name} needs {r} "
                f"(init_r={cfg.init_r}, rank_pattern {'set' if cfg.rank_pattern else 'unset'}); "
                "the adapter's config and tensors do not match"
            )
        for part, shape in (("lora_A", (held, fin)), ("lora_E", (held, 1)), ("lora_B", (fout, held))):
            if tuple(state.tensors[keys[part]].shape) != shape:
                raise AdapterMismatchError(
                    f"adapter tensor {keys[part]} has shape {list(state.tensors[keys[part]].shape)} but module "
                    f"{site.name} needs {list(shape)} (r={held}, in={fin}, out={fout}); "
                    "the adapter was made for another base model"
                )
        saved_ranknum = state.tensors.get(peft_key(site.name, "ranknum"))  # older HF PEFT saved it
        ranknum = float(saved_ranknum.reshape(-1)[0]) if saved_ranknum is not None else cfg.init_r
        denom = ranknum_denominator(ranknum, w.dtype)
        program.sites[site.name] = Site(
            site.name,
            AdaLoraConfig.peft_type,
            site.module_type,
            fin,
            fout,
            held,
            cfg.scale_for(site.name),
            site.fan_in_fan_out,
        )
        return [state.tensors[keys[p]] for p in _PARTS], denom

    def _insert(self, program: Program, site: LinearSite, tensors: list[nn.Parameter], denom: float) -> None:
        cfg, graph, base = self.config, program.graph, site.node
        tag = site.name
        with graph.inserting_before(base.next):
            a_node, b_node, e_node = (
                add_param(program, graph_path(peft_key(site.name, part)), t, tag)
                for part, t in zip(_PARTS, tensors, strict=True)
            )
            x = site.x
            if program.mode == "train" and cfg.lora_dropout > 0:
                x = add_call(program, aten.dropout.default, (x, cfg.lora_dropout, True), base, tag, "lora_dropout")
            ae = add_call(program, aten.mul.Tensor, (a_node, e_node), base, tag, "lora_AE")
            if "val" not in ae.meta:  # both inputs are parameters: no fake mode to infer it from
                ae.meta["val"] = fake_like(tensors[0], site.x)
            xa = add_call(program, aten.linear.default, (x, ae), base, tag, "lora_A")
            xab = add_call(program, aten.linear.default, (xa, b_node), base, tag, "lora_B")
            scaled = add_call(program, aten.mul.Tensor, (xab, cfg.scale_for(site.name)), base, tag, "lora_scale")
            normed = add_call(program, aten.div.Tensor, (scaled, denom), base, tag, "lora_ranknum")
            out = add_call(program, aten.add.Tensor, (base, normed), base, tag, "lora_out")
        base.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)


def _init_adalora(cfg: AdaLoraConfig, r: int, fin: int, fout: int, dtype: torch.dtype) -> list[nn.Parameter]:
    """A, B, E as HF PEFT's ``update_layer`` draws them (randn, then E=0 and A, B ~ N(0, 0.02))."""
    a, e, b = torch.randn(r, fin), torch.randn(r, 1), torch.randn(fout, r)
    if cfg.init_lora_weights:
        nn.init.zeros_(e)
        nn.init.normal_(a, mean=0.0, std=0.02)
        nn.init.normal_(b, mean=0.0, std=0.02)
    return [nn.Parameter(t.to(dtype)) for t in (a, b, e)]


class MergeAdaLoraPass(MergeLowRankPass):
    """Folds B·(A⊙E)·s/(ranknum+1e-5) into W at every AdaLoRA site and removes the branch."""

    method = AdaLoraConfig.peft_type
    parts = _PARTS

    def delta(self, program: Program, site: Site, tagged: list[fx.Node]) -> torch.Tensor:
        scale, denom = _branch_constants(tagged)
        a, b, e = (program.graph_module.get_parameter(graph_path(peft_key(site.name, p))) for p in _PARTS)
        return (b.float() @ (a.float() * e.float())) * scale / denom


def _branch_constants(tagged: list[fx.Node]) -> tuple[float, float]:
    """(s, ranknum + 1e-5) of a site, read from its scale and ranknum nodes."""
    scale = next(n.args[1] for n in tagged if n.meta.get("peftc_role") == "lora_scale")
    denom = next(n.args[1] for n in tagged if n.meta.get("peftc_role") == "lora_ranknum")
    return scale, denom


def adalora_lift(program: Program, site: Site, state: AdapterState) -> list[LiftedTensor]:
    """A ``[r, in]``, E ``[r, 1]`` and B·s/(ranknum+1e-5) ``[out, r]`` as inputs; rank-0 defaults give the base."""
    scale, denom = _branch_constants([n for n in program.graph.nodes if n.meta.get("peftc_site") == site.name])
    keys = {p: peft_key(site.name, p) for p in _PARTS}
    a, b, e = (state.tensors[keys[p]].detach() for p in _PARTS)
    b_scaled = (b.float() * scale / denom).to(b.dtype).contiguous()
    return [
        LiftedTensor(f"{site.name}.lora_A", graph_path(keys["lora_A"]), a.clone(), a.new_zeros(0, a.shape[1]), 0),
        LiftedTensor(f"{site.name}.lora_E", graph_path(keys["lora_E"]), e.clone(), e.new_zeros(0, 1), 0),
        LiftedTensor(f"{site.name}.lora_B", graph_path(keys["lora_B"]), b_scaled, b.new_zeros(b.shape[0], 0), 1),
    ]


def _pipeline(config: AdaLoraConfig, state: AdapterState | None) -> PassManager:
    return PassManager(
        "adalora-insert", [AdaLoraPass(config, state), ModulesToSavePass(config.modules_to_save, config.bias)]
    )


def _hooks(config: AdaLoraConfig, state: AdapterState, total_steps: int) -> Any:
    from .adalora_training import AdaLoraTraining

    return AdaLoraTraining(config, state, total_steps)


ADALORA = register_method(
    Method(
        peft_type=AdaLoraConfig.peft_type,
        config_class=AdaLoraConfig,
        label="AdaLoRA",
        cli_names={"adalora": {}},
        pipeline=_pipeline,
        markers=("lora_", "ranknum"),
        merge_pass=MergeAdaLoraPass,
        lift=adalora_lift,
        lift_bypass=("lora_scale", "lora_ranknum"),
        training_hooks=_hooks,
        describe_site=low_rank_facts,
    )
)
