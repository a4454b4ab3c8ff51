"""Finding adapter sites: HF PEFT's target-matching rules and default target tables.

Targets are found by module name (from the model, via ``nn_module_stack``), never by node names
an exporter generated. ``target_modules`` as a list matches a whole module name or a ``.name``
suffix; as a string it is a full regex (``re.fullmatch``), as in HF PEFT.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import fx

from peftc.program import MODEL_PREFIX, Program

__all__ = [
    "LINEAR_TYPES",
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
