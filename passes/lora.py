"""LoRA insertion: ``h = base(x) + s·B(A(dropout(x)))`` beside every targeted linear layer.

A is ``[r, in]``, B is ``[out, r]``, ``s = lora_alpha / r`` (rsLoRA: ``lora_alpha / √r``), with
per-module ``rank_pattern``/``alpha_pattern``. ``nn.Linear`` appears in the graph as
``aten.linear(x, W, b)``; GPT-2's ``Conv1D`` as ``aten.addmm(b, x2d, W)`` with W stored
``[in, out]`` (fan_in_fan_out) — the branch is added to the addmm output, before Conv1D's reshape,
which is exactly HF PEFT's sum. Dropout on the branch input is inserted only into train programs.
Fresh adapters start as HF PEFT's do: A kaiming-uniform(a=√5), B zero.

A config may switch on a *variant* (HF PEFT's ``LoraVariant``): a change to the forward that keeps A,
B and ``s``, and the ``peft_type`` (``use_dora`` → DoRA, :mod:`peftc.passes.dora`). Such a site is
marked with ``Site.variant``, and the pass, the merge and the lift rule hand it to its variant; the
variant's math lives in its own module.
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
from peftc.errors import AdapterMismatchError, ConfigError
from peftc.methods import LiftedTensor, Method, register_method
from peftc.program import Program, Site

from .base import PassManager, add_call, add_param
from .merge import MergeLowRankPass
from .modules_to_save import ModulesToSavePass
from .targets import LORA_DEFAULT_TARGETS, LinearAdapterPass, LinearSite

__all__ = [
    "LORA",
    "LoraBranch",
    "LoraConfig",
    "LoraPass",
    "LoraVariant",
    "MergeLoraPass",
    "lora_input_names",
    "lora_lift",
    "lora_stack",
    "lora_variant",
    "site_variant",
]

logger = logging.getLogger(__name__)
aten = torch.ops.aten


@dataclass
class LoraConfig(MethodConfig):
    """LoRA: ``h = base(x) + s·B(A(dropout(x)))`` with ``s = lora_alpha / r`` (rsLoRA: ``/√r``)."""

    peft_type: ClassVar[str] = "LORA"
    unsupported: ClassVar[dict[str, Any]] = {
        "lora_bias": False,
        "use_qalora": False,
        "layer_replication": None,
        "loftq_config": {},
        "eva_config": None,
        "corda_config": None,
        "megatron_config": None,
        "trainable_token_indices": None,
        "target_parameters": None,
        "alora_invocation_tokens": None,
        "arrow_config": None,
        # LoRA variants HF PEFT 0.21 adds (each changes the forward or the tensor shapes)
        "velora_config": None,
        "monteclora_config": None,
        "use_bdlora": None,
        "kasa_config": None,
    }

    r: int = help_field("LoRA rank.", default=8)
    lora_alpha: float = help_field("LoRA scaling numerator: s = lora_alpha / r.", default=8)
    lora_dropout: float = help_field("Dropout on the LoRA branch input while training.", default=0.0)
    target_modules: list[str] | str | None = help_field(
        "Modules to adapt: a list matches a whole name or a '.name' suffix, a string is a full regex. "
        "Default: HF PEFT's table for the model type.",
        default=None,
    )
    exclude_modules: list[str] | str | None = help_field("Modules never to adapt (same matching rules).", default=None)
    fan_in_fan_out: bool = help_field("Weights stored as [in, out] (GPT-2 Conv1D); set automatically.", default=False)
    bias: str = help_field("Which biases train: none, all or lora_only.", default="none")
    use_rslora: bool = help_field("Rank-stabilised scaling s = lora_alpha / sqrt(r).", default=False)
    use_dora: bool = help_field(
        "DoRA: a trained magnitude m [out] times the row-normalised W + s·BA, "
        "h = base(x) + (m/||W + s·BA|| - 1)·xWᵀ + (m/||W + s·BA||)·s·B(A(x)); m starts at ||W + s·BA||.",
        default=False,
    )
    modules_to_save: list[str] | None = help_field(
        "Modules trained in full and saved with the adapter (the head, for seq-cls).", default=None
    )
    init_lora_weights: bool | str = help_field("True: A kaiming-uniform, B zero. False: both random.", default=True)
    layers_to_transform: list[int] | int | None = help_field("Only adapt these layer indices.", default=None)
    layers_pattern: list[str] | str | None = help_field("Name of the layer list, e.g. 'h' or 'layers'.", default=None)
    rank_pattern: dict[str, int] = help_field("Per-module rank overrides: {name or regex: r}.", default_factory=dict)
    alpha_pattern: dict[str, float] = help_field(
        "Per-module alpha overrides: {name or regex: alpha}.", default_factory=dict
    )

    def validate(self) -> None:
        super().validate()
        if self.r <= 0:
            raise ConfigError(f"LoRA r must be a positive integer, got r={self.r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ConfigError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported; use true, false or 'gaussian'"
            )
        for key, rank in self.rank_pattern.items():
            if rank <= 0:
                raise ConfigError(f"rank_pattern[{key!r}] must be a positive integer, got {rank}")
        if isinstance(self.target_modules, set):
            self.target_modules = sorted(self.target_modules)

    def rank_for(self, name: str) -> int:
        return int(pattern_value(name, self.rank_pattern, self.r))

    def alpha_for(self, name: str) -> float:
        return float(pattern_value(name, self.alpha_pattern, self.lora_alpha))

    def scale_for(self, name: str) -> float:
        r, alpha = self.rank_for(name), self.alpha_for(name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


@dataclass(frozen=True)
class LoraBranch:
    """The LoRA nodes a variant builds on at one site: ``bax = B(A(x))``, unscaled."""

    x: fx.Node  # the branch input: the layer's input, or its dropout in a train program
    a: fx.Node  # get_attr of A [r, in]
    b: fx.Node  # get_attr of B [out, r]
    bax: fx.Node  # B(A(x))
    scale: float  # s
    dropped: bool  # x is a dropout of the layer's input (train program, lora_dropout > 0)


class LoraVariant:
    """A change to LoRA's forward that keeps A, B, ``s`` and the peft_type (HF PEFT's ``LoraVariant``).

    A variant owns its extra tensors (``parts``, as parts of HF PEFT's key), the nodes that turn
    ``B(A(x))`` into the site's output, its merge delta, its lift rule and the facts inspect shows.
    """

    #: ``Site.variant`` of the sites it rewrites (``"dora"``).
    name: ClassVar[str] = ""
    #: Its own tensors per site, as HF PEFT key parts (``lora_magnitude_vector``).
    parts: ClassVar[tuple[str, ...]] = ()

    @staticmethod
    def bind(program: Program, site: LinearSite, state: AdapterState, scale: float, fresh: bool) -> set[str]:
        """Create (fresh) or check the variant's tensors of ``site`` in ``state``; return their keys."""
        raise NotImplementedError

    @staticmethod
    def insert(program: Program, site: LinearSite, branch: LoraBranch, state: AdapterState) -> fx.Node:
        """Add the variant's nodes after ``branch`` (at the graph's insertion point); return the site's output.

        The output is tagged ``lora_out`` and is ``base + …`` (its first argument is the base call), so
        the merge loop can bypass it; scale multiplications are tagged ``lora_scale`` (bypassed by a lift).
        """
        raise NotImplementedError

    @staticmethod
    def delta(program: Program, site: Site) -> torch.Tensor:
        """The site as a weight update ``[out, in]`` (``W' − W``), in float32."""
        raise NotImplementedError

    @staticmethod
    def lift(program: Program, site: Site, state: AdapterState) -> list[LiftedTensor]:
        """The variant's tensors as graph inputs (besides A and the pre-scaled B), defaults giving the base."""
        raise NotImplementedError

    @staticmethod
    def describe(parts: dict[str, list[int]]) -> dict[str, Any]:
        """Facts inspect shows for a site holding the variant's parts."""
        raise NotImplementedError


def _variants() -> dict[str, type[LoraVariant]]:
    """Config flag -> variant (HF PEFT's ``Linear.lora_variants``); imported here, as each variant imports LoRA."""
    from .dora import DoraVariant

    return {"use_dora": DoraVariant}


def lora_variant(config: Any) -> type[LoraVariant] | None:
    """The variant ``config`` switches on, ``None`` for plain LoRA."""
    return next((v for flag, v in _variants().items() if getattr(config, flag, False)), None)


def site_variant(site: Site) -> type[LoraVariant] | None:
    """The variant of a LoRA site (``Site.variant``), ``None`` for plain LoRA."""
    if site.variant is None:
        return None
    for variant in _variants().values():
        if variant.name == site.variant:
            return variant
    raise ValueError(f"site {site.name} has an unknown LoRA variant {site.variant!r}")


class LoraPass(LinearAdapterPass):
    """Adds s·B(A(x)) beside every targeted linear and Conv1D layer."""

    default_targets = LORA_DEFAULT_TARGETS
    marker = "lora_"

    def __init__(self, config: LoraConfig, state: AdapterState | None = None):
        super().__init__(config, state)

    def site_details(self, program: Program, name: str, calls: list[LinearSite]) -> dict:
        details, variant = super().site_details(program, name, calls), lora_variant(self.config)
        return {**details, "variant": variant.name} if variant else details

    # -- changing ----------------------------------------------------------------------------
    def rewrite_site(self, program: Program, site: LinearSite, decision, state: AdapterState, fresh: bool) -> set:
        cfg = self.config
        a, b = self._tensors(program, site, state, fresh)
        keys = {peft_key(site.name, "lora_A.weight"), peft_key(site.name, "lora_B.weight")}
        variant = lora_variant(cfg)
        if variant is not None:
            keys |= variant.bind(program, site, state, cfg.scale_for(site.name), fresh)
        fin, fout = site.features(program.graph_module)
        program.sites[site.name] = Site(
            site.name,
            LoraConfig.peft_type,
            site.module_type,
            fin,
            fout,
            cfg.rank_for(site.name),
            cfg.scale_for(site.name),
            site.fan_in_fan_out,
            variant.name if variant else None,
        )
        self._insert(program, site, a, b, variant, state)
        return keys

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
        return state.tensors[key_a], state.tensors[key_b]

    def _insert(
        self,
        program: Program,
        site: LinearSite,
        a: nn.Parameter,
        b: nn.Parameter,
        variant: type[LoraVariant] | None,
        state: AdapterState,
    ) -> None:
        cfg, graph, base = self.config, program.graph, site.node
        scale = cfg.scale_for(site.name)
        tag = site.name
        # inserting_before(next) keeps new nodes in creation order (inserting_after reverses them).
        with graph.inserting_before(base.next):
            a_node = add_param(program, graph_path(peft_key(site.name, "lora_A.weight")), a, tag, like=base)
            b_node = add_param(program, graph_path(peft_key(site.name, "lora_B.weight")), b, tag, like=base)
            x = site.x
            if program.mode == "train" and cfg.lora_dropout > 0:
                x = add_call(program, aten.dropout.default, (x, cfg.lora_dropout, True), base, tag, "lora_dropout")
            ax = add_call(program, aten.linear.default, (x, a_node), base, tag, "lora_A")
            bax = add_call(program, aten.linear.default, (ax, b_node), base, tag, "lora_B")
            if variant is None:
                scaled = add_call(program, aten.mul.Tensor, (bax, scale), base, tag, "lora_scale")
                out = add_call(program, aten.add.Tensor, (base, scaled), base, tag, "lora_out")
            else:
                branch = LoraBranch(x, a_node, b_node, bax, scale, dropped=x is not site.x)
                out = variant.insert(program, site, branch, state)
        base.replace_all_uses_with(out, delete_user_cb=lambda user: user.meta.get("peftc_site") != tag)


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


class MergeLoraPass(MergeLowRankPass):
    """Folds s·B·A into W at every LoRA site and removes the branch."""

    method = LoraConfig.peft_type
    parts = ("lora_A", "lora_B")

    def site_parts(self, site: Site) -> tuple[str, ...]:
        variant = site_variant(site)
        return self.parts + variant.parts if variant else self.parts

    def delta(self, program: Program, site: Site, tagged: list[fx.Node]) -> torch.Tensor:
        variant = site_variant(site)
        if variant is not None:
            return variant.delta(program, site)
        gm = program.graph_module
        a = gm.get_parameter(graph_path(peft_key(site.name, "lora_A.weight")))
        b = gm.get_parameter(graph_path(peft_key(site.name, "lora_B.weight")))
        return (b.float() @ a.float()) * site.scale


def lora_input_names(module: str) -> tuple[str, str]:
    """Graph input names of the A and (pre-scaled) B tensors of LoRA site ``module``."""
    return f"{module}.lora_A", f"{module}.lora_B"


def lora_lift(program: Program, site: Site, state: AdapterState) -> list[LiftedTensor]:
    """A ``[r, in]`` and B pre-scaled by ``s`` ``[out, r]`` as inputs; rank-0 defaults give the base model.

    A variant's site adds the variant's own tensors (DoRA: the magnitude).
    """
    name_a, name_b = lora_input_names(site.name)
    key_a, key_b = peft_key(site.name, "lora_A.weight"), peft_key(site.name, "lora_B.weight")
    a, b = state.tensors[key_a].detach(), state.tensors[key_b].detach()
    lifted = [
        LiftedTensor(name_a, graph_path(key_a), a.clone().contiguous(), a.new_zeros(0, a.shape[1]), rank_dim=0),
        LiftedTensor(
            name_b,
            graph_path(key_b),
            (b.float() * site.scale).to(b.dtype).contiguous(),
            b.new_zeros(b.shape[0], 0),
            rank_dim=1,
        ),
    ]
    variant = site_variant(site)
    return lifted + variant.lift(program, site, state) if variant else lifted


def lora_stack(program: Program, site: Site, states: list[AdapterState], slot: fx.Node) -> None:
    """Mixed batch: every source's A and B·s stacked (ranks zero-padded), gathered per row, applied with bmm.

    ``h_b = base(x)_b + (x_b A_bᵀ) B_bᵀ`` with ``A_b``, ``B_b`` the slot of row ``b``
    (:mod:`peftc.passes.mixed_batch`); slot 0 is zeros: the base model.
    """
    from .mixed_batch import erase, gather, per_row, restore_shape, stacked_lora, stacked_param

    if site.variant is not None:
        raise ConfigError(
            f"{site.variant} sites ({site.name}) cannot share one batch yet (no stacked rule for the magnitude); "
            "export without --mixed-batch"
        )
    graph = program.graph
    outs = [n for n in graph.nodes if n.meta.get("peftc_site") == site.name and n.meta.get("peftc_role") == "lora_out"]
    a_stack, b_stack = stacked_lora(states, site.name, site.in_features, site.out_features)
    path_a = graph_path(peft_key(site.name, "lora_A.weight")) + "__stacked"
    path_b = graph_path(peft_key(site.name, "lora_B.weight")) + "__stacked"
    for out in outs:
        base, scaled = out.args
        bax = scaled.args[0]
        ax = bax.args[0]
        x, a_node, b_node = ax.args[0], ax.args[1], bax.args[1]
        with graph.inserting_before(out):
            a_param = stacked_param(program, path_a, a_stack, site.name, like=out)
            b_param = stacked_param(program, path_b, b_stack, site.name, like=out)
            xr = per_row(program, x, slot, out, site.name)
            at = add_call(
                program,
                aten.transpose.int,
                (gather(program, a_param, slot, out, site.name), 1, 2),
                out,
                site.name,
                "mixed_t",
            )
            axr = add_call(program, aten.bmm.default, (xr, at), out, site.name, "lora_A")
            bt = add_call(
                program,
                aten.transpose.int,
                (gather(program, b_param, slot, out, site.name), 1, 2),
                out,
                site.name,
                "mixed_t",
            )
            baxr = add_call(program, aten.bmm.default, (axr, bt), out, site.name, "lora_B")
            delta = restore_shape(program, baxr, base, out, site.name)
        out.args = (base, delta)
        erase(program, [scaled, bax, ax, a_node, b_node])


def low_rank_facts(parts: dict[str, list[int]]) -> dict[str, Any]:
    """Rank, in and out features of a site from the shapes of its ``lora_A`` ``[r, in]`` and ``lora_B`` ``[out, r]``."""
    a, b = parts.get("lora_A"), parts.get("lora_B")
    out: dict[str, Any] = {}
    if a:
        out.update(rank=a[0], **{"in": a[-1]})
    if b:
        out["out"] = b[0]
    return out


def _describe(parts: dict[str, list[int]]) -> dict[str, Any]:
    out = low_rank_facts(parts)
    for variant in _variants().values():
        if any(part in parts for part in variant.parts):
            out.update(variant.describe(parts))
    return out


def _pipeline(config: LoraConfig, state: AdapterState | None) -> PassManager:
    return PassManager("lora-insert", [LoraPass(config, state), ModulesToSavePass(config.modules_to_save, config.bias)])


LORA = register_method(
    Method(
        peft_type=LoraConfig.peft_type,
        config_class=LoraConfig,
        label="LoRA",
        cli_names={"lora": {}, "dora": {"use_dora": True}},
        pipeline=_pipeline,
        markers=("lora_",),
        merge_pass=MergeLoraPass,
        lift=lora_lift,
        lift_bypass=("lora_scale",),
        stack=lora_stack,
        describe_site=_describe,
    )
)
