"""What a run dir, an artifact dir, an ``.onnx`` file or an adapter dir holds: ``peftc inspect PATH``.

Every view reports inputs and outputs, adapter sites (module, method, shape, rank), trainable and
frozen parameter counts and an op histogram; a run adds its method config and last evaluation, an
artifact its manifest and verification report. :func:`render` turns any inspect result (a plan's too,
:mod:`peftc.inspect.plan`) into text. Sites are labelled through :mod:`peftc.inspect.sites`, with the
method the adapter or artifact declares.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from peftc.adapters import CONFIG_FILE, AdapterState
from peftc.errors import AdapterFormatError, PeftcError
from peftc.runs import RUN_FILE, resolve_source

from .sites import adapter_sites, declared_method, guess_method, tensor_site

__all__ = ["inspect_path", "onnx_summary", "program_summary", "render"]


def program_summary(program: Any) -> dict[str, Any]:
    """Inputs, outputs, sites, parameter counts and op histogram of a captured program."""
    return {
        "inputs": [{"name": n, "dims": program.dynamic_dims.get(n, {})} for n in program.input_names],
        "outputs": program.output_names,
        "sites": [s.to_dict() for s in program.sites.values()],
        "parameters": program.parameter_counts(),
        "op_histogram": program.op_histogram(),
    }


def onnx_summary(path: str | Path, method: str | None = None) -> dict[str, Any]:
    """Read an ONNX model's signature, initializers, adapter sites and op histogram (no external data loaded).

    Args:
        path: the ``.onnx`` file.
        method: the ``peft_type`` the artifact declares (its manifest); default: the model's own
            ``peftc.peft_type`` metadata, else guessed from the adapter tensors' names.
    """
    import onnx

    from peftc.program import MODEL_PREFIX

    model = _load_onnx(Path(path))

    def value_info(v: Any) -> dict[str, Any]:
        t = v.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims}

    init_names = {i.name for i in model.graph.initializer}
    params = sum(_numel(i.dims) for i in model.graph.initializer)
    declared = declared_method(method or onnx_method(model))
    # initializers are named after graph paths (model.<module>…); graph inputs (lifted adapters) after the module
    inputs = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input}
    tensors = {i.name.removeprefix(MODEL_PREFIX): list(i.dims) for i in model.graph.initializer if i.name not in inputs}
    tensors.update(inputs)
    own = declared or guess_method(tensors)
    adapter = {name: dims for name, dims in tensors.items() if tensor_site(name, own) is not None}
    info: dict[str, Any] = {
        "inputs": [value_info(v) for v in model.graph.input if v.name not in init_names],
        "outputs": [value_info(v) for v in model.graph.output],
        "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
        "sites": adapter_sites(adapter, own),
        "parameters": {"initializers": len(init_names), "total": params},
        "op_histogram": dict(Counter(n.op_type for n in model.graph.node).most_common()),
    }
    if declared is not None:
        info["method"] = declared.peft_type
    return info


def onnx_method(model: Any) -> str | None:
    """The ``peft_type`` an exported ONNX model declares in its ``peftc.peft_type`` metadata, if any."""
    return next((p.value for p in model.metadata_props if p.key == "peftc.peft_type"), None) or None


def onnx_file(path: Path) -> Path:
    """The ``.onnx`` file itself, or an artifact dir's model (``model.onnx`` first)."""
    if path.is_file():
        return path
    models = sorted(path.glob("*.onnx"))
    if not models:
        raise AdapterFormatError(f"artifact dir {path} holds no .onnx model; export one with `peftc export`")
    return path / "model.onnx" if (path / "model.onnx").is_file() else models[0]


def _load_onnx(path: Path) -> Any:
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError/OSError/…
        raise AdapterFormatError(f"{path} is not a readable ONNX model: {type(e).__name__}: {e}") from e


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
            "sites": adapter_sites(state.tensors, state.config),
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
    named = manifest.get("model_file")  # the manifest's own file first (a diffusion pipeline's unet/model.onnx)
    if isinstance(named, str) and named.endswith(".onnx") and (path / named).is_file():
        info.update(onnx_summary(path / named, method=manifest.get("method")))
    elif any(path.glob("*.onnx")):
        info.update(onnx_summary(onnx_file(path), method=manifest.get("method")))
    files = manifest.get("model_files")
    if isinstance(files, dict):  # several graphs (seq2seq): each one's file and I/O names, from the manifest
        info["graphs"] = [
            {
                "graph": role,
                "file": file,
                **{
                    kind: [v["name"] for v in manifest.get(kind, []) if v.get("graph") == role]
                    for kind in ("inputs", "outputs")
                },
            }
            for role, file in files.items()
        ]
        info["summary_of"] = onnx_file(path).name
    report = path / "report.json"
    if report.is_file():
        info["report"] = json.loads(report.read_text())
    return info


def _inspect_run(path: Path, keep: dict[str, Any] | None = None) -> dict[str, Any]:
    """A run: the adapter, and the adapted eval program (base loaded and captured); ``keep["program"]`` gets it."""
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
        last = last_eval(metrics)
        if last:
            info["last_eval"] = last
    try:
        loaded = load_model(source.base, source.task, id2label=source.id2label)
    except PeftcError as e:
        info["sites"] = adapter_sites(state.tensors, state.config)
        info["warning"] = f"base model not loadable, graph not shown: {e}"
        return info
    program = capture(loaded.model, source.task, mode="eval")
    insertion_pipeline(state.config, state)(program)
    if keep is not None:
        keep["program"] = program
    info.update(program_summary(program))
    info["parameters"]["trainable"] = state.num_parameters()
    info["parameters"]["frozen"] = info["parameters"]["total"] - state.num_parameters()
    return info


def last_eval(metrics: Path) -> dict[str, Any] | None:
    """The last evaluation logged in a run's ``metrics.jsonl`` (``{"type": "eval", …}`` lines), without ``type``."""
    last = None
    for line in metrics.read_text().splitlines():
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            continue  # a line cut short by a crash mid-write: the lines before it still count
        if isinstance(row, dict) and row.get("type") == "eval":
            last = {k: v for k, v in row.items() if k != "type"}
    return last


def _mixed_adapters(manifest: dict[str, Any]) -> str:
    """``0 = name (rank 4), 1 = …`` of a mixed-batch artifact's manifest."""
    parts = []
    for a in manifest.get("adapters", []):
        rank = f" (rank {a['rank']})" if a.get("rank") is not None else ""
        parts.append(f"{a.get('index')} = {a.get('name')}{rank}")
    return ", ".join(parts)


def render(info: dict[str, Any]) -> str:
    """Human-readable text for an :func:`inspect_path` or :func:`plan_model` result."""
    lines = [f"{info['kind']}: {info.get('path') or info.get('model')}"]
    for key in ("task", "base", "method", "opset"):
        if info.get(key) is not None:
            lines.append(f"  {key}: {info[key]}")
    manifest = info.get("manifest")
    if manifest:
        mode = f"  mode: {manifest['mode']}" if manifest.get("mode") else ""
        lines.append(f"  merged: {manifest.get('merged')}  method: {manifest.get('method')}{mode}")
        if manifest.get("mixed_batch"):  # --mixed-batch: which adapter_index picks which adapter
            lines.append(f"  adapter_index: int64[batch], -1 = the base model, {_mixed_adapters(manifest)}")
        elif manifest.get("adapters"):
            lines.append("  adapters: " + ", ".join(str(a.get("name")) for a in manifest["adapters"]))
    if info.get("graphs"):
        lines.append(f"graphs: {len(info['graphs'])}")
        for g in info["graphs"]:
            lines.append(f"  {g['graph']}: {g['file']}  {_names(g['inputs'])} -> {_names(g['outputs'])}")
        lines.append(f"(inputs, outputs and ops below: {info.get('summary_of')})")
    if "inputs" in info:
        lines.append("inputs:")
        lines += [f"  {_io(v)}" for v in info["inputs"]]
        lines.append("outputs:")
        lines += [f"  {_io(v)}" for v in info["outputs"]]
    if info.get("decisions") is not None:
        from .plan import plan_lines

        lines += plan_lines(info)
    if info.get("sites") is not None:
        lines.append(f"adapter sites: {len(info['sites'])}")
        lines += [f"  {s.get('module') or s.get('name')}: {s.get('method')} {_site_facts(s)}" for s in info["sites"]]
    if info.get("parameters"):
        lines.append("parameters: " + ", ".join(f"{k}={v:,}" for k, v in info["parameters"].items()))
    if info.get("report"):
        rep = info["report"]
        lines.append(
            f"verification: max abs diff {rep.get('max_abs_diff')} (atol {rep.get('atol')}"
            + (f" + rtol {rep['rtol']} × max |reference|" if rep.get("rtol") else "")
            + "), "
            f"verified={rep.get('verified')}"
        )
        if rep.get("quantization"):  # --quantize: the quantized file against the float program
            q = rep["quantization"]
            block = f" (block {q['block_size']})" if q.get("block_size") else ""
            figures = (
                ""
                if q.get("mean_kl") is None
                else f", top-1 agreement {q['top1_agreement']}, mean KL {q['mean_kl']:.3g}"
            )
            lines.append(
                f"quantization: {q['scheme']}{block}, {q['size_bytes']:,} of {q['float_size_bytes']:,} bytes{figures}"
            )
    if info.get("last_eval"):
        first = {k: info["last_eval"][k] for k in ("step", "epoch") if k in info["last_eval"]}
        shown = {**first, **info["last_eval"]}  # where it was taken first, then the metrics
        lines.append(
            "last eval: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
        )
    if info.get("op_histogram"):
        ops = list(info["op_histogram"].items())
        lines.append(f"ops: {sum(v for _, v in ops)} nodes, {len(ops)} kinds")
        lines += [f"  {k:40s} {v}" for k, v in ops[:25]]
        if len(ops) > 25:
            lines.append(f"  … {len(ops) - 25} more kinds (--json for all)")
    if info.get("warning"):
        lines.append(f"warning: {info['warning']}")
    return "\n".join(lines)


def _site_facts(site: dict[str, Any]) -> str:
    """``in=64 out=192 r=4`` for low-rank sites (adapters and programs name the fields differently), else
    the shape, else whatever facts the method's ``describe_site`` gave."""
    fin, fout = site.get("in", site.get("in_features")), site.get("out", site.get("out_features"))
    if site.get("rank") is not None or (fin is not None and fout is not None and not site.get("shape")):
        variant = f" ({site['variant']})" if site.get("variant") else ""  # DoRA: a LoRA variant, peft_type LORA
        return f"in={fin} out={fout} r={site.get('rank')}{variant}"
    if site.get("shape"):
        return str(site["shape"])
    skip = {"module", "name", "method"}
    return " ".join(f"{k}={v}" for k, v in site.items() if k not in skip and v is not None)


def _names(names: list[str]) -> str:
    """Graph I/O names, a cache's per-layer names folded: ``input_ids, past_key_values.* (8)``."""
    shown: list[str] = []
    for prefix in dict.fromkeys(n.split(".", 1)[0] if "." in n else n for n in names):
        group = [n for n in names if n == prefix or n.startswith(prefix + ".")]
        shown.append(group[0] if group == [prefix] else f"{prefix}.* ({len(group)})")
    return ", ".join(shown)


def _io(v: Any) -> str:
    if isinstance(v, str):
        return v
    if "shape" in v:
        return f"{v['name']}: {v.get('dtype', '')} {v['shape']}"
    return f"{v['name']}: dims {v.get('dims')}"
