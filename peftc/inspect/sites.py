"""Which method an adapter tensor belongs to, which site it sits at, and how inspect labels that site.

The one place inspect turns tensor names into sites: :func:`adapter_sites` (what ``peftc inspect``
lists), the ONNX block graph (which ops read an adapter tensor) and the plan's marks all ask the
method registry (:mod:`peftc.methods`: each method's ``markers``, ``label`` and ``describe_site``),
never a list of tensor names of their own.

A tensor name alone cannot always tell the method: AdaLoRA and LoRA both save ``lora_A``/``lora_B``.
So the method an adapter or artifact *declares* is asked first (an adapter dir's config, an
artifact's ``manifest.json``, an ONNX file's ``peftc.peft_type`` metadata); only without one is the
method guessed from the names (:func:`guess_method`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

__all__ = ["TensorSite", "adapter_sites", "declared_method", "guess_method", "site_label", "tensor_site"]


class TensorSite(NamedTuple):
    """Where an adapter tensor sits: its method, the adapted module, and the tensor's part there."""

    method: Any  # peftc.methods.Method
    module: str  # the adapted module ("transformer.h.0.attn.c_attn"); the method's label when the name has none
    part: str  # the tensor within the site ("lora_A", "ia3_l", "adaption_prompt")


def declared_method(key: Any) -> Any:
    """The registered method of a ``peft_type``, config or ``AdapterState``; ``None`` for none or an unknown one."""
    from peftc.errors import ConfigError
    from peftc.methods import Method, get_method

    if key is None or isinstance(key, Method):
        return key
    try:
        return get_method(key)
    except ConfigError:
        return None


def guess_method(names: Iterable[str]) -> Any:
    """The method owning the most of ``names`` (``None``: none); ties go to the first registered.

    A LoRA-shaped adapter is guessed LoRA; one with AdaLoRA's own ``ranknum`` tensors, AdaLoRA.
    Ask this only when nothing declares the method.
    """
    from peftc.methods import methods

    names = list(names)
    best, count = None, 0
    for method in methods():
        n = sum(method.owns(name) for name in names)
        if n > count:
            best, count = method, n
    return best


def tensor_site(name: str, method: Any = None, prefix: str = "base_model.model.") -> TensorSite | None:
    """The site of adapter tensor ``name``; ``None`` when no method owns it.

    Args:
        name: an HF PEFT key, a graph path or an ONNX initializer / graph input name.
        method: the declared method (asked first; then the registry).
        prefix: dropped from the front of ``name`` before the module is read: ``base_model.model.`` for
            HF PEFT keys, :data:`peftc.program.MODEL_PREFIX` for graph paths (and the ONNX initializers
            named after them); only a prefix, so LLaMA's own ``model.layers…`` stays whole.
    """
    from peftc.methods import method_of_tensor

    own = declared_method(method)
    owner = own if own is not None and own.owns(name) else method_of_tensor(name)
    if owner is None:
        return None
    marker = min((m for m in owner.markers if m in name), key=name.find)
    module, _, rest = name.removeprefix(prefix).partition(marker)
    return TensorSite(owner, module.rstrip(".") or owner.label, (marker + rest).removesuffix(".weight"))


def site_label(method: Any, rank: Any = None) -> str:
    """``"LoRA r=8"``: the method's registered label (``method`` a peft_type or Method) and the rank."""
    found = declared_method(method)
    label = found.label if found is not None else str(method)
    return f"{label} r={rank}" if rank is not None else label


def adapter_sites(tensors: dict[str, Any], method: Any = None) -> list[dict[str, Any]]:
    """Group an adapter's tensors (or ONNX initializers/inputs) by site: ``{module, method, …facts}``.

    Each key is matched to the method that owns it (``method``, the one the adapter or artifact declares,
    is asked first; without one, the method :func:`guess_method` finds; then the registry), and the site's
    facts (rank, in, out…) come from the method's ``describe_site``. Tensors no method owns are full
    copies of base parameters (``modules_to_save``). ``method`` of each site is its ``peft_type``.
    """
    own = declared_method(method) or guess_method(tensors)
    sites: dict[str, dict[str, Any]] = {}
    parts: dict[str, dict[str, list[int]]] = {}
    owners: dict[str, Any] = {}
    for key, t in tensors.items():
        shape = list(getattr(t, "shape", t))
        site = tensor_site(key, own)
        if site is None:
            name = key.removeprefix("base_model.model.")
            sites[name] = {"module": name, "method": "full copy", "shape": shape}
            continue
        parts.setdefault(site.module, {})[site.part] = shape
        owners[site.module] = site.method
        sites.setdefault(site.module, {"module": site.module})
    for module, owner in owners.items():
        facts = owner.describe_site(parts[module]) if owner.describe_site else dict(parts[module])
        sites[module].update(method=owner.peft_type, **facts)
    return list(sites.values())
