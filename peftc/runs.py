"""Run directories and export sources.

A run directory (what ``peftc train`` writes)::

    peftc-run/
      adapter/            adapter_config.json + adapter_model.safetensors (HF PEFT format)
      run.json            task, base model, method, label map, training config, final metrics
      metrics.jsonl       one JSON object per logged step / eval
      checkpoints/        step-N/ with adapter, optimizer and scheduler state (safetensors)
      base_model/         only for generated presets (tiny-gpt2): the base as a HF model dir
      started.json        while the run is unfinished: its options (``--resume`` restarts such a run afresh
                          when it has no checkpoint yet)
      .peftc.lock         while ``peftc train`` runs: its pid and host (one run per directory)

An adapter trained on the ``minilm`` preset records ``base_model_name_or_path: "minilm"`` (the preset's
name, not the path it resolved to on the training machine); ``resolve_source`` resolves preset names.

``resolve_source`` turns what a user passes to ``peftc export`` — a run directory or an adapter
directory saved by HF PEFT — into the adapter, the base model location and the task.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftc.adapters import CONFIG_FILE
from peftc.errors import AdapterFormatError, ModelLoadError
from peftc.models import PRESETS

__all__ = ["RUN_FILE", "Source", "read_run", "resolve_source"]

RUN_FILE = "run.json"
_TASK_FROM_PEFT = {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "seq-cls", "TOKEN_CLS": "token-cls", "SEQ_2_SEQ_LM": "seq2seq"}


@dataclass
class Source:
    """Everything export needs: where the adapter is, which base, which task."""

    adapter_dir: Path
    base: str  # model directory or preset name
    task: str
    id2label: dict[int, str] | None = None
    run_dir: Path | None = None
    run: dict[str, Any] | None = None


def read_run(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / RUN_FILE
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise AdapterFormatError(f"cannot read {path}: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise AdapterFormatError(f"{path} is not valid JSON: {e}") from e


def _vision_task_of(base: str) -> str | None:
    """``image-cls`` / ``semantic-segmentation`` when the base's config.json names such an architecture;
    ``text-to-image`` for a diffusers UNet or pipeline directory."""
    from peftc.diffusion import diffusion_task
    from peftc.tasks import vision_task

    if diffusion_task(base):
        return diffusion_task(base)
    try:
        archs = json.loads((Path(base).expanduser() / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return None
    return vision_task([a for a in archs if isinstance(a, str)]) if isinstance(archs, list) else None


def resolve_source(src: str | Path, model: str | None = None, task: str | None = None) -> Source:
    """Resolve ``peftc export SRC``: a peftc run dir, or an HF PEFT adapter dir (+ ``--model``).

    Raises:
        AdapterFormatError: SRC is neither, or its files are unreadable.
        ModelLoadError: no base model can be determined.
    """
    src = Path(src)
    if not src.exists():
        raise AdapterFormatError(f"{src} does not exist; pass a peftc run directory or an HF PEFT adapter directory")
    if (src / RUN_FILE).is_file():
        run = read_run(src)
        # A generated preset's base travels with the run dir, wherever the run dir has moved; an on-disk
        # preset (minilm) is found by name on this machine (older runs recorded the path it resolved to).
        local_base = src / "base_model"
        recorded = run.get("model") or {}
        preset = recorded.get("preset")
        if model:
            base = model
        elif local_base.is_dir():
            base = str(local_base)
        elif preset in PRESETS:
            base = preset
        else:
            base = recorded.get("source") or recorded.get("spec")
        if not base:
            raise ModelLoadError(f"{src / RUN_FILE} names no base model; pass it with --model DIR")
        labels = run.get("id2label")
        return Source(
            adapter_dir=src / "adapter",
            base=base,
            task=task or run["task"],
            id2label={int(k): v for k, v in labels.items()} if labels else None,
            run_dir=src,
            run=run,
        )
    config_path = src / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterFormatError(
            f"{src} is neither a peftc run directory (no {RUN_FILE}) nor an adapter directory (no {CONFIG_FILE})"
        )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterFormatError(f"{config_path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{config_path} must hold a JSON object")
    base = model or config.get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"{config_path} names no base_model_name_or_path; pass the base model with --model DIR")
    if not isinstance(base, str):
        raise AdapterFormatError(f"{config_path}: base_model_name_or_path must be a string, got {base!r}")
    if not model and base not in PRESETS and not Path(base).is_dir():
        raise ModelLoadError(
            f"base_model_name_or_path={base!r} in {config_path} is neither a local directory nor a preset "
            f"({', '.join(PRESETS)}); pass --model DIR"
        )
    resolved_task = task or _TASK_FROM_PEFT.get(config.get("task_type") or "")
    if resolved_task is None and not config.get("task_type"):  # HF PEFT's image adapters have none: the base says
        resolved_task = _vision_task_of(base)
    if resolved_task is None:
        raise AdapterFormatError(
            f"{config_path} has task_type={config.get('task_type')!r}; "
            "pass --task (causal-lm, seq-cls, token-cls, seq2seq, image-cls or semantic-segmentation)"
        )
    return Source(adapter_dir=src, base=str(base), task=resolved_task)
