"""Prefix tuning: every attention layer also attends to learned keys and values, fed as past key values.

P ``[n, num_layers·2·token_dim]`` (``n = num_virtual_tokens``) is either trained directly or, with
``prefix_projection``, computed as ``Lin(tanh(Lin(Emb(n, token_dim))))`` (hidden ``encoder_hidden_size``).
Exactly as HF PEFT 0.21 (``PeftModel.get_prompt``, ``PeftModelForCausalLM.forward``,
``PeftModelForSequenceClassification._prefix_tuning_forward``):

* P is viewed as ``[n, 2·layers, heads, token_dim/heads]`` and permuted so that layer ``i`` gets
  K = rows ``2i`` and V = rows ``2i+1``, each ``[batch, heads, n, head_dim]``, put into a
  ``transformers.DynamicCache`` that the model receives as ``past_key_values``; every attention layer
  prepends them to its own keys and values;
* grouped-query attention (``num_key_value_heads`` in the model config): ``heads`` is the number of
  key/value heads and ``token_dim = heads·head_dim`` (filled in by :func:`~peftc.passes.prompt.fill_model_fields`);
* the attention mask gets ``n`` leading ones; ``position_ids`` (a causal-lm graph input) are shifted by
  ``n``, so real tokens are numbered from ``n`` as after ``n`` cached tokens; models that number positions
  themselves (BERT, seq-cls decoders) start at the cache length ``n`` too. ``token_type_ids`` are kept;
* logits keep the input's shape (``[batch, seq, vocab]`` / ``[batch, labels]``): unlike prompt tuning
  nothing is prepended to the sequence itself;
* models whose task head takes no ``past_key_values`` (``BertForSequenceClassification``,
  ``BertForTokenClassification``) run the backbone (the first child that is a ``PreTrainedModel``), then
  ``dropout`` if the model has one, then the head (the first child named like
  ``classifier``/``score``/``modules_to_save``), on the pooled output for seq-cls when the backbone pools
  (BERT) and on every position otherwise (token-cls; RoBERTa, whose head pools ``<s>`` itself) — HF PEFT's
  own paths (``PeftModelForSequenceClassification`` / ``PeftModelForTokenClassification._prefix_tuning_forward``),
  except that HF PEFT takes ``outputs[1]`` for seq-cls, which for a backbone without a pooler is the cache
  (HF PEFT 0.21 then fails on RoBERTa); peftc feeds the head what the model's own forward feeds it.

The prefix is part of the captured graph (parameters ``prompt.*``), so an ONNX export has no KV-cache
inputs. On disk (HF PEFT's format) the adapter is ``prompt_embeddings`` = P ``[n, layers·2·token_dim]``, for
``prefix_projection`` the encoder's *output*; a loaded adapter binds those fixed values (HF PEFT's
inference mode). While the projection trains, the state holds its parameters as ``prompt_encoder.<param>``
(HF PEFT's ``PrefixEncoder`` names: ``embedding.weight``, ``transform.0.weight``, …), as for P-tuning.
:func:`prefix_key_values` gives the per-layer K/V for a with-past (KV-cache) export.
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from peftc.adapters import AdapterState
from peftc.config import PromptLearningConfig, help_field
from peftc.errors import AdapterMismatchError, ConfigError
from peftc.methods import Method, register_method
from peftc.program import Program
from peftc.tasks import HEAD_TASKS, TaskModule, TaskSpec

from .base import PassManager
from .modules_to_save import ModulesToSavePass
from .prompt import PROMPT_KEY, PromptModule, PromptPass, fill_model_fields

__all__ = [
    "PREFIX_TUNING",
    "PrefixModule",
    "PrefixPass",
    "PrefixTaskModule",
    "PrefixTuningConfig",
    "prefix_key_values",
    "split_prefix",
]

logger = logging.getLogger(__name__)


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning: every attention layer also attends to ``num_virtual_tokens`` learned keys and values.

    P ``[num_virtual_tokens, num_layers·2·token_dim]`` (with ``prefix_projection``: the output of
    Emb→Lin→tanh→Lin) is split per layer into K and V ``[heads, n, token_dim/heads]`` and fed as past key
    values. For grouped-query attention ``token_dim`` and ``num_attention_heads`` are filled with the
    key/value size and head count (HF PEFT's rule). The saved adapter holds P (the encoder's *output*).
    """

    peft_type: ClassVar[str] = "PREFIX_TUNING"
    cache_positions: ClassVar[str] = "shift"
    holds_key_values: ClassVar[bool] = True

    encoder_hidden_size: int | None = help_field(
        "Hidden size of the prefix_projection MLP (default: token_dim).", default=None
    )
    prefix_projection: bool = help_field(
        "Compute the prefix with Emb(n, token_dim)→Lin→tanh→Lin instead of training it directly.", default=False
    )
    init_weights: str | None = help_field(
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


#: Child names HF PEFT takes as the head (``PeftModelForSequenceClassification`` / ``…ForTokenClassification``).
_HEAD_NAMES = ("classifier", "score")


class PrefixModule(PromptModule):
    """P ``[1, n, layers·2·token_dim]``: ``Emb(n, token_dim)`` through HF PEFT's ``transform`` (Lin→tanh→Lin)."""

    def __init__(self, num_tokens: int, token_dim: int, width: int, hidden: int, zero: bool = False):
        nn.Module.__init__(self)
        self.num_tokens, self.encoder_type = num_tokens, "PREFIX_PROJECTION"
        self.embedding = nn.Embedding(num_tokens, token_dim)
        self.transform = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
        if zero:
            nn.init.zeros_(self.transform[-1].weight)
            nn.init.zeros_(self.transform[-1].bias)

    def encode(self) -> torch.Tensor:
        tokens = torch.arange(self.num_tokens, device=self.embedding.weight.device).unsqueeze(0)
        return self.transform(self.embedding(tokens))


def split_prefix(prefix: torch.Tensor, config: PromptLearningConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Cut P ``[b, n, layers·2·token_dim]`` into per-layer (K, V), each ``[b, heads, n, token_dim/heads]``.

    HF PEFT's ``get_prompt``: ``view(b, n, 2·layers, heads, head_dim).permute(2, 0, 3, 1, 4)``, then layer
    ``i`` takes rows ``2i`` (keys) and ``2i + 1`` (values).

    Args:
        prefix: the prefix, ``[b, n, layers·2·token_dim]``.
        config: a prefix-tuning config with ``num_layers``, ``num_attention_heads`` and ``token_dim`` filled in.

    Returns:
        ``num_layers`` pairs (key, value), views of ``prefix``.
    """
    b, n = prefix.shape[:2]
    heads, layers = config.num_attention_heads, config.num_layers
    kv = prefix.view(b, n, 2 * layers, heads, config.token_dim // heads).permute(2, 0, 3, 1, 4)
    return [(kv[2 * i], kv[2 * i + 1]) for i in range(layers)]


def _backbone_and_head(model: nn.Module, config: PromptLearningConfig) -> tuple[str, str] | None:
    """HF PEFT's seq-cls / token-cls fallback: (backbone child, head child) for a model without ``past_key_values``."""
    from transformers import PreTrainedModel

    backbone = next((n for n, m in model.named_children() if isinstance(m, PreTrainedModel)), None)
    names = [*(config.modules_to_save or []), *_HEAD_NAMES]
    head = next((n for n, _ in model.named_children() if any(h in n for h in names)), None)
    if backbone is None or head is None:
        return None
    if "past_key_values" not in inspect.signature(model.get_submodule(backbone).forward).parameters:
        return None
    return backbone, head


def _takes_past(model: nn.Module) -> bool:
    return "past_key_values" in inspect.signature(model.forward).parameters


class PrefixTaskModule(TaskModule):
    """TaskModule that feeds the prefix as past key values (HF PEFT's prefix-tuning forward)."""

    def __init__(
        self,
        model: nn.Module,
        input_names: list[str],
        prefix: PromptModule,
        config: PrefixTuningConfig,
        per_token: bool = False,
    ) -> None:
        super().__init__(model, input_names)
        self.per_token = per_token  # the head reads every position (token-cls), else the pooled output
        self.prompt = prefix  # graph parameters ``prompt.<param>``, as for prompt tuning
        self.config = config
        self.extra_positions = prefix.num_tokens  # positions n.. are taken: capture limits the sequence to max - n
        self._split = None if _takes_past(model) else _backbone_and_head(model, config)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache

        kwargs = dict(zip(self.input_names, inputs, strict=True))
        mask = kwargs["attention_mask"]
        batch, n = mask.shape[0], self.prompt.num_tokens
        kwargs["attention_mask"] = torch.cat((mask.new_ones(batch, n), mask), dim=1)
        if "position_ids" in kwargs:
            kwargs["position_ids"] = kwargs["position_ids"] + n
        prefix = self.prompt.encode().to(self.model.dtype)
        cache = DynamicCache(
            [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in split_prefix(prefix, self.config)]
        )
        if self._split is None:
            return self.model(**kwargs, past_key_values=cache, **self._extra, return_dict=True).logits
        backbone, head = self._split
        outputs = self.model.get_submodule(backbone)(**kwargs, past_key_values=cache, return_dict=True)
        # what the model's own forward gives its head: the pooled output where the backbone pools (BERT), else
        # every position (token-cls; RoBERTa's head pools <s> itself, and HF PEFT's outputs[1] is then the cache)
        pooled = None if self.per_token else getattr(outputs, "pooler_output", None)
        hidden = outputs.last_hidden_state if pooled is None else pooled
        if "dropout" in dict(self.model.named_children()):
            hidden = self.model.dropout(hidden)
        return self.model.get_submodule(head)(hidden)


def _kv_shape(model_config: Any) -> tuple[int | None, int | None]:
    """(key/value heads, head dim) of the model's attention, from its config."""

    def get(*keys: str) -> int | None:
        for key in keys:
            value = getattr(model_config, key, None)
            if isinstance(value, int):
                return value
        return None

    heads = get("num_attention_heads", "n_head", "num_heads")
    hidden = get("hidden_size", "n_embd", "d_model")
    head_dim = get("head_dim") or (hidden // heads if hidden and heads else None)
    return get("num_key_value_heads") or heads, head_dim


class PrefixPass(PromptPass):
    """Re-captures the program with learned per-layer keys and values fed to every attention layer."""

    site_name = "prefix_encoder"

    def __init__(self, config: PrefixTuningConfig, state: AdapterState | None = None):
        super().__init__(config, state)

    def _check_model(self, cfg: PromptLearningConfig, model: nn.Module, program: Program) -> None:
        name = type(model).__name__
        if not _takes_past(model) and (program.task.name not in HEAD_TASKS or _backbone_and_head(model, cfg) is None):
            raise ConfigError(
                f"{name} takes no past_key_values, which prefix tuning feeds its keys and values through; "
                "use prompt-tuning or p-tuning for this model"
            )
        heads, head_dim = _kv_shape(program.model_config)
        if (
            heads
            and head_dim
            and (cfg.num_attention_heads != heads or cfg.token_dim // cfg.num_attention_heads != head_dim)
        ):
            raise AdapterMismatchError(
                f"prefix tuning config has num_attention_heads={cfg.num_attention_heads} and token_dim={cfg.token_dim} "
                f"but {name} attends with {heads} key/value heads of size {head_dim}; the adapter was made for "
                "another model (or unset num_attention_heads and token_dim to fill them from this one)"
            )

    def _width(self, cfg: PromptLearningConfig) -> int:
        return int(cfg.num_layers) * 2 * int(cfg.token_dim)

    def _rows(self, cfg: PromptLearningConfig) -> int:
        return int(cfg.num_virtual_tokens)  # one prefix, whatever the submodules (HF PEFT's PrefixEncoder)

    def _wrapper(self, model: nn.Module, input_names: list[str], module: PromptModule, task: TaskSpec) -> TaskModule:
        return PrefixTaskModule(model, input_names, module, self.config, per_token=task.per_token)

    def _fresh_module(self, cfg: PromptLearningConfig, n: int, d: int) -> PromptModule:
        zero = cfg.init_weights == "zero"
        if cfg.prefix_projection and not cfg.inference_mode:  # HF PEFT's PrefixEncoder rule
            return PrefixModule(n, int(cfg.token_dim), d, int(cfg.encoder_hidden_size), zero=zero)
        module = PromptModule(n, d)
        if zero:
            nn.init.zeros_(module.embedding.weight)
        return module

    def _init(self, cfg: PromptLearningConfig, module: PromptModule, model: nn.Module) -> None:
        """``nn.Embedding``/``nn.Linear`` defaults (or zero), as HF PEFT's PrefixEncoder: nothing more to do."""


def prefix_key_values(
    program_or_state: Program | AdapterState, model_config: Any, dtype: torch.dtype | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per decoder layer, the prefix key and value exactly as they enter the model's cache.

    For a with-past (KV-cache) export: layer ``i``'s cache starts with these ``n`` positions, and the real
    tokens' positions (and ``past_sequence_length``) are offset by ``n``. The values are the saved
    ``prompt_embeddings`` (for ``prefix_projection``, the encoder's output in eval mode), split as HF PEFT does.

    Args:
        program_or_state: a program a :class:`PrefixPass` ran on, or a prefix-tuning :class:`AdapterState`
            (loaded from an HF PEFT or peftc directory, or being trained).
        model_config: the base model's transformers config (fills ``token_dim`` & co. where the config lacks them).
        dtype: cast to this dtype (HF PEFT casts to the base model's); default: the adapter's.

    Returns:
        ``num_layers`` pairs ``(key, value)``, each ``[1, kv_heads, n, head_dim]``, detached and contiguous.

    Raises:
        ConfigError: the adapter is not prefix tuning.
        AdapterMismatchError: ``prompt_embeddings`` is missing or has the wrong shape for ``model_config``.
    """
    state = program_or_state.adapter if isinstance(program_or_state, Program) else program_or_state
    if state is None or not isinstance(state.config, PrefixTuningConfig):
        found = "no adapter" if state is None else state.config.peft_type
        raise ConfigError(f"prefix_key_values needs a {PrefixTuningConfig.peft_type} adapter, got {found}")
    cfg = copy.deepcopy(state.config)
    fill_model_fields(cfg, model_config)
    tensors = state.to_saved(state) if state.to_saved is not None else state.tensors
    if PROMPT_KEY not in tensors:
        raise AdapterMismatchError(
            f"prefix-tuning adapter has no {PROMPT_KEY!r} tensor (keys: {sorted(tensors)[:4]}); bind it with a "
            "PrefixPass first or load an HF PEFT prefix-tuning directory"
        )
    prefix = tensors[PROMPT_KEY].detach()
    width = int(cfg.num_layers) * 2 * int(cfg.token_dim)
    if tuple(prefix.shape) != (cfg.num_virtual_tokens, width):
        raise AdapterMismatchError(
            f"{PROMPT_KEY} has shape {list(prefix.shape)} but this model needs [{cfg.num_virtual_tokens}, {width}] "
            f"(num_layers={cfg.num_layers}, token_dim={cfg.token_dim}); the adapter was made for another model"
        )
    if dtype is not None:
        prefix = prefix.to(dtype)
    return [(k.contiguous(), v.contiguous()) for k, v in split_prefix(prefix.unsqueeze(0), cfg)]


def _pipeline(config: PrefixTuningConfig, state: AdapterState | None) -> PassManager:
    """Learned keys/values fed as past key values by re-capturing, then the head (modules_to_save)."""
    return PassManager("prefix-tuning-insert", [PrefixPass(config, state), ModulesToSavePass(config.modules_to_save)])


def _cache_prefix(model: nn.Module, state: AdapterState) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return prefix_key_values(state, model.config)


PREFIX_TUNING = register_method(
    Method(
        peft_type=PrefixTuningConfig.peft_type,
        config_class=PrefixTuningConfig,
        label="prefix tuning",
        cli_names={"prefix-tuning": {}},
        pipeline=_pipeline,
        markers=(PROMPT_KEY, "prompt_encoder."),
        merge_refusal="it prepends learned keys and values to every attention",
        lift_refusal="its keys and values lengthen every attention, not a weight",
        transforms_inputs=True,
        cache_prefix=_cache_prefix,
        describe_site=lambda parts: {"virtual_tokens": (parts.get(PROMPT_KEY) or [None])[0]},
    )
)
