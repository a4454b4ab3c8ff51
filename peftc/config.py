"""The base of every method config, and reading HF PEFT's ``adapter_config.json``.

Each method's config is a dataclass in the method's own module (``peftc.passes.lora.LoraConfig`` …),
a subclass of :class:`MethodConfig`, whose field names, defaults and JSON match HF PEFT (0.21), so a
file written by one loads in the other; :func:`config_from_dict` finds the class through the method
registry (:mod:`peftc.methods`). The classes are also importable from here (``peftc.config.LoraConfig``).
Every field carries a ``help`` text; the CLI builds its options and ``--help`` from it. Unknown keys
from a newer HF PEFT are kept and written back; HF PEFT features peftc does not implement are refused
when they are switched on, never ignored.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from peftc.errors import ConfigError

__all__ = [
    "TASK_TYPES",
    "MethodConfig",
    "PromptLearningConfig",
    "config_from_dict",
    "help_field",
    "load_config",
    "pattern_value",
]

logger = logging.getLogger(__name__)

#: peftc task name -> HF PEFT ``task_type``.
TASK_TYPES = {
    "causal-lm": "CAUSAL_LM",
    "seq-cls": "SEQ_CLS",
    "token-cls": "TOKEN_CLS",
    "seq2seq": "SEQ_2_SEQ_LM",
    "feature-extraction": "FEATURE_EXTRACTION",
    # HF PEFT has no task type for images: its image-classification and segmentation guides leave it unset
    "image-cls": None,
    "semantic-segmentation": None,
    "image-to-text": None,  # HF PEFT's BLIP-2 example leaves it unset too
    "text-to-image": None,  # HF PEFT's Stable Diffusion recipe leaves it unset too
}

#: peftc's task names (``peftc.tasks.TASKS``' keys, here for the command line, which imports no torch): every
#: task trains and exports.
TASK_NAMES = tuple(t for t in TASK_TYPES if t != "feature-extraction")


def help_field(text: str, **kwargs: Any) -> Any:
    """A dataclass field with its ``help`` text (the CLI's ``--help`` and the README read it)."""
    return field(metadata={"help": text}, **kwargs)


@dataclass
class MethodConfig:
    """Fields every HF PEFT config has; subclasses add the method's own."""

    peft_type: ClassVar[str] = ""
    #: HF PEFT fields this class does not implement, with the value that means "off".
    unsupported: ClassVar[dict[str, Any]] = {}

    task_type: str | None = help_field("HF PEFT task type, e.g. CAUSAL_LM or SEQ_CLS.", default=None)
    base_model_name_or_path: str | None = help_field("Base model the adapter was made for.", default=None)
    revision: str | None = help_field("Hub revision of the base model (recorded only).", default=None)
    inference_mode: bool = help_field("True when saved for inference.", default=False)
    extra: dict[str, Any] = field(default_factory=dict, repr=False, metadata={"help": "", "internal": True})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` when a field has the wrong type or an impossible value."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            if f.metadata.get("internal"):
                continue
            value = getattr(self, f.name)
            if not _matches(value, hints[f.name]):
                raise ConfigError(
                    f"{self.peft_type} config field {f.name!r} must be {_type_name(hints[f.name])}, "
                    f"got {value!r} ({type(value).__name__})"
                )
            if isinstance(value, float) and not math.isfinite(value):  # JSON's NaN/Infinity: no method takes them
                raise ConfigError(f"{self.peft_type} config field {f.name!r} must be a finite number, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON object HF PEFT writes as ``adapter_config.json``."""
        out: dict[str, Any] = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.metadata.get("internal"):
                continue
            value = getattr(self, f.name)
            out[f.name] = sorted(value) if isinstance(value, set) else value
        out["peft_type"] = self.peft_type
        for key, off in self.unsupported.items():
            out.setdefault(key, off)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodConfig:
        """Build from an HF PEFT config object, refusing features peftc does not implement."""
        data = dict(data)
        data.pop("peft_type", None)
        names = {f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
        kwargs, extra = {}, {}
        for key, value in data.items():
            if key in names:
                kwargs[key] = value
            elif key in cls.unsupported:
                if value not in (cls.unsupported[key], None, False, {}, [], ""):
                    raise ConfigError(
                        f"{cls.peft_type} option {key}={value!r} is not supported by peftc; "
                        f"remove it or set it to {cls.unsupported[key]!r}"
                    )
            else:
                extra[key] = value
        if extra:
            logger.debug("keeping unknown %s config keys: %s", cls.peft_type, sorted(extra))
        return cls(**kwargs, extra=extra)

    def save(self, directory: str | Path) -> None:
        Path(directory, "adapter_config.json").write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def field_help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, set, tuple):
        (inner, *_) = typing.get_args(hint) or (Any,)
        return isinstance(value, (list, set, tuple)) and all(_matches(v, inner) for v in value)
    if origin is dict:
        key_t, val_t = typing.get_args(hint) or (Any, Any)
        return isinstance(value, dict) and all(_matches(k, key_t) and _matches(v, val_t) for k, v in value.items())
    return isinstance(value, origin or hint)


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def pattern_value(name: str, pattern: dict[str, Any], default: Any) -> Any:
    """HF PEFT's rule: the first key that matches the end of the module name, else the default."""
    import re

    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


@dataclass
class PromptLearningConfig(MethodConfig):
    """Fields shared by the methods that prepend virtual tokens (HF PEFT's ``PromptLearningConfig``).

    ``token_dim``, ``num_transformer_submodules``, ``num_attention_heads`` and ``num_layers`` describe
    the base model; left ``None`` they are filled from the model's config when the adapter is created
    (as HF PEFT does), so a saved config always holds them.
    """

    #: What a KV-cache graph does with ``position_ids`` (HF PEFT 0.21): ``"drop"`` them and number
    #: positions from the cache length, or ``"shift"`` them by the prefix (:class:`peftc.exporting.kv.WithPastModule`).
    cache_positions: ClassVar[str] = "drop"
    #: True when the prompt holds attention keys/values (prefix tuning), not token embeddings: its width
    #: and head count follow the key/value heads of a grouped-query model (HF PEFT's rule).
    holds_key_values: ClassVar[bool] = False

    num_virtual_tokens: int = help_field(
        "Number of virtual tokens prepended to every input (HF PEFT has no default; peftc uses 20).", default=20
    )
    token_dim: int | None = help_field(
        "Hidden size of the base model's embeddings (filled from the model).", default=None
    )
    num_transformer_submodules: int | None = help_field(
        "1 for decoder-only and encoder-only models, 2 for encoder-decoders (filled from the task, as HF PEFT).",
        default=None,
    )
    num_attention_heads: int | None = help_field(
        "Attention heads of the base model (filled from the model).", default=None
    )
    num_layers: int | None = help_field("Transformer layers of the base model (filled from the model).", default=None)
    modules_to_save: list[str] | None = help_field(
        "Modules trained in full and saved with the adapter (the head, for seq-cls).", default=None
    )

    def validate(self) -> None:
        super().validate()
        if self.num_virtual_tokens <= 0:
            raise ConfigError(
                f"{self.peft_type} num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens}"
            )
        for name in ("token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{self.peft_type} {name} must be a positive integer or null, got {value}")
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ConfigError(
                f"{self.peft_type} num_transformer_submodules must be 1 (decoder-only, encoder-only) or 2 "
                f"(encoder-decoder), got {self.num_transformer_submodules}"
            )

    def initial_token_ids(self, n: int, vocab_size: int) -> Any:
        """Vocabulary ids whose embeddings initialise the ``n`` virtual tokens, or ``None`` for N(0, 1)."""
        return None

    def encoder_spec(self) -> dict[str, Any] | None:
        """The prompt encoder's options (``encoder``, ``hidden``, LSTM ``num_layers``/``dropout``), or ``None``."""
        return None


def config_from_dict(data: Any, source: str = "adapter config") -> MethodConfig:
    """Pick the config class by ``peft_type`` and build it."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a JSON object, got {type(data).__name__}")
    peft_type = data.get("peft_type")
    from peftc.methods import methods

    classes = {m.peft_type: m.config_class for m in methods()}
    if not isinstance(peft_type, str) or peft_type not in classes:
        raise ConfigError(
            f"{source} names peft_type={peft_type!r}, which peftc does not know; "
            f"supported: {', '.join(sorted(classes))}"
        )
    return classes[peft_type].from_dict(data)


def load_config(path: str | Path) -> MethodConfig:
    """Read an ``adapter_config.json`` (or any HF PEFT config JSON file)."""
    from peftc.files import read_json

    return config_from_dict(read_json(path, "config", ConfigError), source=str(path))


def __getattr__(name: str) -> Any:
    """``peftc.config.LoraConfig`` & co.: each method's config class, defined in the method's own module."""
    if name.startswith("__"):  # import machinery probing (``__path__``…): never load the registry for it
        raise AttributeError(name)
    from peftc.methods import method_config_classes

    classes = method_config_classes()
    if name in classes:
        return classes[name]
    raise AttributeError(f"module 'peftc.config' has no attribute {name!r}")
