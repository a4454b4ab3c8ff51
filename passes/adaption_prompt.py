"""LLaMA-Adapter (HF PEFT's "adaption prompt"): gated attention to learned prompt tokens, a graph rewrite.

In each of the top ``adapter_layers`` attention modules (names ending with ``.<target_modules>``), with
P ``[1, adapter_len, hidden]`` and a scalar gate g, exactly as HF PEFT 0.21's ``AdaptedAttention``::

    K = k_proj(P), V = v_proj(P)            (GPT-2: K, V = the key/value thirds of c_attn(P), bias included)
    K, V: [1, kv_heads, len, head_dim], repeated to the query heads (grouped-query attention)
    A = g · softmax(Q·Kᵀ / √head_dim)        (a softmax of its own, in fp32; no mask: every position sees P)
    out = attention(x) + o_proj(A·V)         (GPT-2: no output projection, ``out = attention(x) + A·V``)

Q is the layer's own query after RoPE: the first argument of the module's
``scaled_dot_product_attention`` node. K/V/O use the layer's own ``k_proj``/``v_proj``/``o_proj``
weights (the get_attr nodes the graph already has), so the base parameters stay shared and frozen.
``out`` is the attention module's output (after GPT-2's ``resid_dropout`` in train programs, as HF
wraps the whole module). The prompt does not change the model's inputs, so this is an in-place graph
rewrite, not a re-capture. P starts ``N(0, 1)`` and g at 0, so a fresh adapter is the base model
exactly — unless ``o_proj`` has a bias (LLaMA ``attention_bias=True``), which HF PEFT adds a second
time (``o_proj(0) = bias``); peftc follows HF.

Saved as HF PEFT does: ``base_model.model.<attention module>.adaption_prompt`` ``[1, len, hidden]`` and
``.adaption_gate`` ``[1]``. HF PEFT supports the model types llama, mistral and gpt2; so does this pass.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx, nn

from peftc.adapters import AdapterState, graph_path, peft_key
from peftc.config import MethodConfig, help_field
from peftc.errors import AdapterMismatchError, ConfigError, TargetNotFoundError
from peftc.methods import Method, register_method
from peftc.program import MODEL_PREFIX, Program, Site

from .base import InPlacePass, PassManager, PassResult, SiteDecision, add_call, add_param, finish
from .targets import LinearSite, check_all_used, find_linear_sites, suffix_names

__all__ = [
    "ADAPTION_PROMPT_METHOD",
    "ADAPTION_PROMPT_TARGETS",
    "AdaptionPromptConfig",
    "ADAPTION_GATE",
    "ADAPTION_MARKER",
    "ADAPTION_PROMPT",
    "PROJECTIONS",
    "AdaptionPromptPass",
    "AttentionSite",
    "attention_modules",
    "is_adaption_prompt_node",
]

logger = logging.getLogger(__name__)
aten = torch.ops.aten

ADAPTION_PROMPT = "adaption_prompt"
ADAPTION_GATE = "adaption_gate"
#: Prefix of every tensor name this method saves (HF PEFT's ``is_adaption_prompt_trainable``).
ADAPTION_MARKER = "adaption_"
#: HF PEFT's ``TRANSFORMERS_MODEL_CONFIG``: model type -> (k, v, o) projection submodules; one fused
#: ``c_attn`` gives GPT-2's keys and values, and GPT-2 applies no output projection.
PROJECTIONS: dict[str, tuple[str, str, str | None]] = {
    "llama": ("k_proj", "v_proj", "o_proj"),
    "mistral": ("k_proj", "v_proj", "o_proj"),
    "gpt2": ("c_attn", "c_attn", None),
}
_SDPA = aten.scaled_dot_product_attention.default

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

    target_modules: str | None = help_field(
        "Name of the attention submodules to adapt: every module whose name ends with '.<target_modules>'. "
        "Default: self_attn (llama, mistral) or attn (gpt2).",
        default=None,
    )
    adapter_len: int = help_field("Number of adaption prompt tokens per adapted layer.", default=10)
    adapter_layers: int | None = help_field(
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


METHOD = AdaptionPromptConfig.peft_type


@dataclass
class AttentionSite:
    """One attention module the pass can adapt, and the graph nodes it builds on."""

    name: str  # HF module name, e.g. model.layers.1.self_attn
    module_type: str
    query: fx.Node  # [batch, heads, seq, head_dim], after RoPE: the SDPA's first argument
    output: fx.Node  # the module's output [batch, seq, hidden]
    key: LinearSite  # k_proj (GPT-2: c_attn)
    value: LinearSite  # v_proj (GPT-2: c_attn)
    out_proj: LinearSite | None  # o_proj (GPT-2: None)
    hidden: int
    num_heads: int
    kv_heads: int
    head_dim: int

    @property
    def fused(self) -> bool:
        return self.key is self.value


def _in_module(node: fx.Node, name: str) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    path = MODEL_PREFIX + name
    return any(entry[0] == path for entry in stack.values())


def attention_modules(program: Program) -> list[str]:
    """Modules that call ``scaled_dot_product_attention`` directly (the candidates for ``target_modules``)."""
    names: dict[str, None] = {}
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target == _SDPA:
            stack = node.meta.get("nn_module_stack") or {}
            if stack:
                path = list(stack.values())[-1][0]
                if path.startswith(MODEL_PREFIX):
                    names.setdefault(path.removeprefix(MODEL_PREFIX), None)
    return list(names)


def _static(value: Any) -> int | None:
    return value if isinstance(value, int) else None


class AdaptionPromptPass(InPlacePass):
    """Adds g·softmax(Q·k_proj(P)ᵀ/√d)·v_proj(P), through o_proj, to the top adapter_layers attention outputs."""

    def __init__(self, config: AdaptionPromptConfig, state: AdapterState | None = None):
        self.config = config
        self.state = state

    # -- finding -----------------------------------------------------------------------------
    def _model_type(self, program: Program) -> str:
        model_type = getattr(program.model_config, "model_type", None)
        if model_type not in ADAPTION_PROMPT_TARGETS:
            raise ConfigError(
                f"adaption prompt (LLaMA-Adapter) does not support model type {model_type!r}; HF PEFT 0.21 and peftc "
                f"support {', '.join(sorted(ADAPTION_PROMPT_TARGETS))}; use another method (lora, ia3) for this model"
            )
        return model_type

    def _layers(self, program: Program) -> tuple[str, list[str], int]:
        """(target_modules, every matching module in model order, how many from the top are adapted)."""
        model_type = self._model_type(program)
        target = self.config.target_modules or ADAPTION_PROMPT_TARGETS[model_type]
        candidates = [name for name in program.module_types if name.endswith("." + target)]
        if not candidates:
            attention = attention_modules(program)
            raise TargetNotFoundError(
                f"adaption prompt target_modules={target!r} matched no module of this {model_type} model; attention "
                f"modules here: {', '.join(suffix_names(attention)) or 'none'} "
                f"(e.g. {attention[0] if attention else 'none'}); set target_modules to one of them"
            )
        count = self.config.adapter_layers if self.config.adapter_layers is not None else len(candidates)
        if count > len(candidates):
            raise ConfigError(
                f"adapter_layers={count} exceeds the {len(candidates)} {target!r} modules of this model "
                f"({candidates[0]} ... {candidates[-1]}); use adapter_layers <= {len(candidates)}"
            )
        return target, candidates, count

    def plan(self, program: Program) -> list[SiteDecision]:
        target, candidates, count = self._layers(program)
        chosen = set(candidates[len(candidates) - count :])
        decisions = []
        for name in candidates:
            cls = program.module_types[name]
            if name not in chosen:
                decisions.append(SiteDecision(name, cls, "skip", f"below the top adapter_layers={count} layers"))
                continue
            site = self._analyse(program, name)
            if isinstance(site, str):
                decisions.append(SiteDecision(name, cls, "skip", site))
            else:
                details = {
                    "adapter_len": self.config.adapter_len,
                    "hidden": site.hidden,
                    "heads": site.num_heads,
                    "kv_heads": site.kv_heads,
                    "head_dim": site.head_dim,
                }
                decisions.append(SiteDecision(name, cls, "rewrite", details=details))
        return decisions

    def _analyse(self, program: Program, name: str) -> AttentionSite | str:
        """The site's nodes, or the reason it cannot be adapted."""
        k_name, v_name, o_name = PROJECTIONS[program.model_config.model_type]
        inside = [n for n in program.graph.nodes if n.op == "call_function" and _in_module(n, name)]
        sdpa = [n for n in inside if n.target == _SDPA]
        if len(sdpa) != 1:
            attention = suffix_names(attention_modules(program))
            return (
                f"{len(sdpa)} scaled_dot_product_attention calls inside (need exactly 1; attention modules here: "
                f"{', '.join(attention) or 'none'}; load the model with attn_implementation='sdpa')"
            )
        query = sdpa[0].args[0]
        q_val = query.meta.get("val") if isinstance(query, fx.Node) else None
        if q_val is None or q_val.dim() != 4 or _static(q_val.shape[1]) is None or _static(q_val.shape[3]) is None:
            return "the attention query has no static [batch, heads, seq, head_dim] shape in the graph"
        num_heads, head_dim = int(q_val.shape[1]), int(q_val.shape[3])
        linears: dict[str, list[LinearSite]] = {}
        for site in find_linear_sites(program):
            linears.setdefault(site.name, []).append(site)
        proj = {}
        for role, sub in (("k", k_name), ("v", v_name), ("o", o_name)):
            if sub is None:
                proj[role] = None
                continue
            calls = linears.get(f"{name}.{sub}", [])
            if len(calls) != 1:
                return f"{name}.{sub} is called {len(calls)} times in the graph (need exactly 1)"
            proj[role] = calls[0]
        gm = program.graph_module
        k_in, k_out = proj["k"].features(gm)
        # the module's output: the tensor computed from the attention that leaves the module (other tensors
        # may leave it too: torch.export shares e.g. RoPE's unsqueezed cos/sin with the next layers)
        inside_set, after, todo = set(inside), set(), [sdpa[0]]
        while todo:
            node = todo.pop()
            if node not in after:
                after.add(node)
                todo.extend(user for user in node.users if user in inside_set)
        outputs = [
            n
            for n in inside
            if n in after
            and isinstance(n.meta.get("val"), torch.Tensor)
            and any(user.op == "output" or not _in_module(user, name) for user in n.users)
        ]
        if len(outputs) != 1:
            return f"{len(outputs)} tensors computed from its attention leave the module (need exactly 1, its output)"
        out_val = outputs[0].meta["val"]
        if out_val.dim() != 3 or _static(out_val.shape[-1]) != k_in:
            return f"its output has shape {list(out_val.shape)}, not [batch, seq, {k_in}]"
        if proj["o"] is None:  # GPT-2: c_attn holds q, k, v of width hidden each
            if k_out != 3 * k_in or num_heads * head_dim != k_in:
                return f"c_attn maps {k_in} -> {k_out} features; HF PEFT expects {k_in} -> {3 * k_in}"
            kv_heads = num_heads
        else:
            factor = k_in // k_out if k_out else 0  # HF PEFT's rule for grouped-query attention
            kv_heads = num_heads // factor if factor else 0
            if not kv_heads or kv_heads * head_dim != k_out or num_heads % kv_heads:
                return (
                    f"k_proj maps {k_in} -> {k_out} features with {num_heads} heads of {head_dim}; HF PEFT's adaption "
                    "prompt needs k_proj out = heads / (in // out) * head_dim"
                )
        return AttentionSite(
            name=name,
            module_type=program.module_types[name],
            query=query,
            output=outputs[0],
            key=proj["k"],
            value=proj["v"],
            out_proj=proj["o"],
            hidden=k_in,
            num_heads=num_heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
        )

    # -- changing ----------------------------------------------------------------------------
    def run(self, program: Program) -> PassResult:
        if any(site.method != METHOD for site in program.sites.values()):
            others = sorted({site.method for site in program.sites.values()})
            raise ConfigError(
                f"adaption prompt cannot be combined with {', '.join(others)} on one program (HF PEFT allows one "
                "method per model); capture the model again"
            )
        target, candidates, count = self._layers(program)
        names = candidates[len(candidates) - count :]
        stacked = [name for name in names if name in program.sites]
        if stacked:
            raise ConfigError(f"{stacked[0]} already has an adaption prompt; HF PEFT cannot stack two either")
        sites = []
        for name in names:
            site = self._analyse(program, name)
            if isinstance(site, str):
                raise TargetNotFoundError(
                    f"cannot add an adaption prompt to {name} (target_modules={target!r}): {site}; attention modules "
                    f"here: {', '.join(suffix_names(attention_modules(program))) or 'none'}"
                )
            sites.append(site)
        # as HF PEFT's prepare_config: a saved config always holds what was adapted
        self.config.target_modules = target
        self.config.adapter_layers = count
        state = self.state if self.state is not None else AdapterState(self.config)
        fresh = self.state is None
        used: set[str] = set()
        for site in sites:
            prompt, gate = self._tensors(program, site, state, fresh)
            self._insert(program, site, prompt, gate)
            used |= {peft_key(site.name, ADAPTION_PROMPT), peft_key(site.name, ADAPTION_GATE)}
            program.sites[site.name] = Site(site.name, METHOD, site.module_type, site.hidden, site.hidden)
        if not fresh:
            check_all_used(state, used, ADAPTION_MARKER)
        program.adapter = state
        finish(program)
        logger.info(
            "%s: %d layers (%s), %d adapter parameters", self.name, len(sites), names[0], state.num_parameters()
        )
        return PassResult(program, True)

    def _tensors(
        self, program: Program, site: AttentionSite, state: AdapterState, fresh: bool
    ) -> tuple[nn.Parameter, nn.Parameter]:
        key_p, key_g = peft_key(site.name, ADAPTION_PROMPT), peft_key(site.name, ADAPTION_GATE)
        shapes = {key_p: (1, self.config.adapter_len, site.hidden), key_g: (1,)}
        if fresh and key_p not in state.tensors:
            # HF PEFT: the prompt in the dtype of the attention's weights, N(0, 1); the gate zero ("zero-init")
            dtype = _adapter_dtype(program, site)
            state.tensors[key_p] = nn.Parameter(torch.empty(shapes[key_p], dtype=dtype).normal_())
            state.tensors[key_g] = nn.Parameter(torch.zeros(1, dtype=dtype))
        for key, shape in shapes.items():
            if key not in state.tensors:
                raise AdapterMismatchError(
                    f"adapter has no tensor {key} for adapted attention {site.name}; was it made for another model or "
                    "with other adapter_layers?"
                )
            got = tuple(state.tensors[key].shape)
            if got != shape:
                raise AdapterMismatchError(
                    f"adapter tensor {key} has shape {list(got)} but {site.name} needs {list(shape)} "
                    f"(adapter_len={self.config.adapter_len}, hidden={site.hidden}); the adapter was made for another "
                    "base model or adapter_len"
                )
        return state.tensors[key_p], state.tensors[key_g]

    def _insert(self, program: Program, site: AttentionSite, prompt: nn.Parameter, gate: nn.Parameter) -> None:
        graph, out, tag = program.graph, site.output, site.name
        length, heads, kv, hd = self.config.adapter_len, site.num_heads, site.kv_heads, site.head_dim
        q_dtype = site.query.meta["val"].dtype

        def call(target: Any, args: tuple, role: str, **kwargs: Any) -> fx.Node:
            return add_call(program, target, args, out, tag, f"adaption_{role}", kwargs=kwargs or None)

        with graph.inserting_before(out.next):
            p_node = add_param(program, graph_path(peft_key(tag, ADAPTION_PROMPT)), prompt, tag, like=out)
            g_node = add_param(program, graph_path(peft_key(tag, ADAPTION_GATE)), gate, tag, like=out)
            # a loaded adapter in another dtype (fp32 file, bf16 model): HF PEFT copies it into parameters of
            # the model's dtype, so it computes with the rounded values; so does the graph
            p_node = _cast(program, p_node, _adapter_dtype(program, site), out, tag)
            g_node = _cast(program, g_node, _adapter_dtype(program, site), out, tag)
            if site.fused:  # GPT-2 Conv1D: addmm(b, P2d, W) -> [len, 3·hidden]; K, V are its 2nd and 3rd thirds
                base = site.key.node
                p2d = call(aten.reshape.default, (p_node, [length, site.hidden]), "prompt_2d")
                qkv = call(aten.addmm.default, (base.args[0], p2d, base.args[2]), "kv")
                qkv = call(aten.reshape.default, (qkv, [1, length, 3 * site.hidden]), "kv_3d")
                h = site.hidden
                key = call(aten.slice.Tensor, (qkv, 2, h, 2 * h), "k")
                value = call(aten.slice.Tensor, (qkv, 2, 2 * h, 3 * h), "v")
            else:
                key = call(aten.linear.default, (p_node, *site.key.node.args[1:]), "k")
                value = call(aten.linear.default, (p_node, *site.value.node.args[1:]), "v")
            heads_kv = []
            for node, role in ((key, "k"), (value, "v")):
                node = call(aten.reshape.default, (node, [1, length, kv, hd]), f"{role}_heads")
                node = call(aten.transpose.int, (node, 1, 2), f"{role}_t")  # [1, kv_heads, len, head_dim]
                if kv != heads:  # repeat_interleave over heads, as HF (and transformers' repeat_kv)
                    node = call(aten.unsqueeze.default, (node, 2), f"{role}_gqa")
                    node = call(aten.expand.default, (node, [1, kv, heads // kv, length, hd]), f"{role}_gqa")
                    node = call(aten.reshape.default, (node, [1, heads, length, hd]), f"{role}_gqa")
                heads_kv.append(_cast(program, node, q_dtype, out, tag))
            key, value = heads_kv
            scores = call(aten.matmul.default, (site.query, call(aten.transpose.int, (key, 2, 3), "kT")), "scores")
            scores = call(aten.div.Tensor, (scores, math.sqrt(hd)), "scaled")
            probs = call(aten.softmax.int, (_cast(program, scores, torch.float32, out, tag), -1), "softmax")
            probs = _cast(program, probs, q_dtype, out, tag)
            probs = call(aten.mul.Tensor, (g_node, probs), "gated")
            mixed = call(aten.matmul.default, (probs, value), "mixed")  # [batch, heads, seq, head_dim]
            mixed = call(aten.transpose.int, (mixed, 1, 2), "mixed_t")
            mixed = call(aten.flatten.using_ints, (mixed, 2), "mixed_flat")  # [batch, seq, heads·head_dim]
            if site.out_proj is not None:
                mixed = call(aten.linear.default, (mixed, *site.out_proj.node.args[1:]), "o")
            total = call(aten.add.Tensor, (out, mixed), "out")
            result = _cast(program, total, q_dtype, out, tag)
        out.replace_all_uses_with(result, delete_user_cb=lambda user: user is not total)


def _adapter_dtype(program: Program, site: AttentionSite) -> torch.dtype:
    """HF PEFT's ``target_dtype``: the attention weights' dtype (float32 for quantised int8 weights)."""
    dtype = site.key.weight_tensor(program.graph_module).dtype
    return dtype if dtype.is_floating_point else torch.float32


def _cast(program: Program, node: fx.Node, dtype: torch.dtype, like: fx.Node, site: str) -> fx.Node:
    """HF PEFT's ``.to(dtype)``; only inserted when the dtype differs (never in fp32 programs)."""
    val = node.meta.get("val")
    if val is None or val.dtype == dtype:
        return node
    return add_call(program, aten._to_copy.default, (node,), like, site, "adaption_cast", kwargs={"dtype": dtype})


def is_adaption_prompt_node(node: fx.Node) -> bool:
    """True for nodes the adaption prompt pass inserted."""
    return str(node.meta.get("peftc_role", "")).startswith("adaption_") or (
        node.op == "get_attr" and str(node.target).rsplit(".", 1)[-1].startswith(ADAPTION_MARKER)
    )


def _pipeline(config: AdaptionPromptConfig, state: AdapterState | None) -> PassManager:
    """A graph rewrite of the top attention layers; HF PEFT trains nothing else (no head)."""
    return PassManager("adaption-prompt-insert", [AdaptionPromptPass(config, state)])


ADAPTION_PROMPT_METHOD = register_method(
    Method(
        peft_type=AdaptionPromptConfig.peft_type,
        config_class=AdaptionPromptConfig,
        label="LLaMA-Adapter",
        cli_names={"adaption-prompt": {}, "llama-adapter": {}},
        pipeline=_pipeline,
        markers=(ADAPTION_MARKER,),
        merge_refusal="its gated attention over learned prompts is a separate softmax",
        lift_refusal="its learned prompts go through the layer's key and value projections, not a weight update",
        describe_site=lambda parts: {k: v for k, v in parts.items()},
    )
)
