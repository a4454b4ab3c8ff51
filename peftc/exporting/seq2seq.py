"""Encoder-decoder LMs (T5, BART…): two verified graphs in the layout optimum's ``ORTModelForSeq2SeqLM`` loads.

An encoder-decoder model is not one function of the token inputs: generation runs the encoder
once and the decoder once per new token. The export therefore holds two graphs, each captured
with :func:`peftc.program.capture` through its own wrapper (``transform=``)::

    encoder_model.onnx   input_ids [batch, sequence], attention_mask [batch, sequence]
                         -> last_hidden_state [batch, sequence, hidden]
    decoder_model.onnx   input_ids [batch, sequence] (decoder tokens),
                         encoder_attention_mask [batch, encoder_sequence],
                         encoder_hidden_states [batch, encoder_sequence, hidden]
                         -> logits [batch, sequence, vocab]

These are optimum's input and output names (``ORTEncoder`` / ``ORTDecoderForSeq2Seq`` feed the
session by name). The decoder takes no KV cache: every step re-runs the whole decoder prefix, so
``config.json`` says ``use_cache: false`` and optimum is loaded with ``use_cache=False``.

The adapter is one HF PEFT state with keys for encoder and decoder modules
(``base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight`` and
``…decoder…``). Each graph binds the subset it holds (:meth:`AdapterState.subset`): keys under
the encoder module's name go to the encoder graph, the rest (decoder, LM head) to the decoder
graph. The split is a partition and each binding checks that every key it was given found its
module, so together they prove the whole adapter is used. Merging folds each graph's sites.

Each graph is verified with ONNX Runtime against its unmerged adapted torch program on held-out
inputs (a batch of one, a new shape, a left-padded batch); the decoder is fed the torch encoder's
hidden states (:func:`decoder_cases`), so each figure measures one graph. This module holds the
wrappers; the graph plan that captures, binds and references both graphs is
:class:`peftc.exporting.graphs.EncoderDecoder`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from peftc.adapters import AdapterState
from peftc.errors import ConfigError

__all__ = [
    "SEQ2SEQ_TASK",
    "DecoderModule",
    "EncoderModule",
    "PromptedDecoderModule",
    "PromptedEncoderModule",
    "PromptedSeq2SeqModule",
    "Seq2SeqModule",
    "decoder_cases",
    "encoder_prefix",
    "split_state",
]

SEQ2SEQ_TASK = "seq2seq"
_ENCODER_SEQ = "encoder_sequence"


class EncoderModule(nn.Module):
    """Captured around a seq2seq LM: ``input_ids, attention_mask -> last_hidden_state`` of its encoder.

    The whole model is the attribute ``model`` (parameter names stay ``model.<HF name>``, so HF PEFT
    keys map as for every other program); only the encoder runs.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.input_names = ["input_ids", "attention_mask"]
        self.output_names = ["last_hidden_state"]

    @staticmethod
    def prompted(model: nn.Module, prompt: nn.Module, config: Any) -> nn.Module:
        """This graph with a prompt-learning adapter's virtual tokens (what the prompt passes capture)."""
        return PromptedEncoderModule(model, prompt, config)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        input_ids, attention_mask = inputs
        encoder = self.model.get_encoder()
        return encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state


class DecoderModule(nn.Module):
    """Captured around a seq2seq LM: decoder tokens + encoder states -> ``logits`` (no KV cache).

    The decoder's own positions are causal (no decoder mask, as optimum runs it); the encoder's
    padding enters through ``encoder_attention_mask``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.input_names = ["input_ids", "encoder_attention_mask", "encoder_hidden_states"]
        self.output_names = ["logits"]
        self.dynamic_dims = {
            "input_ids": {0: "batch", 1: "sequence"},
            "encoder_attention_mask": {0: "batch", 1: _ENCODER_SEQ},
            "encoder_hidden_states": {0: "batch", 1: _ENCODER_SEQ},
        }

    @staticmethod
    def prompted(model: nn.Module, prompt: nn.Module, config: Any) -> nn.Module:
        """This graph with a prompt-learning adapter's virtual tokens or prefix (what the prompt passes capture)."""
        return PromptedDecoderModule(model, prompt, config)

    def example_inputs(self, batch: int = 2, seq: int = 3, encoder_seq: int = 5) -> tuple[torch.Tensor, ...]:
        """Capture example: every dynamic size ≥ 2 and distinct, so none is specialised or confused."""
        gen = torch.Generator().manual_seed(0)
        cfg = self.model.config
        vocab = int(getattr(cfg, "vocab_size", 100) or 100)
        dtype = next(self.model.parameters()).dtype
        return (
            torch.randint(1, max(vocab, 2), (batch, seq), generator=gen),
            torch.ones(batch, encoder_seq, dtype=torch.long),
            torch.randn(batch, encoder_seq, _hidden_size(cfg), generator=gen).to(dtype),
        )

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        input_ids, encoder_attention_mask, encoder_hidden_states = inputs
        out = self.model(
            attention_mask=encoder_attention_mask,
            decoder_input_ids=input_ids,
            encoder_outputs=(encoder_hidden_states,),
            use_cache=False,
            return_dict=True,
        )
        return out.logits


class PromptedEncoderModule(EncoderModule):
    """The encoder graph of a prompt-learning adapter (HF PEFT 0.21's ``PeftModelForSeq2SeqLM.forward``).

    Prompt tuning and P-tuning: the first ``n`` of the ``2n`` prompt rows are prepended to the token
    embeddings and the mask gets ``n`` leading ones, so ``last_hidden_state`` is ``[batch, n + sequence,
    hidden]``. Prefix tuning leaves the encoder as it is (HF PEFT feeds its prefix to the decoder only).
    """

    base_wrapper = EncoderModule

    def __init__(self, model: nn.Module, prompt: nn.Module, config: Any):
        super().__init__(model)
        self.num_tokens = 0 if config.holds_key_values else int(config.num_virtual_tokens)
        if self.num_tokens:
            self.prompt = prompt
            self.extra_positions = self.num_tokens  # the virtual tokens take the first positions (BART's table)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if not self.num_tokens:
            return super().forward(*inputs)
        input_ids, attention_mask = inputs
        batch, n = input_ids.shape[0], self.num_tokens
        embeds = self.model.get_input_embeddings()(input_ids)
        embeds = torch.cat((self.prompt(batch)[:, :n].to(embeds.dtype), embeds), dim=1)
        mask = torch.cat((attention_mask.new_ones(batch, n), attention_mask), dim=1)
        encoder = self.model.get_encoder()
        return encoder(inputs_embeds=embeds, attention_mask=mask, return_dict=True).last_hidden_state


class PromptedDecoderModule(DecoderModule):
    """The decoder graph of a prompt-learning adapter (HF PEFT 0.21's ``PeftModelForSeq2SeqLM.forward``).

    Prompt tuning and P-tuning: the encoder states hold ``n`` virtual tokens in front, so the encoder mask
    (optimum feeds the encoder's own ``attention_mask``) gets ``n`` leading ones here. Prefix tuning: the
    prefix ``[n, layers·2·token_dim]`` is laid out as HF PEFT's ``get_prompt`` does for two submodules —
    viewed ``[n, 2·layers, heads, head_dim]``, concatenated with itself on the layer axis, permuted and split in
    groups of four, so layer ``i``'s self-attention cache holds the group's first two rows as its keys and
    values — and passed as an ``EncoderDecoderCache`` whose cross-attention cache is empty (HF PEFT replaces
    it, so cross-attention reads the encoder states as usual); the decoder's positions start after the ``n``.
    """

    base_wrapper = DecoderModule

    def __init__(self, model: nn.Module, prompt: nn.Module, config: Any):
        super().__init__(model)
        self.prompt = prompt
        self.config_ = config
        self.num_tokens = int(config.num_virtual_tokens)
        self.prefix = bool(config.holds_key_values)
        self.extra_positions = self.num_tokens
        if not self.prefix:
            del self.prompt  # the decoder only sees the virtual tokens through the encoder states
            self.dynamic_dims["encoder_hidden_states"] = {0: "batch", 1: f"{_ENCODER_SEQ} + {self.num_tokens}"}

    def example_inputs(self, batch: int = 2, seq: int = 3, encoder_seq: int = 5) -> tuple[torch.Tensor, ...]:
        ids, mask, states = super().example_inputs(batch, seq, encoder_seq)
        if not self.prefix:
            states = torch.cat((states[:, :1].expand(-1, self.num_tokens, -1), states), dim=1)
        return ids, mask, states

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        input_ids, encoder_attention_mask, encoder_hidden_states = inputs
        batch, n = input_ids.shape[0], self.num_tokens
        extra: dict[str, Any] = {"use_cache": False}
        if self.prefix:
            extra = {"past_key_values": self._cache(batch), "use_cache": True}
        else:
            ones = encoder_attention_mask.new_ones(batch, n)
            encoder_attention_mask = torch.cat((ones, encoder_attention_mask), dim=1)
        out = self.model(
            attention_mask=encoder_attention_mask,
            decoder_input_ids=input_ids,
            encoder_outputs=(encoder_hidden_states,),
            return_dict=True,
            **extra,
        )
        return out.logits

    def _cache(self, batch: Any) -> Any:
        from transformers import DynamicCache, EncoderDecoderCache

        cfg, n = self.config_, self.num_tokens
        heads = int(cfg.num_attention_heads)
        prefix = self.prompt.encode().to(self.model.dtype)  # [1, n, layers·2·token_dim]
        prefix = prefix.view(1, n, int(cfg.num_layers) * 2, heads, int(cfg.token_dim) // heads)
        groups = torch.cat([prefix, prefix], dim=2).permute([2, 0, 3, 1, 4]).split(4)
        cache = EncoderDecoderCache([tuple(t.expand(batch, -1, -1, -1) for t in group) for group in groups])
        cache.cross_attention_cache = DynamicCache()
        for key in cache.is_updated:
            cache.is_updated[key] = False
        return cache


def _hidden_size(cfg: Any) -> int:
    for key in ("d_model", "hidden_size", "n_embd"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ConfigError(f"cannot tell the hidden size of a {type(cfg).__name__}; seq2seq export needs d_model")


def encoder_prefix(model: nn.Module) -> str:
    """The HF module name of ``model``'s encoder (``encoder`` for T5, ``model.encoder`` for BART)."""
    get = getattr(model, "get_encoder", None)
    encoder = get() if callable(get) else None
    for name, module in model.named_modules():
        if module is encoder and name:
            return name
    raise ConfigError(
        f"{type(model).__name__} has no encoder submodule (get_encoder()); task seq2seq is for encoder-decoder "
        "models such as T5 and BART"
    )


def split_state(state: AdapterState, model: nn.Module) -> tuple[AdapterState, AdapterState]:
    """(encoder part, decoder part) of ``state``: keys under the encoder module, and every other key."""
    from peftc.methods import get_method

    if get_method(state).transforms_inputs:  # virtual tokens / a prefix: each graph takes what it needs of it
        return state, state
    prefix = f"base_model.model.{encoder_prefix(model)}."
    return state.subset(lambda k: k.startswith(prefix)), state.subset(lambda k: not k.startswith(prefix))


def decoder_cases(
    decoder: Any, encoder_cases: Sequence[Any], encoder_states: Sequence[Any], seed: int = 4321
) -> list[Any]:
    """Decoder inputs paired with each encoder case: the encoder's states and mask, new decoder tokens.

    Decoder lengths (1, 4, 6) start with ``decoder_start_token_id``; the encoder's
    ``attention_mask`` rides along as an extra key (reports use it to mark padded cases).
    """
    from peftc.exporters.verify import VerifyCase

    cfg = decoder.model_config
    vocab = int(getattr(cfg, "vocab_size", 128) or 128)
    start = getattr(cfg, "decoder_start_token_id", None)
    start = int(start) if isinstance(start, int) else 0
    gen = torch.Generator().manual_seed(seed)
    cases = []
    for case, states, length in zip(encoder_cases, encoder_states, (1, 4, 6), strict=False):
        mask = case.inputs["attention_mask"]
        ids = torch.randint(3, vocab, (mask.shape[0], length), generator=gen)
        ids[:, 0] = start
        inputs = {
            "input_ids": ids,
            "encoder_attention_mask": mask,
            "encoder_hidden_states": torch.as_tensor(states),
            "attention_mask": mask,
        }
        cases.append(VerifyCase(case.name, inputs, f"{length} decoder tokens over: {case.description}"))
    return cases


class Seq2SeqModule(nn.Module):
    """Captured around a seq2seq LM for training: the whole forward, ``input_ids, attention_mask,
    decoder_input_ids -> logits`` (what ``model(...)`` computes: the encoder, then the decoder over its states).

    It runs :class:`EncoderModule`'s and :class:`DecoderModule`'s forwards one after the other, so the
    training graph computes exactly what the two exported graphs compute together. No decoder mask: the
    decoder is causal and labels are right-padded with ``-100``, so padding positions change no counted logit
    (as transformers' ``DataCollatorForSeq2Seq`` batches). Encoder and decoder lengths are separate dims.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.input_names = ["input_ids", "attention_mask", "decoder_input_ids"]
        self.output_names = ["logits"]
        self.dynamic_dims = {
            "input_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "sequence"},
            "decoder_input_ids": {0: "batch", 1: "decoder_sequence"},
        }

    @staticmethod
    def prompted(model: nn.Module, prompt: nn.Module, config: Any) -> nn.Module:
        """This graph with a prompt-learning adapter's virtual tokens or prefix (what the prompt passes capture)."""
        return PromptedSeq2SeqModule(model, prompt, config)

    def example_inputs(self, batch: int = 2, seq: int = 5, decoder_seq: int = 3) -> tuple[torch.Tensor, ...]:
        """Capture example: every dynamic size ≥ 2 and distinct, so none is specialised or confused."""
        gen = torch.Generator().manual_seed(0)
        vocab = int(getattr(self.model.config, "vocab_size", 100) or 100)
        return (
            torch.randint(1, max(vocab, 2), (batch, seq), generator=gen),
            torch.ones(batch, seq, dtype=torch.long),
            torch.randint(1, max(vocab, 2), (batch, decoder_seq), generator=gen),
        )

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        input_ids, attention_mask, decoder_input_ids = inputs
        states = EncoderModule.forward(self, input_ids, attention_mask)
        return DecoderModule.forward(self, decoder_input_ids, attention_mask, states)


class PromptedSeq2SeqModule(Seq2SeqModule):
    """The training graph of a prompt-learning adapter: :class:`PromptedEncoderModule` then
    :class:`PromptedDecoderModule` (HF PEFT 0.21's ``PeftModelForSeq2SeqLM.forward`` without a decoder mask).

    The two halves are held outside the module tree, so the graph's parameters keep the names
    ``model.<HF name>`` and ``prompt.<param>`` that the export's graphs use.
    """

    base_wrapper = Seq2SeqModule

    def __init__(self, model: nn.Module, prompt: nn.Module, config: Any):
        super().__init__(model)
        self.prompt = prompt
        halves = (PromptedEncoderModule(model, prompt, config), PromptedDecoderModule(model, prompt, config))
        object.__setattr__(self, "_halves", halves)  # not submodules: no second name for the same parameters
        self.extra_positions = max(getattr(h, "extra_positions", 0) for h in halves)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        input_ids, attention_mask, decoder_input_ids = inputs
        encoder, decoder = self._halves
        return decoder(decoder_input_ids, attention_mask, encoder(input_ids, attention_mask))
