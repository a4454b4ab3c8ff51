"""Finding adapter sites: HF PEFT's target-matching rules and default target tables.

Targets are found by module name (from the model, via ``nn_module_stack``), never by node names
an exporter generated. ``target_modules`` as a list matches a whole module name or a ``.name``
suffix; as a string it is a full regex (``re.fullmatch``), as in HF PEFT.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from peftc.adapters import AdapterState, graph_path
from peftc.errors import AdapterMismatchError, ConfigError, TargetNotFoundError
from peftc.program import MODEL_PREFIX, Program

from .base import InPlacePass, PassResult, SiteDecision, finish

logger = logging.getLogger(__name__)

__all__ = [
    "LINEAR_TYPES",
    "LinearAdapterPass",
    "check_all_used",
    "linear_names",
    "resolve_targets",
    "LORA_DEFAULT_TARGETS",
    "LinearSite",
    "default_targets",
    "find_linear_sites",
    "layer_index",
    "matches",
    "module_of",
    "suffix_names",
]

#: HF PEFT 0.21 ``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`` for the families peftc covers.
LORA_DEFAULT_TARGETS: dict[str, list[str]] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "llama": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "falcon": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
}

#: Module classes whose forward is a linear map the LoRA/IA3 passes can rewrite.
LINEAR_TYPES = ("Linear", "Conv1D", "NonDynamicallyQuantizableLinear")


def default_targets(model_type: str, table: dict[str, list[str]]) -> list[str] | None:
    return table.get(model_type)


def matches(name: str, targets: list[str] | str | None) -> bool:
    """HF PEFT's rule: list → whole name or ``.suffix``; string → full regex."""
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


_LAYER_PATTERNS = ("layers", "h", "block", "blocks", "layer")


def layer_index(name: str, layers_pattern: list[str] | str | None = None) -> int | None:
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or _LAYER_PATTERNS)
    for pattern in patterns:
        m = re.search(rf"(?:^|\.){re.escape(pattern)}\.(\d+)(?:\.|$)", name)
        if m:
            return int(m.group(1))
    return None


def module_of(node: fx.Node) -> tuple[str, str] | None:
    """The (HF module name, class name) that produced ``node``, from ``nn_module_stack``."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    cls_name = cls.rsplit(".", 1)[-1] if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    if not path.startswith(MODEL_PREFIX):
        return None
    return path.removeprefix(MODEL_PREFIX), cls_name


@dataclass
class LinearSite:
    """A call of a linear layer in the graph: ``out = x·Wᵀ + b`` (Linear) or ``b + x·W`` (Conv1D)."""

    node: fx.Node  # the aten.linear / aten.addmm node
    name: str  # HF module name
    module_type: str
    x: fx.Node  # input activation
    weight: fx.Node  # get_attr of the weight
    fan_in_fan_out: bool  # weight stored [in, out]

    def weight_tensor(self, gm: fx.GraphModule) -> torch.Tensor:
        owner, _, attr = self.weight.target.rpartition(".")
        return getattr(gm.get_submodule(owner), attr)

    def features(self, gm: fx.GraphModule) -> tuple[int, int]:
        """(in_features, out_features)."""
        w = self.weight_tensor(gm)
        return (w.shape[0], w.shape[1]) if self.fan_in_fan_out else (w.shape[1], w.shape[0])


def find_linear_sites(program: Program) -> Iterator[LinearSite]:
    """Every call of a Linear or Conv1D module whose weight is a parameter of the graph."""
    aten = torch.ops.aten
    for node in program.graph.nodes:
        if node.op != "call_function" or node.meta.get("peftc_site"):
            continue
        owner = module_of(node)
        if owner is None:
            continue
        name, cls = owner
        if node.target == aten.linear.default and cls in LINEAR_TYPES:
            x, w = node.args[0], node.args[1]
            fan_in_fan_out = False
        elif node.target == aten.addmm.default and cls == "Conv1D":
            x, w = node.args[1], node.args[2]
            fan_in_fan_out = True
        else:
            continue
        if isinstance(w, fx.Node) and w.op == "get_attr":
            yield LinearSite(node, name, cls, x, w, fan_in_fan_out)


def suffix_names(names: list[str]) -> list[str]:
    """Short names users type in ``target_modules`` (``c_attn``, ``q_proj``): last name parts, first-seen order."""
    seen: dict[str, None] = {}
    for name in names:
        seen.setdefault(name.rsplit(".", 1)[-1], None)
    return list(seen)


def linear_names(program: Program) -> list[str]:
    """Names of every Linear/Conv1D module of the model (what ``target_modules`` could name)."""
    return [name for name, cls in program.module_types.items() if cls in LINEAR_TYPES]


def resolve_targets(config: Any, program: Program, table: dict[str, list[str]]) -> list[str] | str:
    """``config.target_modules`` as given, else HF PEFT's default for the model type in ``table``."""
    if config.target_modules is not None:
        return config.target_modules
    model_type = getattr(program.model_config, "model_type", None)
    if model_type not in table:
        raise ConfigError(
            f"no default target_modules for model type {model_type!r}; pass --target-modules "
            f"(linear modules here: {', '.join(suffix_names(linear_names(program)))})"
        )
    return table[model_type]


def check_all_used(state: Any, used: set[str], marker: str, module_types: dict[str, str] | None = None) -> None:
    """Every tensor of a loaded adapter that carries ``marker`` must have found its module.

    With the program's ``module_types``, a tensor whose module exists but is not a Linear/Conv1D layer (a
    ``Conv2d``: HF PEFT adapts convolutions, peftc does not yet) is named as such.
    """
    unused = sorted(k for k in state.tensors if marker in k and k not in used)
    module = graph_path(unused[0]).removeprefix(MODEL_PREFIX).split(f".{marker}")[0] if unused else ""
    cls = (module_types or {}).get(module)
    if cls is not None and cls not in LINEAR_TYPES:
        raise AdapterMismatchError(
            f"adapter tensor {unused[0]} (and {len(unused) - 1} more) adapts {module}, a {cls}; peftc adapts "
            f"Linear and Conv1D layers only ({cls} adapters are not supported yet)"
        )
    if unused:
        raise AdapterMismatchError(
            f"adapter tensor {unused[0]} (and {len(unused) - 1} more) matches no targeted module of this model; "
            "the adapter was made for another base model or with other target_modules"
        )


class LinearAdapterPass(InPlacePass):
    """Shared finding logic of the methods that adapt linear layers (LoRA, IA3).

    Subclasses set ``default_targets`` (HF PEFT's table for the method) and implement
    :meth:`site_details` (what :meth:`plan` reports for a site that will be rewritten) and ``run``.
    The checks mirror HF PEFT: a matched module must be a Linear/Conv1D, not excluded, not in
    ``modules_to_save``, in ``layers_to_transform`` when given, and called by the graph.
    """

    default_targets: dict[str, list[str]] = {}
    #: Name fragment of the method's own tensors: every such tensor of a loaded adapter must find a site.
    marker: str = ""

    def __init__(self, config: Any, state: Any = None):
        self.config = config
        self.state = state

    def targets(self, program: Program) -> list[str] | str:
        return resolve_targets(self.config, program, self.default_targets)

    def site_details(self, program: Program, name: str, calls: list[LinearSite]) -> dict[str, Any]:
        """What :meth:`plan` reports for a site it will rewrite: in/out features, and the rank and scale of
        low-rank methods (configs with ``rank_for``/``scale_for``)."""
        fin, fout = calls[0].features(program.graph_module)
        details: dict[str, Any] = {"in": fin, "out": fout}
        if hasattr(self.config, "rank_for"):
            details.update(rank=self.config.rank_for(name), scale=self.config.scale_for(name))
        return details

    def rewrite_site(self, program: Program, site: LinearSite, decision: SiteDecision, state: Any, fresh: bool) -> set:
        """Create or check the site's tensors in ``state``, insert its nodes; return the keys it used."""
        raise NotImplementedError

    def run(self, program: Program) -> PassResult:
        chosen = self.sites_or_raise(program)
        state = self.state or AdapterState(self.config)
        fresh = self.state is None
        used: set[str] = set()
        for site in list(find_linear_sites(program)):
            if site.name in chosen:
                used |= self.rewrite_site(program, site, chosen[site.name], state, fresh)
        if not fresh:
            check_all_used(state, used, self.marker, program.module_types)
        program.adapter = state
        finish(program)
        logger.info("%s: %d sites, %d adapter parameters", self.name, len(chosen), state.num_parameters())
        return PassResult(program, True)

    def plan(self, program: Program) -> list[SiteDecision]:
        targets = self.targets(program)
        calls: dict[str, list[LinearSite]] = {}
        for site in find_linear_sites(program):
            calls.setdefault(site.name, []).append(site)
        decisions = []
        for name, cls in program.module_types.items():
            if not matches(name, targets):
                continue
            reason = self._skip_reason(name, cls, calls.get(name))
            details = None if reason else self.site_details(program, name, calls[name])
            decisions.append(SiteDecision(name, cls, "skip" if reason else "rewrite", reason, details))
        return decisions

    def _skip_reason(self, name: str, cls: str, calls: list[LinearSite] | None) -> str:
        cfg = self.config
        if cls not in LINEAR_TYPES:
            return f"{cls} is not a Linear or Conv1D layer"
        if matches(name, cfg.exclude_modules):
            return "listed in exclude_modules"
        saved = cfg.modules_to_save or []
        if any(name == s or name.endswith("." + s) or name.startswith(s + ".") for s in saved):
            return "in modules_to_save (trained in full instead)"
        wanted = getattr(cfg, "layers_to_transform", None)
        if wanted is not None:
            wanted = [wanted] if isinstance(wanted, int) else wanted
            if layer_index(name, getattr(cfg, "layers_pattern", None)) not in wanted:
                return f"layer not in layers_to_transform={wanted}"
        if not calls:
            return "not called in the captured graph for this task"
        return ""

    def sites_or_raise(self, program: Program) -> dict[str, SiteDecision]:
        """The sites to rewrite by name; :class:`TargetNotFoundError` listing what could be targeted when none."""
        decisions = self.plan(program)
        chosen = {d.name: d for d in decisions if d.action == "rewrite"}
        if not chosen:
            skipped = "; ".join(f"{d.name}: {d.reason}" for d in decisions[:3])
            raise TargetNotFoundError(
                f"target_modules={self.targets(program)!r} matched no adaptable module"
                + (f" ({skipped})" if skipped else "")
                + f"; linear modules here: {', '.join(suffix_names(linear_names(program)))}"
            )
        return chosen
