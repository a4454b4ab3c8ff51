"""(IA)³ insertion: a learned vector ``l`` rescales each targeted linear layer.

Attention targets scale the output, ``y = (W x + b) ⊙ l`` with ``l`` stored ``[out, 1]``;
feed-forward targets (``feedforward_modules``) scale the input, ``y = W (x ⊙ l) + b`` with ``l``
stored ``[1, in]``. As in HF PEFT (0.21) the product uses ``flatten(l)``, so the bias is scaled for
attention targets and untouched for feed-forward ones. ``nn.Linear`` is ``aten.linear(x, W, b)`` in
the graph and GPT-2's ``Conv1D`` is ``aten.addmm(b, x2d, W)`` (W ``[in, out]``): the output mul goes
right after that node (before Conv1D's reshape), the input mul right before it. The tensor is saved
as ``base_model.model.<module>.ia3_l``; fresh ones start at 1 (``init_ia3_weights=True``) or
``randn`` (``False``), in the weight's dtype.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx, nn

from peftc.adapters import AdapterState, graph_path, peft_key
from peftc.config import MethodConfig, help_field
from peftc.errors import AdapterMismatchError, ConfigError
from peftc.methods import LiftedTensor, Method, register_method
from peftc.program import Program, Site

from .base import Pass, PassManager, add_call, add_param
from .modules_to_save import ModulesToSavePass
from .targets import LinearAdapterPass, LinearSite

__all__ = [
    "IA3",
    "IA3Config",
    "IA3_DEFAULT_FEEDFORWARD",
    "IA3_DEFAULT_TARGETS",
    "IA3Pass",
    "IA3_MARKER",
    "is_feedforward",
    "is_ia3_node",
    "resolve_feedforward",
]

logger = logging.getLogger(__name__)
aten = torch.ops.aten

#: Suffix of the (IA)³ vector in HF PEFT's saved keys.
IA3_MARKER = "ia3_l"


@dataclass
class IA3Config(MethodConfig):
    """(IA)³: attention targets ``y = (Wx + b) ⊙ l`` (l ``[out, 1]``), feed-forward targets ``y = W(x ⊙ l) + b``."""

    peft_type: ClassVar[str] = "IA3"

    target_modules: list[str] | str | None = help_field(
        "Modules to adapt: a list matches a whole name or a '.name' suffix, a string is a full regex. "
        "Default: HF PEFT's table for the model type.",
        default=None,
    )
    exclude_modules: list[str] | str | None = help_field("Modules never to adapt (same matching rules).", default=None)
    feedforward_modules: list[str] | str | None = help_field(
        "Targets treated as feed-forward, whose input (not output) is scaled, e.g. ['output.dense']: a list entry "
        "matches a name ending with it, a string is a full regex; must be a subset of target_modules. "
        "Default: HF PEFT's table for the model type.",
        default=None,
    )
    fan_in_fan_out: bool = help_field("Weights stored as [in, out] (GPT-2 Conv1D); set automatically.", default=False)
    modules_to_save: list[str] | None = help_field(
        "Modules trained in full and saved with the adapter (the head, for seq-cls).", default=None
    )
    init_ia3_weights: bool = help_field(
        "True: the (IA)³ vectors start at 1 (the base model). False: random.", default=True
    )

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


#: HF PEFT 0.21 ``TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING``.
IA3_DEFAULT_TARGETS: dict[str, list[str]] = {
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"],
    "llama4": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"],
    "RefinedWebModel": ["query_key_value", "dense_4h_to_h"],
    "RefinedWeb": ["query_key_value", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
}

#: HF PEFT 0.21 ``TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING``.
IA3_DEFAULT_FEEDFORWARD: dict[str, list[str]] = {
    "t5": ["wo"],
    "mt5": [],
    "gpt2": ["mlp.c_proj"],
    "bloom": ["mlp.dense_4h_to_h"],
    "roberta": ["output.dense"],
    "opt": ["fc2"],
    "gptj": ["fc_out"],
    "gpt_neox": ["dense_4h_to_h"],
    "gpt_neo": ["c_proj"],
    "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"],
    "llama": ["down_proj"],
    "llama4": ["down_proj"],
    "mistral": ["down_proj"],
    "mixtral": ["w2"],
    "bert": ["output.dense"],
    "deberta-v2": ["output.dense"],
    "deberta": ["output.dense"],
    "RefinedWeb": ["dense_4h_to_h"],
    "RefinedWebModel": ["dense_4h_to_h"],
    "falcon": ["dense_4h_to_h"],
    "phi": ["fc2"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "gemma3_text": ["down_proj"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
}


def resolve_feedforward(config: IA3Config, program: Program) -> list[str] | str:
    """``feedforward_modules`` as given, else HF PEFT's default for the model type."""
    if config.feedforward_modules is not None:
        return config.feedforward_modules
    model_type = getattr(program.model_config, "model_type", None)
    if model_type not in IA3_DEFAULT_FEEDFORWARD:
        raise ConfigError(
            f"no default feedforward_modules for model type {model_type!r}; pass feedforward_modules "
            "(the targets whose input is scaled; an empty list when every target is scaled at its output)"
        )
    return IA3_DEFAULT_FEEDFORWARD[model_type]


def is_feedforward(name: str, feedforward: list[str] | str) -> bool:
    """HF PEFT's rule (``IA3Model._check_target_module_feedforward``): regex fullmatch, or plain ``endswith``."""
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, name) is not None
    return any(name.endswith(key) for key in feedforward)


class IA3Pass(LinearAdapterPass):
    """Multiplies the output (attention) or input (feed-forward) of every targeted linear by l."""

    default_targets = IA3_DEFAULT_TARGETS
    marker = IA3_MARKER

    def __init__(self, config: IA3Config, state: AdapterState | None = None):
        super().__init__(config, state)

    def site_details(self, program: Program, name: str, calls: list[LinearSite]) -> dict:
        fin, fout = calls[0].features(program.graph_module)
        ff = is_feedforward(name, resolve_feedforward(self.config, program))
        return {"in": fin, "out": fout, "feedforward": ff, "shape": [1, fin] if ff else [fout, 1]}

    # -- changing ----------------------------------------------------------------------------
    def rewrite_site(self, program: Program, site: LinearSite, decision, state: AdapterState, fresh: bool) -> set:
        ff = decision.details["feedforward"]
        l_vec = self._tensor(program, site, state, fresh, ff)
        self._insert(program, site, l_vec, ff)
        return {peft_key(site.name, IA3_MARKER)}

    def _tensor(self, program: Program, site: LinearSite, state: AdapterState, fresh: bool, ff: bool) -> nn.Parameter:
        fin, fout = site.features(program.graph_module)
        shape = (1, fin) if ff else (fout, 1)
        key = peft_key(site.name, IA3_MARKER)
        if fresh and key not in state.tensors:
            dtype = site.weight_tensor(program.graph_module).dtype
            init = torch.ones(shape) if self.config.init_ia3_weights else torch.randn(shape)
            state.tensors[key] = nn.Parameter(init.to(dtype))
        if key not in state.tensors:
            raise AdapterMismatchError(
                f"adapter has no tensor {key} for targeted module {site.name}; was it made for another model "
                "or with other target_modules?"
            )
        got = tuple(state.tensors[key].shape)
        if got != shape:
            kind = f"feed-forward, in={fin}" if ff else f"attention, out={fout}"
            raise AdapterMismatchError(
                f"adapter tensor {key} has shape {list(got)} but module {site.name} needs {list(shape)} ({kind}); "
                "the adapter was made for another base model or with other feedforward_modules"
            )
        program.sites[site.name] = Site(
            site.name, IA3Config.peft_type, site.module_type, fin, fout, None, None, site.fan_in_fan_out
        )
        return state.tensors[key]

    def _insert(self, program: Program, site: LinearSite, l_vec: nn.Parameter, ff: bool) -> None:
        graph, base, tag = program.graph, site.node, site.name
        path = graph_path(peft_key(site.name, IA3_MARKER))
        if ff:
            # y = W (x ⊙ l) + b: l [1, in] broadcasts over the last dim of x (2-D for Conv1D, 3-D for Linear).
            x = site.x
            with graph.inserting_before(base):
                l_node = add_param(program, path, l_vec, tag, like=x)
                out = add_call(program, aten.mul.Tensor, (x, l_node), base, tag, "ia3_in")
                out = _cast_like(program, out, x, base, tag)
            base.replace_input_with(x, out)
        else:
            # y = (W x + b) ⊙ flatten(l): scales the bias too, exactly as HF PEFT does.
            with graph.inserting_before(base.next):
                l_node = add_param(program, path, l_vec, tag, like=base)
                flat = add_call(program, aten.reshape.default, (l_node, [-1]), base, tag, "ia3_flat")
                mul = add_call(program, aten.mul.Tensor, (base, flat), base, tag, "ia3_out")
                out = _cast_like(program, mul, base, base, tag)
            base.replace_all_uses_with(out, delete_user_cb=lambda user: user is not mul)


def _cast_like(program: Program, node: fx.Node, ref: fx.Node, like: fx.Node, site: str) -> fx.Node:
    """HF PEFT casts the product back to the activation's dtype; only needed when l's dtype differs."""
    want, got = ref.meta.get("val"), node.meta.get("val")
    if want is None or got is None or want.dtype == got.dtype:
        return node
    return add_call(program, aten._to_copy.default, (node,), like, site, "ia3_cast", kwargs={"dtype": want.dtype})


def is_ia3_node(node: fx.Node) -> bool:
    """True for nodes the IA3 pass inserted (its mul, reshape, cast)."""
    return str(node.meta.get("peftc_role", "")).startswith("ia3_")


def ia3_input_name(module: str) -> str:
    """Graph input name of the IA3 vector of site ``module`` (static shape, default: ones)."""
    return f"{module}.{IA3_MARKER}"


def ia3_lift(program: Program, site: Site, state: AdapterState) -> list[LiftedTensor]:
    """``l`` as an input of static shape; ones give the base model."""
    key = peft_key(site.name, IA3_MARKER)
    value = state.tensors[key].detach().clone().contiguous()
    return [LiftedTensor(ia3_input_name(site.name), graph_path(key), value, torch.ones_like(value))]


def ia3_stack(program: Program, site: Site, states: list[AdapterState], slot: fx.Node) -> None:
    """Mixed batch: every source's ``l`` stacked ``[n+1, features]`` (ones in slot 0), one vector per row."""
    from .mixed_batch import erase, gather, per_row, restore_shape, stacked_param

    graph, key = program.graph, peft_key(site.name, IA3_MARKER)
    values = [torch.ones_like(states[0].tensors[key].detach().flatten())]
    values += [s.tensors[key].detach().flatten() for s in states]
    stacked = torch.stack(values)
    path = graph_path(key) + "__stacked"
    muls = [
        n
        for n in graph.nodes
        if n.meta.get("peftc_site") == site.name and n.meta.get("peftc_role") in ("ia3_in", "ia3_out")
    ]
    for mul in muls:
        t, vec = mul.args
        dead = [mul, vec] + ([vec.args[0]] if vec.op == "call_function" else [])  # the output's flatten, then l
        with graph.inserting_before(mul):
            param = stacked_param(program, path, stacked, site.name, like=mul)
            rows = add_call(
                program,
                aten.unsqueeze.default,
                (gather(program, param, slot, mul, site.name), 1),
                mul,
                site.name,
                "mixed_u",
            )
            scaled = add_call(
                program,
                aten.mul.Tensor,
                (per_row(program, t, slot, mul, site.name), rows),
                mul,
                site.name,
                mul.meta["peftc_role"],
            )
            out = restore_shape(program, scaled, t, mul, site.name)
        mul.replace_all_uses_with(out)
        erase(program, dead)


def _merge_pass() -> Pass:
    from .merge_ia3 import MergeIA3Pass

    return MergeIA3Pass()


def _describe(parts: dict[str, list[int]]) -> dict[str, Any]:
    shape = parts.get(IA3_MARKER) or []
    feedforward = len(shape) == 2 and shape[0] == 1
    return {"shape": shape, "scales": "input" if feedforward else "output"}


def _pipeline(config: IA3Config, state: AdapterState | None) -> PassManager:
    return PassManager("ia3-insert", [IA3Pass(config, state), ModulesToSavePass(config.modules_to_save)])


IA3 = register_method(
    Method(
        peft_type=IA3Config.peft_type,
        config_class=IA3Config,
        label="IA3",
        cli_names={"ia3": {}},
        pipeline=_pipeline,
        markers=("ia3_",),
        merge_pass=_merge_pass,
        lift=ia3_lift,
        stack=ia3_stack,
        describe_site=_describe,
    )
)
