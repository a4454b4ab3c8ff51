"""Task specs: which model class, which graph inputs, which loss and metrics.

A task fixes the signature of the captured program (inputs in order, output ``logits``) and the
training objective. Methods never special-case tasks; they only see the program.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "HEAD_TASKS",
    "IGNORE_INDEX",
    "IMAGE_TARGETS",
    "TASKS",
    "Metric",
    "VISION_TASKS",
    "TaskModule",
    "TaskSpec",
    "get_task",
    "graph_input_names",
    "head_modules",
    "vision_task",
]

#: Label of a segmentation-mask pixel that no loss or metric counts (transformers' ``semantic_loss_ignore_index``).
IGNORE_INDEX = 255


@dataclass(frozen=True)
class TaskSpec:
    """What a task means to capture, training and export."""

    name: str
    auto_class: str  # transformers Auto class name
    optimum_task: str  # the task name optimum uses for the same thing
    takes_position_ids: bool  # decoders get explicit positions (padding-aware, as optimum exports them)

    @property
    def per_token(self) -> bool:
        """Logits ``[batch, sequence, classes]``: the head reads every position's hidden state, not a pooled one."""
        return self.name in _PER_TOKEN

    @property
    def scores_positions(self) -> bool:
        """The loss is a cross-entropy over positions (:meth:`scored`): next-token and per-token tasks."""
        return self.name in _NEXT_TOKEN or self.name in _PER_TOKEN

    def scored(self, values: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position tasks: the rows of ``values`` ``[batch, sequence, …]`` that a label scores, and those labels.

        Next-token tasks score position t against label t+1; per-token tasks position t against label t;
        labels -100 (padding, prompts, ignored sub-words) score nothing. Returns ``([n, …], [n])``.
        """
        labels = batch["labels"]
        if self.name in _NEXT_TOKEN:
            if values.size(1) > labels.size(1):  # virtual tokens prepended (prompt methods): HF PEFT labels them -100
                labels = F.pad(labels, (values.size(1) - labels.size(1), 0), value=-100)
            values, labels = values[:, :-1], labels[:, 1:]
        keep = labels != -100
        return values[keep], labels[keep]

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.scores_positions:
            scored, labels = self.scored(logits, batch)
            return F.cross_entropy(scored.float(), labels)
        if self.name == "semantic-segmentation":  # as transformers computes it: logits upsampled to the mask
            labels = batch["labels"]
            upsampled = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
            return F.cross_entropy(upsampled, labels, ignore_index=IGNORE_INDEX)
        if self.name == "text-to-image":  # noise (or velocity) prediction: diffusers' train_text_to_image_lora
            return F.mse_loss(logits.float(), batch["labels"].float())
        return F.cross_entropy(logits.float(), batch["labels"])

    def metric(self) -> Metric:
        """A fresh accumulator of this task's evaluation metrics (besides the loss), fed batch by batch."""
        if self.name == "semantic-segmentation":
            return MeanIoU()
        if self.name == "text-to-image":
            return Metric()
        return Accuracy() if self.name in HEAD_TASKS else Perplexity()

    @property
    def vision(self) -> bool:
        """An image task: the graph takes ``pixel_values`` ``[batch, channels, height, width]``, no tokens."""
        return self.name in VISION_TASKS


class Metric:
    """An evaluation metric accumulated over batches: :meth:`update` per batch, then :meth:`result`."""

    def update(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        """Count one batch's predictions."""

    def result(self, loss: float) -> dict[str, float]:
        """The metrics over every batch seen; ``loss`` is the mean evaluation loss."""
        return {}


class Perplexity(Metric):
    """Language models: ``exp(loss)`` (capped at ``exp(50)``)."""

    def result(self, loss: float) -> dict[str, float]:
        return {"perplexity": math.exp(min(loss, 50.0))}


class Accuracy(Metric):
    """Classifiers: the fraction of labelled predictions (rows, or positions not labelled -100) that are right."""

    def __init__(self) -> None:
        self.correct = self.total = 0

    def update(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        labels = batch["labels"]
        self.correct += int((logits.argmax(-1) == labels).sum())  # -100 never equals an argmax
        self.total += int((labels != -100).sum())

    def result(self, loss: float) -> dict[str, float]:
        return {"accuracy": self.correct / self.total} if self.total else {}


class MeanIoU(Metric):
    """Segmentation: mean IoU over classes and pixel accuracy, from a confusion matrix over every pixel.

    Logits are upsampled to the mask's size as the loss does; pixels labelled :data:`IGNORE_INDEX`
    are not counted (:func:`peftc.images.mean_iou`).
    """

    def __init__(self) -> None:
        self.confusion: np.ndarray | None = None

    def update(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        labels = batch["labels"]
        classes = logits.shape[1]
        upsampled = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        pred = upsampled.argmax(1).numpy().ravel()
        true = labels.numpy().ravel()
        keep = true != IGNORE_INDEX
        counts = np.bincount(true[keep] * classes + pred[keep], minlength=classes * classes)
        counts = counts[: classes * classes].reshape(classes, classes)
        self.confusion = counts if self.confusion is None else self.confusion + counts

    def result(self, loss: float) -> dict[str, float]:
        from peftc.images import mean_iou

        return mean_iou(self.confusion) if self.confusion is not None else {}


#: Tasks whose loss predicts each next token from the logits of the positions before (labels shifted by one).
_NEXT_TOKEN = ("causal-lm", "image-to-text")

#: Tasks whose logits are ``[batch, sequence, classes]`` with one label per position.
_PER_TOKEN = ("token-cls", "seq2seq")

TASKS = {
    "causal-lm": TaskSpec("causal-lm", "AutoModelForCausalLM", "text-generation", True),
    "seq-cls": TaskSpec("seq-cls", "AutoModelForSequenceClassification", "text-classification", False),
    "token-cls": TaskSpec("token-cls", "AutoModelForTokenClassification", "token-classification", False),
    # Encoder-decoder LMs: training captures the whole forward (input_ids, attention_mask, decoder_input_ids ->
    # logits, peftc.exporting.seq2seq.Seq2SeqModule); the export captures the encoder and the decoder through
    # their own wrappers (``capture(..., transform=...)``). TaskModule does not apply. The loss is per decoder
    # token (labels -100 on padding), as transformers' T5 and BART compute it; the metric is perplexity.
    "seq2seq": TaskSpec("seq2seq", "AutoModelForSeq2SeqLM", "text2text-generation", False),
    # Image tasks take one input, pixel_values [batch, channels, height, width] at the model's image size.
    "image-cls": TaskSpec("image-cls", "AutoModelForImageClassification", "image-classification", False),
    "semantic-segmentation": TaskSpec(
        "semantic-segmentation", "AutoModelForSemanticSegmentation", "semantic-segmentation", False
    ),
    # BLIP-2: images and caption tokens -> logits over every position (the query tokens' too), the next-token loss
    # on the caption as Blip2ForConditionalGeneration computes it with ``labels``; peftc.blip2 holds its data and
    # capture, peftc.exporting.multimodal its export graphs.
    "image-to-text": TaskSpec("image-to-text", "AutoModelForImageTextToText", "image-to-text", False),
    # A diffusers UNet2DConditionModel (peftc.diffusion): sample, timestep, encoder_hidden_states -> out_sample;
    # the loss is the noise-prediction MSE, the metric the loss alone.
    "text-to-image": TaskSpec("text-to-image", "UNet2DConditionModel", "text-to-image", False),
}

#: Tasks whose input is an image (``pixel_values``) rather than tokens.
VISION_TASKS = ("image-cls", "semantic-segmentation")

#: Tasks whose model ends in a classification head saved with the adapter (HF PEFT ``modules_to_save``).
HEAD_TASKS = ("seq-cls", "token-cls", "image-cls", "semantic-segmentation")

#: The head modules HF PEFT's examples put in ``modules_to_save``, per task: transformers names a text
#: classifier ``classifier`` (BERT-like) or ``score`` (decoders), an image classifier ``classifier`` (ViT,
#: Swin), and SegFormer's all-MLP decoder ``decode_head`` (trained whole, as HF PEFT's semantic
#: segmentation guide does).
_HEADS = {"image-cls": ["classifier"], "semantic-segmentation": ["decode_head"]}


def vision_task(architectures: list[str]) -> str | None:
    """The image task of a model whose config lists ``architectures`` (``*ForImageClassification``,
    ``*ForSemanticSegmentation``, ``Blip2ForConditionalGeneration``), or ``None``."""
    if any(a.endswith("ForImageClassification") for a in architectures):
        return "image-cls"
    if any(a.endswith("ForSemanticSegmentation") for a in architectures):
        return "semantic-segmentation"
    if "Blip2ForConditionalGeneration" in architectures:
        return "image-to-text"
    return None


#: ``target_modules`` for image models when none are given: HF PEFT has no default table entry for ViT, Swin
#: or SegFormer; its image-classification and semantic-segmentation guides target the attention's query and value.
IMAGE_TARGETS = ["query", "value"]


def head_modules(task: str) -> list[str]:
    """The ``modules_to_save`` of a head task when the method config gives none."""
    return list(_HEADS.get(task, ["classifier", "score"]))


def get_task(name: str) -> TaskSpec:
    from peftc.errors import ConfigError

    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; supported: {', '.join(TASKS)}")
    return TASKS[name]


def graph_input_names(model: nn.Module, task: TaskSpec) -> list[str]:
    """The graph inputs for ``model``: input_ids, attention_mask, then what the model takes (images: pixel_values)."""
    if task.vision:
        return ["pixel_values"]
    if task.name == "image-to-text":  # input_ids hold the image tokens the query embeddings replace
        return ["pixel_values", "input_ids", "attention_mask"]
    params = inspect.signature(model.forward).parameters
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in params and getattr(model.config, "type_vocab_size", 0):
        names.append("token_type_ids")
    if task.takes_position_ids and "position_ids" in params:
        names.append("position_ids")
    return names


class TaskModule(nn.Module):
    """Wraps a transformers model so its forward takes tensors positionally and returns logits.

    The wrapped model is the attribute ``model``, so parameter names inside a captured graph are
    ``model.<HF name>`` and HF PEFT keys are ``base_model.<that>``.
    """

    def __init__(self, model: nn.Module, input_names: list[str]):
        super().__init__()
        self.model = model
        self.input_names = list(input_names)
        params = inspect.signature(model.forward).parameters
        self._extra = {"use_cache": False} if "use_cache" in params else {}

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        kwargs = dict(zip(self.input_names, inputs, strict=True))
        return self.model(**kwargs, **self._extra, return_dict=True).logits
