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

__all__ = ["SEQ2SEQ_TASK", "DecoderModule", "EncoderModule", "decoder_cases", "encoder_prefix", "split_state"]

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
