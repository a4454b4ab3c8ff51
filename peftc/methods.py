"""The method registry: one :class:`Method` descriptor per PEFT method, registered by the method's own module.

Training, export, inspect and the CLI ask this registry what a method does — its config class, its
``--method`` names, its insertion pipeline, whether and how it merges or lifts to graph inputs, which
tensors are its own, its training hooks, how its sites are labelled — and none of them names a
``peft_type``. A method module (``peftc.passes.lora``, ``peftc.passes.ia3``, …) defines its config
dataclass, its passes and one descriptor, and calls :func:`register_method` when imported;
``peftc.passes`` imports every method module listed in its ``METHOD_MODULES``, and the registry
imports ``peftc.passes`` on first use. (HF PEFT's ``register_peft_method`` works the same way.)

Adding a method is one module plus its tests plus one line in ``passes/__init__.py``; the README's
architecture section walks through it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from peftc.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from peftc.adapters import AdapterState
    from peftc.config import MethodConfig
    from peftc.passes.base import Pass, PassManager
    from peftc.program import Program, Site

__all__ = [
    "LiftedTensor",
    "Method",
    "NoTrainingHooks",
    "TrainingHooks",
    "adapter_markers",
    "cli_names",
    "config_class",
    "get_method",
    "method_by_name",
    "method_of_tensor",
    "methods",
    "register_method",
]


@runtime_checkable
class TrainingHooks(Protocol):
    """What a method may add to the training loop (AdaLoRA: orthogonal regularisation and rank allocation).

    Subclass :class:`NoTrainingHooks` and override what the method needs; the loop calls every hook.
    """

    def regularization(self) -> torch.Tensor | float:
        """An extra loss term added to every micro-batch loss (``0.0``: none)."""
        ...

    def after_step(self, step: int) -> None:
        """After ``optimizer.step()``, before ``zero_grad`` (gradients still there); ``step`` is 1-based."""
        ...

    def save_state(self, directory: Path) -> None:
        """Write the method's own training state into a checkpoint directory."""
        ...

    def load_state(self, directory: Path) -> None:
        """Read what :meth:`save_state` wrote (``--resume``)."""
        ...

    def finalize(self, state: AdapterState) -> AdapterState:
        """The adapter to save when training ends (AdaLoRA: tensors cut to the kept ranks)."""
        ...


class NoTrainingHooks:
    """Hooks that change nothing: the base of every method's hooks."""

    def regularization(self) -> torch.Tensor | float:
        return 0.0

    def after_step(self, step: int) -> None:
        return None

    def save_state(self, directory: Path) -> None:
        return None

    def load_state(self, directory: Path) -> None:
        return None

    def finalize(self, state: AdapterState) -> AdapterState:
        return state


@dataclass(frozen=True)
class LiftedTensor:
    """One adapter tensor of a site turned into a graph input (swappable export).

    Attributes:
        input_name: the graph input's name (``<module>.lora_A``), stable across adapters.
        graph_path: the ``get_attr`` target it replaces (``model.<module>.lora_A.weight``).
        value: what this adapter feeds (with any scale folded in, e.g. LoRA's B pre-scaled by ``s``).
        default: what the base model feeds: the input's default (LoRA: rank-0 zeros; IA3: ones).
        rank_dim: the axis that is the symbolic rank (``None``: a static shape).
    """

    input_name: str
    graph_path: str
    value: torch.Tensor
    default: torch.Tensor
    rank_dim: int | None = None


@dataclass(frozen=True)
class Method:
    """What the rest of peftc needs to know about one PEFT method.

    Attributes:
        peft_type: HF PEFT's ``peft_type`` (``"LORA"``).
        config_class: the method's config dataclass (reads and writes ``adapter_config.json``).
        label: how inspect and graph pictures name its sites (``"LoRA"``).
        cli_names: ``--method`` names, each with the config fields it presets
            (``{"lora": {}, "dora": {"use_dora": True}}``).
        pipeline: ``(config, state) -> PassManager`` inserting a fresh (``state`` None) or bound adapter.
        markers: fragments of HF PEFT tensor keys that belong to the method (``"lora_"``); any other key
            of an adapter is a full copy of a base parameter (``modules_to_save``).
        merge_pass: builds the pass that folds the method's sites into the weights; ``None`` with
            ``merge_refusal`` saying why it cannot.
        lift: ``(program, site, state) -> [LiftedTensor]``: the site's tensors as graph inputs, for
            swappable exports; ``None`` with ``lift_refusal`` saying why not.
        lift_bypass: ``peftc_role`` values of nodes removed once the tensors are inputs (a scale folded
            into the lifted value).
        stack: ``(program, site, states, slot) -> None``: the mixed-batch rule (``--mixed-batch``): rewrite
            the site so every row applies the adapter its ``slot`` node picks from all ``states`` stacked
            (:mod:`peftc.passes.mixed_batch`); ``None`` refuses, with ``stack_refusal`` if given.
        stack_refusal: why the method cannot share one batch (optional).
        training_hooks: ``(config, state, total_steps) -> TrainingHooks``; ``None``: no hooks.
        transforms_inputs: the adapter enters through the model's inputs (virtual tokens, prefixes),
            not through its layers; such methods re-capture the model and take no graph-level merge.
        cache_prefix: with-past (KV-cache) exports of input-transforming methods:
            ``(model, state) -> per-layer (key, value)``, a constant prefix of the cache.
        describe_site: ``{part: shape} -> dict`` of facts inspect shows for one site (rank, in, out).
    """

    peft_type: str
    config_class: type[MethodConfig]
    label: str
    cli_names: Mapping[str, Mapping[str, Any]]
    pipeline: Callable[[MethodConfig, AdapterState | None], PassManager]
    markers: tuple[str, ...]
    merge_pass: Callable[[], Pass] | None = None
    merge_refusal: str | None = None
    lift: Callable[[Program, Site, AdapterState], list[LiftedTensor]] | None = None
    lift_refusal: str | None = None
    lift_bypass: tuple[str, ...] = ()
    stack: Callable[[Program, Site, list[AdapterState], Any], None] | None = None
    stack_refusal: str | None = None
    training_hooks: Callable[[MethodConfig, AdapterState, int], TrainingHooks] | None = None
    transforms_inputs: bool = False
    cache_prefix: Callable[[nn.Module, AdapterState], list[tuple[torch.Tensor, torch.Tensor]]] | None = None
    describe_site: Callable[[dict[str, list[int]]], dict[str, Any]] | None = field(default=None)

    def __post_init__(self) -> None:
        if (self.merge_pass is None) == (self.merge_refusal is None):
            raise ValueError(f"method {self.peft_type}: give exactly one of merge_pass and merge_refusal")
        if (self.lift is None) == (self.lift_refusal is None):
            raise ValueError(f"method {self.peft_type}: give exactly one of lift and lift_refusal")
        if not self.cli_names:
            raise ValueError(f"method {self.peft_type}: give at least one --method name")

    def hooks(self, config: MethodConfig, state: AdapterState, total_steps: int) -> TrainingHooks:
        """The method's training hooks (:class:`NoTrainingHooks` when it has none)."""
        return self.training_hooks(config, state, total_steps) if self.training_hooks else NoTrainingHooks()

    def owns(self, key: str) -> bool:
        """Whether adapter tensor ``key`` is one of this method's own (not a copy of a base parameter)."""
        return any(m in key for m in self.markers)

    def config(self, cli_name: str | None = None, **fields: Any) -> MethodConfig:
        """A config of this method with the fields ``cli_name`` presets, then ``fields``."""
        presets = dict(self.cli_names.get(cli_name, {})) if cli_name else {}
        return self.config_class(**{**presets, **fields})


_REGISTRY: dict[str, Method] = {}
_BY_NAME: dict[str, Method] = {}
_loaded = False


def register_method(method: Method) -> Method:
    """Register ``method`` (called once by the method's own module); returns it."""
    if method.peft_type in _REGISTRY and _REGISTRY[method.peft_type] is not method:
        raise ValueError(f"peft_type {method.peft_type} is registered twice")
    for name in method.cli_names:
        other = _BY_NAME.get(name)
        if other is not None and other.peft_type != method.peft_type:
            raise ValueError(f"--method {name} is registered by {other.peft_type} and {method.peft_type}")
    _REGISTRY[method.peft_type] = method
    for name in method.cli_names:
        _BY_NAME[name] = method
    return method


def _load() -> None:
    """Import ``peftc.passes``, which imports every method module (each registers itself)."""
    global _loaded
    if not _loaded:
        importlib.import_module("peftc.passes")  # re-entrant: a partly imported package is returned as is
        _loaded = True


def methods() -> list[Method]:
    """Every registered method, in registration order."""
    _load()
    return list(_REGISTRY.values())


def get_method(key: Any) -> Method:
    """The method of a ``peft_type`` string, a config, a config class or an ``AdapterState``.

    Raises:
        ConfigError: no such method, listing the known ones.
    """
    _load()
    config = getattr(key, "config", key)  # an AdapterState
    peft_type = config if isinstance(config, str) else getattr(config, "peft_type", None)
    if peft_type not in _REGISTRY:
        raise ConfigError(
            f"peft_type={peft_type!r} is not a method peftc knows; supported: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[peft_type]


def method_by_name(name: str) -> Method:
    """The method a ``--method`` name selects (case-insensitive).

    Raises:
        ConfigError: an unknown name, listing the known ones.
    """
    _load()
    method = _BY_NAME.get(name.lower())
    if method is None:
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(cli_names())}")
    return method


def cli_names() -> list[str]:
    """Every ``--method`` name, in registration order."""
    _load()
    return list(_BY_NAME)


def config_class(peft_type: str) -> type[MethodConfig]:
    """The config dataclass of ``peft_type`` (:class:`ConfigError` when unknown)."""
    return get_method(peft_type).config_class


def adapter_markers() -> tuple[str, ...]:
    """Key fragments of every method's own tensors (anything else in an adapter is a base-parameter copy)."""
    return tuple(m for method in methods() for m in method.markers)


def method_of_tensor(key: str) -> Method | None:
    """The method an adapter tensor key (or graph input name) belongs to, if any."""
    for method in methods():
        if method.owns(key):
            return method
    return None


def method_config_classes() -> dict[str, type[MethodConfig]]:
    """Class name -> config class of every method (``LoraConfig`` …), for re-export from :mod:`peftc.config`."""
    return {m.config_class.__name__: m.config_class for m in methods()}
