"""What changed between two graphs: ``peftc inspect --diff A B`` and :func:`diff_programs` around a pass.

A graph is reduced to facts (:func:`program_facts` for a captured program, :func:`onnx_facts` for an
ONNX model): op counts by kind, parameters by name (shape, dtype and a digest of the values), inputs
and outputs (dtype, shape, whether an input has a default), adapter sites. :func:`diff` compares two
such snapshots: ops by kind, parameters added, removed, reshaped, retyped or with new values, unnamed
constants by content, inputs and outputs; :func:`render_diff` turns the result into text. Take
:func:`program_facts` before an in-place pass to diff the program against itself after the pass.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from peftc.errors import AdapterFormatError

from .describe import _load_onnx, _numel
from .sources import is_model, resolve

__all__ = ["diff", "diff_programs", "graph_facts", "onnx_facts", "program_facts", "render_diff"]


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
    from .graph import _flat_nodes

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
    """:func:`program_facts` or :func:`onnx_facts` of anything :func:`~peftc.inspect.graph.graph_of` takes
    (facts pass through).

    With ``plan`` (see :func:`~peftc.inspect.sources.describe`), a model dir or preset is taken with the
    plan's sites inserted by the method's own pipeline (a fresh adapter): the graph a training run with
    that plan would start from.
    """
    if isinstance(src, dict) and "ops" in src and "parameters" in src:
        return src
    if plan is not None and isinstance(src, (str, Path)):
        from peftc.passes import insertion_pipeline

        from .plan import _plan, planned_summary

        info, program, config = _plan(str(src), task, plan)
        program = insertion_pipeline(config)(program).program  # prompt methods re-capture: a new program
        return program_facts(program, f"plan: {src} ({planned_summary(info)} inserted)")
    info, graph = resolve(src, task, plan, model)
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
        plan: ``b``, when a model dir or preset, is taken with the sites of this plan inserted
            (``{"method", "target_modules", "r", "options"}``, as :func:`~peftc.inspect.sources.describe`):
            ``diff(model, model, plan=...)`` shows what the plan adds.
        model: base model for adapter-dir operands (default: their ``base_model_name_or_path``).

    Returns:
        ``{"a", "b", "ops", "parameters", "inputs", "outputs", "notes", "identical"}``; ``ops`` has
        per-kind counts before/after/delta (changed kinds only) and totals; ``parameters`` lists
        added, removed, shape- or dtype-changed and value-changed tensors and the totals;
        ``inputs``/``outputs`` list added, removed and changed (dtype, shape, default) entries.
        :func:`render_diff` turns it into text.
    """
    for src in (a, b):  # fail on a missing operand before loading and capturing the other
        if isinstance(src, (str, Path)) and not Path(src).exists() and not is_model(src):
            raise AdapterFormatError(f"{src} does not exist; --diff takes two run, adapter, artifact or model dirs")
    fa = graph_facts(a, task, None, model)
    fb = graph_facts(b, task, plan if is_model(b) else None, model)  # a plan applies to a model, never a run
    return _diff_facts(fa, fb)


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
