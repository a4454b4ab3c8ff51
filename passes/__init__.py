"""Graph passes over captured programs (installed as ``peftc.passes``).

Pipelines are named, straight-line lists of passes. ``insertion_pipeline(config, state)`` picks the
method's pipeline from the config's ``peft_type``; new methods register a builder in
:data:`PIPELINES`.
"""

from __future__ import annotations

from collections.abc import Callable

from peftc.adapters import AdapterState
from peftc.config import IA3Config, LoraConfig, MethodConfig
from peftc.errors import ConfigError

from .base import FunctionalPass, InPlacePass, Pass, PassManager, PassResult, SiteDecision
from .eval_mode import EvalModePass
from .ia3 import IA3Pass
from .lora import LoraPass
from .merge import MergeLoraPass
from .merge_ia3 import MergeIA3Pass
from .modules_to_save import ModulesToSavePass

__all__ = [
    "PIPELINES",
    "EvalModePass",
    "FunctionalPass",
    "IA3Pass",
    "InPlacePass",
    "LoraPass",
    "MergeIA3Pass",
    "MergeLoraPass",
    "ModulesToSavePass",
    "Pass",
    "PassManager",
    "PassResult",
    "SiteDecision",
    "insertion_pipeline",
    "merge_pipeline",
]


def _lora_pipeline(config: LoraConfig, state: AdapterState | None) -> PassManager:
    return PassManager("lora-insert", [LoraPass(config, state), ModulesToSavePass(config.modules_to_save, config.bias)])


#: peft_type -> builder of the insertion pipeline for that method.
PIPELINES: dict[str, Callable[[MethodConfig, AdapterState | None], PassManager]] = {"LORA": _lora_pipeline}


def _ia3_pipeline(config: IA3Config, state: AdapterState | None) -> PassManager:
    return PassManager("ia3-insert", [IA3Pass(config, state), ModulesToSavePass(config.modules_to_save)])


PIPELINES["IA3"] = _ia3_pipeline


def insertion_pipeline(config: MethodConfig, state: AdapterState | None = None) -> PassManager:
    """The passes that insert (fresh) or bind (``state``) an adapter of ``config``'s method."""
    if config.peft_type not in PIPELINES:
        raise ConfigError(f"no insertion pipeline for peft_type {config.peft_type!r}")
    return PIPELINES[config.peft_type](config, state)


def merge_pipeline() -> PassManager:
    """Folds every mergeable adapter into the base weights."""
    return PassManager("merge", [EvalModePass(), MergeLoraPass(), MergeIA3Pass()])
