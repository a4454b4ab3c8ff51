"""Typed method configurations that read and write HF PEFT's ``adapter_config.json``.

Each method config is a dataclass whose field names, defaults and JSON match HF PEFT (0.21), so a
file written by one loads in the other. Every field carries a ``help`` text; the CLI builds its
options and ``--help`` from it. Unknown keys from a newer HF PEFT are kept and written back;
HF PEFT features peftc does not implement are refused when they are switched on, never ignored.
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
    "CONFIG_CLASSES",
    "AdaLoraConfig",
    "ADAPTION_PROMPT_TARGETS",
    "AdaptionPromptConfig",
    "TASK_TYPES",
    "IA3Config",
    "LoraConfig",
    "MethodConfig",
    "PromptEncoderConfig",
    "PrefixTuningConfig",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "config_from_dict",
    "load_config",
]

logger = logging.getLogger(__name__)

#: peftc task name -> HF PEFT ``task_type``.
TASK_TYPES = {
    "causal-lm": "CAUSAL_LM",
    "seq-cls": "SEQ_CLS",
    "token-cls": "TOKEN_CLS",
    "seq2seq": "SEQ_2_SEQ_LM",
    "feature-extraction": "FEATURE_EXTRACTION",
}


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class MethodConfig:
    """Fields every HF PEFT config has; subclasses add the method's own."""

    peft_type: ClassVar[str] = ""
    #: Why no merge can fold this method into the weights (``None``: it merges exactly).
    merge_refusal: ClassVar[str | None] = None
    #: HF PEFT fields this class does not implement, with the value that means "off".
    unsupported: ClassVar[dict[str, Any]] = {}

    task_type: str | None = _help("HF PEFT task type, e.g. CAUSAL_LM or SEQ_CLS.", default=None)
    base_model_name_or_path: str | None = _help("Base model the adapter was made for.", default=None)
    revision: str | None = _help("Hub revision of the base model (recorded only).", default=None)
    inference_mode: bool = _help("True when saved for inference.", default=False)
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


@dataclass
class LoraConfig(MethodConfig):
    """LoRA: ``h = base(x) + s·B(A(dropout(x)))`` with ``s = lora_alpha / r`` (rsLoRA: ``/√r``)."""

    peft_type: ClassVar[str] = "LORA"
    unsupported: ClassVar[dict[str, Any]] = {
        "use_dora": False,
        "lora_bias": False,
        "use_qalora": False,
        "layer_replication": None,
        "loftq_config": {},
        "eva_config": None,
        "corda_config": None,
        "megatron_config": None,
        "trainable_token_indices": None,
        "target_parameters": None,
        "alora_invocation_tokens": None,
        "arrow_config": None,
        # LoRA variants HF PEFT 0.21 adds (each changes the forward or the tensor shapes)
        "velora_config": None,
        "monteclora_config": None,
        "use_bdlora": None,
        "kasa_config": None,
    }

    r: int = _help("LoRA rank.", default=8)
    lora_alpha: float = _help("LoRA scaling numerator: s = lora_alpha / r.", default=8)
    lora_dropout: float = _help("Dropout on the LoRA branch input while training.", default=0.0)
    target_modules: list[str] | str | None = _help(
        "Modules to adapt: a list matches a whole name or a '.name' suffix, a string is a full regex. "
        "Default: HF PEFT's table for the model type.",
        default=None,
    )
    exclude_modules: list[str] | str | None = _help("Modules never to adapt (same matching rules).", default=None)
    fan_in_fan_out: bool = _help("Weights stored as [in, out] (GPT-2 Conv1D); set automatically.", default=False)
    bias: str = _help("Which biases train: none, all or lora_only.", default="none")
    use_rslora: bool = _help("Rank-stabilised scaling s = lora_alpha / sqrt(r).", default=False)
    modules_to_save: list[str] | None = _help(
        "Modules trained in full and saved with the adapter (the head, for seq-cls).", default=None
    )
    init_lora_weights: bool | str = _help("True: A kaiming-uniform, B zero. False: both random.", default=True)
    layers_to_transform: list[int] | int | None = _help("Only adapt these layer indices.", default=None)
    layers_pattern: list[str] | str | None = _help("Name of the layer list, e.g. 'h' or 'layers'.", default=None)
    rank_pattern: dict[str, int] = _help("Per-module rank overrides: {name or regex: r}.", default_factory=dict)
    alpha_pattern: dict[str, float] = _help("Per-module alpha overrides: {name or regex: alpha}.", default_factory=dict)

    def validate(self) -> None:
        super().validate()
        if self.r <= 0:
            raise ConfigError(f"LoRA r must be a positive integer, got r={self.r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ConfigError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported; use true, false or 'gaussian'"
            )
        for key, rank in self.rank_pattern.items():
            if rank <= 0:
                raise ConfigError(f"rank_pattern[{key!r}] must be a positive integer, got {rank}")
        if isinstance(self.target_modules, set):
            self.target_modules = sorted(self.target_modules)

    def rank_for(self, name: str) -> int:
        return int(_pattern_value(name, self.rank_pattern, self.r))

    def alpha_for(self, name: str) -> float:
        return float(_pattern_value(name, self.alpha_pattern, self.lora_alpha))

    def scale_for(self, name: str) -> float:
        r, alpha = self.rank_for(name), self.alpha_for(name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _pattern_value(name: str, pattern: dict[str, Any], default: Any) -> Any:
    """HF PEFT's rule: the first key that matches the end of the module name, else the default."""
    import re

    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


@dataclass
class IA3Config(MethodConfig):
    """(IA)³: attention targets ``y = (Wx + b) ⊙ l`` (l ``[out, 1]``), feed-forward targets ``y = W(x ⊙ l) + b``."""

    peft_type: ClassVar[str] = "IA3"

    target_modules: list[str] | str | None = _help(
        "Modules to adapt: a list matches a whole name or a '.name' suffix, a string is a full regex. "
        "Default: HF PEFT's table for the model type.",
        default=None,
    )
    exclude_modules: list[str] | str | None = _help("Modules never to adapt (same matching rules).", default=None)
    feedforward_modules: list[str] | str | None = _help(
        "Targets treated as feed-forward, whose input (not output) is scaled, e.g. ['output.dense']: a list entry "
        "matches a name ending with it, a string is a full regex; must be a subset of target_modules. "
        "Default: HF PEFT's table for the model type.",
        default=None,
    )
    fan_in_fan_out: bool = _help("Weights stored as [in, out] (GPT-2 Conv1D); set automatically.", default=False)
    modules_to_save: list[str] | None = _help(
        "Modules trained in full and saved with the adapter (the head, for seq-cls).", default=None
    )
    init_ia3_weights: bool = _help("True: the (IA)³ vectors start at 1 (the base model). False: random.", default=True)

    def validate(self) -> None:
        super().validate()
        for name in ("target_modules", "exclude_modules", "feedforward_modules"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                setattr(self, name, sorted(value))
        targets, feedforward = self.target_modules, self.feedforward_modules
        if isinstance(targets, list) and isinstance(feedforward, list) and not set(feedforward) <= set(targets):
            missing = sorted(set(feedforward) - set(targets))
            raise ConfigError(
                f"feedforward_modules must be a subset of target_modules (as in HF PEFT): {missing} not in "
                f"target_modules={targets}; add them to target_modules or remove them from feedforward_modules"
            )


@dataclass
class AdaLoraConfig(LoraConfig):
    """AdaLoRA: ``h = Wx + b + dropout(x)(A⊙E)ᵀBᵀ·lora_alpha/(ranknum + 1e-5)`` with ranks pruned while training.

    HF PEFT 0.21's ``AdaLoraConfig`` (a ``LoraConfig`` subclass). Every target starts at ``init_r``;
    the RankAllocator prunes the total budget to ``target_r`` per module between ``tinit`` and
    ``total_step - tfinal`` and records the kept triplets in ``rank_pattern``
    (``{"<module>.lora_E": [bool] * init_r}``). ``r``, ``use_rslora`` and ``alpha_pattern`` are ignored,
    as in HF PEFT.
    """

    peft_type: ClassVar[str] = "ADALORA"

    target_r: int = _help("Target average rank per module after pruning.", default=8)
    init_r: int = _help("Initial rank of every module.", default=12)
    tinit: int = _help("Steps of initial fine-tuning before any pruning.", default=0)
    tfinal: int = _help("Steps of final fine-tuning after the budget reached target_r.", default=0)
    deltaT: int = _help("Steps between two budget allocations (masking).", default=1)
    beta1: float = _help("EMA coefficient of the sensitivity smoothing.", default=0.85)
    beta2: float = _help("EMA coefficient of the uncertainty quantification.", default=0.85)
    orth_reg_weight: float = _help("Weight of the orthogonal regularisation of A and B in the loss.", default=0.5)
    total_step: int | None = _help(
        "Total training steps (required by HF PEFT; peftc train fills in the run's step count when unset).",
        default=None,
    )
    rank_pattern: dict[str, list[bool]] | None = _help(
        "Triplets kept by the RankAllocator: {'<module>.lora_E': [bool] * init_r}; written by training.",
        default=None,
    )

    def validate(self) -> None:
        MethodConfig.validate(self)
        for name in ("r", "init_r", "target_r", "deltaT"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"AdaLoRA {name} must be a positive integer, got {name}={getattr(self, name)}")
        if self.target_r > self.init_r:
            raise ConfigError(
                f"AdaLoRA target_r={self.target_r} exceeds init_r={self.init_r}; pruning only lowers the rank, "
                "so set target_r <= init_r"
            )
        for name in ("tinit", "tfinal"):
            if getattr(self, name) < 0:
                raise ConfigError(f"AdaLoRA {name} must be >= 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(f"AdaLoRA {name} must be in (0, 1), got {getattr(self, name)}")
        if self.orth_reg_weight < 0:
            raise ConfigError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        if self.total_step is not None:
            if self.total_step <= 0:
                raise ConfigError(f"AdaLoRA total_step must be a positive integer, got {self.total_step}")
            if self.tinit >= self.total_step - self.tfinal:
                raise ConfigError(
                    f"AdaLoRA schedule tinit={self.tinit}, tfinal={self.tfinal}, total_step={self.total_step} leaves "
                    "no budgeting phase; need tinit < total_step - tfinal: lower tinit/tfinal or raise total_step"
                )
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.init_lora_weights not in (True, False):
            raise ConfigError(f"AdaLoRA init_lora_weights must be true or false, got {self.init_lora_weights!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("layers_pattern is set but layers_to_transform is not; set both (as HF PEFT requires)")
        for key, mask in (self.rank_pattern or {}).items():
            if len(mask) != self.init_r:
                raise ConfigError(
                    f"rank_pattern[{key!r}] has {len(mask)} entries but init_r={self.init_r}; "
                    "the adapter was saved with another init_r"
                )
        if isinstance(self.target_modules, set):
            self.target_modules = sorted(self.target_modules)

    def rank_for(self, name: str) -> int:
        """Kept rank of module ``name``: ``sum(rank_pattern['<name>.lora_E'])``, else ``init_r``."""
        pattern = self.rank_pattern or {}
        mask = pattern.get(f"{name}.lora_E", pattern.get(f"{name}.lora_E.default"))  # saved / in-memory HF key
        return self.init_r if mask is None else int(sum(bool(m) for m in mask))

    def alpha_for(self, name: str) -> float:
        return float(self.lora_alpha)

    def scale_for(self, name: str) -> float:
        """HF's ``scaling``: ``lora_alpha`` (``init_r`` when alpha <= 0); the forward also divides by ranknum."""
        return float(self.lora_alpha) if self.lora_alpha > 0 else float(self.init_r)


@dataclass
class PromptLearningConfig(MethodConfig):
    """Fields shared by the methods that prepend virtual tokens (HF PEFT's ``PromptLearningConfig``).

    ``token_dim``, ``num_transformer_submodules``, ``num_attention_heads`` and ``num_layers`` describe
    the base model; left ``None`` they are filled from the model's config when the adapter is created
    (as HF PEFT does), so a saved config always holds them.
    """

    merge_refusal: ClassVar[str | None] = "it prepends virtual tokens to the inputs"
    #: What a KV-cache graph does with ``position_ids`` (HF PEFT 0.21): ``"drop"`` them and number
    #: positions from the cache length, or ``"shift"`` them by the prefix (:class:`peftc.kv.WithPastModule`).
    cache_positions: ClassVar[str] = "drop"

    num_virtual_tokens: int = _help(
        "Number of virtual tokens prepended to every input (HF PEFT has no default; peftc uses 20).", default=20
    )
    token_dim: int | None = _help("Hidden size of the base model's embeddings (filled from the model).", default=None)
    num_transformer_submodules: int | None = _help(
        "1 for decoder-only and encoder-only models (filled from the model); 2 only for encoder-decoders.", default=None
    )
    num_attention_heads: int | None = _help("Attention heads of the base model (filled from the model).", default=None)
    num_layers: int | None = _help("Transformer layers of the base model (filled from the model).", default=None)
    modules_to_save: list[str] | None = _help(
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
        if self.num_transformer_submodules not in (None, 1):
            raise ConfigError(
                f"{self.peft_type} num_transformer_submodules={self.num_transformer_submodules} means an "
                "encoder-decoder model, which peftc does not support; use 1 (decoder-only or encoder-only)"
            )


#: HF PEFT's ``PromptTuningInit`` values.
PROMPT_TUNING_INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning: ``[P; E(x)]`` with P ``[num_virtual_tokens, token_dim]`` trained directly."""

    peft_type: ClassVar[str] = "PROMPT_TUNING"

    prompt_tuning_init: str = _help(
        "Initial P: RANDOM (N(0,1)), SAMPLE_VOCAB (embeddings of random vocabulary tokens) or TEXT "
        "(embeddings of prompt_tuning_init_text, repeated or cut to num_virtual_tokens).",
        default="RANDOM",
    )
    prompt_tuning_init_text: str | None = _help("Text whose token embeddings initialise P (init TEXT).", default=None)
    tokenizer_name_or_path: str | None = _help(
        "Local tokenizer directory used to tokenise prompt_tuning_init_text (init TEXT); never downloaded.",
        default=None,
    )
    tokenizer_kwargs: dict[str, Any] | None = _help(
        "Extra AutoTokenizer.from_pretrained arguments (init TEXT).", default=None
    )

    def validate(self) -> None:
        super().validate()
        if self.prompt_tuning_init not in PROMPT_TUNING_INITS:
            raise ConfigError(
                f"prompt_tuning_init={self.prompt_tuning_init!r} is not one of {', '.join(PROMPT_TUNING_INITS)}"
            )
        if self.prompt_tuning_init == "TEXT":
            if not self.tokenizer_name_or_path:
                raise ConfigError(
                    "prompt_tuning_init='TEXT' needs tokenizer_name_or_path (a local tokenizer directory)"
                )
            if self.prompt_tuning_init_text is None:
                raise ConfigError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text")
        elif self.tokenizer_kwargs:
            raise ConfigError(
                f"tokenizer_kwargs is only used with prompt_tuning_init='TEXT', not {self.prompt_tuning_init!r}"
            )


#: HF PEFT's ``PromptEncoderReparameterizationType`` values.
PROMPT_ENCODER_TYPES = ("MLP", "LSTM")


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning: P = encoder(Emb(num_virtual_tokens, token_dim)), prepended like prompt tuning.

    MLP: Lin→ReLU→Lin→ReLU→Lin; LSTM: a bidirectional LSTM then Lin→ReLU→Lin. The saved adapter holds
    the encoder's *output* (``prompt_embeddings``), not the encoder.
    """

    peft_type: ClassVar[str] = "P_TUNING"

    encoder_reparameterization_type: str = _help("Prompt encoder: MLP (recommended) or LSTM.", default="MLP")
    encoder_hidden_size: int | None = _help("Hidden size of the encoder (default: token_dim).", default=None)
    encoder_num_layers: int = _help("LSTM layers (ignored by MLP, which always has 3 linear layers).", default=2)
    encoder_dropout: float = _help("Dropout between LSTM layers while training (unused by MLP).", default=0.0)

    def validate(self) -> None:
        super().validate()
        if self.encoder_reparameterization_type not in PROMPT_ENCODER_TYPES:
            raise ConfigError(
                f"encoder_reparameterization_type={self.encoder_reparameterization_type!r} is not one of "
                f"{', '.join(PROMPT_ENCODER_TYPES)}"
            )
        if self.encoder_hidden_size is not None and self.encoder_hidden_size <= 0:
            raise ConfigError(f"encoder_hidden_size must be a positive integer, got {self.encoder_hidden_size}")
        if self.encoder_num_layers <= 0:
            raise ConfigError(f"encoder_num_layers must be a positive integer, got {self.encoder_num_layers}")
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ConfigError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout}")


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning: every attention layer also attends to ``num_virtual_tokens`` learned keys and values.

    P ``[num_virtual_tokens, num_layers·2·token_dim]`` (with ``prefix_projection``: the output of
    Emb→Lin→tanh→Lin) is split per layer into K and V ``[heads, n, token_dim/heads]`` and fed as past key
    values. For grouped-query attention ``token_dim`` and ``num_attention_heads`` are filled with the
    key/value size and head count (HF PEFT's rule). The saved adapter holds P (the encoder's *output*).
    """

    peft_type: ClassVar[str] = "PREFIX_TUNING"
    merge_refusal: ClassVar[str | None] = "it prepends learned keys and values to every attention"
    cache_positions: ClassVar[str] = "shift"

    encoder_hidden_size: int | None = _help(
        "Hidden size of the prefix_projection MLP (default: token_dim).", default=None
    )
    prefix_projection: bool = _help(
        "Compute the prefix with Emb(n, token_dim)→Lin→tanh→Lin instead of training it directly.", default=False
    )
    init_weights: str | None = _help(
        "None: random init (HF PEFT's). 'zero': the prefix (projection: the last Lin) starts at zero.", default=None
    )

    def validate(self) -> None:
        super().validate()
        if self.encoder_hidden_size is not None and self.encoder_hidden_size <= 0:
            raise ConfigError(f"encoder_hidden_size must be a positive integer, got {self.encoder_hidden_size}")
        if self.init_weights not in (None, "zero"):
            raise ConfigError(f"prefix tuning init_weights={self.init_weights!r} is not supported; use null or 'zero'")
        if self.token_dim and self.num_attention_heads and self.token_dim % self.num_attention_heads:
            raise ConfigError(
                f"prefix tuning token_dim={self.token_dim} is not a multiple of num_attention_heads="
                f"{self.num_attention_heads}; each head gets token_dim / num_attention_heads values"
            )


#: Model types HF PEFT 0.21's adaption prompt supports -> its default ``target_modules`` (the attention module).
ADAPTION_PROMPT_TARGETS = {"llama": "self_attn", "mistral": "self_attn", "gpt2": "attn"}


@dataclass
class AdaptionPromptConfig(MethodConfig):
    """LLaMA-Adapter: the top ``adapter_layers`` attention blocks attend to ``adapter_len`` learned, gated tokens.

    ``out += o_proj(g·softmax(Q·k_proj(P)ᵀ/√d)·v_proj(P))`` with P ``[1, adapter_len, hidden]`` and the gate
    g zero-initialised (GPT-2: ``c_attn`` gives the keys and values and no output projection is applied, as
    in HF PEFT). HF PEFT 0.21's ``AdaptionPromptConfig``: supported model types are llama, mistral and gpt2.
    HF PEFT has no defaults for ``adapter_len`` and ``adapter_layers``; peftc uses 10 (the paper's) and
    every attention layer, and fills ``adapter_layers`` and ``target_modules`` in when the adapter is
    created, so a saved config always holds them. It has no ``modules_to_save``: for seq-cls only the
    adaption prompts train and the base model's head is kept, exactly as HF PEFT does.
    """

    peft_type: ClassVar[str] = "ADAPTION_PROMPT"
    merge_refusal: ClassVar[str | None] = "its gated attention over learned prompts is a separate softmax"

    target_modules: str | None = _help(
        "Name of the attention submodules to adapt: every module whose name ends with '.<target_modules>'. "
        "Default: self_attn (llama, mistral) or attn (gpt2).",
        default=None,
    )
    adapter_len: int = _help("Number of adaption prompt tokens per adapted layer.", default=10)
    adapter_layers: int | None = _help(
        "Number of adapted attention layers, counted from the top (HF PEFT has no default; peftc: every layer).",
        default=None,
    )

    def validate(self) -> None:
        if isinstance(self.target_modules, (list, tuple)) and len(self.target_modules) == 1:
            self.target_modules = self.target_modules[0]  # ``--target-modules self_attn`` parses to a list
        super().validate()
        if self.adapter_len <= 0:
            raise ConfigError(
                f"adaption prompt adapter_len must be a positive integer, got adapter_len={self.adapter_len}"
            )
        if self.adapter_layers is not None and self.adapter_layers <= 0:
            raise ConfigError(
                f"adaption prompt adapter_layers must be a positive integer (layers from the top), got "
                f"adapter_layers={self.adapter_layers}"
            )
        if self.target_modules is not None and not self.target_modules.strip("."):
            raise ConfigError(
                f"adaption prompt target_modules must name the attention modules, e.g. 'self_attn' (matched as the "
                f"end of a module name), got {self.target_modules!r}"
            )


#: HF PEFT ``peft_type`` -> config class. Other method modules register themselves here.
CONFIG_CLASSES: dict[str, type[MethodConfig]] = {"LORA": LoraConfig}
CONFIG_CLASSES["IA3"] = IA3Config
CONFIG_CLASSES["PROMPT_TUNING"] = PromptTuningConfig
CONFIG_CLASSES["P_TUNING"] = PromptEncoderConfig
CONFIG_CLASSES["ADALORA"] = AdaLoraConfig
CONFIG_CLASSES["PREFIX_TUNING"] = PrefixTuningConfig
CONFIG_CLASSES["ADAPTION_PROMPT"] = AdaptionPromptConfig


def config_from_dict(data: Any, source: str = "adapter config") -> MethodConfig:
    """Pick the config class by ``peft_type`` and build it."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a JSON object, got {type(data).__name__}")
    peft_type = data.get("peft_type")
    if peft_type not in CONFIG_CLASSES:
        raise ConfigError(
            f"{source} names peft_type={peft_type!r}, which peftc does not know; "
            f"supported: {', '.join(sorted(CONFIG_CLASSES))}"
        )
    return CONFIG_CLASSES[peft_type].from_dict(data)


def load_config(path: str | Path) -> MethodConfig:
    """Read an ``adapter_config.json`` (or any HF PEFT config JSON file)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); expected a JSON file") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from e
    return config_from_dict(data, source=str(path))
