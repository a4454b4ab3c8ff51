"""``peftc inspect``: what is in a run dir, an artifact dir, an ``.onnx`` file or an adapter dir.

Every view reports inputs and outputs, adapter sites (module, shape, rank), trainable and frozen
parameter counts and an op histogram. ``plan_model`` shows which sites a method would adapt in a
model, and why others are skipped, without changing anything (the passes' dry run).

Pictures and diffs: :func:`graph_of` builds the block-level graph of anything with a graph (a run
dir's adapted program, an artifact's or a file's ONNX graph, a model's base program, a
:class:`~peftc.program.Program`) and :func:`draw` writes it as DOT or, with Graphviz, SVG/PNG/PDF
(:mod:`peftc.graph`). :func:`diff` tells what changed between two such graphs — ops by kind,
parameters (added, removed, reshaped, new values), inputs and outputs — and :func:`diff_programs`
does it for programs, e.g. around a pass (take :func:`program_facts` before an in-place pass).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from peftc.adapters import CONFIG_FILE, AdapterState
from peftc.errors import AdapterFormatError, ModelLoadError, PeftcError
from peftc.runs import RUN_FILE, resolve_source

__all__ = [
    "adapter_sites",
    "block_graph",
    "describe",
    "diff",
    "diff_programs",
    "draw",
    "graph_facts",
    "graph_of",
    "inspect_path",
    "onnx_facts",
    "onnx_summary",
    "plan_model",
    "program_facts",
    "program_summary",
    "render",
    "render_diff",
]


def adapter_sites(tensors: dict[str, Any], method: Any = None) -> list[dict[str, Any]]:
    """Group an adapter's tensors (or ONNX initializers/inputs) by site: ``{module, method, …facts}``.

    Each key is matched to the method that owns it (``method``, an adapter's own method, is asked first;
    then the registry), and the site's facts (rank, in, out…) come from the method's ``describe_site``.
    Tensors no method owns are full copies of base parameters (``modules_to_save``).
    """
    from peftc.methods import get_method, method_of_tensor

    own = get_method(method) if method is not None else None
    sites: dict[str, dict[str, Any]] = {}
    parts: dict[str, dict[str, list[int]]] = {}
    owners: dict[str, Any] = {}
    for key, t in tensors.items():
        shape = list(getattr(t, "shape", t))
        name = key.removeprefix("base_model.model.")
        owner = own if own is not None and own.owns(key) else method_of_tensor(key)
        if owner is None:
            sites[name] = {"module": name, "method": "full copy", "shape": shape}
            continue
        marker = next(m for m in owner.markers if m in name)
        module, _, rest = name.partition(marker)
        module = module.rstrip(".") or owner.label
        part = (marker + rest).removesuffix(".weight")
        parts.setdefault(module, {})[part] = shape
        owners[module] = owner
        sites.setdefault(module, {"module": module})
    for module, owner in owners.items():
        facts = owner.describe_site(parts[module]) if owner.describe_site else dict(parts[module])
        sites[module].update(method=owner.peft_type, **facts)
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
    from peftc.methods import method_of_tensor

    lora = {i.name: list(i.dims) for i in model.graph.initializer if method_of_tensor(i.name) is not None}
    lora.update(
        {
            v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in model.graph.input
            if method_of_tensor(v.name) is not None
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
    models = sorted(path.glob("*.onnx"))
    if models:
        info.update(onnx_summary(models[0]))
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
        lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        evals = [m for m in lines if any(k.startswith("eval") for k in m)]
        if evals:
            info["last_eval"] = evals[-1]
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


def plan_model(
    spec: str, task: str | None = None, target_modules: list[str] | str | None = None, r: int = 8
) -> dict[str, Any]:
    """The LoRA sites a model would get, and the reason for each skipped candidate; changes nothing."""
    return _plan(spec, task, target_modules, r)[0]


def _plan(
    spec: str, task: str | None, target_modules: list[str] | str | None, r: int
) -> tuple[dict[str, Any], Any, Any]:
    """:func:`plan_model`'s result, the base program it planned on, and the LoRA pass it asked."""
    from peftc.config import TASK_TYPES
    from peftc.models import PRESETS, load_model
    from peftc.passes.lora import LoraConfig, LoraPass
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
    info = {
        "kind": "plan",
        "model": spec,
        "task": task,
        "method": LoraConfig.peft_type,
        "decisions": [d.__dict__ for d in decisions],
        "parameters": program.parameter_counts(),
    }
    return info, program, lora


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


# -- graphs: what has one, pictures, facts and diffs ---------------------------------------------


def describe(
    path: str | Path,
    task: str | None = None,
    plan: dict[str, Any] | None = None,
    model: str | None = None,
) -> tuple[dict[str, Any], Any]:
    """:func:`inspect_path` (or :func:`plan_model`) and the graph behind it, built once.

    Args:
        path: a run dir, an adapter dir (with a local base), an artifact dir, an ``.onnx`` file, or a
            model dir / preset (its base program, captured in eval mode).
        task: task for a model dir or preset (default: guessed from its ``config.json``).
        model: base model dir or preset for an adapter dir (default: its ``base_model_name_or_path``).
        plan: ``{"target_modules": ..., "r": ...}``: a model's base program with the sites a LoRA
            plan would adapt (:func:`plan_model`); changes nothing.

    Returns:
        ``(info, graph)`` where graph is a :class:`~peftc.program.Program` or an ``onnx.ModelProto``.
        For a plan, ``info["planned"]`` maps each site the plan would rewrite to ``"LoRA r=…"``.

    Raises:
        AdapterFormatError: the path does not exist or holds nothing with a graph.
        ModelLoadError: a base model cannot be loaded.
    """
    if plan is not None:
        if task is None and (Path(path) / "config.json").is_file():
            task = _guess_task(Path(path))
        info, program, _ = _plan(str(path), task, plan.get("target_modules"), int(plan.get("r") or 8))
        info["planned"] = {
            d["name"]: f"LoRA r={(d.get('details') or {}).get('rank')}"
            for d in info["decisions"]
            if d["action"] == "rewrite"
        }
        return info, program
    spec = str(path)
    path = Path(path)
    if not path.exists() and spec in _presets():
        return _model_graph(spec, task)
    if not path.exists():
        raise AdapterFormatError(f"{path} does not exist")
    if path.is_file() or (path / "manifest.json").is_file():
        info = inspect_path(path)
        return info, _load_onnx(_onnx_file(path))
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


def _presets() -> dict[str, Any]:
    from peftc.models import PRESETS

    return PRESETS


def _guess_task(path: Path) -> str:
    """``causal-lm`` for a ``…ForCausalLM``/``…LMHeadModel`` config, else ``seq-cls``."""
    try:
        arch = " ".join(json.loads((path / "config.json").read_text()).get("architectures") or [])
    except (OSError, json.JSONDecodeError, AttributeError):
        arch = ""
    return "causal-lm" if "CausalLM" in arch or "LMHead" in arch else "seq-cls"


def _model_graph(spec: str, task: str | None) -> tuple[dict[str, Any], Any]:
    from peftc.models import load_model
    from peftc.program import capture

    presets = _presets()
    task = task or (presets[spec][1] if spec in presets else _guess_task(Path(spec)))
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


def _onnx_file(path: Path) -> Path:
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


def block_graph(info: dict[str, Any], graph: Any, depth: int | None = None) -> Any:
    """The :class:`peftc.graph.BlockGraph` of a :func:`describe` result, captioned from its ``info``."""
    from peftc.graph import onnx_block_graph, program_block_graph

    title = f"{info.get('kind', 'graph')}: {info.get('path') or info.get('model') or ''}".rstrip(": ")
    manifest = info.get("manifest") or {}
    if info.get("method") and info.get("kind") != "plan":
        title += f" ({info['method']}{', merged' if manifest.get('merged') else ''})"
    if type(graph).__name__ == "ModelProto":
        return onnx_block_graph(graph, title, depth=depth)
    return program_block_graph(graph, title, depth=depth, planned=info.get("planned") or None)


def _resolve(
    src: Any, task: str | None, plan: dict[str, Any] | None, model: str | None = None
) -> tuple[dict[str, Any], Any]:
    """(info, Program or ModelProto) for anything :func:`graph_of` takes."""
    from peftc.program import Program

    if isinstance(src, Program):
        return {"kind": f"program ({src.task.name}, {src.mode})"}, src
    if type(src).__name__ == "ModelProto":
        return {"kind": "onnx", "path": src.graph.name}, src
    return describe(src, task=task, plan=plan, model=model)


def graph_of(src: Any, depth: int | None = None, task: str | None = None, plan: dict[str, Any] | None = None) -> Any:
    """The block-level graph (:class:`peftc.graph.BlockGraph`) of a path, a Program or an ONNX model.

    Args:
        src: anything :func:`describe` takes, a :class:`~peftc.program.Program`, or an
            ``onnx.ModelProto``.
        depth: group ops by the first ``depth`` module-name parts instead of per layer block.
        task: task for a model dir or preset.
        plan: draw a model's base program with the sites a LoRA plan would adapt marked
            (``{"target_modules": ..., "r": ...}``).
    """
    info, graph = _resolve(src, task, plan)
    return block_graph(info, graph, depth)


def draw(src: Any, target: str | Path, depth: int | None = None, task: str | None = None, force: bool = False) -> Any:
    """Write the block graph of ``src`` to ``target`` (``.dot``/``.gv``, or ``.svg``/``.png``/``.pdf``).

    Returns:
        :class:`peftc.graph.GraphOutcome`: the file written, whether Graphviz rendered it, a message
        (without Graphviz's ``dot`` on PATH, a picture request writes the ``.dot`` beside it).
    """
    from peftc.graph import check_target, write_graph

    check_target(target, force)
    return write_graph(graph_of(src, depth=depth, task=task), target, force)


def _strip_model(name: str) -> str:
    from peftc.program import MODEL_PREFIX

    return name.removeprefix(MODEL_PREFIX)


def _digest(data: bytes) -> str:
    import hashlib

    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _tensor_digest(t: Any) -> str:
    import torch

    flat = t.detach().cpu().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return _digest(flat.view(torch.uint8).numpy().tobytes())


def program_facts(program: Any, label: str = "program") -> dict[str, Any]:
    """A snapshot of a program for :func:`diff`: op counts, parameters (shape, dtype, digest), inputs, outputs.

    Take it before an in-place pass to diff against the program after it::

        before = program_facts(program)
        merge_pipeline()(program)
        print(render_diff(diff_programs(before, program)))
    """
    import torch

    gm = program.graph_module
    params = {}
    for name, t in [*gm.named_parameters(), *gm.named_buffers()]:
        params[_strip_model(name)] = {
            "shape": list(t.shape),
            "dtype": str(t.dtype).removeprefix("torch."),
            "digest": _tensor_digest(t),
        }

    def spec(val: Any, dims: dict[int, str]) -> dict[str, Any]:
        if not isinstance(val, torch.Tensor):
            return {"dtype": type(val).__name__, "shape": []}
        shape = [dims.get(i, d if isinstance(d, int) else str(d)) for i, d in enumerate(val.shape)]
        shape = [int(d) if not isinstance(d, str) and hasattr(d, "__int__") else d for d in shape]
        return {"dtype": str(val.dtype).removeprefix("torch."), "shape": shape}

    inputs = {}
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    for i, node in enumerate(placeholders):
        name = node.meta.get("peftc_input") or (program.input_names[i] if i < len(program.input_names) else node.name)
        inputs[name] = {**spec(node.meta.get("val"), program.dynamic_dims.get(name, {})), "default": False}
    outputs = {}
    out_node = next(n for n in program.graph.nodes if n.op == "output")
    from peftc.graph import _flat_nodes

    for j, arg in enumerate(_flat_nodes(out_node.args)):
        name = program.output_names[j] if j < len(program.output_names) else f"output_{j}"
        outputs[name] = spec(arg.meta.get("val"), {0: "batch", 1: "sequence"})
    return {
        "kind": "program",
        "label": label,
        "ops": program.op_histogram(),
        "parameters": params,
        "inputs": inputs,
        "outputs": outputs,
        "sites": {name: site.to_dict() for name, site in program.sites.items()},
    }


def onnx_facts(model: Any, label: str = "onnx") -> dict[str, Any]:
    """The same snapshot as :func:`program_facts` for an ONNX model (a path or an ``onnx.ModelProto``).

    Initializers that are also graph inputs (swappable adapters' defaults) count as inputs with a
    default, not as parameters. Values stored as external data are not compared (``digest`` None).
    """
    import onnx
    from onnx import numpy_helper

    if not isinstance(model, onnx.ModelProto):
        label = str(model) if label == "onnx" else label
        model = _load_onnx(Path(model))
    graph = model.graph
    input_names = {v.name for v in graph.input}
    inits = {i.name: i for i in graph.initializer}

    def dtype(elem: int) -> str:
        try:
            return onnx.helper.tensor_dtype_to_np_dtype(elem).name
        except (KeyError, ValueError, TypeError):
            return onnx.TensorProto.DataType.Name(elem).lower()

    params = {}
    for name, init in inits.items():
        if name in input_names:
            continue
        if init.data_location == onnx.TensorProto.EXTERNAL:
            digest = None
        elif init.raw_data:
            digest = _digest(init.raw_data)
        else:
            digest = _digest(numpy_helper.to_array(init).tobytes())
        params[_strip_model(name)] = {"shape": list(init.dims), "dtype": dtype(init.data_type), "digest": digest}

    def value(v: Any) -> dict[str, Any]:
        t = v.type.tensor_type
        return {"dtype": dtype(t.elem_type), "shape": [d.dim_param or d.dim_value for d in t.shape.dim]}

    ops: Counter = Counter(
        f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in graph.node
    )
    return {
        "kind": "onnx",
        "label": label,
        "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "parameters": params,
        "inputs": {v.name: {**value(v), "default": v.name in inits} for v in graph.input},
        "outputs": {v.name: value(v) for v in graph.output},
    }


def graph_facts(
    src: Any, task: str | None = None, plan: dict[str, Any] | None = None, model: str | None = None
) -> dict[str, Any]:
    """:func:`program_facts` or :func:`onnx_facts` of anything :func:`graph_of` takes (facts pass through).

    With ``plan``, a model dir or preset is taken with the plan's LoRA sites inserted (fresh adapter),
    the graph a training run with that plan would start from.
    """
    if isinstance(src, dict) and "ops" in src and "parameters" in src:
        return src
    if plan is not None and isinstance(src, (str, Path)):
        if task is None and (Path(src) / "config.json").is_file():
            task = _guess_task(Path(src))
        info, program, lora = _plan(str(src), task, plan.get("target_modules"), int(plan.get("r") or 8))
        lora(program)
        return program_facts(program, f"plan: {src} (LoRA r={int(plan.get('r') or 8)} inserted)")
    info, graph = _resolve(src, task, plan, model)
    label = f"{info['kind']}: {info['path']}" if info.get("path") else info["kind"]
    if type(graph).__name__ == "ModelProto":
        return onnx_facts(graph, label)
    return program_facts(graph, label)


def diff_programs(before: Any, after: Any) -> dict[str, Any]:
    """What changed from one program (or its :func:`program_facts` snapshot) to another; see :func:`diff`."""
    a = before if isinstance(before, dict) else program_facts(before, "before")
    b = after if isinstance(after, dict) else program_facts(after, "after")
    return _diff_facts(a, b)


def diff(
    a: Any, b: Any, task: str | None = None, plan: dict[str, Any] | None = None, model: str | None = None
) -> dict[str, Any]:
    """What changed from graph ``a`` to graph ``b``: ops by kind, parameters, inputs and outputs.

    Args:
        a, b: run dirs or adapter dirs (their adapted programs), artifact dirs or ``.onnx`` files
            (ONNX graphs), model dirs or presets (base programs), Programs, ONNX models, or
            snapshots from :func:`program_facts` / :func:`onnx_facts`.
        task: task for model dirs and presets.
        plan: ``b``, when a model dir or preset, is taken with the LoRA sites of this plan inserted
            (``{"target_modules": ..., "r": ...}``): ``diff(model, model, plan=...)`` shows what the plan adds.
        model: base model for adapter-dir operands (default: their ``base_model_name_or_path``).

    Returns:
        ``{"a", "b", "ops", "parameters", "inputs", "outputs", "notes", "identical"}``; ``ops`` has
        per-kind counts before/after/delta (changed kinds only) and totals; ``parameters`` lists
        added, removed, shape- or dtype-changed and value-changed tensors and the totals;
        ``inputs``/``outputs`` list added, removed and changed (dtype, shape, default) entries.
        :func:`render_diff` turns it into text.
    """
    for src in (a, b):  # fail on a missing operand before loading and capturing the other
        if isinstance(src, (str, Path)) and not Path(src).exists() and str(src) not in _presets():
            raise AdapterFormatError(f"{src} does not exist; --diff takes two run, adapter, artifact or model dirs")
    fa = graph_facts(a, task, None, model)
    fb = graph_facts(b, task, _plan_for(b, plan), model)
    return _diff_facts(fa, fb)


def _plan_for(src: Any, plan: dict[str, Any] | None) -> dict[str, Any] | None:
    """A plan applies to model operands only (a model dir or preset), never to runs or artifacts."""
    if plan is None or not isinstance(src, (str, Path)):
        return None
    path = Path(src)
    if str(src) in _presets() and not path.exists():
        return plan
    is_model = path.is_dir() and (path / "config.json").is_file()
    has_other = any((path / f).is_file() for f in ("manifest.json", RUN_FILE, CONFIG_FILE))
    return plan if is_model and not has_other else None


def _count(params: dict[str, Any]) -> tuple[int, int]:
    return len(params), sum(_numel(p["shape"]) for p in params.values())


def _diff_facts(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    notes = []
    if a["kind"] != b["kind"]:
        notes.append(
            f"A is {'an aten program' if a['kind'] == 'program' else 'an ONNX graph'} and B is "
            f"{'an aten program' if b['kind'] == 'program' else 'an ONNX graph'}: op names differ by IR"
        )
    ops = []
    for op in sorted(set(a["ops"]) | set(b["ops"])):
        na, nb = a["ops"].get(op, 0), b["ops"].get(op, 0)
        if na != nb:
            ops.append({"op": op, "a": na, "b": nb, "delta": nb - na})
    ops.sort(key=lambda d: (-abs(d["delta"]), d["op"]))
    ta, tb = sum(a["ops"].values()), sum(b["ops"].values())

    pa = {n: p for n, p in a["parameters"].items() if _is_named(n)}
    pb = {n: p for n, p in b["parameters"].items() if _is_named(n)}
    added = [{"name": n, **_spec(pb[n])} for n in pb if n not in pa]
    removed = [{"name": n, **_spec(pa[n])} for n in pa if n not in pb]
    reshaped, retyped, revalued, unknown = [], [], [], 0
    for n in pa:
        if n not in pb:
            continue
        if pa[n]["shape"] != pb[n]["shape"]:
            reshaped.append({"name": n, "a": pa[n]["shape"], "b": pb[n]["shape"]})
        elif pa[n]["dtype"] != pb[n]["dtype"]:
            retyped.append({"name": n, "a": pa[n]["dtype"], "b": pb[n]["dtype"]})
        elif pa[n].get("digest") is None or pb[n].get("digest") is None:
            unknown += 1
        elif pa[n]["digest"] != pb[n]["digest"]:
            revalued.append(n)
    if unknown:
        notes.append(f"{unknown} parameters stored as external data: values not compared")
    if a["kind"] != b["kind"] and (added or removed):
        notes.append(
            "the ONNX exporter stores identical tensors once and a tied weight under one name: "
            "compare a program with a program and an ONNX graph with an ONNX graph for exact parameter diffs"
        )
    (ca, ea), (cb, eb) = _count(pa), _count(pb)
    parameters = {
        "added": added,
        "removed": removed,
        "shape_changed": reshaped,
        "dtype_changed": retyped,
        "values_changed": revalued,
        "tensors": {"a": ca, "b": cb, "delta": cb - ca},
        "elements": {"a": ea, "b": eb, "delta": eb - ea},
        "constants": _diff_constants(a["parameters"], b["parameters"]),
    }
    result = {
        "a": {"kind": a["kind"], "label": a["label"]},
        "b": {"kind": b["kind"], "label": b["label"]},
        "ops": {"changed": ops, "total": {"a": ta, "b": tb, "delta": tb - ta}},
        "parameters": parameters,
        "inputs": _diff_values(a["inputs"], b["inputs"]),
        "outputs": _diff_values(a["outputs"], b["outputs"]),
        "notes": notes,
    }
    if "sites" in a or "sites" in b:
        sa, sb = set(a.get("sites") or {}), set(b.get("sites") or {})
        result["sites"] = {"added": sorted(sb - sa), "removed": sorted(sa - sb), "a": len(sa), "b": len(sb)}
    result["identical"] = not (
        ops
        or added
        or removed
        or reshaped
        or retyped
        or revalued
        or parameters["constants"]["added"]
        or parameters["constants"]["removed"]
        or any(result[k][c] for k in ("inputs", "outputs") for c in ("added", "removed", "changed"))
    )
    return result


def _is_named(name: str) -> bool:
    """A model parameter (``module.weight``), not a constant an exporter named (``val_12``, ``_tensor_constant0``)."""
    return "." in name


def _diff_constants(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Unnamed constants compared by content (shape, dtype, value), since exporters number them arbitrarily."""

    def bag(params: dict[str, Any]) -> Counter:
        return Counter((tuple(p["shape"]), p["dtype"], p.get("digest")) for n, p in params.items() if not _is_named(n))

    ba, bb = bag(a), bag(b)

    def listing(c: Counter) -> list[dict[str, Any]]:
        return [{"shape": list(s), "dtype": d, "count": n} for (s, d, _), n in sorted(c.items(), key=str)]

    return {
        "a": sum(ba.values()),
        "b": sum(bb.values()),
        "added": listing(bb - ba),
        "removed": listing(ba - bb),
    }


def _spec(p: dict[str, Any]) -> dict[str, Any]:
    return {"shape": p["shape"], "dtype": p["dtype"]}


def _diff_values(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    changed = []
    for name in a:
        if name in b and a[name] != b[name]:
            what = [k for k in ("dtype", "shape", "default") if a[name].get(k) != b[name].get(k)]
            changed.append({"name": name, "what": what, "a": a[name], "b": b[name]})
    return {
        "added": [{"name": n, **b[n]} for n in b if n not in a],
        "removed": [{"name": n, **a[n]} for n in a if n not in b],
        "changed": changed,
        "a": list(a),
        "b": list(b),
    }


def _signed(n: int) -> str:
    return f"{n:+,}" if n else "0"


def render_diff(d: dict[str, Any], limit: int = 20) -> str:
    """Human-readable text for a :func:`diff` result (at most ``limit`` lines per list; ``--json`` has all)."""
    lines = [f"A: {d['a']['label']}", f"B: {d['b']['label']}"]
    lines += [f"note: {n}" for n in d["notes"]]
    if d["identical"]:
        lines.append("identical: same ops, parameters (shapes and values), inputs and outputs")
    tot = d["ops"]["total"]
    lines.append(f"ops: {tot['a']:,} -> {tot['b']:,} ({_signed(tot['delta'])})")
    if d["ops"]["changed"]:
        width = max(len(o["op"]) for o in d["ops"]["changed"][:limit]) + 2
        lines.append(f"  {'op':{width}s}{'A':>7s}{'B':>7s}{'delta':>8s}")
        for o in d["ops"]["changed"][:limit]:
            lines.append(f"  {o['op']:{width}s}{o['a']:>7,}{o['b']:>7,}{_signed(o['delta']):>8s}")
        _more(lines, d["ops"]["changed"], limit)
    p = d["parameters"]
    lines.append(
        f"parameters: {p['tensors']['a']:,} -> {p['tensors']['b']:,} tensors ({_signed(p['tensors']['delta'])}), "
        f"{p['elements']['a']:,} -> {p['elements']['b']:,} elements ({_signed(p['elements']['delta'])})"
    )
    for sign, key in (("+", "added"), ("-", "removed")):
        for t in p[key][:limit]:
            lines.append(f"  {sign} {t['name']} {t['shape']} {t['dtype']}")
        _more(lines, p[key], limit)
    for t in p["shape_changed"][:limit]:
        lines.append(f"  ~ {t['name']} shape {t['a']} -> {t['b']}")
    for t in p["dtype_changed"][:limit]:
        lines.append(f"  ~ {t['name']} dtype {t['a']} -> {t['b']}")
    if p["values_changed"]:
        lines.append(f"  values changed: {len(p['values_changed'])}")
        lines += [f"  ~ {n}" for n in p["values_changed"][:limit]]
        _more(lines, p["values_changed"], limit)
    c = p["constants"]
    if c["a"] or c["b"]:
        same = not (c["added"] or c["removed"])
        lines.append(
            f"constants (unnamed, compared by value): {c['a']:,} -> {c['b']:,}" + (", same values" if same else "")
        )
        for sign, key in (("+", "added"), ("-", "removed")):
            for t in c[key][:limit]:
                lines.append(f"  {sign} {t['count']}x {t['shape']} {t['dtype']}")
            _more(lines, c[key], limit)
    for key in ("inputs", "outputs"):
        io = d[key]
        if not (io["added"] or io["removed"] or io["changed"]):
            lines.append(f"{key}: unchanged ({', '.join(io['a'])})")
            continue
        lines.append(f"{key}: {len(io['a'])} -> {len(io['b'])}")
        for sign, part in (("+", "added"), ("-", "removed")):
            for v in io[part][:limit]:
                default = " (has default)" if v.get("default") else ""
                lines.append(f"  {sign} {v['name']}: {v['dtype']} {v['shape']}{default}")
            _more(lines, io[part], limit)
        for v in io["changed"][:limit]:
            parts = [f"{w} {v['a'].get(w)} -> {v['b'].get(w)}" for w in v["what"]]
            lines.append(f"  ~ {v['name']}: " + "; ".join(parts))
    if d.get("sites") and (d["sites"]["added"] or d["sites"]["removed"]):
        s = d["sites"]
        lines.append(f"adapter sites: {s['a']} -> {s['b']}")
        lines += [f"  + {n}" for n in s["added"][:limit]] + [f"  - {n}" for n in s["removed"][:limit]]
    return "\n".join(lines)


def _more(lines: list[str], items: list[Any], limit: int) -> None:
    if len(items) > limit:
        lines.append(f"  … {len(items) - limit} more (--json for all)")
