"""LoKr insertion, merge and lift: ``h = base(x) + x·ΔWᵀ`` with ``ΔW = kron(w1, w2)·alpha/r`` beside every target.

HF PEFT 0.21's LoKr (LyCORIS' low-rank Kronecker product). Each dimension of a layer is split in two
by :func:`factorization` (LyCORIS' rule, ``decompose_factor``): ``out = a·b``, ``in = c·d``, and the
weight update ``ΔW [out, in]`` is the Kronecker product of ``w1 [a, c]`` and ``w2 [b, d]``, scaled by
``s = alpha / r`` (per-module ``rank_pattern``/``alpha_pattern``). Each factor is either a full matrix or a
rank-``r`` product, by HF's rules:

- ``w1`` is ``lokr_w1`` ``[a, c]``, or ``lokr_w1_a [a, r] @ lokr_w1_b [r, c]`` when ``decompose_both`` and
  ``r < max(a, c) / 2``;
- ``w2`` is ``lokr_w2`` ``[b, d]``, or ``lokr_w2_a [b, r] @ lokr_w2_b [r, d]`` when ``r < max(b, d) / 2``.

The branch follows ``LoKrLayer.forward`` / ``Linear._get_delta_activations`` op for op: ``mm`` for each
decomposed factor, ``kron``, ``mul(s)``, ``linear(x, ΔW)``, added to the base call's output
(``aten.linear`` for ``nn.Linear``; for GPT-2's ``Conv1D``, ``aten.addmm`` before its reshape).
Train programs also carry HF's training-only randomness when ``rank_dropout`` or ``module_dropout`` is
set: one draw ``u ~ U[0, 1)`` per site and forward keeps the branch iff ``u > module_dropout`` (HF's
``torch.rand(1) > module_dropout``, made even at ``module_dropout=0``; no rescaling), then one draw per
output row keeps row ``i`` of ΔW iff ``u_i > rank_dropout`` (divided by the kept fraction with
``rank_dropout_scale``). A graph cannot skip the row draws of a dropped branch as HF does, so a seeded CPU
forward draws HF PEFT's numbers up to the first skipped branch (every time when ``module_dropout=0``).

Tensors are keyed as HF PEFT saves them (``ParameterDict`` entries: ``base_model.model.<module>.lokr_w1``,
no ``.weight``). Fresh ones start as HF's ``reset_adapter_parameters`` (``init_weights=True``: ``w1`` or
``w1_a`` zero, the rest kaiming-uniform, so ΔW = 0), ``"lycoris"`` (``w2`` or ``w2_b`` zero) or random
(``False``). A loaded adapter's tensors say which factors are full; they must agree with what the config
gives for the module (HF PEFT builds the layer from the config and would not load them otherwise).

GPT-2's ``Conv1D`` (weight stored ``[in, out]``): HF PEFT 0.21 refuses LoKr on it (``layers_mapping``
holds ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` only). peftc adapts it as the equivalent ``nn.Linear``:
ΔW is ``[out, in]`` as for Linear and is transposed into the weight when merged. The saved adapter is
then HF PEFT's LoKr adapter of that model with its ``Conv1D`` layers converted to ``nn.Linear``.

Convolution layers are not LoKr sites in peftc (so ``use_effective_conv2d``, which HF ignores for linear
layers, changes nothing here, and an adapter holding ``lokr_t2`` is refused).
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
from peftc.program import Program, Site, get_tensor

from .base import PassManager, add_call, add_param
from .merge import MergeLowRankPass
from .modules_to_save import ModulesToSavePass
from .targets import LORA_DEFAULT_TARGETS, LinearAdapterPass, LinearSite

__all__ = [
    "LOKR",
    "LOKR_DEFAULT_TARGETS",
    "PARTS",
    "KronLayout",
    "LoKrConfig",
    "LoKrPass",
    "MergeLoKrPass",
    "factorization",
    "kron_layout",
    "lokr_delta",
    "lokr_lift",
]

logger = logging.getLogger(__name__)
aten = torch.ops.aten

#: HF PEFT 0.21 ``TRANSFORMERS_MODELS_TO_LOKR_TARGET_MODULES_MAPPING`` is a copy of LoRA's table.
LOKR_DEFAULT_TARGETS = LORA_DEFAULT_TARGETS

#: A site's tensors, as HF PEFT names them (``lokr_t2``, conv layers only, is not among them).
PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
_CONV_PART = "lokr_t2"


@dataclass
class LoKrConfig(MethodConfig):
    """LoKr: ``h = base(x) + x·ΔWᵀ``, ``ΔW = kron(w1, w2)·alpha/r`` (HF PEFT 0.21's ``LoKrConfig``)."""

    peft_type: ClassVar[str] = "LOKR"
    unsupported: ClassVar[dict[str, Any]] = {}

    r: int = help_field("LoKr rank of the decomposed Kronecker factors; scale s = alpha / r.", default=8)
    alpha: float = help_field("LoKr scaling numerator: s = alpha / r.", default=8)
    rank_dropout: float = help_field(
        "While training, drop each output row of the weight update with this probability.", default=0.0
    )
    module_dropout: float = help_field(
        "While training, skip a module's whole LoKr branch with this probability (per forward).", default=0.0
    )
    use_effective_conv2d: bool = help_field(
        "FedPara's decomposition of conv kernels (> 1); conv layers only, so it changes nothing for the "
        "Linear/Conv1D layers peftc adapts (as in HF PEFT).",
        default=False,
    )
    decompose_both: bool = help_field(
        "Also decompose the left Kronecker factor w1 into w1_a·w1_b when r < max(its dims) / 2.", default=False
    )
    decompose_factor: int = help_field(
        "Kronecker factorisation of each dimension: -1 splits it near its square root, f > 0 into (f, dim / f) "
        "when f divides it.",
        default=-1,
    )
    rank_dropout_scale: bool = help_field(
        "Divide the rank-dropout mask by its mean (the kept fraction) while training.", default=False
    )
    target_modules: list[str] | str | None = help_field(
        "Modules to adapt: a list matches a whole name or a '.name' suffix, a string is a full regex. "
        "Default: HF PEFT's table for the model type (LoRA's).",
        default=None,
    )
    exclude_modules: list[str] | str | None = help_field("Modules never to adapt (same matching rules).", default=None)
    init_weights: bool | str = help_field(
        "True: w1 (or w1_a) zero, the rest kaiming-uniform, so the update starts at 0. 'lycoris': w2 (or w2_b) "
        "zero instead. False: all random (the update is not 0).",
        default=True,
    )
    layers_to_transform: list[int] | int | None = help_field("Only adapt these layer indices.", default=None)
    layers_pattern: list[str] | str | None = help_field("Name of the layer list, e.g. 'h' or 'layers'.", default=None)
    modules_to_save: list[str] | None = help_field(
        "Modules trained in full and saved with the adapter (the head, for seq-cls).", default=None
    )
    rank_pattern: dict[str, int] | None = help_field(
        "Per-module rank overrides: {name or regex: r}.", default_factory=dict
    )
    alpha_pattern: dict[str, float] | None = help_field(
        "Per-module alpha overrides: {name or regex: alpha}.", default_factory=dict
    )

    def validate(self) -> None:
        super().validate()
        if self.r <= 0:
            raise ConfigError(f"LoKr r must be a positive integer, got r={self.r}")
        for name in ("rank_dropout", "module_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"LoKr {name} is a probability in [0, 1], got {getattr(self, name)}")
        if self.init_weights not in (True, False, "lycoris"):
            raise ConfigError(f"LoKr init_weights must be true, false or 'lycoris', got {self.init_weights!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("layers_pattern is set but layers_to_transform is not; set both (as HF PEFT requires)")
        for key, rank in (self.rank_pattern or {}).items():
            if rank <= 0:
                raise ConfigError(f"rank_pattern[{key!r}] must be a positive integer, got {rank}")
        for name in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, name), set):
                setattr(self, name, sorted(getattr(self, name)))

    def rank_for(self, name: str) -> int:
        return int(pattern_value(name, self.rank_pattern or {}, self.r))

    def alpha_for(self, name: str) -> float:
        return float(pattern_value(name, self.alpha_pattern or {}, self.alpha))

    def scale_for(self, name: str) -> float:
        """HF's ``scaling``: ``alpha / r`` of the module (no rsLoRA variant in LoKr)."""
        return self.alpha_for(name) / self.rank_for(name)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into ``(m, n)`` with ``m·n = dimension``, exactly as LyCORIS and HF PEFT 0.21 do.

    ``factor > 0`` dividing ``dimension`` gives ``(factor, dimension // factor)`` as is (not sorted). Otherwise
    the divisor pair nearest the square root is searched, stopping before ``m`` exceeds ``factor`` (``-1``: no
    limit), and returned with ``m <= n``: ``factorization(192) == (12, 16)``, ``factorization(127) == (1, 127)``.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        m, n = n, m
    return m, n


@dataclass(frozen=True)
class KronLayout:
    """How HF PEFT shapes one LoKr site: ``ΔW [a·b, c·d] = kron(w1 [a, c], w2 [b, d])``, each factor full or rank r."""

    a: int
    b: int
    c: int
    d: int
    r: int
    full_w1: bool
    full_w2: bool

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Part name -> shape of the tensors the site holds, in HF's creation order."""
        a, b, c, d, r = self.a, self.b, self.c, self.d, self.r
        out = {"lokr_w1": (a, c)} if self.full_w1 else {"lokr_w1_a": (a, r), "lokr_w1_b": (r, c)}
        out.update({"lokr_w2": (b, d)} if self.full_w2 else {"lokr_w2_a": (b, r), "lokr_w2_b": (r, d)})
        return out

    def describe(self) -> str:
        w1 = f"w1 [{self.a}, {self.c}]" if self.full_w1 else f"w1 = w1_a [{self.a}, {self.r}]·w1_b [{self.r}, {self.c}]"
        w2 = f"w2 [{self.b}, {self.d}]" if self.full_w2 else f"w2 = w2_a [{self.b}, {self.r}]·w2_b [{self.r}, {self.d}]"
        return f"{w1}, {w2}"


def kron_layout(fin: int, fout: int, r: int, decompose_both: bool = False, decompose_factor: int = -1) -> KronLayout:
    """HF PEFT's ``LoKrLayer.update_layer`` for a Linear ``[fout, fin]``: factor shapes and which are decomposed."""
    c, d = factorization(fin, decompose_factor)
    a, b = factorization(fout, decompose_factor)
    full_w1 = not (decompose_both and r < max(a, c) / 2)
    full_w2 = not (r < max(b, d) / 2)
    return KronLayout(a, b, c, d, r, full_w1, full_w2)


def _layout_words(parts: set[str] | list[str]) -> str:
    w1 = "full w1" if "lokr_w1" in parts else "w1 = w1_a·w1_b"
    w2 = "full w2" if "lokr_w2" in parts else "w2 = w2_a·w2_b"
    return f"{w1}, {w2}"


def lokr_delta(tensors: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    """``kron(w1, w2)·scale`` from a site's tensors (part name -> tensor), in float32, as HF's ``make_kron``."""
    t = {k: v.float() for k, v in tensors.items()}
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    return torch.kron(w1, w2) * scale


def _site_parts(tensors: dict[str, Any], module: str) -> dict[str, Any]:
    """Part name -> tensor of module ``module`` among HF-keyed ``tensors`` (``lokr_t2`` included when present)."""
    keys = {p: peft_key(module, p) for p in (*PARTS, _CONV_PART)}
    return {p: tensors[k] for p, k in keys.items() if k in tensors}


class LoKrPass(LinearAdapterPass):
    """Adds x·(kron(w1, w2)·s)ᵀ beside every targeted linear and Conv1D layer."""

    default_targets = LOKR_DEFAULT_TARGETS
    marker = "lokr_"

    def __init__(self, config: LoKrConfig, state: AdapterState | None = None):
        super().__init__(config, state)
        self._warned_conv1d = False

    def layout(self, name: str, fin: int, fout: int) -> KronLayout:
        cfg = self.config
        return kron_layout(fin, fout, cfg.rank_for(name), cfg.decompose_both, cfg.decompose_factor)

    def site_details(self, program: Program, name: str, calls: list[LinearSite]) -> dict:
        fin, fout = calls[0].features(program.graph_module)
        layout = self.layout(name, fin, fout)
        return {
            "in": fin,
            "out": fout,
            "rank": layout.r,
            "scale": self.config.scale_for(name),
            "kron": layout.describe(),
        }

    # -- changing ----------------------------------------------------------------------------
    def rewrite_site(self, program: Program, site: LinearSite, decision, state: AdapterState, fresh: bool) -> set:
        if site.fan_in_fan_out and not self._warned_conv1d:
            self._warned_conv1d = True
            logger.warning(
                "LoKr on %s (%s): HF PEFT 0.21 does not apply LoKr to transformers' Conv1D; peftc adapts it as the "
                "equivalent nn.Linear, so HF PEFT loads this adapter only into the model with its Conv1D layers "
                "converted to nn.Linear",
                site.name,
                site.module_type,
            )
        tensors = self._tensors(program, site, state, fresh)
        self._insert(program, site, tensors)
        return {peft_key(site.name, p) for p in tensors}

    def _tensors(self, program: Program, site: LinearSite, state: AdapterState, fresh: bool) -> dict[str, nn.Parameter]:
        cfg = self.config
        fin, fout = site.features(program.graph_module)
        layout = self.layout(site.name, fin, fout)
        if fresh and not _site_parts(state.tensors, site.name):
            w = site.weight_tensor(program.graph_module)
            for part, t in _init_lokr(cfg, layout, w.dtype).items():
                state.tensors[peft_key(site.name, part)] = t
        held = _site_parts(state.tensors, site.name)
        if not held:
            raise AdapterMismatchError(
                f"adapter has no LoKr tensor for targeted module {site.name} (expected {', '.join(layout.shapes())}); "
                "was it made for another model or other target_modules?"
            )
        if _CONV_PART in held:
            raise AdapterMismatchError(
                f"adapter tensor {peft_key(site.name, _CONV_PART)} is a conv kernel core (use_effective_conv2d) but "
                f"{site.name} is a {site.module_type}; the adapter was made for another model"
            )
        want = layout.shapes()
        if set(held) != set(want):
            raise AdapterMismatchError(
                f"adapter holds {', '.join(sorted(held))} ({_layout_words(held)}) for module {site.name}, but its "
                f"config (r={layout.r}, decompose_both={cfg.decompose_both}, decompose_factor={cfg.decompose_factor}) "
                f"gives HF PEFT's layout {layout.describe()} for in={fin}, out={fout}; the adapter's tensors and its "
                "config disagree (HF PEFT would not load it either)"
            )
        for part, shape in want.items():
            if tuple(held[part].shape) != shape:
                raise AdapterMismatchError(
                    f"adapter tensor {peft_key(site.name, part)} has shape {list(held[part].shape)} but module "
                    f"{site.name} needs {list(shape)} ({layout.describe()} for in={fin}, out={fout}); the adapter was "
                    "made for another base model"
                )
        program.sites[site.name] = Site(
            site.name,
            LoKrConfig.peft_type,
            site.module_type,
            fin,
            fout,
            layout.r,
            cfg.scale_for(site.name),
            site.fan_in_fan_out,
        )
        return {part: held[part] for part in want}

    def _insert(self, program: Program, site: LinearSite, tensors: dict[str, nn.Parameter]) -> None:
        graph, base, tag = program.graph, site.node, site.name
        scale = self.config.scale_for(site.name)
        # inserting_before(next) keeps new nodes in creation order (inserting_after reverses them).
        with graph.inserting_before(base.next):
            nodes = {
                part: add_param(program, graph_path(peft_key(tag, part)), t, tag, like=site.x)
                for part, t in tensors.items()
            }
            factors = []
            for w in ("lokr_w1", "lokr_w2"):
                if w in nodes:
                    factors.append(nodes[w])
                else:
                    factors.append(add_call(program, aten.mm.default, (nodes[f"{w}_a"], nodes[f"{w}_b"]), base, tag, w))
            kron = add_call(program, aten.kron.default, tuple(factors), base, tag, "lokr_kron")
            delta = add_call(program, aten.mul.Tensor, (kron, scale), base, tag, "lokr_scale")
            if program.mode == "train" and (self.config.module_dropout > 0 or self.config.rank_dropout > 0):
                delta = self._dropouts(program, site, delta, next(iter(tensors.values())).dtype)
            branch = add_call(program, aten.linear.default, (site.x, delta), base, tag, "lokr_linear")
            out = add_call(program, aten.add.Tensor, (base, branch), base, tag, "lokr_out")
        base.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)

    def _dropouts(self, program: Program, site: LinearSite, delta: fx.Node, dtype: torch.dtype) -> fx.Node:
        """HF's training-only draws on ΔW: module dropout (one draw), then rank dropout (one per output row)."""
        cfg, base, tag = self.config, site.node, site.name

        def call(target, args, role, **kwargs):
            return add_call(program, target, args, base, tag, role, kwargs=kwargs or None)

        # Draws are made like ΔW's rows (same device) in float32, as HF's torch.rand.
        rows = call(aten.select.int, (delta, 1, 0), "lokr_rows")
        one = call(aten.select.int, (rows, 0, 0), "lokr_one")
        u = call(aten.rand_like.default, (one,), "lokr_module_draw", dtype=torch.float32)
        keep = call(aten.gt.Scalar, (u, float(cfg.module_dropout)), "lokr_module_keep")
        keep = call(aten._to_copy.default, (keep,), "lokr_module_mask", dtype=dtype)
        if cfg.rank_dropout > 0:
            v = call(aten.rand_like.default, (rows,), "lokr_rank_draw", dtype=torch.float32)
            drop = call(aten.gt.Scalar, (v, float(cfg.rank_dropout)), "lokr_rank_keep")
            drop = call(aten._to_copy.default, (drop,), "lokr_rank_mask", dtype=torch.float32)
            if cfg.rank_dropout_scale:
                mean = call(aten.mean.default, (drop,), "lokr_rank_mean")
                drop = call(aten.div.Tensor, (drop, mean), "lokr_rank_scale")
            if dtype != torch.float32:
                drop = call(aten._to_copy.default, (drop,), "lokr_rank_cast", dtype=dtype)
            column = call(aten.unsqueeze.default, (drop, 1), "lokr_rank_column")
            delta = call(aten.mul.Tensor, (delta, column), "lokr_rank_dropout")
        return call(aten.mul.Tensor, (delta, keep), "lokr_module_dropout")


def _init_lokr(cfg: LoKrConfig, layout: KronLayout, dtype: torch.dtype) -> dict[str, nn.Parameter]:
    """A site's tensors as HF PEFT's ``update_layer`` creates and initialises them (same order of draws)."""
    tensors = {part: torch.empty(shape, dtype=dtype) for part, shape in layout.shapes().items()}

    def kaiming(part: str) -> None:
        nn.init.kaiming_uniform_(tensors[part], a=math.sqrt(5))

    w1 = ["lokr_w1"] if layout.full_w1 else ["lokr_w1_a", "lokr_w1_b"]
    w2 = ["lokr_w2"] if layout.full_w2 else ["lokr_w2_a", "lokr_w2_b"]
    if cfg.init_weights is True:  # reset_adapter_parameters
        nn.init.zeros_(tensors[w1[0]])
        for part in [*w1[1:], *w2]:
            kaiming(part)
    elif cfg.init_weights == "lycoris":  # reset_adapter_parameters_lycoris_way
        for part in w1:
            kaiming(part)
        nn.init.zeros_(tensors[w2[-1]])
        if len(w2) == 2:
            kaiming(w2[0])
    else:  # reset_adapter_parameters_random
        for part in [*w1, *w2]:
            kaiming(part)
    return {part: nn.Parameter(t) for part, t in tensors.items()}


class MergeLoKrPass(MergeLowRankPass):
    """Folds kron(w1, w2)·s into W at every LoKr site and removes the branch."""

    method = LoKrConfig.peft_type
    parts = PARTS
    out_role = "lokr_out"

    def delta(self, program: Program, site: Site, tagged: list[fx.Node]) -> torch.Tensor:
        gm = program.graph_module
        paths = {p: graph_path(peft_key(site.name, p)) for p in PARTS}
        held = {n.target for n in tagged if n.op == "get_attr"}
        return lokr_delta({p: get_tensor(gm, path) for p, path in paths.items() if path in held}, site.scale)


def lokr_lift(program: Program, site: Site, state: AdapterState) -> list[LiftedTensor]:
    """The site's factors as inputs ``<module>.lokr_w1`` …, ``s`` folded into w2 (or w2_b); defaults give ΔW = 0.

    Full factors have static shapes (default zeros); decomposed ones a symbolic rank (default rank 0, whose
    product is a zero factor). Either way one zero factor makes ``kron(w1, w2) = 0``: the base model.
    """
    held = _site_parts(state.tensors, site.name)
    if _CONV_PART in held or not held:
        raise AdapterMismatchError(f"LoKr site {site.name} has no liftable tensors in adapter {state.name!r}")
    scaled = "lokr_w2" if "lokr_w2" in held else "lokr_w2_b"
    rank_dims = {"lokr_w1_a": 1, "lokr_w1_b": 0, "lokr_w2_a": 1, "lokr_w2_b": 0}
    out = []
    for part in PARTS:
        if part not in held:
            continue
        t = held[part].detach()
        value = (t.float() * site.scale).to(t.dtype) if part == scaled else t.clone()
        dim = rank_dims.get(part)
        shape = list(t.shape)
        if dim is not None:
            shape[dim] = 0
        key = peft_key(site.name, part)
        out.append(LiftedTensor(f"{site.name}.{part}", graph_path(key), value.contiguous(), t.new_zeros(shape), dim))
    return out


def _describe(parts: dict[str, list[int]]) -> dict[str, Any]:
    """Rank, in, out and the Kronecker layout of a site from its parts' shapes."""

    def factor(w: str) -> tuple[list[int] | None, int | None]:
        if w in parts:
            return parts[w], None
        left, right = parts.get(f"{w}_a"), parts.get(f"{w}_b")
        if left and right:
            return [left[0], right[-1]], left[-1]
        return None, None

    (w1, r1), (w2, r2) = factor("lokr_w1"), factor("lokr_w2")
    out: dict[str, Any] = {}
    rank = r1 if r1 is not None else r2
    if rank is not None:
        out["rank"] = rank
    if w1 and w2:
        out.update({"in": w1[1] * w2[1], "out": w1[0] * w2[0], "kron": f"{w1} ⊗ {w2}"})
    return out


def _pipeline(config: LoKrConfig, state: AdapterState | None) -> PassManager:
    return PassManager("lokr-insert", [LoKrPass(config, state), ModulesToSavePass(config.modules_to_save)])


LOKR = register_method(
    Method(
        peft_type=LoKrConfig.peft_type,
        config_class=LoKrConfig,
        label="LoKr",
        cli_names={"lokr": {}},
        pipeline=_pipeline,
        markers=("lokr_",),
        merge_pass=MergeLoKrPass,
        lift=lokr_lift,
        lift_bypass=("lokr_scale",),
        describe_site=_describe,
    )
)
