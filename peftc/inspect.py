"""``peftc inspect``: what is in a run dir, an artifact dir, an ``.onnx`` file or an adapter dir.

Every view reports inputs and outputs, adapter sites (module, shape, rank), trainable and frozen
parameter counts and an op histogram. ``plan_model`` shows which sites a method would adapt in a
model, and why others are skipped, without changing anything (the passes' dry run).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from peftc.adapters import CONFIG_FILE, AdapterState
from peftc.errors import AdapterFormatError, PeftcError
from peftc.runs import RUN_FILE, resolve_source

__all__ = ["adapter_sites", "inspect_path", "onnx_summary", "plan_model", "program_summary", "render"]

_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.weight)?$")


def adapter_sites(tensors: dict[str, Any]) -> list[dict[str, Any]]:
    """Group LoRA tensors by module: ``{module, in, out, rank}``; other tensors as full copies."""
    sites: dict[str, dict[str, Any]] = {}
    for key, t in tensors.items():
        shape = list(getattr(t, "shape", t))
        m = _LORA_KEY.match(key)
        if m:
            site = sites.setdefault(m["module"], {"module": m["module"], "method": "LORA"})
            if m["which"] == "A":
                site["rank"], site["in"] = shape[0], shape[1]
            else:
                site["out"] = shape[0]
        else:
            name = key.removeprefix("base_model.model.")
            sites[name] = {"module": name, "method": "full copy", "shape": shape}
    return list(sites.values())


def program_summary(program: Any) -> dict[str, Any]:
    """Inputs, outputs, sites, parameter counts and op histogram of a captured program."""
    return {
        "inputs": [{"name": n, "dims": program.dynamic_dims.get(n, {})} for n in program.input_names],
        "outputs": program.output_names,
        "sites": [s.to_dict() for s in program.sites.values()],
        "parameters": program.parameter_counts(),
        "op_histogram": program.op_histogram(),
    }


def onnx_summary(path: str | Path) -> dict[str, Any]:
    """Read an ONNX model's signature, initializers and op histogram (no external data loaded)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError/OSError/…
        raise AdapterFormatError(f"{path} is not a readable ONNX model: {type(e).__name__}: {e}") from e

    def value_info(v: Any) -> dict[str, Any]:
        t = v.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims}

    init_names = {i.name for i in model.graph.initializer}
    params = sum(_numel(i.dims) for i in model.graph.initializer)
    lora = {i.name: list(i.dims) for i in model.graph.initializer if "lora_" in i.name}
    lora.update(
        {
            v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in model.graph.input
            if "lora_" in v.name
        }
    )
    return {
        "inputs": [value_info(v) for v in model.graph.input if v.name not in init_names],
        "outputs": [value_info(v) for v in model.graph.output],
        "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
        "sites": adapter_sites(lora),
        "parameters": {"initializers": len(init_names), "total": params},
        "op_histogram": dict(Counter(n.op_type for n in model.graph.node).most_common()),
    }


def _numel(dims: Any) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def inspect_path(path: str | Path) -> dict[str, Any]:
    """Describe a run dir, an artifact dir, an ``.onnx`` file or an adapter dir.

    Raises:
        AdapterFormatError: ``path`` is none of these, or unreadable.
    """
    path = Path(path)
    if not path.exists():
        raise AdapterFormatError(f"{path} does not exist")
    if path.is_file():
        if path.suffix != ".onnx":
            raise AdapterFormatError(
                f"{path} is a file but not an .onnx model; inspect takes a run dir, an artifact dir or an .onnx file"
            )
        return {"kind": "onnx", "path": str(path), **onnx_summary(path)}
    if (path / "manifest.json").is_file():
        return _inspect_artifact(path)
    if (path / RUN_FILE).is_file():
        return _inspect_run(path)
    if (path / CONFIG_FILE).is_file():
        state = AdapterState.load(path)
        return {
            "kind": "adapter",
            "path": str(path),
            "method": state.config.peft_type,
            "config": state.config.to_dict(),
            "sites": adapter_sites(state.tensors),
            "parameters": {"trainable": state.num_parameters()},
        }
    raise AdapterFormatError(
        f"{path} is not a run dir ({RUN_FILE}), an artifact dir (manifest.json) or an adapter dir ({CONFIG_FILE})"
    )


def _inspect_artifact(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except json.JSONDecodeError as e:
        raise AdapterFormatError(f"{path / 'manifest.json'} is not valid JSON: {e}") from e
    info: dict[str, Any] = {"kind": "artifact", "path": str(path), "manifest": manifest}
    models = sorted(path.glob("*.onnx"))
    if models:
        info.update(onnx_summary(models[0]))
    report = path / "report.json"
    if report.is_file():
        info["report"] = json.loads(report.read_text())
    return info


def _inspect_run(path: Path) -> dict[str, Any]:
    """A run: the adapter, and the adapted eval program (base loaded and captured)."""
    from peftc.models import load_model
    from peftc.passes import insertion_pipeline
    from peftc.program import capture

    source = resolve_source(path)
    state = AdapterState.load(source.adapter_dir)
    info: dict[str, Any] = {
        "kind": "run",
        "path": str(path),
        "task": source.task,
        "base": source.base,
        "method": state.config.peft_type,
        "config": state.config.to_dict(),
    }
    metrics = path / "metrics.jsonl"
    if metrics.is_file():
        lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        evals = [m for m in lines if any(k.startswith("eval") for k in m)]
        if evals:
            info["last_eval"] = evals[-1]
    try:
        loaded = load_model(source.base, source.task, id2label=source.id2label)
    except PeftcError as e:
        info["sites"] = adapter_sites(state.tensors)
        info["warning"] = f"base model not loadable, graph not shown: {e}"
        return info
    program = capture(loaded.model, source.task, mode="eval")
    insertion_pipeline(state.config, state)(program)
    info.update(program_summary(program))
    info["parameters"]["trainable"] = state.num_parameters()
    info["parameters"]["frozen"] = info["parameters"]["total"] - state.num_parameters()
    return info


def plan_model(
    spec: str, task: str | None = None, target_modules: list[str] | str | None = None, r: int = 8
) -> dict[str, Any]:
    """The LoRA sites a model would get, and the reason for each skipped candidate; changes nothing."""
    from peftc.config import TASK_TYPES, LoraConfig
    from peftc.models import PRESETS, load_model
    from peftc.passes import LoraPass
    from peftc.program import capture

    task = task or (PRESETS[spec][1] if spec in PRESETS else "seq-cls")
    loaded = load_model(spec, task, num_labels=2 if task == "seq-cls" else None)
    program = capture(loaded.model, task, mode="eval")
    cfg = LoraConfig(
        r=r,
        target_modules=target_modules,
        task_type=TASK_TYPES[task],
        modules_to_save=["classifier", "score"] if task == "seq-cls" else None,
    )
    lora = LoraPass(cfg)
    lora.sites_or_raise(program)
    decisions = lora.plan(program)
    return {
        "kind": "plan",
        "model": spec,
        "task": task,
        "method": "LORA",
        "decisions": [d.__dict__ for d in decisions],
        "parameters": program.parameter_counts(),
    }


def render(info: dict[str, Any]) -> str:
    """Human-readable text for an :func:`inspect_path` or :func:`plan_model` result."""
    lines = [f"{info['kind']}: {info.get('path') or info.get('model')}"]
    for key in ("task", "base", "method", "opset"):
        if info.get(key) is not None:
            lines.append(f"  {key}: {info[key]}")
    manifest = info.get("manifest")
    if manifest:
        lines.append(f"  merged: {manifest.get('merged')}  method: {manifest.get('method')}")
    if "inputs" in info:
        lines.append("inputs:")
        lines += [f"  {_io(v)}" for v in info["inputs"]]
        lines.append("outputs:")
        lines += [f"  {_io(v)}" for v in info["outputs"]]
    if info.get("decisions") is not None:
        lines.append("plan:")
        for d in info["decisions"]:
            extra = (
                f" r={d['details']['rank']} in={d['details']['in']} out={d['details']['out']}"
                if d.get("details")
                else ""
            )
            why = f"  — {d['reason']}" if d["reason"] else ""
            lines.append(f"  {d['action']:8s} {d['name']} ({d['module_type']}){extra}{why}")
    if info.get("sites") is not None:
        lines.append(f"adapter sites: {len(info['sites'])}")
        for s in info["sites"]:
            shape = (
                s.get("shape")
                or f"in={s.get('in', s.get('in_features'))} out={s.get('out', s.get('out_features'))} r={s.get('rank')}"
            )
            lines.append(f"  {s.get('module') or s.get('name')}: {s.get('method')} {shape}")
    if info.get("parameters"):
        lines.append("parameters: " + ", ".join(f"{k}={v:,}" for k, v in info["parameters"].items()))
    if info.get("report"):
        rep = info["report"]
        lines.append(
            f"verification: max abs diff {rep.get('max_abs_diff')} (atol {rep.get('atol')}), "
            f"verified={rep.get('verified')}"
        )
    if info.get("last_eval"):
        lines.append("last eval: " + ", ".join(f"{k}={v}" for k, v in info["last_eval"].items()))
    if info.get("op_histogram"):
        ops = list(info["op_histogram"].items())
        lines.append(f"ops: {sum(v for _, v in ops)} nodes, {len(ops)} kinds")
        lines += [f"  {k:40s} {v}" for k, v in ops[:25]]
        if len(ops) > 25:
            lines.append(f"  … {len(ops) - 25} more kinds (--json for all)")
    if info.get("warning"):
        lines.append(f"warning: {info['warning']}")
    return "\n".join(lines)


def _io(v: Any) -> str:
    if isinstance(v, str):
        return v
    if "shape" in v:
        return f"{v['name']}: {v.get('dtype', '')} {v['shape']}"
    return f"{v['name']}: dims {v.get('dims')}"
