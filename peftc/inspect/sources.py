"""What has a graph, and how to get it: the sources of ``peftc inspect --graph`` and ``--diff``.

:func:`describe` takes a run dir (its adapted eval program: the base loaded and captured, the adapter
bound), an adapter dir (likewise, with the local base it names), an artifact dir or an ``.onnx`` file
(the ONNX graph), a model dir or preset (its base program), or a model with a plan (the base program
and the sites :mod:`peftc.inspect.plan` would adapt), and returns the :func:`inspect_path`-style facts
with the graph behind them, built once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peftc.adapters import CONFIG_FILE, AdapterState
from peftc.errors import AdapterFormatError, ModelLoadError
from peftc.runs import RUN_FILE, resolve_source

from .describe import _inspect_run, _load_onnx, inspect_path, onnx_file, program_summary

__all__ = ["describe", "guess_task", "is_model", "resolve"]


def describe(
    path: str | Path,
    task: str | None = None,
    plan: dict[str, Any] | None = None,
    model: str | None = None,
) -> tuple[dict[str, Any], Any]:
    """:func:`inspect_path` (or :func:`~peftc.inspect.plan.plan_model`) and the graph behind it, built once.

    Args:
        path: a run dir, an adapter dir (with a local base), an artifact dir, an ``.onnx`` file, or a
            model dir / preset (its base program, captured in eval mode).
        task: task for a model dir or preset (default: the preset's, else guessed from its ``config.json``).
        model: base model dir or preset for an adapter dir (default: its ``base_model_name_or_path``).
        plan: ``{"method", "target_modules", "r", "options"}`` (any may be absent; method default
            ``lora``): a model's base program with the sites that plan would adapt; changes nothing.

    Returns:
        ``(info, graph)`` where graph is a :class:`~peftc.program.Program` or an ``onnx.ModelProto``.
        For a plan, ``info["planned"]`` maps each site the plan would rewrite to its label (``"LoRA r=8"``).

    Raises:
        AdapterFormatError: the path does not exist or holds nothing with a graph.
        ModelLoadError: a base model cannot be loaded.
    """
    if plan is not None:
        from .plan import _plan

        info, program, _ = _plan(str(path), task, plan)
        return info, program
    spec = str(path)
    path = Path(path)
    if not path.exists() and spec in _presets():
        return _model_graph(spec, task)
    if not path.exists():
        raise AdapterFormatError(f"{path} does not exist")
    if path.is_file() or (path / "manifest.json").is_file():
        info = inspect_path(path)
        return info, _load_onnx(onnx_file(path))
    if (path / RUN_FILE).is_file():
        keep: dict[str, Any] = {}
        info = _inspect_run(path, keep)
        if "program" not in keep:
            raise ModelLoadError(f"{path}: {info.get('warning', 'base model not loadable')}")
        return info, keep["program"]
    if (path / CONFIG_FILE).is_file():  # an adapter dir: its graph needs the local base it names
        info = inspect_path(path)
        extra, program = _adapted(path, model, task)
        info.update(extra)
        return info, program
    if (path / "config.json").is_file():
        return _model_graph(spec, task)
    raise AdapterFormatError(
        f"{path} has no graph: it is not a run dir ({RUN_FILE}), an artifact dir (manifest.json), "
        f"an adapter dir ({CONFIG_FILE}), a model dir (config.json) or an .onnx file"
    )


def resolve(
    src: Any, task: str | None, plan: dict[str, Any] | None = None, model: str | None = None
) -> tuple[dict[str, Any], Any]:
    """(info, Program or ModelProto) for a path (:func:`describe`), a Program or an ONNX model."""
    from peftc.program import Program

    if isinstance(src, Program):
        return {"kind": f"program ({src.task.name}, {src.mode})"}, src
    if type(src).__name__ == "ModelProto":
        return {"kind": "onnx", "path": src.graph.name}, src
    return describe(src, task=task, plan=plan, model=model)


def _presets() -> dict[str, Any]:
    from peftc.models import PRESETS

    return PRESETS


def guess_task(spec: str | Path) -> str:
    """A preset's task; ``image-cls``/``semantic-segmentation`` for a ``…ForImageClassification``/
    ``…ForSemanticSegmentation`` config, ``causal-lm`` for a ``…ForCausalLM``/``…LMHeadModel`` one, else ``seq-cls``."""
    from peftc.diffusion import diffusion_task
    from peftc.tasks import vision_task

    presets = _presets()
    if str(spec) in presets and not Path(spec).exists():
        return presets[str(spec)][1]
    if diffusion_task(spec):  # a diffusers UNet directory: text-to-image
        return diffusion_task(spec)
    try:
        arch = " ".join(json.loads((Path(spec) / "config.json").read_text()).get("architectures") or [])
    except (OSError, json.JSONDecodeError, AttributeError):
        arch = ""
    image = vision_task(arch.split())
    if image:
        return image
    return "causal-lm" if "CausalLM" in arch or "LMHead" in arch else "seq-cls"


def is_model(src: Any) -> bool:
    """A model dir (``config.json``, and no run, artifact or adapter files) or a preset: what a plan applies to."""
    if not isinstance(src, (str, Path)):
        return False
    path = Path(src)
    if str(src) in _presets() and not path.exists():
        return True
    has_other = any((path / f).is_file() for f in ("manifest.json", RUN_FILE, CONFIG_FILE))
    return path.is_dir() and (path / "config.json").is_file() and not has_other


def _model_graph(spec: str, task: str | None) -> tuple[dict[str, Any], Any]:
    from peftc.models import load_model
    from peftc.program import capture

    task = task or guess_task(spec)
    loaded = load_model(spec, task, num_labels=None)
    program = capture(loaded.model, task, mode="eval")
    info = {"kind": "model", "path": spec, "task": task, **program_summary(program)}
    return info, program


def _adapted(path: Path, model: str | None, task: str | None) -> tuple[dict[str, Any], Any]:
    """An adapter dir bound into its base's eval program (the base from ``base_model_name_or_path``)."""
    from peftc.models import load_model
    from peftc.passes import insertion_pipeline
    from peftc.program import capture

    source = resolve_source(path, model=model, task=task)
    state = AdapterState.load(source.adapter_dir)
    loaded = load_model(source.base, source.task, id2label=source.id2label)
    program = capture(loaded.model, source.task, mode="eval")
    insertion_pipeline(state.config, state)(program)
    return {"task": source.task, "base": source.base, **program_summary(program)}, program
