"""Task specs: which model class, which graph inputs, which loss and metrics.

A task fixes the signature of the captured program (inputs in order, output ``logits``) and the
training objective. Methods never special-case tasks; they only see the program.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["HEAD_TASKS", "TASKS", "TaskModule", "TaskSpec", "get_task", "graph_input_names"]


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

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.name == "causal-lm":
            labels = batch["labels"]
            if logits.size(1) > labels.size(1):  # virtual tokens prepended (prompt methods): HF PEFT labels them -100
                labels = F.pad(labels, (logits.size(1) - labels.size(1), 0), value=-100)
            return F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        if self.name in _PER_TOKEN:  # one label per position, -100 on padding and ignored sub-words
            return F.cross_entropy(
                logits.reshape(-1, logits.size(-1)).float(), batch["labels"].reshape(-1), ignore_index=-100
            )
        return F.cross_entropy(logits.float(), batch["labels"])


#: Tasks whose logits are ``[batch, sequence, classes]`` with one label per position.
_PER_TOKEN = ("token-cls", "seq2seq")

TASKS = {
    "causal-lm": TaskSpec("causal-lm", "AutoModelForCausalLM", "text-generation", True),
    "seq-cls": TaskSpec("seq-cls", "AutoModelForSequenceClassification", "text-classification", False),
    "token-cls": TaskSpec("token-cls", "AutoModelForTokenClassification", "token-classification", False),
    # Encoder-decoder LMs have no single-graph capture: peftc.exporting.seq2seq captures the encoder and
    # the decoder through its own wrappers (``capture(..., transform=...)``); TaskModule does not apply.
    "seq2seq": TaskSpec("seq2seq", "AutoModelForSeq2SeqLM", "text2text-generation", False),
}

#: Tasks whose model ends in a classification head saved with the adapter (HF PEFT ``modules_to_save``).
HEAD_TASKS = ("seq-cls", "token-cls")


def get_task(name: str) -> TaskSpec:
    from peftc.errors import ConfigError

    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; supported: {', '.join(TASKS)}")
    return TASKS[name]


def graph_input_names(model: nn.Module, task: TaskSpec) -> list[str]:
    """The graph inputs for ``model``: input_ids, attention_mask, then what the model takes."""
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
