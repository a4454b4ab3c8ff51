"""Shared fixtures: tiny models built from configs (no hub), seeded, one per family."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_gpt2(num_labels: int | None = None):
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64, pad_token_id=0)
    if num_labels:
        cfg.num_labels = num_labels
        return GPT2ForSequenceClassification(cfg).eval()
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(num_labels: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        vocab_size=128,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    if num_labels:
        cfg.num_labels = num_labels
        return LlamaForSequenceClassification(cfg).eval()
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        vocab_size=128,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg).eval()


FAMILIES = {
    ("gpt2", "causal-lm"): lambda: tiny_gpt2(),
    ("llama", "causal-lm"): lambda: tiny_llama(),
    ("bert", "seq-cls"): lambda: tiny_bert(),
    ("gpt2", "seq-cls"): lambda: tiny_gpt2(num_labels=3),
    ("llama", "seq-cls"): lambda: tiny_llama(num_labels=3),
}


def batch_for(program, batch: int = 3, seq: int = 9, left_pad: bool = True, seed: int = 1) -> tuple:
    """Inputs in the program's order; row 0 left-padded by 3 tokens when ``left_pad``."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if left_pad:
        mask[0, :3] = 0
        ids[0, :3] = 0
    out = []
    for name in program.input_names:
        out.append(
            {
                "input_ids": ids,
                "attention_mask": mask,
                "token_type_ids": torch.zeros_like(ids),
                "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
            }[name]
        )
    return tuple(out)


def real_positions(program, inputs: tuple) -> torch.Tensor:
    """Mask selecting logits rows to compare: real tokens for causal-lm, every row for seq-cls."""
    mask = inputs[program.input_names.index("attention_mask")].bool()
    return mask if program.task.name == "causal-lm" else torch.ones(mask.shape[0], dtype=torch.bool)


@pytest.fixture(params=sorted(FAMILIES), ids=lambda p: f"{p[0]}-{p[1]}")
def family(request):
    """(family, task, model) for every supported family/task pair."""
    fam, task = request.param
    return fam, task, FAMILIES[request.param]()


_CAPTURES: dict = {}


def captured(fam: str, task: str, mode: str = "eval"):
    """A private copy of a cached capture of ``FAMILIES[(fam, task)]`` in ``mode``: (program, model).

    Passes mutate programs in place, so each call returns a new Program whose graph is a deep copy
    of the cached one (about 20 ms instead of seconds for a capture). The base model's parameters and
    buffers are shared with the cache and with the returned eager ``model``: a test must never change
    them in place (peftc never does: merge and modules_to_save bind new tensors).
    """
    import copy

    from peftc.program import capture

    key = (fam, task, mode)
    if key not in _CAPTURES:
        model = FAMILIES[(fam, task)]()
        _CAPTURES[key] = (capture(model, task, mode=mode), model)
    program, model = _CAPTURES[key]
    gm = program.graph_module
    memo = {id(t): t for t in [*gm.parameters(), *gm.buffers()]}
    memo[id(program.model_config)] = program.model_config
    return copy.deepcopy(program, memo), model
