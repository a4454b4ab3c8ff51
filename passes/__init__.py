"""Graph passes over captured programs (installed as ``peftc.passes``).

Every method lives in its own module here and registers a :class:`peftc.methods.Method` when
imported; :data:`METHOD_MODULES` lists them (adding a method = one module + one line there).
Pipelines are named, straight-line lists of passes: ``insertion_pipeline(config, state)`` asks the
method registry for the config's method's pipeline, ``merge_pipeline()`` runs every method's merge.
"""

from __future__ import annotations

import importlib

from peftc.adapters import AdapterState
from peftc.config import MethodConfig
from peftc.methods import get_method, methods

from .base import FunctionalPass, InPlacePass, Pass, PassManager, PassResult, SiteDecision
from .eval_mode import EvalModePass
from .lift import LiftAdaptersToInputsPass
from .mixed_batch import MixedBatchPass
from .modules_to_save import ModulesToSavePass

#: The method modules; importing one registers its method (order = ``--method`` listing order).
METHOD_MODULES = (
    "lora",
    "adalora",
    "ia3",
    "loha",
    "lokr",
    "prompt_tuning",
    "p_tuning",
    "prefix",
    "adaption_prompt",
)
for _module in METHOD_MODULES:
    importlib.import_module(f"{__name__}.{_module}")

from .adalora import AdaLoraPass, MergeAdaLoraPass  # noqa: E402
from .adaption_prompt import AdaptionPromptPass  # noqa: E402
from .ia3 import IA3Pass  # noqa: E402
from .lora import LoraPass, MergeLoraPass  # noqa: E402
from .merge_ia3 import MergeIA3Pass  # noqa: E402
from .prefix import PrefixPass, prefix_key_values  # noqa: E402
from .prompt import PromptPass  # noqa: E402

__all__ = [
    "METHOD_MODULES",
    "AdaLoraPass",
    "AdaptionPromptPass",
    "EvalModePass",
    "FunctionalPass",
    "IA3Pass",
    "InPlacePass",
    "LiftAdaptersToInputsPass",
    "LoraPass",
    "MergeAdaLoraPass",
    "MergeIA3Pass",
    "MergeLoraPass",
    "MixedBatchPass",
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
]


def insertion_pipeline(config: MethodConfig, state: AdapterState | None = None) -> PassManager:
    """The passes that insert (fresh) or bind (``state``) an adapter of ``config``'s method."""
    return get_method(config).pipeline(config, state)


def merge_pipeline() -> PassManager:
    """Folds every mergeable adapter into the base weights (each method's merge pass, in registration order)."""
    return PassManager("merge", [EvalModePass(), *(m.merge_pass() for m in methods() if m.merge_pass is not None)])
