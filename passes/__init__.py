"""Graph passes over captured programs (installed as ``peftc.passes``).

Pipelines are named, straight-line lists of passes. ``insertion_pipeline(config, state)`` picks the
method's pipeline from the config's ``peft_type``; new methods register a builder in
:data:`PIPELINES`.
"""

from __future__ import annotations

from collections.abc import Callable

from peftc.adapters import AdapterState
from peftc.config import (
    AdaLoraConfig,
    AdaptionPromptConfig,
    IA3Config,
    LoraConfig,
    MethodConfig,
    PrefixTuningConfig,
    PromptLearningConfig,
)
from peftc.errors import ConfigError

from .adalora import AdaLoraPass, AdaLoraTraining, MergeAdaLoraPass
from .adaption_prompt import AdaptionPromptPass
from .base import FunctionalPass, InPlacePass, Pass, PassManager, PassResult, SiteDecision
from .eval_mode import EvalModePass
from .ia3 import IA3Pass
from .lift import LiftLoraToInputsPass
from .lora import LoraPass
from .merge import MergeLoraPass
from .merge_ia3 import MergeIA3Pass
from .modules_to_save import ModulesToSavePass
from .prefix import PrefixPass, prefix_key_values
from .prompt import PromptPass

__all__ = [
    "PIPELINES",
    "TRAINING_HOOKS",
    "AdaLoraPass",
    "AdaptionPromptPass",
    "MergeAdaLoraPass",
    "EvalModePass",
    "FunctionalPass",
    "IA3Pass",
    "InPlacePass",
    "LiftLoraToInputsPass",
    "LoraPass",
    "MergeIA3Pass",
    "MergeLoraPass",
    "ModulesToSavePass",
    "Pass",
    "PassManager",
    "PassResult",
    "PrefixPass",
    "PromptPass",
    "SiteDecision",
    "insertion_pipeline",
    "merge_pipeline",
    "prefix_key_values",
    "training_hooks",
]


def _lora_pipeline(config: LoraConfig, state: AdapterState | None) -> PassManager:
    return PassManager("lora-insert", [LoraPass(config, state), ModulesToSavePass(config.modules_to_save, config.bias)])


#: peft_type -> builder of the insertion pipeline for that method.
PIPELINES: dict[str, Callable[[MethodConfig, AdapterState | None], PassManager]] = {"LORA": _lora_pipeline}


def _ia3_pipeline(config: IA3Config, state: AdapterState | None) -> PassManager:
    return PassManager("ia3-insert", [IA3Pass(config, state), ModulesToSavePass(config.modules_to_save)])


PIPELINES["IA3"] = _ia3_pipeline


def _prompt_pipeline(config: PromptLearningConfig, state: AdapterState | None) -> PassManager:
    """Prompt tuning / P-tuning: an input transform applied by re-capturing (see passes/prompt.py)."""
    name = config.peft_type.lower().replace("_", "-")
    return PassManager(f"{name}-insert", [PromptPass(config, state), ModulesToSavePass(config.modules_to_save)])


PIPELINES["PROMPT_TUNING"] = _prompt_pipeline
PIPELINES["P_TUNING"] = _prompt_pipeline


def _prefix_pipeline(config: PrefixTuningConfig, state: AdapterState | None) -> PassManager:
    """Prefix tuning: learned keys/values fed as past key values by re-capturing (see passes/prefix.py)."""
    return PassManager("prefix-tuning-insert", [PrefixPass(config, state), ModulesToSavePass(config.modules_to_save)])


PIPELINES["PREFIX_TUNING"] = _prefix_pipeline


def _adalora_pipeline(config: AdaLoraConfig, state: AdapterState | None) -> PassManager:
    return PassManager(
        "adalora-insert", [AdaLoraPass(config, state), ModulesToSavePass(config.modules_to_save, config.bias)]
    )


PIPELINES["ADALORA"] = _adalora_pipeline


def _adaption_prompt_pipeline(config: AdaptionPromptConfig, state: AdapterState | None) -> PassManager:
    """LLaMA-Adapter: a graph rewrite of the top attention layers; HF PEFT trains nothing else (no head)."""
    return PassManager("adaption-prompt-insert", [AdaptionPromptPass(config, state)])


PIPELINES["ADAPTION_PROMPT"] = _adaption_prompt_pipeline

#: peft_type -> builder of a method's training hooks, ``(config, state, total_steps) -> hooks``. The hooks
#: object may define ``regularization() -> loss term`` (added to every micro-batch loss),
#: ``after_step(step)`` (after ``optimizer.step()``, before ``zero_grad``; 1-based step) and
#: ``finalize(state) -> AdapterState`` (the adapter to save at the end of training).
TRAINING_HOOKS: dict[str, Callable[[MethodConfig, AdapterState, int], object]] = {"ADALORA": AdaLoraTraining}


def training_hooks(config: MethodConfig, state: AdapterState, total_steps: int) -> object | None:
    """The method's training hooks (see :data:`TRAINING_HOOKS`), or ``None`` when it needs none."""
    builder = TRAINING_HOOKS.get(config.peft_type)
    return builder(config, state, total_steps) if builder else None


def insertion_pipeline(config: MethodConfig, state: AdapterState | None = None) -> PassManager:
    """The passes that insert (fresh) or bind (``state``) an adapter of ``config``'s method."""
    if config.peft_type not in PIPELINES:
        raise ConfigError(f"no insertion pipeline for peft_type {config.peft_type!r}")
    return PIPELINES[config.peft_type](config, state)


def merge_pipeline() -> PassManager:
    """Folds every mergeable adapter into the base weights."""
    return PassManager("merge", [EvalModePass(), MergeLoraPass(), MergeAdaLoraPass(), MergeIA3Pass()])
