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
session by name). Without a cache every step re-runs the whole decoder prefix (``config.json`` says
``use_cache: false``; optimum is loaded with ``use_cache=False``). With one (``with_past``, the ONNX
default) the decoder is two graphs, the layout optimum loads when it finds no merged decoder::

    decoder_model.onnx            (CacheDecoderModule, the first step) the inputs above
                                  -> logits, present.{i}.decoder.key|value [batch, heads, sequence, head_dim],
                                     present.{i}.encoder.key|value [batch, heads, encoder_sequence, head_dim]
    decoder_with_past_model.onnx  (DecoderWithPastModule, every later step) the inputs above,
                                  past_key_values.{i}.decoder.key|value [batch, heads, past_sequence, head_dim],
                                  past_key_values.{i}.encoder.key|value [batch, heads, encoder_sequence, head_dim]
                                  -> logits, present.{i}.decoder.key|value [.., past_sequence + sequence, ..]

The cross-attention ("encoder") cache is the encoder states projected by each layer's key/value
projections: the first step computes it, later steps read it (their graph calls no cross-attention
key/value projection, so an adapter on those reaches them through the cache). The self-attention
("decoder") cache grows by the new tokens each step; the decoder's positions continue from its length.
optimum's preferred ``decoder_model_merged.onnx`` would hold both decoders behind an ``If`` on
``use_cache_branch``; the two plain graphs need no control flow and load the same way. With
``use_cache=False`` optimum runs ``decoder_model.onnx`` alone and ignores its presents.

The adapter is one HF PEFT state with keys for encoder and decoder modules
(``base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight`` and
``…decoder…``). Each graph binds the subset it holds (:meth:`AdapterState.subset`): keys under
the encoder module's name go to the encoder graph, the rest (decoder, LM head) to the decoder
graph. The split is a partition and each binding checks that every key it was given found its
module, so together they prove the whole adapter is used. Merging folds each graph's sites.

Each graph is verified with ONNX Runtime against its unmerged adapted torch program on held-out
inputs (a batch of one, a new shape, a left-padded batch); the decoder is fed the torch encoder's
hidden states (:func:`decoder_cases`) and the decoder with past the torch first step's caches
(:func:`decode_step_cases`), so each figure measures one graph. This module holds the
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
from peftc.program import PAST_DIM

__all__ = [
    "SEQ2SEQ_TASK",
    "CacheDecoderModule",
    "DecoderModule",
    "DecoderWithPastModule",
    "EncoderModule",
    "PromptedCacheDecoderModule",
    "PromptedDecoderModule",
    "PromptedDecoderWithPastModule",
    "PromptedEncoderModule",
    "PromptedSeq2SeqModule",
    "Seq2SeqModule",
    "decode_step_cases",
    "decoder_cache_geometry",
    "decoder_cases",
    "encoder_prefix",
    "seq2seq_past_names",
    "seq2seq_present_names",
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


# -- the KV-cache decoder graphs ----------------------------------------------------------------------

_STACKS = ("decoder", "encoder")  # optimum's names: self-attention ("decoder") and cross-attention ("encoder") caches


def decoder_cache_geometry(config: Any) -> tuple[int, int, int]:
    """``(layers, heads, head_dim)`` of a seq2seq decoder's caches (T5: ``num_decoder_layers``, ``d_kv``; BART…).

    Raises:
        ConfigError: a config that names neither its decoder layers nor its attention heads.
    """

    def first(*keys: str) -> int:
        for key in keys:
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        raise ConfigError(
            f"cannot tell the decoder cache geometry of a {type(config).__name__} (none of {', '.join(keys)}); "
            "export it with --no-past"
        )

    layers = first("num_decoder_layers", "decoder_layers", "num_layers")
    heads = first("decoder_attention_heads", "num_heads", "num_attention_heads")
    head_dim = getattr(config, "d_kv", None)
    return layers, heads, int(head_dim) if isinstance(head_dim, int) else _hidden_size(config) // heads


def seq2seq_past_names(layers: int) -> list[str]:
    """``past_key_values.{i}.decoder.key|value``, ``past_key_values.{i}.encoder.key|value`` per layer (optimum's)."""
    return [f"past_key_values.{i}.{s}.{kind}" for i in range(layers) for s in _STACKS for kind in ("key", "value")]


def seq2seq_present_names(layers: int, cross: bool = True) -> list[str]:
    """``present.{i}.decoder.key|value`` (and, with ``cross``, ``present.{i}.encoder.key|value``) per layer."""
    stacks = _STACKS if cross else _STACKS[:1]
    return [f"present.{i}.{s}.{kind}" for i in range(layers) for s in stacks for kind in ("key", "value")]


class CacheDecoderModule(DecoderModule):
    """The first decoder step of a cached generation (``decoder_model.onnx`` of a with-past export).

    The inputs of :class:`DecoderModule`; the outputs ``logits`` then, per layer, the self-attention cache
    ``present.{i}.decoder.key|value`` ``[batch, heads, sequence, head_dim]`` and the cross-attention cache
    ``present.{i}.encoder.key|value`` ``[batch, heads, encoder_sequence, head_dim]`` (the encoder states
    projected by each layer: computed here once, passed on to every later step). optimum runs this graph for
    the first token and :class:`DecoderWithPastModule` for the next ones; without ``use_cache`` it ignores the
    presents.
    """

    #: A prompt-learning adapter's rule (:class:`_PromptRule`), set by the prompted variants.
    rule: Any = None

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.layers, self.heads, self.head_dim = decoder_cache_geometry(model.config)
        self.output_names = ["logits", *seq2seq_present_names(self.layers)]

    @staticmethod
    def prompted(model: nn.Module, prompt: nn.Module, config: Any) -> nn.Module:
        """This graph with a prompt-learning adapter's virtual tokens or prefix (what the prompt passes capture)."""
        return PromptedCacheDecoderModule(model, prompt, config)

    def example_inputs(self, batch: int = 2, seq: int = 3, encoder_seq: int = 5) -> tuple[torch.Tensor, ...]:
        ids, mask, states = DecoderModule.example_inputs(self, batch, seq, encoder_seq)
        return ids, mask, self.rule.states(states) if self.rule is not None else states

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        input_ids, encoder_attention_mask, encoder_hidden_states = inputs
        return self._step(input_ids, encoder_attention_mask, encoder_hidden_states, ())

    def _step(
        self, input_ids: torch.Tensor, mask: torch.Tensor, states: torch.Tensor, past: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, ...]:
        """One decoder step over ``past`` (flat, in :func:`seq2seq_past_names` order; empty: the first step).

        The self-attention cache is the prompt rule's prefix (prefix tuning) then the past; the presents
        exclude the prefix, so the caller's bookkeeping is the plain model's. The cross-attention cache,
        when given, marks every layer as updated, so cross-attention reads it instead of the encoder states.
        """
        from transformers import DynamicCache, EncoderDecoderCache

        batch = input_ids.shape[0]
        prefix = self.rule.self_prefix(self.model, batch) if self.rule is not None else []
        if self.rule is not None:
            mask = self.rule.encoder_mask(mask)
        self_cache, cross_cache = DynamicCache(), DynamicCache()
        for i in range(self.layers if (past or prefix) else 0):
            kv = list(past[4 * i : 4 * i + 2]) if past else []
            if prefix:
                kv = [torch.cat([p, t], dim=2) for p, t in zip(prefix[i], kv, strict=True)] if kv else list(prefix[i])
            self_cache.update(kv[0], kv[1], i)
            if past:
                cross_cache.update(past[4 * i + 2], past[4 * i + 3], i)
        cache = EncoderDecoderCache(self_cache, cross_cache)  # is_updated: True for the layers given a cross cache
        out = self.model(
            attention_mask=mask,
            decoder_input_ids=input_ids,
            encoder_outputs=(states,),
            past_key_values=cache,
            use_cache=True,
            return_dict=True,
        )
        n = len(prefix) and int(prefix[0][0].shape[2])
        cache = out.past_key_values
        presents: list[torch.Tensor] = []
        for i in range(self.layers):
            layer = cache.self_attention_cache.layers[i]
            presents += [layer.keys[:, :, n:], layer.values[:, :, n:]]
            if not past:
                cross = cache.cross_attention_cache.layers[i]
                presents += [cross.keys, cross.values]
        return (out.logits, *presents)


class DecoderWithPastModule(CacheDecoderModule):
    """A later decoder step of a cached generation (``decoder_with_past_model.onnx``; module docstring).

    Inputs: those of :class:`DecoderModule`, then per layer ``past_key_values.{i}.decoder.key|value``
    ``[batch, heads, past_sequence, head_dim]`` (the self-attention cache so far) and
    ``past_key_values.{i}.encoder.key|value`` ``[batch, heads, encoder_sequence, head_dim]`` (the first
    step's cross-attention cache). Outputs: ``logits`` and the grown self-attention cache
    ``present.{i}.decoder.key|value`` ``[batch, heads, past_sequence + sequence, head_dim]``. The decoder's
    positions continue from ``past_sequence`` (T5's relative bias, BART's position table).
    ``encoder_hidden_states`` stays an input (optimum feeds it; the encoder's length comes from it).
    """

    def __init__(self, model: nn.Module):
        super().__init__(model)
        names = seq2seq_past_names(self.layers)
        self.input_names = [*self.input_names, *names]
        self.output_names = ["logits", *seq2seq_present_names(self.layers, cross=False)]
        cross_dim = self.dynamic_dims["encoder_hidden_states"][1]
        for name in names:
            self.dynamic_dims[name] = {0: "batch", 2: cross_dim if ".encoder." in name else PAST_DIM}

    @staticmethod
    def prompted(model: nn.Module, prompt: nn.Module, config: Any) -> nn.Module:
        """This graph with a prompt-learning adapter's virtual tokens or prefix (what the prompt passes capture)."""
        return PromptedDecoderWithPastModule(model, prompt, config)

    def example_inputs(
        self, batch: int = 2, seq: int = 3, encoder_seq: int = 5, past: int = 4
    ) -> tuple[torch.Tensor, ...]:
        """Capture example: every dynamic size ≥ 2 and distinct, so none is specialised or confused."""
        ids, mask, states = CacheDecoderModule.example_inputs(self, batch, seq, encoder_seq)
        gen = torch.Generator().manual_seed(1)
        caches = []
        for _ in range(self.layers):
            for length in (past, past, states.shape[1], states.shape[1]):
                caches.append(torch.randn(batch, self.heads, length, self.head_dim, generator=gen).to(states.dtype))
        return (ids, mask, states, *caches)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        input_ids, encoder_attention_mask, encoder_hidden_states, *past = inputs
        return self._step(input_ids, encoder_attention_mask, encoder_hidden_states, past)


class _PromptRule:
    """How a prompt-learning adapter enters the cached decoder steps (as :class:`PromptedDecoderModule` does).

    Prompt tuning and P-tuning: the encoder states (and so the cross-attention cache) hold the ``n`` virtual
    tokens in front, and the encoder mask gets ``n`` leading ones. Prefix tuning: every step's self-attention
    cache starts with the prefix (HF PEFT's ``get_prompt`` layout; its cross-attention part is dropped, as
    HF PEFT empties that cache), so the decoder's positions start after the ``n``.
    """

    def __init__(self, owner: nn.Module, prompt: nn.Module, config: Any):
        self.config = config
        self.num_tokens = int(config.num_virtual_tokens)
        self.prefix = bool(config.holds_key_values)
        owner.extra_positions = self.num_tokens
        if self.prefix:
            owner.prompt = prompt  # a submodule: its parameters are the graph's ``prompt.*`` tensors
        else:
            plus = f"{_ENCODER_SEQ} + {self.num_tokens}"
            for name, dims in owner.dynamic_dims.items():
                if name == "encoder_hidden_states" or ".encoder." in name:
                    dims[1 if name == "encoder_hidden_states" else 2] = plus
        object.__setattr__(self, "owner", owner)

    def encoder_mask(self, mask: torch.Tensor) -> torch.Tensor:
        if self.prefix:
            return mask
        return torch.cat((mask.new_ones(mask.shape[0], self.num_tokens), mask), dim=1)

    def self_prefix(self, model: nn.Module, batch: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the prefix's self-attention (key, value) ``[batch, heads, n, head_dim]`` (none without one)."""
        if not self.prefix:
            return []
        cfg, n = self.config, self.num_tokens
        heads = int(cfg.num_attention_heads)
        prefix = self.owner.prompt.encode().to(model.dtype)  # [1, n, layers·2·token_dim]
        prefix = prefix.view(1, n, int(cfg.num_layers) * 2, heads, int(cfg.token_dim) // heads)
        groups = torch.cat([prefix, prefix], dim=2).permute([2, 0, 3, 1, 4]).split(4)
        return [(g[0].expand(batch, -1, -1, -1), g[1].expand(batch, -1, -1, -1)) for g in groups]

    def states(self, states: torch.Tensor) -> torch.Tensor:
        """Capture example encoder states with the virtual tokens' rows in front (prompt tuning, P-tuning)."""
        if self.prefix:
            return states
        return torch.cat((states[:, :1].expand(-1, self.num_tokens, -1), states), dim=1)


class PromptedCacheDecoderModule(CacheDecoderModule):
    """:class:`CacheDecoderModule` with a prompt-learning adapter (:class:`_PromptRule`)."""

    base_wrapper = CacheDecoderModule

    def __init__(self, model: nn.Module, prompt: nn.Module, config: Any):
        super().__init__(model)
        self.rule = _PromptRule(self, prompt, config)


class PromptedDecoderWithPastModule(DecoderWithPastModule):
    """:class:`DecoderWithPastModule` with a prompt-learning adapter (:class:`_PromptRule`)."""

    base_wrapper = DecoderWithPastModule

    def __init__(self, model: nn.Module, prompt: nn.Module, config: Any):
        super().__init__(model)
        self.rule = _PromptRule(self, prompt, config)


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


def decode_step_cases(
    step: Any, first_cases: Sequence[Any], first_outputs: Sequence[Any], seed: int = 8765
) -> list[Any]:
    """Decoder-with-past inputs continuing each first-step case: new tokens over the first step's caches.

    ``first_outputs`` are the torch first-step decoder's outputs (``logits``, then per layer the self- and
    cross-attention caches, in :func:`seq2seq_past_names` order), so both runtimes see the same caches. One
    new token per case (what generation feeds), three on the second case (a chunk: positions past + 0..2).
    """
    from peftc.exporters.verify import VerifyCase

    vocab = int(getattr(step.model_config, "vocab_size", 128) or 128)
    gen = torch.Generator().manual_seed(seed)
    past = [n for n in step.input_names if n.startswith("past_key_values.")]
    cases = []
    for k, (case, outputs) in enumerate(zip(first_cases, first_outputs, strict=True)):
        new = 3 if k == 1 else 1
        ids = case.inputs["input_ids"]
        inputs = dict(case.inputs)
        inputs["input_ids"] = torch.randint(3, vocab, (ids.shape[0], new), generator=gen)
        inputs.update(zip(past, (torch.as_tensor(t) for t in outputs[1:]), strict=True))
        description = f"{new} new token(s) over the caches of {ids.shape[1]} decoder tokens ({case.description})"
        cases.append(VerifyCase(f"{case.name}-step", inputs, description))
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
