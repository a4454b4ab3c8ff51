"""The LLM-runner layout: a causal LM with its KV cache held in the program, as ExecuTorch's runners drive it.

ExecuTorch's LLM runners (``llama_main`` / ``TextLLMRunner`` in C++, ``executorch.extension.llm.runner``
in Python) call one method::

    forward(tokens int64[1, seq], input_pos int64[seq]) -> logits float[1, seq, vocab]

once for the prompt (``input_pos = 0..n-1``) and then once per new token (``input_pos = [n]``, ``[n+1]``…).
The keys and values live in the program as mutable buffers of a **static cache**
(``[1, kv_heads, max_seq_len, head_dim]`` per layer): each call writes its positions with
``index_copy_`` and attends to positions ``≤ input_pos`` only, so whatever a buffer held before
(an earlier generation) is never read. A new generation starts again at position 0.

The cache is transformers' own: :class:`LLMRunnerModule` is
:class:`transformers.integrations.executorch.TorchExportableModuleWithStaticCache` (the recipe
optimum-executorch exports with) given peftc's capture interface. peftc captures it like any other
program, so the adapter passes (LoRA, IA3, merges…) find their sites by module name as usual. One
change to the recipe: each call first points the cache's layers at the module's own buffers, so that
``torch.export`` traces the writes as buffer mutations (otherwise it also lifts the cache's tensors as
constants aliasing the buffers, and decomposition refuses the duplicated, mutated inputs).

The runner reads the model's constants from methods of the program, named as ExecuTorch's
``export_llama`` names them (:func:`peftc.exporters.executorch.runner_metadata`): ``get_max_seq_len``,
``get_max_context_len``, ``get_vocab_size``, ``get_n_layers``, ``get_bos_id``, ``get_eos_ids``,
``use_kv_cache``, ``use_sdpa_with_kv_cache``, ``enable_dynamic_shape``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from peftc.program import LLM_RUNNER_INPUTS

__all__ = [
    "LLMRunnerModule",
    "default_max_seq_len",
    "llm_runner",
]
#: Default cache length when the model's position table is longer (the cache is planned memory on the device).
MAX_SEQ_LEN = 2048


def default_max_seq_len(config: Any) -> int:
    """The cache length of an export: the model's position table, at most :data:`MAX_SEQ_LEN`."""
    from peftc.program import _max_positions

    return min(_max_positions(config) or MAX_SEQ_LEN, MAX_SEQ_LEN)


def _static_cache_base() -> type[nn.Module]:
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    return TorchExportableModuleWithStaticCache


class LLMRunnerModule(_static_cache_base()):
    """Captured around a causal LM: ``forward(tokens, input_pos) -> logits`` over a static cache in buffers.

    Args:
        model: a transformers causal LM.
        max_seq_len: cache length: the longest prompt + generation one run of the program holds.
    """

    def __init__(self, model: nn.Module, max_seq_len: int):
        config = model.generation_config
        was = config.cache_implementation
        config.cache_implementation = "static"  # the recipe checks it; the model is left as found
        try:
            super().__init__(model, batch_size=1, max_cache_len=max_seq_len)
        finally:
            config.cache_implementation = was
        self.max_seq_len = max_seq_len
        self.input_names = list(LLM_RUNNER_INPUTS)
        self.output_names = ["logits"]
        self.dynamic_dims = {"tokens": {1: "sequence"}, "input_pos": {0: "sequence"}}

    def example_inputs(self, seq: int = 3) -> tuple[torch.Tensor, ...]:
        """A prefill of ``seq`` tokens at positions ``0..seq-1`` (seq ≥ 2, or the dim specialises)."""
        gen = torch.Generator().manual_seed(0)
        vocab = int(getattr(self.model.config, "vocab_size", 100) or 100)
        return torch.randint(1, max(vocab, 2), (1, seq), generator=gen), torch.arange(seq)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        tokens, input_pos = inputs
        for i, layer in enumerate(self.static_cache.layers):  # trace the writes as buffer mutations
            layer.keys, layer.values = getattr(self, f"key_cache_{i}"), getattr(self, f"value_cache_{i}")
        return super().forward(input_ids=tokens, cache_position=input_pos)

    def reset(self) -> None:
        """Zero the cache (a fresh program's state; not needed between generations, see the module docstring)."""
        for name, buffer in self.named_buffers():
            if "_cache_" in name:
                buffer.zero_()


def llm_runner(max_seq_len: int) -> Callable[[nn.Module, list[str]], LLMRunnerModule]:
    """The capture transform of the LLM-runner layout (``capture(model, "causal-lm", transform=llm_runner(n))``)."""

    def transform(model: nn.Module, _names: list[str]) -> LLMRunnerModule:
        return LLMRunnerModule(model, max_seq_len)

    return transform
