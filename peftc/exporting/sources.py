"""The source and base stages: what SRC(s) hold, and the base model they were made for.

Each SRC is a peftc run directory or an adapter directory saved by HF PEFT
(:func:`peftc.runs.resolve_source`); every export reads one, a swappable export one or more. The
source stage resolves them, refuses an ``out`` that would replace one of them, and loads each
adapter (:class:`~peftc.adapters.AdapterState`); the base stage loads the model of the first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftc.adapters import AdapterState
from peftc.errors import AdapterMismatchError, OutputExistsError
from peftc.runs import Source
from peftc.tasks import HEAD_TASKS

__all__ = [
    "Adapters",
    "adapter_name",
    "adapter_names",
    "head_classes",
    "load_base",
    "adapted_modules",
    "read_sources",
    "refuse_other_targets",
    "refuse_out_over_inputs",
    "same_base",
]

_HEAD_SUFFIXES = (".classifier.weight", ".score.weight", ".classifier.out_proj.weight")


@dataclass
class Adapters:
    """The source stage's result: what each SRC resolved to and the adapter it holds, in SRC order."""

    srcs: list[str | Path]
    sources: list[Source]
    states: list[AdapterState]

    @property
    def first(self) -> Source:
        return self.sources[0]


def read_sources(srcs: Sequence[str | Path], model: str | Path | None, task: str | None, out: Path) -> Adapters:
    """Resolve every SRC (``model`` and ``task`` override what it records) and load its adapter.

    Raises:
        AdapterFormatError, ModelLoadError: a SRC is not a run or adapter directory, or names no usable base.
        OutputExistsError: ``out`` would replace a SRC, its adapter or its base.
    """
    from peftc.runs import resolve_source

    model = str(model) if model is not None else None
    sources = [resolve_source(s, model, task) for s in srcs]
    for s, source in zip(srcs, sources, strict=True):
        refuse_out_over_inputs(out, [Path(s), Path(source.adapter_dir), Path(source.base)])
    states = [AdapterState.load(source.adapter_dir) for source in sources]
    return Adapters(list(srcs), sources, states)


def load_base(adapters: Adapters, dtype: str | None = None) -> Any:
    """The base model (and tokenizer) of the first source, with the classifier head its adapter saved.

    ``dtype``: the export's dtype, in which the weights are loaded (a float16 export of a 7B model
    never holds its 28 GB of float32 weights); ``None``: float32.
    """
    from peftc.models import load_model

    first = adapters.first
    num_labels = head_classes(adapters.states[0]) if first.task in HEAD_TASKS and not first.id2label else None
    return load_model(first.base, first.task, num_labels=num_labels, id2label=first.id2label, dtype=dtype)


def refuse_out_over_inputs(out: Path, inputs: list[Path]) -> None:
    """``force`` replaces ``out`` wholesale: never let that delete the run, adapter or base model."""
    target = out.resolve()
    for path in inputs:
        if path.exists() and (path.resolve() == target or target in path.resolve().parents):
            raise OutputExistsError(f"--out {out} would replace {path}, which this export reads; choose another --out")


def head_classes(state: AdapterState) -> int | None:
    """Number of classes of a seq-cls head saved in the adapter (``modules_to_save``), if any."""
    for key, tensor in state.tensors.items():
        if key.endswith(_HEAD_SUFFIXES) and tensor.ndim == 2:
            return int(tensor.shape[0])
    return None


def adapter_name(source: Source) -> str:
    """The name an artifact gives the adapter of one source: its run directory's or adapter directory's name."""
    return source.run_dir.name if source.run_dir is not None else Path(source.adapter_dir).name


def adapter_names(sources: Sequence[Source]) -> list[str]:
    """One file-safe, unique name per source of a swappable export (``adapters/<name>.onnx_adapter``)."""
    names: list[str] = []
    for source in sources:
        raw = adapter_name(source)
        if raw in ("adapter", "export-onnx") and source.run_dir is None:
            raw = Path(source.adapter_dir).resolve().parent.name or raw
        base = "".join(c if c.isalnum() or c in "-_." else "_" for c in raw) or "adapter"
        name, i = base, 2
        while name in names:
            name, i = f"{base}-{i}", i + 1
        names.append(name)
    return names


def same_base(spec: str) -> str:
    """A base model spec compared across sources: a resolved path when it exists, the spec otherwise."""
    path = Path(spec)
    return str(path.resolve()) if path.exists() else str(spec)


def adapted_modules(state: AdapterState) -> dict[str, Any]:
    """The modules a state adapts (by its method's own tensors) and the base parameters it copies, by name.

    Cheap (no capture): what two swappable sources must agree on before any model is loaded.
    """
    from peftc.methods import get_method

    method = get_method(state)
    out: dict[str, Any] = {}
    for key in state.tensors:
        name = key.removeprefix("base_model.model.")
        marker = next((m for m in method.markers if m in name), None)
        out[name.partition(marker)[0].rstrip(".") if marker else name] = None
    return out


def refuse_other_targets(first: str, want: dict[str, Any], src: str, have: dict[str, Any]) -> None:
    """Sources must adapt the same modules and lift the same tensors; shapes must agree except along a
    tensor's rank dim (``LiftedTensor.rank_dim``: ranks may differ). Refuse naming the first difference.

    ``want``/``have``: name -> ``None`` (:func:`adapted_modules`, before capture) or a
    :class:`~peftc.methods.LiftedTensor` (after binding).
    """
    for name in want:
        if name not in have:
            raise AdapterMismatchError(
                f"{src} does not adapt {name} but {first} does; swappable adapters must have the same target "
                "modules, method options and modules_to_save: retrain with the same targets or export separately"
            )
    for name in have:
        if name not in want:
            raise AdapterMismatchError(
                f"{src} adapts {name} but {first} does not; swappable adapters must have the same target "
                "modules, method options and modules_to_save: retrain with the same targets or export separately"
            )
        if have[name] is not None and want[name] is not None and _fixed_shape(have[name]) != _fixed_shape(want[name]):
            raise AdapterMismatchError(
                f"{src} tensor {name} has shape {list(have[name].value.shape)} but {first}'s is "
                f"{list(want[name].value.shape)}; only the rank may differ between swappable adapters"
            )


def _fixed_shape(tensor: Any) -> list[int | None]:
    """A lifted tensor's shape with its rank dim blanked (the dim that varies between adapters)."""
    return [None if i == tensor.rank_dim else int(d) for i, d in enumerate(tensor.value.shape)]
