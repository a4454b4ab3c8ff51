"""``image-to-text``: BLIP-2 (``Blip2ForConditionalGeneration``) captions — capture, data, processor, generation.

BLIP-2 in transformers 4.57 reads an image and a text as one token sequence: the processor puts
``num_query_tokens`` image tokens (``config.image_token_id``) in front of the tokenised text, and the model
replaces their embeddings by the Q-Former's query outputs (vision encoder -> Q-Former -> language
projection) before running the language model (OPT) over the whole sequence. The captured program is that
forward::

    pixel_values [batch, 3, H, W], input_ids [batch, sequence], attention_mask [batch, sequence]
        -> logits [batch, sequence, vocab]

(:class:`Blip2Module`: a :class:`~peftc.tasks.TaskModule` whose example ids carry the image tokens).
Training data are JSON lines ``{"image": "images/1.png", "text": "a red square"}`` (paths relative to the
file); a batch is what ``Blip2Processor(images=..., text=...)`` makes of them, the caption followed by the
tokenizer's end token, and the labels are the input ids with ``-100`` on the image tokens and on padding, so the
loss is the next-token cross-entropy on the caption that ``Blip2ForConditionalGeneration`` computes with
``labels``; the metric is perplexity.

The export holds the whole forward (``model.onnx``, for scoring captions) and three graphs for generation
with a KV cache (:mod:`peftc.exporting.multimodal`); :func:`generate` is the greedy loop over them with
ONNX Runtime.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from peftc.errors import DataError, ModelLoadError
from peftc.files import json_lines
from peftc.tasks import TaskModule

__all__ = [
    "IMAGE_TO_TEXT",
    "Blip2Module",
    "CaptionData",
    "CaptionEncoded",
    "caption_data",
    "check_model",
    "generate",
    "load_processor",
    "read_captions",
]

IMAGE_TO_TEXT = "image-to-text"
logger = logging.getLogger(__name__)

_EXAMPLE = '{"image": "images/1.png", "text": "a red square"}'
_INPUTS = ["pixel_values", "input_ids", "attention_mask"]


def check_model(model: nn.Module) -> None:
    """Refuse a BLIP-2 that the task cannot run: no image token id, or an encoder-decoder (T5) language model.

    Raises:
        ModelLoadError: saying what the config lacks.
    """
    cfg = model.config
    if getattr(cfg, "image_token_id", None) is None:
        raise ModelLoadError(
            f"{type(model).__name__} config has no image_token_index: transformers 4.57 places the query embeddings "
            "at the image tokens of input_ids; set image_token_index to the tokenizer's '<image>' token id"
        )
    if not getattr(cfg, "use_decoder_only_language_model", True):
        raise ModelLoadError(
            "image-to-text supports BLIP-2 with a decoder-only language model (OPT); this one has "
            f"{getattr(cfg.text_config, 'model_type', '?')}"
        )


class Blip2Module(TaskModule):
    """The whole BLIP-2 forward, ``pixel_values, input_ids, attention_mask -> logits`` (module docstring).

    Its capture example puts ``num_query_tokens`` image tokens in front of each row, as the processor does.
    """

    def __init__(self, model: nn.Module, input_names: Sequence[str] = _INPUTS):
        check_model(model)
        super().__init__(model, list(input_names))

    def example_inputs(self, batch: int = 2, text: int = 5) -> tuple[torch.Tensor, ...]:
        """Capture example: image tokens, then random text tokens (never the image token)."""
        from peftc.program import image_shape

        cfg = self.model.config
        gen = torch.Generator().manual_seed(0)
        image = int(cfg.image_token_id)
        vocab = int(cfg.text_config.vocab_size)
        ids = torch.randint(3, vocab - 1, (batch, text), generator=gen)
        ids = ids + (ids >= image).long()
        ids = torch.cat([torch.full((batch, int(cfg.num_query_tokens)), image), ids], dim=1)
        dtype = next(p.dtype for p in self.model.parameters() if p.is_floating_point())
        device = next(self.model.parameters()).device
        pixels = torch.randn(batch, *image_shape(cfg), generator=gen).to(dtype)
        return tuple(t.to(device) for t in (pixels, ids, torch.ones_like(ids)))


def load_processor(path: Path, model: nn.Module) -> Any:
    """The ``Blip2Processor`` of a BLIP-2 directory: the one saved there, else one made from its tokenizer and a
    ``BlipImageProcessor`` at the vision tower's image size; ``num_query_tokens`` is the model's.

    Raises:
        ModelLoadError: no tokenizer in ``path``, or its ``<image>`` token is not the model's image token.
    """
    import transformers

    from peftc.models import _first_line, load_tokenizer
    from peftc.program import image_shape

    cfg = model.config
    _, height, width = image_shape(cfg)
    try:
        if (path / "processor_config.json").is_file():
            processor = transformers.Blip2Processor.from_pretrained(str(path))
        else:
            if (path / "preprocessor_config.json").is_file():
                images = transformers.BlipImageProcessor.from_pretrained(str(path))
            else:
                images = transformers.BlipImageProcessor(size={"height": height, "width": width})
            processor = transformers.Blip2Processor(images, load_tokenizer(path), cfg.num_query_tokens)
    except ModelLoadError:
        raise
    except Exception as e:  # transformers raises OSError/ValueError/… for a broken file
        raise ModelLoadError(f"cannot load a BLIP-2 processor from {path}: {type(e).__name__}: {_first_line(e)}") from e
    processor.num_query_tokens = int(cfg.num_query_tokens)
    image_id = processor.tokenizer.convert_tokens_to_ids(str(processor.image_token))
    if image_id != cfg.image_token_id:
        raise ModelLoadError(
            f"the tokenizer in {path} has '{processor.image_token}' as id {image_id} but the model's "
            f"image_token_index is {cfg.image_token_id}; save the tokenizer the model was made with"
        )
    return processor


# -- data ---------------------------------------------------------------------------------------------------


@dataclass
class CaptionData:
    """``{"image", "text"}`` examples (image paths only; images are decoded per batch)."""

    path: Path
    images: list[Path]
    texts: list[str]
    lines: list[int] = field(default_factory=list)
    task: str = IMAGE_TO_TEXT

    def __len__(self) -> int:
        return len(self.images)

    def eval_kwargs(self) -> dict[str, Any]:
        return {}


def read_captions(path: str | Path) -> CaptionData:
    """Read JSON lines ``{"image": path, "text": caption}``; paths relative to the file's folder.

    Raises:
        DataError: Pillow missing, an unreadable file, a bad line, a missing or undecodable image, an empty caption.
    """
    from peftc.images import _check_image, _pil

    Image = _pil()
    path = Path(path).expanduser()
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e.strerror or e}; pass a JSON-lines file") from e
    data = CaptionData(path, [], [])
    for lineno, obj in json_lines(path, raw, lambda n, what: _fail(path, n, what)):
        image, text = obj.get("image"), obj.get("text")
        if not isinstance(image, str) or not image.strip():
            raise _fail(path, lineno, "missing field 'image'" if "image" not in obj else f"bad 'image' {image!r}")
        if not isinstance(text, str) or not text.strip():
            raise _fail(path, lineno, "missing field 'text'" if "text" not in obj else f"bad 'text' {text!r}")
        file = (path.parent / image).resolve()
        _check_image(path, lineno, file, Image)
        data.images.append(file)
        data.texts.append(text)
        data.lines.append(lineno)
    if not data.images:
        raise DataError(f"data file {path} holds no examples; add JSON lines like {_EXAMPLE}")
    return data


def _fail(path: Path, lineno: int, what: str) -> DataError:
    return DataError(f"{path}:{lineno}: {what}; each line must be a JSON object like {_EXAMPLE}")


@dataclass
class CaptionEncoded:
    """Caption examples batched by the model's ``Blip2Processor`` (the ``Encoded`` of ``image-to-text``)."""

    data: CaptionData
    processor: Any
    max_length: int = 128
    task: str = IMAGE_TO_TEXT

    def __len__(self) -> int:
        return len(self.data)

    def collate(self, indices: Sequence[int], input_names: Sequence[str]) -> dict[str, torch.Tensor]:
        """``pixel_values``, ``input_ids`` (image tokens, then the caption and the end token), ``attention_mask``
        and ``labels`` (the ids, ``-100`` on image tokens and padding) of the examples at ``indices``."""
        from peftc.images import _pil

        if list(input_names) != _INPUTS:
            raise DataError(f"caption data feeds {_INPUTS}, but the program takes {list(input_names)}")
        Image = _pil()
        images = []
        for i in indices:
            with Image.open(self.data.images[i]) as im:
                images.append(im.convert("RGB"))
        tok = self.processor.tokenizer
        end = tok.eos_token or ""
        texts = [self.data.texts[i] + end for i in indices]
        out = self.processor(
            images=images,
            text=texts,
            padding=True,
            truncation=True,
            max_length=self.max_length + self.processor.num_query_tokens,
            return_tensors="pt",
        )
        ids, mask = out["input_ids"].long(), out["attention_mask"].long()
        image_id = tok.convert_tokens_to_ids(str(self.processor.image_token))
        labels = ids.masked_fill((mask == 0) | (ids == image_id), -100)
        return {"pixel_values": out["pixel_values"].float(), "input_ids": ids, "attention_mask": mask, "labels": labels}


def caption_data(model: str, data_path: str, eval_path: str | None, max_length: int, dtype: torch.dtype | None):
    """Training setup of ``image-to-text``: ``(train_enc, eval_enc, train_data, None, loaded)`` as the training
    loop's other readers return it."""
    from peftc.models import load_model

    train_data = read_captions(data_path)
    eval_data = read_captions(eval_path) if eval_path else None
    loaded = load_model(model, IMAGE_TO_TEXT, dtype=dtype)
    if loaded.processor is None:
        raise ModelLoadError(
            f"{loaded.source} has no tokenizer; save the BLIP-2 processor (or its tokenizer) into the directory with "
            "processor.save_pretrained"
        )
    cfg = loaded.model.config
    positions = getattr(cfg.text_config, "max_position_embeddings", None)
    if positions and max_length > positions - cfg.num_query_tokens:  # the image tokens take positions too
        usable = positions - cfg.num_query_tokens
        logger.warning(
            "max_length=%d exceeds the %d caption positions the model has; using %d", max_length, usable, usable
        )
        max_length = usable
    train_enc = CaptionEncoded(train_data, loaded.processor, max_length)
    eval_enc = CaptionEncoded(eval_data, loaded.processor, max_length) if eval_data else None
    return train_enc, eval_enc, train_data, None, loaded


# -- generation over the exported graphs -------------------------------------------------------------------


def generate(
    artifact_dir: str | Path,
    image: Any,
    prompt: str = "",
    max_new_tokens: int = 20,
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> list[int]:
    """Greedy generation over an ``image-to-text`` ONNX artifact with ONNX Runtime and its KV cache.

    The image graph turns the image into query embeddings once; the embedding graph puts them at the prompt's
    image tokens; the decoder runs the prompt with an empty cache, then one token per step on the cache it
    returned, until an end token (``generation_config.json``'s ``eos_token_id``) or ``max_new_tokens`` (as
    ``model.generate(..., do_sample=False)``).

    Args:
        artifact_dir: what ``peftc export`` wrote for an image-to-text run.
        image: a PIL image or a path.
        prompt: text after the image (``""``: a caption from scratch; the tokenizer adds its start token).
        max_new_tokens: the most tokens to generate.
        providers: ONNX Runtime execution providers.

    Returns:
        The generated token ids (decode them with the artifact's tokenizer).
    """
    import onnxruntime as ort
    import transformers

    from peftc.images import _pil

    root = Path(artifact_dir)
    processor = transformers.Blip2Processor.from_pretrained(str(root))
    if not isinstance(image, _pil().Image):
        with _pil().open(image) as im:
            image = im.convert("RGB")
    inputs = processor(images=image, text=prompt, return_tensors="np")
    session = {
        name: ort.InferenceSession(str(root / f"{name}_model.onnx"), providers=list(providers))
        for name in ("vision_encoder", "embed_tokens", "decoder")
    }
    (features,) = session["vision_encoder"].run(None, {"pixel_values": inputs["pixel_values"].astype(np.float32)})
    ids = inputs["input_ids"].astype(np.int64)
    mask = inputs["attention_mask"].astype(np.int64)
    decoder = session["decoder"]
    past_inputs = [i for i in decoder.get_inputs() if i.name.startswith("past_key_values.")]
    past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in past_inputs}
    eos = _end_tokens(root, processor.tokenizer)
    out: list[int] = []
    for _ in range(max_new_tokens):
        (embeds,) = session["embed_tokens"].run(None, {"input_ids": ids, "image_features": features})
        logits, *presents = decoder.run(None, {"inputs_embeds": embeds, "attention_mask": mask, **past})
        token = int(logits[0, -1].argmax())
        out.append(token)
        if token in eos:
            break
        past = {i.name: p for i, p in zip(past_inputs, presents, strict=True)}
        ids = np.array([[token]], np.int64)
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
    return out


def _end_tokens(root: Path, tokenizer: Any) -> set[int]:
    """The ids that end a generation: ``generation_config.json``'s ``eos_token_id`` (an id or a list), as
    ``generate`` reads them, else the tokenizer's end token."""
    try:
        ids = json.loads((root / "generation_config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError):
        ids = None
    if ids is None:
        ids = tokenizer.eos_token_id
    return {int(i) for i in (ids if isinstance(ids, list) else [ids]) if i is not None}
