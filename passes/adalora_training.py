"""AdaLoRA's training hooks: the RankAllocator, the orthogonal regularisation, the save-time resize.

HF PEFT 0.21's ``RankAllocator`` scores each triplet by its sensitivity ``|w·∇w|``, smoothed with
``beta1`` (importance) and ``beta2`` (uncertainty); a cubic budget schedule lowers the total rank from
``init_r`` to ``target_r`` per module between ``tinit`` and ``total_step - tfinal``, masking the
lowest-scored triplets of E every ``deltaT`` steps. The loss gets ``orth_reg_weight · mean ‖PPᵀ − I‖_F``
over A and B. :class:`AdaLoraTraining` is what ``peftc train`` calls (:class:`peftc.methods.TrainingHooks`);
its state is part of a checkpoint, so a resumed run allocates ranks as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from peftc.adapters import AdapterState
from peftc.errors import ConfigError
from peftc.methods import NoTrainingHooks

from .adalora import PARTS as _PARTS
from .adalora import AdaLoraConfig

__all__ = ["ALLOCATOR_FILE", "AdaLoraTraining", "RankAllocator", "orthogonal_regularization", "resize_by_rank_pattern"]

#: File of a training checkpoint holding the RankAllocator's state.
ALLOCATOR_FILE = "adalora_allocator.safetensors"


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


class AdaLoraTraining(NoTrainingHooks):
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
