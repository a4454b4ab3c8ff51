"""KV-cache ("with past") graphs for causal LMs, in the layout optimum's ``ORTModelForCausalLM`` runs.

A with-past program takes, in this order::

    input_ids                   [batch, sequence]
    attention_mask              [batch, past_sequence + sequence]
    position_ids                [batch, sequence]            (models that take them)
    past_key_values.{i}.key     [batch, kv_heads, past_sequence, head_dim]   for each layer i
    past_key_values.{i}.value   [batch, kv_heads, past_sequence, head_dim]

and returns ``logits`` ``[batch, sequence, vocab]`` then ``present.{i}.key|value``
``[batch, kv_heads, past_sequence + sequence, head_dim]``. The first step of a generation feeds an
empty past (``past_sequence = 0``), the next ones feed the presents of the step before: one graph
does both, as optimum's current exports do. :class:`WithPastModule` is the capture transform that
builds it (``capture(model, "causal-lm", transform=with_past())``); adapter passes (LoRA, IA3,
AdaLoRA, merges, lifting adapters to inputs) then run on it as on any program. The names of the
signature (:data:`~peftc.program.PAST_DIM`, :func:`~peftc.program.past_names`,
:func:`~peftc.program.present_names`) live in :mod:`peftc.program`, where exporters and
verification read them.

Prompt methods (prompt tuning, P-tuning, prefix tuning) enter a with-past graph as a **constant
prefix of the cache**: prefix tuning's learned keys/values are that prefix by definition, and a
prompt's virtual tokens come first and attend only to each other, so their keys/values in every
layer depend on nothing else and are computed once at export (the method's
:attr:`~peftc.methods.Method.cache_prefix`). Each step the
graph puts the prefix in front of the past and prepends ``n`` ones to the mask. Positions follow HF
PEFT 0.21: prompt tuning and P-tuning drop ``position_ids`` (the model numbers positions by its own rule
from the cache and the mask with ``n`` leading ones: ``n + past + i`` on GPT-2/LLaMA, padding counted;
unmasked tokens only on OPT, as in one full pass), prefix tuning shifts the given ones by ``n``. The
presents it returns exclude the prefix, so the caller's bookkeeping (mask length = past + new
tokens) is the plain model's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from peftc.program import PAST_DIM, past_names, present_names

__all__ = ["WithPastModule", "cache_geometry", "cache_prefix", "with_past"]

_MASK_DIM = f"{PAST_DIM} + sequence"


def cache_geometry(config) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a decoder's KV cache, from its transformers config."""
    text = getattr(config, "text_config", None) or config
    layers = int(getattr(text, "num_hidden_layers", None) or text.n_layer)
    heads = int(getattr(text, "num_attention_heads", None) or text.n_head)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    hidden = int(getattr(text, "hidden_size", None) or text.n_embd)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    return layers, kv_heads, head_dim


class WithPastModule(nn.Module):
    """Captured around a causal LM: tokens + cache in, logits + updated cache out (module docstring).

    Args:
        model: a transformers causal LM.
        input_names: the task's token inputs (``input_ids``, ``attention_mask`` (+ ``position_ids``)).
        prefix: per layer ``(key, value)`` ``[1, kv_heads, n, head_dim]``: a constant cache prefix
            (prompt methods). Stored as frozen parameters ``prefix.{i}``.
        positions: with a prefix, what becomes of ``position_ids`` (still a graph input, optimum
            feeds it): ``"drop"`` — the model numbers positions from the cache length (HF PEFT's
            prompt tuning / P-tuning) — or ``"shift"`` — they move by ``n`` (HF PEFT's prefix tuning).
    """

    def __init__(
        self,
        model: nn.Module,
        input_names: Sequence[str],
        prefix: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
        positions: str = "drop",
    ):
        super().__init__()
        self.model = model
        self.layers, self.kv_heads, self.head_dim = cache_geometry(model.config)
        self.prefix_len = int(prefix[0][0].shape[2]) if prefix else 0
        if positions not in ("drop", "shift"):
            raise ValueError(f"positions must be 'drop' or 'shift', got {positions!r}")
        self.positions = positions
        if prefix and len(prefix) != self.layers:
            raise ValueError(f"a cache prefix needs one (key, value) per layer: {len(prefix)} != {self.layers}")
        self.prefix = nn.ParameterList(
            nn.Parameter(t.detach().clone(), requires_grad=False) for kv in prefix for t in kv
        )
        tokens = list(input_names)
        self.token_names = tokens
        self.input_names = tokens + past_names(self.layers)
        self.output_names = ["logits", *present_names(self.layers)]
        self.dynamic_dims = {n: {0: "batch", 1: "sequence"} for n in tokens}
        self.dynamic_dims["attention_mask"] = {0: "batch", 1: _MASK_DIM}
        self.dynamic_dims.update({n: {0: "batch", 2: PAST_DIM} for n in past_names(self.layers)})
        #: Positions the prefix takes from the model's position table (capture lowers the max sequence).
        self.extra_positions = self.prefix_len

    def example_inputs(self, batch: int = 2, seq: int = 3, past: int = 5) -> tuple[torch.Tensor, ...]:
        """Capture example: every dynamic size ≥ 2 and distinct, so none is specialised or confused."""
        gen = torch.Generator().manual_seed(0)
        vocab = int(getattr(self.model.config, "vocab_size", 100) or 100)
        dtype = next(self.model.parameters()).dtype
        tensors = {
            "input_ids": torch.randint(1, max(vocab, 2), (batch, seq), generator=gen),
            "attention_mask": torch.ones(batch, past + seq, dtype=torch.long),
            "position_ids": torch.arange(past, past + seq).expand(batch, seq).contiguous(),
        }
        cache = [
            torch.randn(batch, self.kv_heads, past, self.head_dim, generator=gen).to(dtype)
            for _ in range(2 * self.layers)
        ]
        return tuple(tensors[n] for n in self.token_names) + tuple(cache)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        tokens = dict(zip(self.token_names, inputs[: len(self.token_names)], strict=True))
        past = inputs[len(self.token_names) :]
        batch = tokens["input_ids"].shape[0]
        n = self.prefix_len
        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            key, value = past[2 * i], past[2 * i + 1]
            if n:
                key = torch.cat([self.prefix[2 * i].expand(batch, -1, -1, -1).to(key.dtype), key], dim=2)
                value = torch.cat([self.prefix[2 * i + 1].expand(batch, -1, -1, -1).to(value.dtype), value], dim=2)
            cache.update(key, value, i)
        mask = tokens["attention_mask"]
        if n:
            mask = torch.cat([mask.new_ones(batch, n), mask], dim=1)
            if self.positions == "shift" and "position_ids" in tokens:
                tokens["position_ids"] = tokens["position_ids"] + n
            else:
                tokens.pop("position_ids", None)  # the model numbers them from the cache and the mask
        out = self.model(**{**tokens, "attention_mask": mask}, past_key_values=cache, use_cache=True, return_dict=True)
        presents: list[torch.Tensor] = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys[:, :, n:], layer.values[:, :, n:]]
        return (out.logits, *presents)


def with_past(
    prefix: Sequence[tuple[torch.Tensor, torch.Tensor]] = (), positions: str = "drop"
) -> Callable[[nn.Module, list[str]], WithPastModule]:
    """The capture transform for a with-past program (optionally with a constant cache prefix)."""

    def transform(model: nn.Module, names: list[str]) -> WithPastModule:
        return WithPastModule(model, names, prefix, positions)

    return transform


def cache_prefix(model: nn.Module, state) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The constant cache prefix of a prompt-learning adapter ``state`` (an AdapterState) on ``model``.

    Each input-transforming method says how (:attr:`peftc.methods.Method.cache_prefix`): prefix tuning's
    adapter is the cache prefix itself; prompt tuning's and P-tuning's virtual tokens give theirs through
    the model (``peftc.passes.prompt.prompt_prefix``).
    """
    from peftc.methods import get_method

    method = get_method(state)
    if method.cache_prefix is None:
        raise ValueError(f"{method.label} adapters enter through the model's layers, not as a cache prefix")
    return method.cache_prefix(model, state)
