"""Shared LoKr test cases: the layouts to cover, perturbation and padded batches.

HF PEFT 0.21 refuses LoKr on transformers' ``Conv1D`` (GPT-2), so the GPT-2 reference is HF PEFT on the same
model with every ``Conv1D`` replaced by the equivalent ``nn.Linear`` (``conftest.hf_base``): what peftc's LoKr
on ``Conv1D`` is defined to equal.
"""

from __future__ import annotations

import torch

#: HF PEFT config fields per (family, layout). ``full``: w1 and w2 full; ``w2_decomposed``: w2 = w2_a·w2_b
#: (w1 full); ``decompose_both``: both factors decomposed. The comments give the layouts HF picks.
LAYOUTS = {
    # c_attn [192, 64] = (12, 16) x (8, 8); c_fc [256, 64] = (16, 16) x (8, 8); mlp.c_proj [64, 256] = (8, 8) x (16, 16)
    ("gpt2", "full"): dict(r=8, alpha=12, target_modules=["c_attn", "c_fc", "mlp.c_proj"]),
    ("gpt2", "w2_decomposed"): dict(
        r=4,
        alpha=8,
        target_modules=["c_attn", "c_fc"],
        rank_pattern={"c_fc": 2},
        alpha_pattern={"c_fc": 3.0},
    ),
    ("gpt2", "decompose_both"): dict(r=2, alpha=4, decompose_both=True, target_modules=["c_attn", "mlp.c_proj"]),
    # decompose_factor=16: q_proj [64, 64] = (16, 4) x (16, 4), v_proj [32, 64] = (16, 2) x (16, 4), unsorted pairs
    ("llama", "full"): dict(r=8, alpha=16, decompose_factor=16, target_modules=["q_proj", "v_proj", "down_proj"]),
    # q_proj (8, 8) x (8, 8), v_proj (4, 8) x (8, 8), up_proj [128, 64] = (8, 16) x (8, 8)
    ("llama", "w2_decomposed"): dict(
        r=2, alpha=6, target_modules=["q_proj", "v_proj", "up_proj"], alpha_pattern={"up_proj": 1.5}
    ),
    ("llama", "decompose_both"): dict(r=2, alpha=4, decompose_both=True, target_modules=["q_proj", "v_proj"]),
    # OPT causal LM (positions from the attention mask): fc1 [128, 64] = (8, 16) x (8, 8)
    ("opt", "w2_decomposed"): dict(
        r=2, alpha=6, target_modules=["q_proj", "v_proj", "fc1"], alpha_pattern={"fc1": 1.5}
    ),
    # BERT seq-cls (the classifier in modules_to_save): query, value [64, 64]
    ("bert", "decompose_both"): dict(r=2, alpha=4, decompose_both=True, target_modules=["query", "value"]),
}
LAYOUT_IDS = sorted({kind for _, kind in LAYOUTS})
#: The task of each family's layouts (causal-lm unless listed).
TASKS = {"bert": "seq-cls"}


def perturb(tensors, seed: int, std: float = 0.1) -> None:
    """Add N(0, std²) noise to every tensor (LoKr's fresh w1 is zero: the adapter would be the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tensors:
            t.add_(std * torch.randn(t.shape, generator=gen))


def padded_batch(program, side: str, batch: int = 3, seq: int = 9, seed: int = 1) -> tuple:
    """Inputs in the program's order; rows 0 and 2 padded by 3 and 1 tokens on ``side`` (``left``/``right``)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row, pad in ((0, 3), (2, 1)):
        cols = slice(0, pad) if side == "left" else slice(seq - pad, seq)
        mask[row, cols] = 0
        ids[row, cols] = 0
    tensors = {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": torch.zeros_like(ids),
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
    }
    return tuple(tensors[name] for name in program.input_names)
