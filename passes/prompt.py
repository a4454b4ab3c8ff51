"""What the prompt methods share: ``inputs_embeds = [P; E(x)]``, an input transform applied at capture.

The methods themselves (config, registration) are :mod:`peftc.passes.prompt_tuning` and
:mod:`peftc.passes.p_tuning`; prefix tuning (:mod:`peftc.passes.prefix`) builds on the same pass.


Both methods prepend ``n = num_virtual_tokens`` learned vectors P ``[n, token_dim]`` to the token
embeddings E(x). Prompt tuning trains P directly; P-tuning computes P = encoder(Emb ``[n, d]``) with
an MLP (Lin→ReLU→Lin→ReLU→Lin) or a bidirectional LSTM followed by Lin→ReLU→Lin. Exactly as HF
PEFT 0.21 (``PeftModelForCausalLM.forward`` / ``PeftModelForSequenceClassification.forward``):

* the attention mask gets ``n`` leading ones; BERT's ``token_type_ids`` get ``n`` leading zeros;
* ``position_ids`` are *dropped* (HF PEFT warns and passes ``None``), so the model numbers the
  ``n + seq`` positions by its own rule from the extended mask: ``0..n+seq-1`` whatever the padding
  (GPT-2, LLaMA: from the cache position), or counting only unmasked tokens (OPT: ``cumsum(mask)·mask - 1``;
  Bloom's ALiBi likewise). Prompt programs therefore have no ``position_ids`` input (graph inputs:
  ``input_ids``, ``attention_mask`` (+ ``token_type_ids``)) and never number positions themselves;
* causal-lm logits cover the virtual tokens too: ``[batch, n + seq, vocab]`` (HF's shape); the loss
  labels those positions -100 (:meth:`peftc.tasks.TaskSpec.loss`), and real token ``i`` is row
  ``n + i``. Seq-cls logits are ``[batch, labels]``; GPT-2/LLaMA heads pool the last position (HF
  passes no ``input_ids``, so no pad-aware pooling), which peftc reproduces;
* P is computed once and repeated over the batch (HF's ``get_prompt``).

These methods change the model's inputs, not its linear layers, so :class:`PromptPass` does not
rewrite the base graph: it re-captures the program's eager model through a :class:`PromptTaskModule`
(``capture(..., transform=...)``) that holds the prompt module as the submodule ``prompt``.

On disk (HF PEFT's format) the adapter is one tensor ``prompt_embeddings`` ``[n, token_dim]``: for
P-tuning the encoder's *output*. A loaded adapter binds those fixed embeddings (HF PEFT's inference
mode). While P-tuning trains, :class:`~peftc.adapters.AdapterState` holds the encoder's parameters
as ``prompt_encoder.<param>`` and writes ``prompt_embeddings`` computed from them; a checkpoint
(``inference_mode=False``) also keeps the encoder parameters, so a resumed run continues the encoder.

Prefix tuning (passes/prefix.py) is the same kind of method: :class:`PromptPass` holds the machinery both
use (config fields from the model, fresh / checkpoint / fixed binding of the prompt tensors, HF PEFT's
on-disk keys, the re-capture) and :class:`~peftc.passes.prefix.PrefixPass` overrides the prompt module and
the wrapper.

Grouped-query attention: after prepending, keys and values are ``n + seq`` long, and transformers' SDPA
path repeats the key/value heads with ``expand`` + ``reshape``; the reshape's contiguity check asks
torch.export to prove ``min(d·(s+n), kv·d·(s+n)) == d·(s+n)``, which its symbolic solver cannot do with the
offset ``n`` (it can without one), so the capture failed. :func:`export_attention` swaps in, for the
capture only, an SDPA attention that repeats heads with ``index_select``: the same values, no reshape.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from peftc.adapters import AdapterState
from peftc.config import PromptLearningConfig
from peftc.errors import AdapterMismatchError, ConfigError
from peftc.methods import Method
from peftc.program import Program, Site, capture
from peftc.tasks import TaskModule, TaskSpec

from .base import InPlacePass, PassManager, PassResult, SiteDecision
from .modules_to_save import ModulesToSavePass

__all__ = [
    "PROMPT_KEY",
    "PromptModule",
    "PromptPass",
    "PromptTaskModule",
    "export_attention",
    "fill_model_fields",
    "prompt_cache_prefix",
    "prompt_method",
    "prompt_prefix",
]

logger = logging.getLogger(__name__)

#: HF PEFT's key of the saved prompt.
PROMPT_KEY = "prompt_embeddings"
#: Key prefix of a P-tuning encoder's parameters while it trains (never in a final adapter).
ENCODER_PREFIX = "prompt_encoder."
#: Name of the prompt module inside the captured wrapper (graph parameters ``prompt.<param>``).
PROMPT_ATTR = "prompt"
_PEFT_MODEL = "base_model.model."


class PromptModule(nn.Module):
    """The virtual-token embeddings, optionally through a P-tuning encoder (HF PEFT's module names).

    ``forward(batch_size)`` returns P ``[batch, n, token_dim]``.
    """

    def __init__(self, num_tokens: int, token_dim: int, encoder: str | None = None, hidden: int = 0, **lstm: Any):
        super().__init__()
        self.num_tokens, self.encoder_type = num_tokens, encoder
        self.embedding = nn.Embedding(num_tokens, token_dim)
        if encoder == "LSTM":
            self.lstm_head = nn.LSTM(
                input_size=token_dim,
                hidden_size=hidden,
                num_layers=lstm.get("num_layers", 2),
                dropout=lstm.get("dropout", 0.0),
                bidirectional=True,
                batch_first=True,
            )
            self.mlp_head = nn.Sequential(
                nn.Linear(hidden * 2, hidden * 2), nn.ReLU(), nn.Linear(hidden * 2, token_dim)
            )
        elif encoder == "MLP":
            self.mlp_head = nn.Sequential(
                nn.Linear(token_dim, hidden),
                nn.ReLU(),
                nn.Linear(hidden, hidden),
                nn.ReLU(),
                nn.Linear(hidden, token_dim),
            )
        elif encoder is not None:
            raise ConfigError(f"prompt encoder {encoder!r} is not MLP or LSTM")

    def encode(self) -> torch.Tensor:
        """P for one row: ``[1, n, token_dim]``."""
        tokens = torch.arange(self.num_tokens, device=self.embedding.weight.device).unsqueeze(0)
        x = self.embedding(tokens)
        if self.encoder_type == "LSTM":
            x = self.mlp_head(self.lstm_head(x)[0])
        elif self.encoder_type == "MLP":
            x = self.mlp_head(x)
        return x

    def forward(self, batch_size: Any) -> torch.Tensor:
        return self.encode().expand(batch_size, -1, -1)


class PromptTaskModule(TaskModule):
    """TaskModule that prepends the prompt to the input embeddings (HF PEFT's prompt-learning forward)."""

    def __init__(self, model: nn.Module, input_names: list[str], prompt: PromptModule):
        # HF PEFT drops position_ids, so the model numbers positions from the mask it gets, by its own rule
        # (a left-padded row starts at n on OPT, at n + pads on GPT-2): no positions are made up here
        super().__init__(model, [n for n in input_names if n != "position_ids"])
        self.prompt = prompt
        self.extra_positions = prompt.num_tokens  # capture limits the sequence dim to max_positions - n

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        kwargs = dict(zip(self.input_names, inputs, strict=True))
        input_ids, mask = kwargs.pop("input_ids"), kwargs.pop("attention_mask")
        batch, n = input_ids.shape[0], self.prompt.num_tokens
        embeds = self.model.get_input_embeddings()(input_ids)
        embeds = torch.cat((self.prompt(batch).to(embeds.dtype), embeds), dim=1)
        kwargs["attention_mask"] = torch.cat((mask.new_ones(batch, n), mask), dim=1)
        if "token_type_ids" in kwargs:
            types = kwargs["token_type_ids"]
            kwargs["token_type_ids"] = torch.cat((types.new_zeros(batch, n), types), dim=1)
        return self.model(inputs_embeds=embeds, **kwargs, **self._extra, return_dict=True).logits


def fill_model_fields(config: PromptLearningConfig, model_config: Any) -> None:
    """Fill ``token_dim`` & co. from the base model's config where unset (HF PEFT does the same)."""

    def get(*keys: str) -> Any:
        for key in keys:
            value = getattr(model_config, key, None)
            if isinstance(value, int):
                return value
        return None

    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 1
    if config.num_layers is None:
        config.num_layers = get("num_hidden_layers", "n_layer", "num_layers")
    if config.token_dim is None:
        config.token_dim = get("hidden_size", "n_embd", "d_model")
    if config.num_attention_heads is None:
        config.num_attention_heads = get("num_attention_heads", "n_head", "num_heads")
    if config.holds_key_values and get("num_key_value_heads") is not None and config.token_dim:
        # HF PEFT's rule for grouped-query attention (peft#1901): the prefix holds keys/values, so its width and
        # head count are the key/value heads' (always recomputed, as HF PEFT does)
        head_dim = get("head_dim") or config.token_dim // config.num_attention_heads
        config.num_attention_heads = get("num_key_value_heads")
        config.token_dim = head_dim * config.num_attention_heads
    if hasattr(config, "encoder_hidden_size") and config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
    if config.token_dim is None:
        raise ConfigError(
            f"cannot read the embedding size of {getattr(model_config, 'model_type', 'this model')}; "
            "set token_dim in the adapter config"
        )


def _init_embedding(config: PromptLearningConfig, module: PromptModule, word_embeddings: nn.Embedding) -> None:
    """HF PEFT's PromptEmbedding init: N(0, 1), or the rows of the vocabulary tokens the config picks."""
    ids = config.initial_token_ids(module.num_tokens, word_embeddings.num_embeddings)
    if ids is None:
        return
    weight = word_embeddings(ids.to(word_embeddings.weight.device)).detach().clone().to(torch.float32)
    module.embedding.weight = nn.Parameter(weight)


def _hf_key(key: str) -> str:
    """HF PEFT wraps no ``LoraModel`` around a prompt-learning model: its head is ``base_model.classifier.weight``."""
    return "base_model." + key.removeprefix(_PEFT_MODEL) if key.startswith(_PEFT_MODEL) else key


def _peftc_keys(state: AdapterState) -> None:
    """Rename HF PEFT's prompt-learning head keys (``base_model.<p>``) to peftc's (``base_model.model.<p>``)."""
    for key in [k for k in state.tensors if k.startswith("base_model.") and not k.startswith(_PEFT_MODEL)]:
        state.tensors[_PEFT_MODEL + key.removeprefix("base_model.")] = state.tensors.pop(key)


def _saved_tensors(module: PromptModule, state: AdapterState) -> dict[str, torch.Tensor]:
    """HF PEFT's file: ``prompt_embeddings`` (an encoder's output) and the head under HF's keys.

    An encoder's own parameters are written only while training (checkpoints, ``inference_mode=False``).
    """
    with torch.no_grad():
        was_training = module.training
        module.eval()
        prompt = module.encode()[0]
        module.train(was_training)
    out = {_hf_key(k): t for k, t in state.tensors.items() if not k.startswith(ENCODER_PREFIX)}
    out[PROMPT_KEY] = prompt
    if not state.config.inference_mode:
        out.update({k: t for k, t in state.tensors.items() if k.startswith(ENCODER_PREFIX)})
    return out


#: Attention implementation used while capturing a prepending method on a grouped-query model.
_GQA_IMPL = "sdpa_without_vmap_gqa"


class _SharedHeads:
    """The attention module as ``sdpa_attention_forward`` sees it once keys/values have every query head."""

    def __init__(self, module: nn.Module):
        self.is_causal = getattr(module, "is_causal", True)


def _sdpa_repeat_by_index(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention with key/value heads repeated by ``index_select`` (equal to ``repeat_kv``)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        heads = torch.arange(key.shape[1] * groups, device=key.device).div(groups, rounding_mode="floor")
        key, value = key.index_select(1, heads), value.index_select(1, heads)
        module = _SharedHeads(module)
    return sdpa_attention_forward(module, query, key, value, *args, **kwargs)


@contextmanager
def export_attention(model: nn.Module) -> Iterator[None]:
    """While active, a grouped-query ``model`` captures with keys/values of any length ``n + seq``.

    transformers repeats key/value heads with ``expand`` + ``reshape``; with a sequence ``s + n`` torch.export
    cannot prove the reshape's contiguity guard and the capture fails (see the module docstring). This swaps
    the model's SDPA attention for :func:`_sdpa_repeat_by_index` (same values, same mask function) and
    restores it on exit. Models without grouped heads, or not on SDPA, are left alone.

    Args:
        model: the eager transformers model about to be captured.
    """
    from peftc.program import _MASK_IMPL, _register_mask_without_vmap

    grouped = any(getattr(m, "num_key_value_groups", 1) > 1 for m in model.modules())
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
    swapped = [c for c in configs.values() if getattr(c, "_attn_implementation", None) in ("sdpa", _MASK_IMPL)]
    if not grouped or not swapped:
        yield
        return
    from transformers.integrations.executorch import sdpa_mask_without_vmap
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    _register_mask_without_vmap()
    if _GQA_IMPL not in ALL_MASK_ATTENTION_FUNCTIONS:
        ALL_MASK_ATTENTION_FUNCTIONS.register(_GQA_IMPL, sdpa_mask_without_vmap)
        ALL_ATTENTION_FUNCTIONS.register(_GQA_IMPL, _sdpa_repeat_by_index)
    before = [c._attn_implementation for c in swapped]
    try:
        for c in swapped:
            c._attn_implementation = _GQA_IMPL
        yield
    finally:
        for c, impl in zip(swapped, before, strict=True):
            c._attn_implementation = impl


class PromptPass(InPlacePass):
    """Re-captures the program with num_virtual_tokens learned embeddings prepended to its inputs."""

    #: Name of the program's site (HF PEFT's ``prompt_encoder`` module dict).
    site_name = "prompt_encoder"

    def __init__(self, config: PromptLearningConfig, state: AdapterState | None = None):
        self.config = config
        self.state = state

    def plan(self, program: Program) -> list[SiteDecision]:
        n = self.config.num_virtual_tokens
        return [SiteDecision("input_embeddings", "embedding", "rewrite", details={"num_virtual_tokens": n})]

    def run(self, program: Program) -> PassResult:
        if program.source is None:
            raise ConfigError(
                f"{self.config.peft_type} re-captures the model, but this program has no eager model; "
                "capture it with peftc.program.capture"
            )
        if program.sites or program.history:
            raise ConfigError(
                f"{self.config.peft_type} must be the first pass on a fresh capture; this program already ran "
                f"{', '.join(program.history) or 'other passes'}"
            )
        cfg = self.config
        _check_submodules(cfg, program.model_config)
        fill_model_fields(cfg, program.model_config)
        model = program.source.model
        self._check_model(cfg, model, program)
        state = self.state if self.state is not None else AdapterState(cfg)
        _peftc_keys(state)
        module = self._prompt_module(cfg, state, model)
        state.to_saved = lambda s, m=module: _saved_tensors(m, s)
        module.train(program.mode == "train")
        prompted = getattr(program.wrapper, "prompted", None)  # a wrapper with its own prompt rule (seq2seq graphs)
        with export_attention(model):
            if prompted is not None:
                wrap = lambda m, names: prompted(m, module, cfg)  # noqa: E731
            else:
                wrap = lambda m, names: self._wrapper(m, names, module, program.task)  # noqa: E731
            new = capture(model, program.task, program.mode, transform=wrap)
        program.graph_module = new.graph_module
        program.input_names = new.input_names
        program.dynamic_dims = new.dynamic_dims
        program.example_inputs = new.example_inputs
        program.max_sequence = new.max_sequence
        program.adapter = state
        program.sites[self.site_name] = Site(
            name=self.site_name,
            method=cfg.peft_type,
            module_type=type(module).__name__,
            in_features=module.num_tokens,
            out_features=self._width(cfg),
        )
        logger.info(
            "%s: %d virtual tokens, %d adapter parameters", cfg.peft_type, module.num_tokens, state.num_parameters()
        )
        return PassResult(program, True)

    # -- what prefix tuning overrides ---------------------------------------------------------------

    def _check_model(self, cfg: PromptLearningConfig, model: nn.Module, program: Program) -> None:
        """Raise when the model cannot take this method (prompt methods take any embedding model)."""

    def _width(self, cfg: PromptLearningConfig) -> int:
        """Width of the saved ``prompt_embeddings`` rows."""
        return int(cfg.token_dim)

    def _rows(self, cfg: PromptLearningConfig) -> int:
        """Rows of the saved ``prompt_embeddings``: HF PEFT keeps ``n`` per transformer submodule (``2n`` for
        an encoder-decoder, of which its forward uses the first ``n``)."""
        return int(cfg.num_virtual_tokens) * int(cfg.num_transformer_submodules)

    def _wrapper(self, model: nn.Module, input_names: list[str], module: PromptModule, task: TaskSpec) -> TaskModule:
        return PromptTaskModule(model, input_names, module)

    def _fresh_module(self, cfg: PromptLearningConfig, n: int, d: int) -> PromptModule:
        encoder = cfg.encoder_spec()  # P-tuning: its encoder's type, hidden size and LSTM options
        return PromptModule(n, d, **encoder) if encoder else PromptModule(n, d)

    def _init(self, cfg: PromptLearningConfig, module: PromptModule, model: nn.Module) -> None:
        _init_embedding(cfg, module, model.get_input_embeddings())

    # -- shared binding ------------------------------------------------------------------------------

    def _prompt_module(self, cfg: PromptLearningConfig, state: AdapterState, model: nn.Module) -> PromptModule:
        """Fresh (new init), checkpoint (``prompt_encoder.*``: the encoder trains on) or fixed ``prompt_embeddings``."""
        n, d = self._rows(cfg), self._width(cfg)
        encoder_keys = {k for k in state.tensors if k.startswith(ENCODER_PREFIX)}
        fresh = self.state is None or (not state.loaded and not encoder_keys and PROMPT_KEY not in state.tensors)
        if fresh:
            module = self._fresh_module(cfg, n, d)
            self._init(cfg, module, model)
            if module.encoder_type is None:
                state.tensors[PROMPT_KEY] = module.embedding.weight
            else:
                state.tensors.update({ENCODER_PREFIX + k: p for k, p in module.named_parameters()})
            return module
        if encoder_keys:  # a checkpoint of an encoder (P-tuning, prefix projection): the encoder continues training
            module = self._fresh_module(cfg, n, d)
            for name, param in list(module.named_parameters()):
                key = ENCODER_PREFIX + name
                if key not in state.tensors:
                    raise AdapterMismatchError(f"adapter has no tensor {key} of the {cfg.peft_type} prompt encoder")
                _check_shape(state.tensors[key], tuple(param.shape), key, cfg)
                owner, _, attr = name.rpartition(".")
                setattr(module.get_submodule(owner), attr, state.tensors[key])
            extra = sorted(encoder_keys - {ENCODER_PREFIX + k for k, _ in module.named_parameters()})
            if extra:
                raise AdapterMismatchError(f"adapter tensor {extra[0]} is not a parameter of the configured encoder")
            return module
        if PROMPT_KEY not in state.tensors:
            raise AdapterMismatchError(
                f"{cfg.peft_type} adapter has no tensor {PROMPT_KEY!r}; is it an HF PEFT prompt-learning adapter?"
            )
        module = PromptModule(n, d)  # fixed (or directly trained) embeddings: HF PEFT's inference mode
        _check_shape(state.tensors[PROMPT_KEY], (n, d), PROMPT_KEY, cfg)
        module.embedding.weight = state.tensors[PROMPT_KEY]
        return module


def _check_submodules(config: PromptLearningConfig, model_config: Any) -> None:
    """HF PEFT's rule: 2 transformer submodules for an encoder-decoder (``SEQ_2_SEQ_LM``), else 1; fill or check it."""
    wanted = 2 if getattr(model_config, "is_encoder_decoder", False) else 1
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = wanted
    elif config.num_transformer_submodules != wanted:
        kind = "an encoder-decoder" if wanted == 2 else "not an encoder-decoder"
        raise ConfigError(
            f"{config.peft_type} adapter has num_transformer_submodules={config.num_transformer_submodules}, but "
            f"{getattr(model_config, 'model_type', 'this model')} is {kind} (HF PEFT uses {wanted}); the adapter was "
            "made for another kind of model"
        )


def _check_shape(tensor: torch.Tensor, shape: tuple[int, ...], key: str, cfg: PromptLearningConfig) -> None:
    if tuple(tensor.shape) != shape:
        raise AdapterMismatchError(
            f"adapter tensor {key} has shape {list(tensor.shape)} but {cfg.peft_type} with num_virtual_tokens="
            f"{cfg.num_virtual_tokens} on this model (token_dim={cfg.token_dim}, num_layers={cfg.num_layers}) needs "
            f"{list(shape)}; the adapter was made for another model"
        )


def _prompt_pipeline(config: PromptLearningConfig, state: AdapterState | None) -> PassManager:
    """An input transform applied by re-capturing (see passes/prompt.py), then the head (modules_to_save)."""
    name = config.peft_type.lower().replace("_", "-")
    return PassManager(f"{name}-insert", [PromptPass(config, state), ModulesToSavePass(config.modules_to_save)])


def prompt_cache_prefix(model: Any, state: AdapterState) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """With-past exports: the virtual tokens' keys/values through ``model`` (they attend only to each other)."""
    return prompt_prefix(model, state.tensors[PROMPT_KEY].detach())


@torch.no_grad()
def prompt_prefix(model: nn.Module, prompt: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer keys/values of virtual-token embeddings ``prompt`` ``[n, hidden]`` run through ``model``.

    The virtual tokens come first and attend only to each other (causal attention, mask of ones),
    so this is exactly the cache a prompt-tuned model holds for them after any first step.
    """
    was_training = model.training
    model.eval()
    try:
        out = model(inputs_embeds=prompt[None].to(next(model.parameters()).dtype), use_cache=True, return_dict=True)
    finally:
        model.train(was_training)
    return [(layer.keys.detach(), layer.values.detach()) for layer in out.past_key_values.layers]


def prompt_method(config_class: type[PromptLearningConfig], label: str, cli_name: str) -> Method:
    """The descriptor of a method that prepends virtual token embeddings (prompt tuning, P-tuning)."""
    return Method(
        peft_type=config_class.peft_type,
        config_class=config_class,
        label=label,
        cli_names={cli_name: {}},
        pipeline=_prompt_pipeline,
        markers=(PROMPT_KEY, "prompt_encoder."),
        merge_refusal="it prepends virtual tokens to the inputs",
        lift_refusal="its virtual tokens change the sequence length, not a weight",
        transforms_inputs=True,
        cache_prefix=prompt_cache_prefix,
        describe_site=lambda parts: {"virtual_tokens": (parts.get(PROMPT_KEY) or [None])[0]},
    )
