"""DoRA (weight-decomposed LoRA) as a LoRA variant, as HF PEFT 0.21's ``DoraLinearVariant`` computes it.

With ``V = W + s·BA`` (W as ``[out, in]``: GPT-2's ``Conv1D`` weight transposed) and ``‖V‖`` the L2
norm of each output row, a DoRA site computes::

    h = base(x) + (m/‖V‖ − 1)·(x Wᵀ) + (m/‖V‖)·s·B(A(x))

i.e. ``h = x·(m/‖V‖·V)ᵀ + b``: the magnitude ``m`` ``[out]`` (saved as
``base_model.model.<module>.lora_magnitude_vector``) times the direction ``V/‖V‖``. As in HF PEFT:

- ``‖V‖`` is computed every forward, in the weight's dtype, and **detached** (the DoRA paper, §4.3:
  no gradient flows through the norm), with ``s·BA`` built from A and B (``mm(B, A)·s``);
- ``x Wᵀ`` is the base output minus its bias; in a train program with ``lora_dropout > 0`` the branch
  input is ``dropout(x)`` and ``x Wᵀ`` is recomputed on it (``linear(dropout(x), W)``) while the base
  output keeps the undropped ``x`` — exactly HF PEFT's two code paths;
- a fresh ``m`` is ``‖W + s·BA‖`` (B = 0: the row norms of W), so a fresh site is the base layer.

Merge folds ``W' = m/‖V‖ · V`` (row-wise; Conv1D: column-wise in its ``[in, out]`` storage) as the
update ``W' − W`` in float32 through LoRA's :class:`~peftc.passes.lora.MergeLoraPass`. A swappable
export lifts A, B pre-scaled by ``s`` and m: the graph computes ``‖W + B'A‖`` from the inputs; the
defaults (rank-0 A and B', and ``m = ‖W‖`` computed by the same ops the graph runs) make
``m/‖V‖ = 1`` exactly, hence the base model.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import fx, nn

from peftc.adapters import AdapterState, graph_path, peft_key
from peftc.errors import AdapterMismatchError
from peftc.methods import LiftedTensor
from peftc.program import Program, Site, get_tensor

from .base import add_call, add_param
from .lora import LoraBranch, LoraVariant
from .targets import LinearSite

__all__ = ["MAGNITUDE", "DoraVariant", "dora_input_name", "weight_norm"]

aten = torch.ops.aten

#: HF PEFT's key part of the magnitude vector (``base_model.model.<module>.lora_magnitude_vector``).
MAGNITUDE = "lora_magnitude_vector"


def weight_norm(weight: torch.Tensor, lora_weight: torch.Tensor, scale: float) -> torch.Tensor:
    """``‖W + s·BA‖`` per output row (HF PEFT's ``DoraLinearLayer.get_weight_norm``); ``weight`` is ``[out, in]``."""
    v = weight + scale * lora_weight
    return torch.linalg.norm(v, dim=1).to(v.dtype)


def dora_input_name(module: str) -> str:
    """Graph input name of the magnitude of DoRA site ``module`` (swappable exports)."""
    return f"{module}.{MAGNITUDE}"


class DoraVariant(LoraVariant):
    """Scales each output row of W + s·BA to the trained magnitude m (DoRA)."""

    name: ClassVar[str] = "dora"
    parts: ClassVar[tuple[str, ...]] = (MAGNITUDE,)

    @staticmethod
    def bind(program: Program, site: LinearSite, state: AdapterState, scale: float, fresh: bool) -> set[str]:
        key = peft_key(site.name, MAGNITUDE)
        fin, fout = site.features(program.graph_module)
        if fresh and key not in state.tensors:
            w = site.weight_tensor(program.graph_module).detach()
            a = state.tensors[peft_key(site.name, "lora_A.weight")].detach()
            b = state.tensors[peft_key(site.name, "lora_B.weight")].detach()
            with torch.no_grad():
                m = weight_norm(w.T if site.fan_in_fan_out else w, b @ a, scale)
            state.tensors[key] = nn.Parameter(m)
        if key not in state.tensors:
            raise AdapterMismatchError(
                f"adapter has no tensor {key} for DoRA module {site.name}; was it saved without use_dora, "
                "or made for another model?"
            )
        if tuple(state.tensors[key].shape) != (fout,):
            raise AdapterMismatchError(
                f"adapter tensor {key} has shape {list(state.tensors[key].shape)} but module {site.name} needs "
                f"[{fout}] (out={fout}); the adapter was made for another base model"
            )
        return {key}

    @staticmethod
    def insert(program: Program, site: LinearSite, branch: LoraBranch, state: AdapterState) -> fx.Node:
        base, tag, s = site.node, site.name, branch.scale

        def call(target: Any, args: tuple, role: str) -> fx.Node:
            return add_call(program, target, args, base, tag, role)

        key = peft_key(site.name, MAGNITUDE)
        m = add_param(program, graph_path(key), state.tensors[key], tag, like=base)
        # ‖W + s·BA‖ per output row, detached (HF: weight_norm.detach()); W read through the base's own node
        w = call(aten.t.default, (site.weight,), "dora_weight_t") if site.fan_in_fan_out else site.weight
        ba = call(aten.mm.default, (branch.b, branch.a), "dora_lora_weight")
        sba = call(aten.mul.Tensor, (ba, s), "lora_scale")
        v = call(aten.add.Tensor, (w, sba), "dora_weight")
        norm = call(aten.linalg_vector_norm.default, (v, 2, [1]), "dora_norm")
        norm = call(aten.detach.default, (norm,), "dora_norm_detach")
        mns = call(aten.div.Tensor, (m, norm), "dora_scale")
        # x Wᵀ: the base output minus its bias, or, with dropout, W applied to the dropped input
        if branch.dropped:
            xw = call(aten.linear.default, (branch.x, w), "dora_base")
        else:
            bias = base.args[0] if site.fan_in_fan_out else (base.args[2] if len(base.args) > 2 else None)
            xw = call(aten.sub.Tensor, (base, bias), "dora_base") if isinstance(bias, fx.Node) else base
        mns_1 = call(aten.sub.Tensor, (mns, 1), "dora_scale_minus_one")
        base_term = call(aten.mul.Tensor, (mns_1, xw), "dora_base_term")
        lora_term = call(aten.mul.Tensor, (mns, branch.bax), "dora_lora")
        lora_term = call(aten.mul.Tensor, (lora_term, s), "lora_scale")  # HF: mag_norm_scale * lora_result * s
        result = call(aten.add.Tensor, (base_term, lora_term), "dora_result")
        return call(aten.add.Tensor, (base, result), "lora_out")

    @staticmethod
    def delta(program: Program, site: Site) -> torch.Tensor:
        gm = program.graph_module
        a = gm.get_parameter(graph_path(peft_key(site.name, "lora_A.weight"))).float()
        b = gm.get_parameter(graph_path(peft_key(site.name, "lora_B.weight"))).float()
        m = gm.get_parameter(graph_path(peft_key(site.name, MAGNITUDE))).float()
        w = _base_weight(program, site).float()
        v = w + site.scale * (b @ a)
        merged = (m / torch.linalg.norm(v, dim=1)).unsqueeze(1) * v
        return merged - w

    @staticmethod
    def lift(program: Program, site: Site, state: AdapterState) -> list[LiftedTensor]:
        key = peft_key(site.name, MAGNITUDE)
        m = state.tensors[key].detach()
        w = _base_weight(program, site).detach()
        # ‖W + B'·A‖ with rank-0 B' and A, by the ops the graph runs: exactly the graph's norm, so m/‖V‖ = 1
        rank0 = torch.mm(w.new_zeros(w.shape[0], 0), w.new_zeros(0, w.shape[1]))
        default = torch.ops.aten.linalg_vector_norm.default(w + rank0, 2, [1])
        return [LiftedTensor(dora_input_name(site.name), graph_path(key), m.clone().contiguous(), default)]

    @staticmethod
    def describe(parts: dict[str, list[int]]) -> dict[str, Any]:
        return {"variant": DoraVariant.name, "magnitude": parts[MAGNITUDE]}


def _base_weight(program: Program, site: Site) -> torch.Tensor:
    """The base weight of DoRA site ``site`` as ``[out, in]`` (a view of the graph's tensor; Conv1D's transposed)."""
    for node in program.graph.nodes:
        if node.meta.get("peftc_site") == site.name and node.meta.get("peftc_role") == "dora_weight":
            w = node.args[0]
            transposed = w.meta.get("peftc_role") == "dora_weight_t"
            tensor = get_tensor(program.graph_module, (w.args[0] if transposed else w).target)
            return tensor.T if transposed else tensor
    raise ValueError(f"DoRA site {site.name} has no weight-norm nodes in the graph")
