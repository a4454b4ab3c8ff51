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

Training support lives here as well: :class:`RankAllocator` (HF's importance-driven budget), the
orthogonal regularisation, and :class:`AdaLoraTraining`, the hooks ``peftc.train`` calls.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import fx, nn

from peftc.adapters import AdapterState, graph_path, peft_key
from peftc.config import AdaLoraConfig
from peftc.errors import AdapterMismatchError, ConfigError
from peftc.program import Program, Site

from .base import add_call, add_param
from .merge import MergeLoraPass
from .targets import LORA_DEFAULT_TARGETS, LinearAdapterPass, LinearSite

__all__ = [
    "ADALORA_DEFAULT_TARGETS",
    "AdaLoraPass",
    "AdaLoraTraining",
    "MergeAdaLoraPass",
    "RankAllocator",
    "orthogonal_regularization",
    "resize_by_rank_pattern",
]

logger = logging.getLogger(__name__)
aten = torch.ops.aten

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

_PARTS = ("lora_A", "lora_B", "lora_E")
#: File of a training checkpoint holding the RankAllocator's state.
ALLOCATOR_FILE = "adalora_allocator.safetensors"


def ranknum_denominator(init_r: int | float, dtype: torch.dtype = torch.float32) -> float:
    """``ranknum + 1e-5`` computed as HF PEFT does (a ``dtype`` tensor plus 1e-5), as a Python float."""
    return float(torch.tensor([float(init_r)], dtype=dtype) + 1e-5)


class AdaLoraPass(LinearAdapterPass):
    """Adds (x·(A⊙E)ᵀ·Bᵀ)·s/(ranknum+1e-5) beside every targeted linear and Conv1D layer."""

    default_targets = ADALORA_DEFAULT_TARGETS
    marker = "lora_"

    def __init__(self, config: AdaLoraConfig, state: AdapterState | None = None):
        super().__init__(config, state)

    def site_details(self, program: Program, name: str, calls: list[LinearSite]) -> dict:
        fin, fout = calls[0].features(program.graph_module)
        return {"in": fin, "out": fout, "rank": self.config.rank_for(name), "scale": self.config.scale_for(name)}

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
            site.name, "ADALORA", site.module_type, fin, fout, held, cfg.scale_for(site.name), site.fan_in_fan_out
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
                ae.meta["val"] = _fake_like(site.x, tensors[0])
            xa = add_call(program, aten.linear.default, (x, ae), base, tag, "lora_A")
            xab = add_call(program, aten.linear.default, (xa, b_node), base, tag, "lora_B")
            scaled = add_call(program, aten.mul.Tensor, (xab, cfg.scale_for(site.name)), base, tag, "lora_scale")
            normed = add_call(program, aten.div.Tensor, (scaled, denom), base, tag, "lora_ranknum")
            out = add_call(program, aten.add.Tensor, (base, normed), base, tag, "lora_out")
        base.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)


def _fake_like(node: fx.Node, tensor: torch.Tensor) -> torch.Tensor:
    """A fake tensor shaped like ``tensor`` in the fake mode of ``node``'s value."""
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode([node.meta["val"]])
    return mode.from_tensor(tensor.detach(), static_shapes=True)


def _init_adalora(cfg: AdaLoraConfig, r: int, fin: int, fout: int, dtype: torch.dtype) -> list[nn.Parameter]:
    """A, B, E as HF PEFT's ``update_layer`` draws them (randn, then E=0 and A, B ~ N(0, 0.02))."""
    a, e, b = torch.randn(r, fin), torch.randn(r, 1), torch.randn(fout, r)
    if cfg.init_lora_weights:
        nn.init.zeros_(e)
        nn.init.normal_(a, mean=0.0, std=0.02)
        nn.init.normal_(b, mean=0.0, std=0.02)
    return [nn.Parameter(t.to(dtype)) for t in (a, b, e)]


class MergeAdaLoraPass(MergeLoraPass):
    """Folds B·(A⊙E)·s/(ranknum+1e-5) into W at every AdaLoRA site and removes the branch."""

    method = "ADALORA"
    parts = _PARTS

    def delta(self, program: Program, site, tagged: list[fx.Node]) -> torch.Tensor:
        scale = next(n.args[1] for n in tagged if n.meta.get("peftc_role") == "lora_scale")
        denom = next(n.args[1] for n in tagged if n.meta.get("peftc_role") == "lora_ranknum")
        a, b, e = (program.graph_module.get_parameter(graph_path(peft_key(site.name, p))) for p in _PARTS)
        return (b.float() @ (a.float() * e.float())) * scale / denom


def _modules(state: AdapterState) -> list[str]:
    """Module names (HF PEFT key prefixes without ``.lora_A``) of the state's AdaLoRA triplets, sorted."""
    return sorted(k.removesuffix(".lora_A") for k in state.tensors if k.endswith(".lora_A"))


def _rank_key(prefix: str) -> str:
    """``rank_pattern`` key of a triplet: ``<module>.lora_E`` (HF PEFT's saved form)."""
    return prefix.removeprefix("base_model.model.") + ".lora_E"


def orthogonal_regularization(state: AdapterState) -> torch.Tensor:
    """Mean over every A and B of ``‖P Pᵀ − I‖_F`` (A: ``A Aᵀ``; B: ``Bᵀ B``), as HF's ``AdaLoraModel.forward``."""
    total, count = None, 0
    for key, p in state.tensors.items():
        if not p.requires_grad or not (key.endswith(".lora_A") or key.endswith(".lora_B")):
            continue
        cov = p @ p.T if key.endswith(".lora_A") else p.T @ p
        eye = torch.eye(*cov.size(), dtype=cov.dtype, device=cov.device)
        norm = torch.norm(cov - eye, p="fro")
        total = norm if total is None else total + norm
        count += 1
    return total / count if count else torch.zeros(())


class RankAllocator:
    """HF PEFT's RankAllocator over an :class:`AdapterState`: importance EMAs, cubic budget, masking of E.

    The importance of an entry is ``|w·∇w|``, smoothed (``beta1``) and multiplied by its uncertainty
    (``beta2`` EMA of the deviation); a triplet's score is its E score plus the row/column means of its
    A and B scores. At a masking step the lowest-scoring triplets over all modules are zeroed in E until
    ``budget`` remain.
    """

    def __init__(self, config: AdaLoraConfig, state: AdapterState):
        if config.total_step is None:
            raise ConfigError("AdaLoRA total_step is unset; set it in the config (peftc train fills it in)")
        self.config = config
        self.state = state
        self.prefixes = _modules(state)
        self.init_bgt = sum(state.tensors[p + ".lora_A"].shape[0] for p in self.prefixes)
        self.target_bgt = config.target_r * len(self.prefixes)
        self.reset_ipt()

    def reset_ipt(self) -> None:
        self.ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(budget, whether to mask) at ``step``: constant until tinit, cubic decay, target after total−tfinal."""
        cfg = self.config
        tinit, tfinal, total = cfg.tinit, cfg.tfinal, cfg.total_step
        if step <= tinit:
            return self.init_bgt, False
        if step > total - tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - tinit) / (total - tfinal - tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul_coeff**3) + self.target_bgt)
        return budget, step % cfg.deltaT == 0

    @torch.no_grad()
    def update_ipt(self) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for prefix in self.prefixes:
            for part in _PARTS:
                n = f"{prefix}.{part}"
                p = self.state.tensors[n]
                if n not in self.ipt:
                    self.ipt[n] = torch.zeros_like(p)
                    self.exp_avg_ipt[n] = torch.zeros_like(p)
                    self.exp_avg_unc[n] = torch.zeros_like(p)
                if p.grad is None:
                    raise RuntimeError(f"AdaLoRA rank allocation needs the gradient of {n}; call it before zero_grad")
                self.ipt[n] = (p * p.grad).abs().detach()
                self.exp_avg_ipt[n] = b1 * self.exp_avg_ipt[n] + (1 - b1) * self.ipt[n]
                self.exp_avg_unc[n] = b2 * self.exp_avg_unc[n] + (1 - b2) * (self.ipt[n] - self.exp_avg_ipt[n]).abs()

    def _score(self, n: str) -> torch.Tensor:
        return self.exp_avg_ipt[n] * self.exp_avg_unc[n]

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero E of the lowest-scoring triplets so ``budget`` remain; the kept-triplet masks by rank key."""
        triplet: dict[str, torch.Tensor] = {}
        for prefix in self.prefixes:
            a = torch.mean(self._score(prefix + ".lora_A"), dim=1, keepdim=True)
            b = torch.mean(self._score(prefix + ".lora_B"), dim=0, keepdim=False).view(-1, 1)
            ab = torch.cat([a, b], dim=1).sum(dim=1, keepdim=False)
            triplet[prefix] = (self._score(prefix + ".lora_E").view(-1) + ab.view(-1)).view(-1, 1)
        k = self.init_bgt - budget
        # HF PEFT calls kthvalue(k=0) there and fails; masking nothing is what that budget means.
        threshold = torch.kthvalue(torch.cat([t.view(-1) for t in triplet.values()]), k=k)[0].item() if k > 0 else -1
        pattern = {}
        for prefix, score in triplet.items():
            self.state.tensors[prefix + ".lora_E"].masked_fill_(score <= threshold, 0.0)
            pattern[_rank_key(prefix)] = (~(score <= threshold)).view(-1).tolist()
        return pattern

    def update_and_allocate(self, step: int, force_mask: bool = False) -> tuple[int, dict[str, list[bool]] | None]:
        if step < self.config.total_step - self.config.tfinal:
            self.update_ipt()
        budget, mask_ind = self.budget_schedule(step)
        return budget, (self.mask_to_budget(budget) if mask_ind or force_mask else None)

    @torch.no_grad()
    def mask_using_rank_pattern(self, rank_pattern: dict[str, list[bool]]) -> None:
        for prefix in self.prefixes:
            mask = torch.tensor(rank_pattern[_rank_key(prefix)], dtype=torch.bool).unsqueeze(-1)
            self.state.tensors[prefix + ".lora_E"].masked_fill_(~mask, 0.0)


class AdaLoraTraining:
    """The hooks ``peftc.train`` calls for AdaLoRA: loss regularisation, rank allocation, final resize.

    ``after_step(step)`` is HF's ``AdaLoraModel.update_and_allocate(global_step)``: call it after
    ``optimizer.step()`` and before ``zero_grad`` with the 1-based optimizer step.
    """

    def __init__(self, config: AdaLoraConfig, state: AdapterState, total_steps: int):
        if config.total_step is None:
            config.total_step = total_steps
            if config.tinit >= config.total_step - config.tfinal:
                raise ConfigError(
                    f"AdaLoRA tinit={config.tinit} and tfinal={config.tfinal} leave no pruning phase in this run's "
                    f"{total_steps} steps; lower them or train longer"
                )
        self.config = config
        self.state = state
        self.allocator = RankAllocator(config, state)

    def regularization(self) -> torch.Tensor | float:
        """``orth_reg_weight · mean ‖PPᵀ − I‖_F``, added to every micro-batch loss."""
        if self.config.orth_reg_weight == 0:
            return 0.0
        return self.config.orth_reg_weight * orthogonal_regularization(self.state)

    def after_step(self, step: int) -> None:
        cfg = self.config
        final = cfg.total_step - cfg.tfinal
        if step < final:
            _, pattern = self.allocator.update_and_allocate(step)
            if pattern:
                cfg.rank_pattern = pattern
        elif step == final:
            _, cfg.rank_pattern = self.allocator.update_and_allocate(step, force_mask=True)
            self.allocator.reset_ipt()
        else:
            if cfg.rank_pattern is None:  # resumed in the final phase: the allocator state is gone
                _, cfg.rank_pattern = self.allocator.update_and_allocate(step, force_mask=True)
            self.allocator.mask_using_rank_pattern(cfg.rank_pattern)

    def save_state(self, directory: str | Path) -> None:
        """Write the allocator's importance EMAs and ``rank_pattern`` into a checkpoint directory."""
        alloc = self.allocator
        tensors = {}
        for slot, table in (("ipt", alloc.ipt), ("avg", alloc.exp_avg_ipt), ("unc", alloc.exp_avg_unc)):
            tensors.update({f"{slot}::{k}": v.contiguous() for k, v in table.items()})
        meta = {"rank_pattern": json.dumps(self.config.rank_pattern), "total_step": str(self.config.total_step)}
        save_file(tensors, str(Path(directory, ALLOCATOR_FILE)), metadata=meta)

    def load_state(self, directory: str | Path) -> None:
        """Restore what :meth:`save_state` wrote, so a resumed run allocates ranks as an uninterrupted one."""
        path = Path(directory, ALLOCATOR_FILE)
        if not path.is_file():
            raise ConfigError(f"checkpoint {directory} has no {ALLOCATOR_FILE}; it was not written by an AdaLoRA run")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        alloc = self.allocator
        alloc.reset_ipt()
        tables = {"ipt": alloc.ipt, "avg": alloc.exp_avg_ipt, "unc": alloc.exp_avg_unc}
        for key, value in tensors.items():
            slot, _, name = key.partition("::")
            tables[slot][name] = value
        self.config.rank_pattern = json.loads(meta.get("rank_pattern", "null"))

    def finalize(self, state: AdapterState) -> AdapterState:
        """The adapter as HF PEFT saves it: tensors cut to the kept triplets of ``rank_pattern``."""
        return resize_by_rank_pattern(state)


def resize_by_rank_pattern(state: AdapterState) -> AdapterState:
    """A new state whose A/E rows and B columns are those ``config.rank_pattern`` keeps (HF's save-time resize)."""
    pattern = state.config.rank_pattern
    if not pattern:
        return state
    tensors = dict(state.tensors)
    for prefix in _modules(state):
        mask = pattern.get(_rank_key(prefix))
        if mask is None:
            continue
        idx = torch.tensor(mask, dtype=torch.bool)
        for part in _PARTS:
            t = tensors[f"{prefix}.{part}"]
            held = t.shape[1] if part == "lora_B" else t.shape[0]
            if held == int(idx.sum()):
                continue
            cut = t.detach()[:, idx] if part == "lora_B" else t.detach()[idx]
            tensors[f"{prefix}.{part}"] = nn.Parameter(cut.clone(), requires_grad=False)
    return dataclasses.replace(state, tensors=tensors)
