"""``image-to-text`` (BLIP-2) exports: the whole forward for scoring, and three graphs for KV-cache generation.

Generation runs the image through the vision tower once and the language model once per new token, so
besides the whole forward the artifact holds the pieces a generation loop calls (the layout of ONNX Runtime
GenAI's vision-language models: a vision graph, an embedding graph, a decoder over ``inputs_embeds``)::

    model.onnx                 pixel_values, input_ids, attention_mask -> logits     (scoring captions)
    vision_encoder_model.onnx  pixel_values [batch, 3, H, W] -> image_features [batch, queries, hidden]
                               (vision encoder -> Q-Former -> language projection)
    embed_tokens_model.onnx    input_ids [batch, sequence], image_features -> inputs_embeds
                               (token embeddings, the image tokens' replaced by the image features in order)
    decoder_model.onnx         inputs_embeds [batch, sequence, hidden], attention_mask [batch, past + sequence],
                               past_key_values.{i}.key|value -> logits, present.{i}.key|value

The decoder is :class:`peftc.exporting.kv.WithPastModule`'s cache layout (optimum's names) over the language
model with ``inputs_embeds`` instead of ``input_ids``; OPT numbers positions from the mask, as in one full
pass. :func:`peftc.blip2.generate` is the greedy loop over the three graphs.

The adapter is one HF PEFT state; the whole forward binds all of it, the decoder the keys under the language
model, the vision graph the others (Q-Former, vision encoder, projection), the embedding graph none (an adapter
on the token embeddings is refused). Each graph is verified against its unmerged adapted torch program:
the embedding graph is fed the torch vision graph's features, the decoder the torch embedding graph's
embeddings, then decode steps on the cache its torch program returned, so each figure measures one graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from peftc.adapters import AdapterState
from peftc.errors import ConfigError

from .kv import WithPastModule

__all__ = ["DecoderModule", "EmbedTokensModule", "ImageToText", "VisionModule", "split_state"]

TASK = "image-to-text"
_LM = "language_model."


def _dtype(model: nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


class VisionModule(nn.Module):
    """``pixel_values -> image_features``: BLIP-2's ``get_image_features`` (the language model's query inputs)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.input_names = ["pixel_values"]
        self.output_names = ["image_features"]
        self.dynamic_dims = {"pixel_values": {0: "batch"}}

    def example_inputs(self, batch: int = 2) -> tuple[torch.Tensor, ...]:
        from peftc.program import image_shape

        gen = torch.Generator().manual_seed(0)
        return (torch.randn(batch, *image_shape(self.model.config), generator=gen).to(_dtype(self.model)),)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        (pixel_values,) = inputs
        return self.model.get_image_features(pixel_values)


class EmbedTokensModule(nn.Module):
    """``input_ids, image_features -> inputs_embeds``: token embeddings with the image tokens' rows replaced by the
    image features in order (``Blip2ForConditionalGeneration.forward``'s ``masked_scatter``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.input_names = ["input_ids", "image_features"]
        self.output_names = ["inputs_embeds"]
        self.dynamic_dims = {"input_ids": {0: "batch", 1: "sequence"}, "image_features": {0: "batch"}}

    def example_inputs(self, batch: int = 2, text: int = 5) -> tuple[torch.Tensor, ...]:
        from peftc.blip2 import Blip2Module

        cfg = self.model.config
        _, ids, _ = Blip2Module(self.model).example_inputs(batch, text)
        hidden = int(cfg.text_config.hidden_size)
        gen = torch.Generator().manual_seed(1)
        features = torch.randn(batch, int(cfg.num_query_tokens), hidden, generator=gen).to(_dtype(self.model))
        return ids, features

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        input_ids, image_features = inputs
        embeds = self.model.get_input_embeddings()(input_ids)
        mask = self.model.get_placeholder_mask(input_ids, inputs_embeds=embeds)
        return embeds.masked_scatter(mask, image_features.to(embeds.dtype))


class DecoderModule(WithPastModule):
    """The language model over ``inputs_embeds`` with a KV cache (:class:`~peftc.exporting.kv.WithPastModule`'s
    layout); the whole BLIP-2 is the attribute ``model``, so HF PEFT keys map as for the whole forward."""

    def __init__(self, model: nn.Module):
        super().__init__(model, ["inputs_embeds", "attention_mask"])
        self.dynamic_dims["inputs_embeds"] = {0: "batch", 1: "sequence"}

    def example_inputs(self, batch: int = 2, seq: int = 3, past: int = 5) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(0)
        dtype = _dtype(self.model)
        hidden = int(self.model.config.text_config.hidden_size)
        embeds = torch.randn(batch, seq, hidden, generator=gen).to(dtype)
        mask = torch.ones(batch, past + seq, dtype=torch.long)
        cache = [
            torch.randn(batch, self.kv_heads, past, self.head_dim, generator=gen).to(dtype)
            for _ in range(2 * self.layers)
        ]
        return (embeds, mask, *cache)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        embeds, mask, *past = inputs
        cache = DynamicCache(config=self.model.config.text_config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        # positions from the mask as OPT numbers them without position_ids (padding skipped); the last
        # ``sequence`` columns are gathered, not sliced at the cache length, which would guard ``past > 0``
        positions = mask.cumsum(1) * mask - 1
        last = torch.arange(embeds.shape[1], device=mask.device) + (mask.shape[1] - embeds.shape[1])
        out = self.model.language_model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions.index_select(1, last),
            past_key_values=cache,
            use_cache=True,
            return_dict=True,
        )
        presents: list[torch.Tensor] = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


def split_state(state: AdapterState) -> tuple[AdapterState, AdapterState]:
    """(vision part, decoder part) of ``state``: keys outside the language model, and keys under it.

    Raises:
        ConfigError: a prompt-learning adapter (virtual tokens have no place in these graphs), or an adapter on
            the language model's token embeddings (the embedding graph takes none).
    """
    from peftc.methods import get_method

    if get_method(state).transforms_inputs:
        raise ConfigError(
            f"{state.config.peft_type} adapters are not supported for image-to-text exports; use LoRA (or another "
            "method that adapts layers)"
        )
    lm = f"base_model.model.{_LM}"
    if any(".embed_tokens." in k for k in state.tensors if k.startswith(lm)):
        raise ConfigError(
            "image-to-text exports take no adapter on the language model's embed_tokens; drop that target"
        )
    return state.subset(lambda k: not k.startswith(lm)), state.subset(lambda k: k.startswith(lm))


@dataclass
class ImageToText:
    """BLIP-2: the whole forward and the three generation graphs (module docstring), each bound to its part."""

    roles: ClassVar[tuple[str | None, ...]] = ("model", "vision_encoder", "embed_tokens", "decoder")
    task: str = TASK
    with_past: bool = True

    def capture(self, model: nn.Module, state: AdapterState) -> list[Any]:
        from peftc.program import capture

        from .graphs import Graph

        vision, decoder = split_state(state)
        parts = {"model": state, "vision_encoder": vision, "embed_tokens": None, "decoder": decoder}
        wrappers = {
            "model": None,
            "vision_encoder": VisionModule,
            "embed_tokens": EmbedTokensModule,
            "decoder": DecoderModule,
        }
        graphs = []
        for role in self.roles:
            wrapper = wrappers[role]
            transform = None if wrapper is None else (lambda m, _names, w=wrapper: w(m))
            program = capture(model, self.task, mode="eval", transform=transform)
            part = parts[role]
            graphs.append(Graph(role, program, part if part is not None and part.tensors else None))
        return graphs

    def reference(self, graphs: list[Any]) -> None:
        """Cases per graph; each graph after the vision one is fed its torch predecessor's outputs."""
        from peftc.exporters.verify import run_torch

        whole, vision, embed, decoder = graphs
        cfg = whole.program.model_config
        for g, cases in ((whole, _whole_cases(cfg)), (vision, _vision_cases(cfg))):
            g.cases = cases
            g.reference = run_torch(g.program, g.cases, g.program.input_names)
        embed.cases = _embed_cases(whole.cases, vision.reference)
        embed.reference = run_torch(embed.program, embed.cases, embed.program.input_names)
        decoder.cases, decoder.reference = _decoder_cases(decoder.program, embed.cases, embed.reference)

    def base_module(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError("image-to-text exports take no swappable adapters (graph_plan refuses them)")


def _ids(cfg: Any, texts: list[int], pads_left: bool, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows as the processor makes them: image tokens, then text (lengths ``texts``) padded to the longest,
    the padding after the text (right) or between the image tokens and the text (a left-padding tokenizer)."""
    image, q = int(cfg.image_token_id), int(cfg.num_query_tokens)
    vocab = int(cfg.text_config.vocab_size)
    pad = cfg.text_config.pad_token_id
    pad = int(pad) if isinstance(pad, int) else 1
    width = max(texts)
    ids = torch.full((len(texts), q + width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[:, :q], mask[:, :q] = image, 1
    allowed = torch.tensor([i for i in range(3, vocab) if i not in (image, pad)])  # real text tokens
    for row, n in enumerate(texts):
        tokens = allowed[torch.randint(len(allowed), (n,), generator=gen)]
        start = q + (width - n if pads_left else 0)
        ids[row, start : start + n], mask[row, start : start + n] = tokens, 1
    return ids, mask


def _pixels(cfg: Any, batch: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    from peftc.program import image_shape

    return torch.randn(batch, *image_shape(cfg), generator=gen).to(dtype)


def _whole_cases(cfg: Any, seed: int = 1234) -> list[Any]:
    from peftc.exporters.verify import VerifyCase

    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float32
    cases = []
    for name, texts, left, what in (
        ("batch1", [6], False, "one image and caption"),
        ("right-padded", [3, 7, 5], False, "three captions padded after the text"),
        ("left-padded", [2, 8, 5, 4], True, "four captions padded between the image tokens and the text"),
    ):
        ids, mask = _ids(cfg, texts, left, gen)
        inputs = {"pixel_values": _pixels(cfg, len(texts), gen, dtype), "input_ids": ids, "attention_mask": mask}
        cases.append(VerifyCase(name, inputs, what))
    return cases


def _vision_cases(cfg: Any, seed: int = 99) -> list[Any]:
    from peftc.exporters.verify import VerifyCase

    gen = torch.Generator().manual_seed(seed)
    return [
        VerifyCase("batch1", {"pixel_values": _pixels(cfg, 1, gen, torch.float32)}, "a single image"),
        VerifyCase("batch3", {"pixel_values": _pixels(cfg, 3, gen, torch.float32)}, "a batch of three"),
        VerifyCase("batch4", {"pixel_values": _pixels(cfg, 4, gen, torch.float32)}, "a batch of four"),
    ]


def _embed_cases(whole_cases: list[Any], features: list[Any]) -> list[Any]:
    """The whole forward's ids with the torch vision graph's features (batches 1, 3, 4 in both)."""
    from peftc.exporters.verify import VerifyCase

    cases = []
    for case, feats in zip(whole_cases, features, strict=True):
        ids = case.inputs["input_ids"]
        inputs = {
            "input_ids": ids,
            "image_features": torch.as_tensor(feats),
            "attention_mask": case.inputs["attention_mask"],  # not an input: the decoder's cases take it
        }
        cases.append(VerifyCase(case.name, inputs, f"{case.description}, the torch vision graph's features"))
    return cases


def _decoder_cases(program: Any, embed_cases: list[Any], embeds: list[Any]) -> tuple[list[Any], list[Any]]:
    """Prefills from an empty cache on the torch embedding graph's outputs, then a two-token decode step on the
    cache each prefill's torch program returned; the reference is that program's outputs."""
    from peftc.exporters.verify import VerifyCase, run_torch

    names = program.input_names
    past_names = [n for n in names if n.startswith("past_key_values.")]
    geometry = program.example_inputs[names.index(past_names[0])].shape
    gen = torch.Generator().manual_seed(7)
    cases, reference = [], []
    for case, emb in zip(embed_cases, embeds, strict=True):
        emb = torch.as_tensor(emb)
        b = emb.shape[0]
        empty = torch.zeros(b, geometry[1], 0, geometry[3], dtype=emb.dtype)
        mask = case.inputs["attention_mask"]
        inputs = {"inputs_embeds": emb, "attention_mask": mask, **dict.fromkeys(past_names, empty)}
        prefill = VerifyCase(f"{case.name}-prefill", inputs, f"prefill: {case.description}")
        (out,) = run_torch(program, [prefill], names)
        step_embeds = torch.randn(b, 2, emb.shape[2], generator=gen).to(emb.dtype)
        step_mask = torch.cat([inputs["attention_mask"], torch.ones(b, 2, dtype=torch.long)], dim=1)
        step_inputs = {"inputs_embeds": step_embeds, "attention_mask": step_mask}
        step_inputs.update({n: torch.as_tensor(p) for n, p in zip(past_names, out[1:], strict=True)})
        step = VerifyCase(f"{case.name}-step", step_inputs, f"two tokens on the cache of: {case.description}")
        cases += [prefill, step]
        reference += [out, *run_torch(program, [step], names)]
    return cases, reference
