"""Trainable copies of base parameters: ``modules_to_save`` (e.g. the classifier head) and biases.

HF PEFT trains whole modules listed in ``modules_to_save`` and, with ``bias="all"``/``"lora_only"``,
biases. peftc gives the adapter its own copy of each such parameter and rebinds the graph's
``get_attr`` to it: the base model stays untouched and the adapter file holds the copies under
HF PEFT's keys (``base_model.model.classifier.weight``). A bias of a module that a method wraps
(a LoRA site) is saved by HF PEFT under the wrapper's ``base_layer``
(``base_model.model.transformer.h.0.attn.c_attn.base_layer.bias``); HF PEFT silently ignores the
key without it, so peftc writes and reads exactly that name. With ``bias="all"`` HF PEFT also saves a
head's bias as ``<head>.modules_to_save.bias`` and ``<head>.original_module.bias``: duplicates of
``<head>.bias`` and of the base value, accepted on load and not written back.

A saved module's persistent buffers are the adapter's too, as HF PEFT saves them: SegFormer's
``decode_head`` holds a BatchNorm whose ``running_mean``/``running_var``/``num_batches_tracked``
a train-mode graph updates in place. They get copies bound as buffers (never trained by the
optimizer), so training updates the adapter's statistics and the base model's stay as loaded.

A name may select a module at any depth (``classifier`` selects SegFormer's ``decode_head.classifier``,
saved as ``base_model.model.decode_head.classifier.weight``, as HF PEFT does). Names that select a module
*inside* another selected one (``["decode_head", "classifier"]``) are refused (:func:`check_not_nested`).
"""

from __future__ import annotations

import json

import torch
from torch import nn

from peftc.errors import AdapterMismatchError, ConfigError, TargetNotFoundError
from peftc.methods import adapter_markers
from peftc.program import MODEL_PREFIX, Program

from .base import InPlacePass, PassResult, SiteDecision, finish, set_attr

__all__ = ["ModulesToSavePass", "base_param_key", "check_not_nested", "saved_base_buffers", "trainable_base_params"]


#: Sub-module names of HF PEFT's ModulesToSaveWrapper that appear in keys it saves with bias="all".
_WRAPPER_ALIASES = ("modules_to_save", "original_module")


def base_param_key(program: Program, name: str) -> str:
    """HF PEFT's saved key for base parameter ``name``: ``base_layer.`` inside a wrapped (site) module."""
    module, _, param = name.rpartition(".")
    if module in program.sites:
        return f"base_model.{MODEL_PREFIX}{module}.base_layer.{param}"
    return f"base_model.{MODEL_PREFIX}{name}"


def _wrapper_alias(key: str, used: set[str]) -> bool:
    """True for HF PEFT's duplicate ``<head>.modules_to_save.<p>`` / ``<head>.original_module.<p>`` keys."""
    head, _, param = key.rpartition(".")
    head, _, wrapper = head.rpartition(".")
    return wrapper in _WRAPPER_ALIASES and f"{head}.{param}" in used


def _saved_base_copy(program: Program, key: str, tensor: nn.Parameter) -> bool:
    """True for HF PEFT's copy of a site's own base weight (``<site>.base_layer.weight``).

    HF PEFT saves it when a site is an embedding-like layer (``lm_head``, ``embed_tokens``:
    ``save_embedding_layers``), for a resized vocabulary. Equal to this base model's weight it is a no-op;
    a different one is refused (the adapter was made on another base, or with a resized vocabulary).
    """
    module, sep, param = key.removeprefix(f"base_model.{MODEL_PREFIX}").rpartition(".base_layer.")
    if not sep or module not in program.sites or "." in param:
        return False
    base = program.graph_module.get_parameter(f"{MODEL_PREFIX}{module}.{param}")
    if base.shape != tensor.shape or not torch.equal(base.detach(), tensor.detach().to(base.dtype)):
        raise AdapterMismatchError(
            f"adapter tensor {key} is HF PEFT's copy of the base {module}.{param} (saved for a targeted embedding "
            "layer) but differs from this base model's; load the adapter on the base (and vocabulary) it was made for"
        )
    return True


def _saved_module(module: str, modules_to_save: list[str] | None) -> bool:
    return bool(modules_to_save) and any(
        module == s or module.endswith("." + s) or f".{s}." in f".{module}." for s in modules_to_save or ()
    )


def check_not_nested(program: Program, modules_to_save: list[str] | None) -> None:
    """Refuse ``modules_to_save`` names that select a module inside another selected one.

    SegFormer's ``decode_head`` holds a ``classifier``: ``modules_to_save=["decode_head", "classifier"]``
    selects both. HF PEFT then wraps the outer module (a trained copy of the whole head, classifier included)
    and, on that wrapper, the nested one a second time (a copy its forward never calls), and saves both copies
    under the same keys (``base_model.model.decode_head.classifier.weight``): which one a file holds is not
    defined, so peftc cannot match it. One module alone (``["classifier"]`` selects ``decode_head.classifier``)
    is HF PEFT's plain case and is supported.

    Raises:
        ConfigError: naming the nested module, its selected ancestor, and what to write instead.
    """
    if not modules_to_save:
        return
    selected = sorted(m for m in program.module_types if any(m == s or m.endswith("." + s) for s in modules_to_save))
    for module in selected:
        outer = next((a for a in selected if module.startswith(a + ".")), None)
        if outer is not None:
            keep = [s for s in modules_to_save if not (module == s or module.endswith("." + s))]
            raise ConfigError(
                f"modules_to_save={modules_to_save!r} selects {module} inside {outer}, which is selected too; "
                f"HF PEFT would save two copies of {module} under the same keys: name only the outer module "
                f"(modules_to_save={json.dumps(keep)}; on the command line --set 'modules_to_save={json.dumps(keep)}')"
            )


def saved_base_buffers(program: Program, modules_to_save: list[str] | None) -> list[str]:
    """HF module-relative names of the persistent buffers of ``modules_to_save`` (BatchNorm statistics)."""
    if not modules_to_save:
        return []
    model = program.source.model if program.source is not None else None
    persistent = set(model.state_dict()) if model is not None else None
    names = []
    for path, _ in program.graph_module.named_buffers():
        name = path.removeprefix(MODEL_PREFIX)
        if not path.startswith(MODEL_PREFIX) or (persistent is not None and name not in persistent):
            continue
        if _saved_module(name.rpartition(".")[0], modules_to_save):
            names.append(name)
    return names


def trainable_base_params(program: Program, modules_to_save: list[str] | None, bias: str = "none") -> list[str]:
    """HF module-relative names of the base parameters the adapter trains in full."""
    names = []
    lora_modules = {s for s in program.sites}
    for path, _ in program.graph_module.named_parameters():
        if not path.startswith(MODEL_PREFIX) or any(m in path for m in adapter_markers()):
            continue
        name = path.removeprefix(MODEL_PREFIX)
        module = name.rpartition(".")[0]
        saved = _saved_module(module, modules_to_save)
        is_bias = name.endswith("bias") and (bias == "all" or (bias == "lora_only" and module in lora_modules))
        if saved or is_bias:
            names.append(name)
    return names


class ModulesToSavePass(InPlacePass):
    """Rebinds modules_to_save and trained biases to the adapter's own trainable copies."""

    def __init__(self, modules_to_save: list[str] | None, bias: str = "none"):
        self.modules_to_save = modules_to_save
        self.bias = bias

    def plan(self, program: Program) -> list[SiteDecision]:
        check_not_nested(program, self.modules_to_save)  # `peftc inspect plan` refuses what the pass would
        return [
            SiteDecision(n.rpartition(".")[0], "parameter", "rewrite", details={"param": n})
            for n in trainable_base_params(program, self.modules_to_save, self.bias)
        ] + [
            SiteDecision(n.rpartition(".")[0], "buffer", "rewrite", details={"buffer": n})
            for n in saved_base_buffers(program, self.modules_to_save)
        ]

    def run(self, program: Program) -> PassResult:
        state = program.adapter
        if state is None:
            raise ValueError("ModulesToSavePass runs after a method pass has bound an adapter")
        check_not_nested(program, self.modules_to_save)
        names = trainable_base_params(program, self.modules_to_save, self.bias)
        if self.modules_to_save and not names:
            # seq-cls heads are named `classifier` or `score`; HF PEFT lists both and needs one.
            raise TargetNotFoundError(f"modules_to_save={self.modules_to_save!r} matched no module of this model")
        gm, used = program.graph_module, set()
        for name in names:
            key = base_param_key(program, name)
            base = gm.get_parameter(MODEL_PREFIX + name)
            if key not in state.tensors:
                if state.loaded:
                    raise AdapterMismatchError(f"adapter has no tensor {key}; was it made for another model?")
                state.tensors[key] = nn.Parameter(base.detach().clone())
            copy = state.tensors[key]
            if copy.shape != base.shape:
                raise AdapterMismatchError(
                    f"adapter tensor {key} has shape {list(copy.shape)} but the model's {name} is "
                    f"{list(base.shape)}; the adapter was made for another base model (e.g. other num_labels)"
                )
            set_attr(gm, MODEL_PREFIX + name, copy)
            used.add(key)
        for name in saved_base_buffers(program, self.modules_to_save):
            key = base_param_key(program, name)
            base = gm.get_buffer(MODEL_PREFIX + name)
            if key not in state.tensors:
                if state.loaded:
                    raise AdapterMismatchError(f"adapter has no tensor {key}; was it made for another model?")
                state.tensors[key] = base.detach().clone()
            copy = state.tensors[key]
            if copy.shape != base.shape:
                raise AdapterMismatchError(
                    f"adapter tensor {key} has shape {list(copy.shape)} but the model's {name} is "
                    f"{list(base.shape)}; the adapter was made for another base model"
                )
            if isinstance(copy, nn.Parameter):  # a buffer: bound as one, never trained
                copy = state.tensors[key] = copy.detach().requires_grad_(False)
            set_attr(gm, MODEL_PREFIX + name, copy.to(base.dtype) if copy.dtype != base.dtype else copy)
            used.add(key)
        for key in [k for k in state.tensors if k not in used and _wrapper_alias(k, used)]:
            del state.tensors[key]  # HF PEFT's duplicates of a head's bias (bias="all"); not written back
        for key in [k for k in state.tensors if k not in used and _saved_base_copy(program, k, state.tensors[k])]:
            del state.tensors[key]  # HF PEFT's copy of a targeted lm_head/embedding's base weight; not written back
        markers = adapter_markers()
        unused = sorted(k for k in state.tensors if k not in used and not any(m in k for m in markers))
        if unused:
            raise AdapterMismatchError(
                f"adapter tensor {unused[0]} matches no parameter this adapter trains here; "
                "the adapter was made for another base model"
            )
        if not used:
            return PassResult(program, False)
        finish(program)
        return PassResult(program, True)
