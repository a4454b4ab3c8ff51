"""The dry run: which sites a method would adapt in a model, and why it would skip the others.

``peftc inspect MODEL --plan --method NAME`` builds that method's config the way ``peftc train``
does (the ``--method`` name's presets, then ``--target-modules``, ``--r``, ``--set FIELD=VALUE``),
captures the model's base program in eval mode and asks the method's own insertion pipeline what it
would do: ``insertion_pipeline(config).plan(program)``, every pass's :class:`~peftc.passes.SiteDecision`
(rewrite, with the method's facts about the site, or skip, with the reason). Nothing is changed. The
passes decide with the same checks they run when they rewrite (STYLE: finding a site is separate from
changing it), so a plan cannot disagree with what training will do, for any method in the registry.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .sites import site_label

__all__ = ["plan_config", "plan_lines", "plan_model", "plan_program"]

#: Config fields a plan never takes from ``--set`` (the task and the base fill them; the type is the method).
_NOT_SETTABLE = ("peft_type", "task_type", "inference_mode", "base_model_name_or_path")


def plan_config(
    method: str = "lora",
    task: str = "causal-lm",
    target_modules: list[str] | str | None = None,
    r: int | None = None,
    options: dict[str, Any] | None = None,
) -> Any:
    """The config a plan (or a training run) of ``method`` on a ``task`` model starts from.

    Args:
        method: a ``--method`` name (``lora``, ``ia3``, ``adalora``, ``adaption-prompt``, …).
        task: the peftc task (sets ``task_type``; head tasks save the head, as HF PEFT: ``modules_to_save``).
        target_modules: module names (a list) or a regex (a string); default: the method's table.
        r: the LoRA-family rank (a config field ``r``); refused for methods without one.
        options: any other config field by its HF PEFT name (``--set FIELD=VALUE``).

    Raises:
        ConfigError: an unknown method, or an option the method's config has no field for.
    """
    from peftc.config import TASK_TYPES
    from peftc.errors import ConfigError
    from peftc.methods import method_by_name
    from peftc.tasks import HEAD_TASKS, IMAGE_TARGETS, VISION_TASKS, head_modules

    chosen = method_by_name(method)
    fields = [f.name for f in dataclasses.fields(chosen.config_class) if not f.metadata.get("internal")]
    settable = [f for f in fields if f not in _NOT_SETTABLE]
    settings: dict[str, Any] = {}
    if target_modules is not None:
        if "target_modules" not in fields:
            raise ConfigError(
                f"--target-modules does not apply to method {method!r}: it adapts no modules by name "
                f"(its fields: {', '.join(settable)})"
            )
        settings["target_modules"] = target_modules
    if r is not None:
        if "r" not in fields:
            raise ConfigError(
                f"--r is the LoRA-family rank and method {method!r} has none; set its own fields with "
                f"--set FIELD=VALUE ({', '.join(settable)})"
            )
        settings["r"] = r
    for name, value in (options or {}).items():
        if name not in settable:
            raise ConfigError(
                f"--set {name}: not a field of {chosen.peft_type} configs (or not settable); fields: "
                f"{', '.join(settable)}"
            )
        settings[name] = value
    settings["task_type"] = TASK_TYPES[task]
    if task in VISION_TASKS and "target_modules" in fields and not settings.get("target_modules"):
        settings["target_modules"] = list(IMAGE_TARGETS)  # HF PEFT's image guides (its default table has no ViT)
    if task == "text-to-image" and "target_modules" in fields and not settings.get("target_modules"):
        from peftc.diffusion import UNET_TARGETS

        settings["target_modules"] = list(UNET_TARGETS)  # HF PEFT's Stable Diffusion recipe
    if task in HEAD_TASKS and "modules_to_save" in fields and not settings.get("modules_to_save"):
        settings["modules_to_save"] = head_modules(task)  # HF PEFT's convention for classification heads
    return chosen.config(method, **settings)


def plan_program(program: Any, config: Any) -> dict[str, Any]:
    """What ``config``'s insertion pipeline would do to ``program``; changes nothing.

    Returns:
        ``{"method", "label", "pipeline", "config", "decisions", "planned"}``: ``decisions`` lists every
        pass's :class:`~peftc.passes.SiteDecision` as a dict with the pass's name (``"pass"``); ``planned``
        maps each module the method would adapt to its label (``"LoRA r=8"``), for pictures.

    Raises:
        TargetNotFoundError: the method would adapt nothing (the error a training run raises, listing
            what could be targeted).
    """
    from peftc.errors import TargetNotFoundError
    from peftc.methods import get_method
    from peftc.passes import ModulesToSavePass, insertion_pipeline

    method = get_method(config)
    pipeline = insertion_pipeline(config)
    for p in pipeline:
        check = getattr(p, "sites_or_raise", None)
        if check is not None:
            check(program)  # nothing matched: its message names what could be targeted
    decisions, planned = [], {}
    for p in pipeline:
        own = not isinstance(p, ModulesToSavePass)  # the method's sites; the other pass copies whole parameters
        mine = p.plan(program)
        for d in mine:
            decisions.append({**dataclasses.asdict(d), "pass": p.name})
            if own and d.action == "rewrite":
                planned[d.name] = site_label(method, (d.details or {}).get("rank"))
        if own and mine and not any(d.action == "rewrite" for d in mine):
            reasons = "; ".join(f"{d.name}: {d.reason}" for d in mine[:3])
            raise TargetNotFoundError(f"{method.label} would adapt no module of this model ({reasons})")
    return {
        "method": method.peft_type,
        "label": method.label,
        "pipeline": pipeline.name,
        "config": config.to_dict(),
        "decisions": decisions,
        "planned": planned,
    }


def plan_model(
    spec: str | Path,
    task: str | None = None,
    target_modules: list[str] | str | None = None,
    r: int | None = None,
    method: str = "lora",
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The sites ``method`` would adapt in a model (dir or preset), and the reason for each skipped one.

    Args:
        spec: a model dir or preset.
        task: default: the preset's task, else guessed from the model's ``config.json`` architecture.
        target_modules, r, options: as :func:`plan_config`; ``method`` is a ``--method`` name.

    Returns:
        ``{"kind": "plan", "model", "task", "parameters", …}`` and what :func:`plan_program` returns.
    """
    plan = {"method": method, "target_modules": target_modules, "r": r, "options": options}
    return _plan(str(spec), task, plan)[0]


def _plan(spec: str, task: str | None, plan: dict[str, Any]) -> tuple[dict[str, Any], Any, Any]:
    """:func:`plan_model`'s result, the base program it planned on, and the config it planned with."""
    from peftc.models import load_model
    from peftc.program import capture

    from .sources import guess_task

    task = task or guess_task(spec)
    config = plan_config(
        plan.get("method") or "lora", task, plan.get("target_modules"), plan.get("r"), plan.get("options")
    )
    loaded = load_model(spec, task, num_labels=2 if task == "seq-cls" else None)
    program = capture(loaded.model, task, mode="eval")
    info = {"kind": "plan", "model": spec, "task": task, **plan_program(program, config)}
    info["parameters"] = program.parameter_counts()
    return info, program, config


def planned_summary(info: dict[str, Any]) -> str:
    """``"LoRA r=2"`` when every planned site has that label, else the method's label."""
    labels = set(info.get("planned", {}).values())
    return labels.pop() if len(labels) == 1 else info.get("label", info.get("method", "adapter"))


def plan_lines(info: dict[str, Any]) -> list[str]:
    """The text of a plan: per pass, each candidate site's action, module, class, the method's facts, the reason."""
    decisions = info["decisions"]
    rewrite = sum(d["action"] == "rewrite" for d in decisions)
    lines = [
        f"decisions of {info.get('pipeline', 'the pipeline')} ({info.get('label', info.get('method'))}): "
        f"{rewrite} rewrite, {len(decisions) - rewrite} skip"
    ]
    passes = list(dict.fromkeys(d.get("pass", "") for d in decisions))
    for name in passes:
        indent = "  "
        if len(passes) > 1:
            lines.append(f"  {name}:")
            indent = "    "
        for d in (d for d in decisions if d.get("pass", "") == name):
            why = f"  — {d['reason']}" if d.get("reason") else ""
            lines.append(f"{indent}{d['action']:8s} {d['name']} ({d['module_type']}){_details(d.get('details'))}{why}")
    return lines


def _details(details: dict[str, Any] | None) -> str:
    """`` r=8 in=64 out=192 scale=2.0`` (rank first, as LoRA's plan always showed), booleans as yes/no."""
    if not details:
        return ""
    items = dict(details)
    parts = [f"r={items.pop('rank')}"] if "rank" in items else []
    for key, value in items.items():
        parts.append(f"{key}={('yes' if value else 'no') if isinstance(value, bool) else value}")
    return " " + " ".join(parts)
