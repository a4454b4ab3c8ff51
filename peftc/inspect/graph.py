"""Block-level pictures of a graph: a captured program or an ONNX file, as Graphviz DOT.

One box per *block* of the model, not one per op: embeddings, each layer's attention and MLP,
norms, the head. Ops are grouped by the module that ran them — ``node.meta["nn_module_stack"]`` in a
torch program, the ``pkg.torch.onnx.name_scopes`` metadata the torch ONNX exporter records on every
node (or ``/a/b/Op``-style node names from other exporters). A module path is cut to a block:
inside a layer list (the first numeric name part, ``transformer.h.0``) the layer's child
(``transformer.h.0.attn``), elsewhere the first two name parts (``bert.embeddings``), or ``depth``
parts when given. Ops of container modules (residual adds, mask building, reshapes in a model's own
``forward``) join the block that produces their input inside the same container, else the block
that consumes their output, so the picture stays a DAG of real blocks. Shape-only ops (symbolic
sizes, asserts) are counted but not drawn.

Adapter sites are marked (filled, with the method's label and the rank): in a program, by the
``peftc_site`` tags the insertion passes put on the nodes they add (``passes/base.py``) and
``Program.sites``; in an ONNX file, by the adapter initializers and graph inputs an op reads, which the
method registry recognises (each method's tensor-name ``markers``; the method the file declares is asked
first, see :mod:`peftc.inspect.sites`); for a plan, by the module names the method's passes would
rewrite. DOT text is written by hand (no dependency); :func:`write_graph` renders ``.svg``/``.png``/``.pdf``
with Graphviz's ``dot`` when it is on ``PATH`` and otherwise writes the ``.dot`` beside the requested file.

:func:`graph_of` and :func:`block_graph` build the picture of anything :mod:`peftc.inspect.sources`
finds a graph in; :func:`draw` writes it.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftc.errors import ConfigError, OutputExistsError, PeftcError
from peftc.files import write_atomic

from .sites import declared_method, guess_method, site_label, tensor_site

__all__ = [
    "RENDER_FORMATS",
    "Block",
    "BlockGraph",
    "GraphOutcome",
    "block_graph",
    "block_key",
    "check_target",
    "draw",
    "graph_of",
    "onnx_block_graph",
    "program_block_graph",
    "write_graph",
]

#: Suffixes Graphviz renders to; ``.dot``/``.gv`` are written as text.
RENDER_FORMATS = (".svg", ".png", ".pdf")
_TEXT_FORMATS = (".dot", ".gv")
#: First line of every DOT text peftc writes (how a rerun recognises its own fallback ``.dot``).
DOT_HEADER = "digraph peftc {"
_MODEL_PREFIX = "model."  # the TaskModule attribute that holds the HF model (peftc.program.MODEL_PREFIX)
_NO_MODULE = "_empty_nn_module_stack_from_metadata_hook"  # torch's scope for nodes no module ran
_ADAPTER_FILL = "#ffcc80"
_PLANNED_FILL = "#c6e2ff"
_INPUT_FILL = "#eeeeee"


def block_key(module: str, depth: int | None = None) -> str:
    """The block a module belongs to: the layer's child inside a layer list, else two name parts.

    >>> block_key("transformer.h.0.attn.c_attn"), block_key("bert.embeddings.word_embeddings")
    ('transformer.h.0.attn', 'bert.embeddings')
    """
    parts = module.split(".") if module else []
    if depth is not None:
        return ".".join(parts[:depth])
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 2])
    return ".".join(parts[:2])


def _layer_of(key: str) -> str | None:
    """``transformer.h.0`` for any block inside that layer (the cluster a block is drawn in)."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return None


@dataclass
class _Op:
    """One op of either IR, reduced to what grouping needs."""

    name: str
    op: str
    module: str | None  # HF module path that ran it ("" = the model itself); None = no module
    inputs: list[str]  # names of producing ops or graph inputs
    hidden: bool = False  # shape-only: counted, not drawn
    site: str | None = None  # adapter site label part, e.g. "LORA r=4"
    site_module: str | None = None


@dataclass
class Block:
    """One box of the picture: a module (or a graph input/output) and the ops it holds."""

    id: str
    key: str  # module path, or the input/output name
    kind: str  # "block", "input", "output"
    module_type: str = ""
    ops: Counter = field(default_factory=Counter)
    adapters: dict[str, list[str]] = field(default_factory=dict)  # "LORA r=4" -> [site module, ...]
    planned: bool = False
    adapter_input: bool = False

    @property
    def layer(self) -> str | None:
        return _layer_of(self.key) if self.kind == "block" else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "key": self.key,
            "kind": self.kind,
            "module_type": self.module_type,
            "ops": dict(self.ops.most_common()),
            "adapters": self.adapters,
            "planned": self.planned,
            "adapter_input": self.adapter_input,
        }


@dataclass
class BlockGraph:
    """Blocks, the data-flow edges between them, and the layer clusters they are drawn in."""

    title: str
    blocks: dict[str, Block]  # id -> block, in graph order
    edges: dict[tuple[str, str], int]  # (src id, dst id) -> number of op-to-op edges
    clusters: dict[str, str]  # layer path -> class name
    hidden: int = 0  # shape-only ops not drawn

    @property
    def adapter_sites(self) -> int:
        return len({m for b in self.blocks.values() for ms in b.adapters.values() for m in ms})

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "blocks": [b.to_dict() for b in self.blocks.values()],
            "edges": [{"from": s, "to": d, "count": n} for (s, d), n in self.edges.items()],
            "clusters": self.clusters,
            "hidden_ops": self.hidden,
            "adapter_sites": self.adapter_sites,
        }

    def to_dot(self) -> str:
        """Graphviz DOT text: boxes for blocks (adapter sites filled), ellipses for inputs and outputs."""
        lines = [
            DOT_HEADER,
            "  rankdir=TB;",
            '  graph [fontname="Helvetica", fontsize=11, labelloc=t, label=' + _q(self._caption()) + "];",
            '  node [shape=box, style="rounded", fontname="Helvetica", fontsize=10];',
            '  edge [color="#555555"];',
        ]
        in_cluster: dict[str, list[Block]] = {}
        for block in self.blocks.values():
            if block.layer is not None:
                in_cluster.setdefault(block.layer, []).append(block)
            else:
                lines.append("  " + self._node(block))
        for i, (layer, blocks) in enumerate(in_cluster.items()):
            cls = self.clusters.get(layer, "")
            lines.append(f"  subgraph cluster_{i} {{")
            lines.append(f'    label={_q(layer + (f" · {cls}" if cls else ""))}; style=dashed; color="#999999";')
            lines += ["    " + self._node(b) for b in blocks]
            lines.append("  }")
        for src, dst in self.edges:
            lines.append(f"  {src} -> {dst};")
        lines.append("}")
        return "\n".join(lines) + "\n"

    def _caption(self) -> str:
        ops = sum(sum(b.ops.values()) for b in self.blocks.values())
        blocks = sum(b.kind == "block" for b in self.blocks.values())
        text = f"{self.title}\n{blocks} blocks, {ops} ops"
        if self.hidden:
            text += f" (+{self.hidden} shape ops not drawn)"
        if self.adapter_sites:
            planned = any(b.planned for b in self.blocks.values())
            text += f"; {self.adapter_sites} adapter sites ({'blue: planned' if planned else 'orange'})"
        return text

    def _node(self, block: Block) -> str:
        if block.kind != "block":
            fill = _ADAPTER_FILL if block.adapter_input else _INPUT_FILL
            label = block.key + ("\n(adapter input)" if block.adapter_input else "")
            return f'{block.id} [shape=ellipse, style=filled, fillcolor="{fill}", label={_q(label)}];'
        name = block.key
        if block.layer is not None:
            name = name[len(block.layer) + 1 :] or block.key.rsplit(".", 1)[-1]
        lines = [f"{name or '(model)'}" + (f" · {block.module_type}" if block.module_type else "")]
        total = sum(block.ops.values())
        top = ", ".join(f"{op} {n}" for op, n in block.ops.most_common(3))
        more = ", …" if len(block.ops) > 3 else ""
        lines.append(f"{total} op{'s' if total != 1 else ''}: {top}{more}")
        for what, modules in block.adapters.items():
            short = sorted({m[len(block.key) + 1 :] if m.startswith(block.key + ".") else m for m in modules})
            lines.append(f"{what}: {', '.join(short)}")
        attrs = f"label={_q(chr(10).join(lines))}"
        if block.adapters:
            fill = _PLANNED_FILL if block.planned else _ADAPTER_FILL
            attrs += f', style="rounded,filled,bold", fillcolor="{fill}"'
        return f"{block.id} [{attrs}];"


def _q(text: str) -> str:
    """A DOT double-quoted string; newlines become centred line breaks."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


# -- building ---------------------------------------------------------------------------------


def _build(
    title: str,
    ops: list[_Op],
    inputs: list[tuple[str, bool]],
    outputs: list[tuple[str, list[str]]],
    classes: dict[str, str],
    depth: int | None,
) -> BlockGraph:
    """Group ``ops`` into blocks and connect them; ``inputs`` are (name, is adapter input)."""
    drawn = [op for op in ops if not op.hidden]
    keys = {op.name: block_key(op.module, depth) for op in drawn if op.module is not None}
    present = set(keys.values())
    # a container's own ops (a key that is an ancestor of another block) are glue, placed below
    glue = {k for k in present if k == "" or any(o.startswith(k + ".") for o in present)}
    placed: dict[str, str] = {name: key for name, key in keys.items() if key not in glue}
    scope = {op.name: keys.get(op.name, "") for op in drawn}
    users: dict[str, list[str]] = {}
    for op in drawn:
        for src in op.inputs:
            users.setdefault(src, []).append(op.name)

    def inside(container: str, key: str) -> bool:
        return container == "" or key.startswith(container + ".")

    order = {op.name: i for i, op in enumerate(drawn)}
    pending = [op for op in drawn if op.name not in placed]

    def from_producer() -> None:  # the latest block feeding it inside the same container
        for op in pending:
            if op.name not in placed:
                near = sorted((p for p in op.inputs if p in placed), key=lambda p: -order.get(p, -1))
                key = next((placed[p] for p in near if inside(scope[op.name], placed[p])), None)
                if key is not None:
                    placed[op.name] = key

    from_producer()
    for op in reversed(pending):  # constants and ops on graph inputs only: the first block they feed
        if op.name not in placed and not any(p in order for p in op.inputs):
            near = sorted((u for u in users.get(op.name, []) if u in placed), key=lambda u: order[u])
            if near:
                placed[op.name] = placed[near[0]]
    from_producer()
    for op in drawn:  # the rest (mask building, …) is its container's own box
        placed.setdefault(op.name, scope[op.name])

    blocks: dict[str, Block] = {}
    by_key: dict[str, Block] = {}
    for name, is_adapter in inputs:
        block = Block(f"in{len(blocks)}", name, "input", adapter_input=is_adapter)
        blocks[block.id] = by_key[f"input:{name}"] = block
    of_op: dict[str, Block] = {}
    for op in drawn:
        key = placed[op.name]
        block = by_key.get(key)
        if block is None:
            block = Block(f"b{len(blocks)}", key, "block", module_type=classes.get(key, ""))
            blocks[block.id] = by_key[key] = block
        block.ops[op.op] += 1
        if op.site:
            block.adapters.setdefault(op.site, [])
            if op.site_module and op.site_module not in block.adapters[op.site]:
                block.adapters[op.site].append(op.site_module)
        of_op[op.name] = block
    for name, _ in inputs:
        of_op[name] = by_key[f"input:{name}"]
    edges: dict[tuple[str, str], int] = {}
    for op in drawn:
        dst = of_op[op.name]
        for src_name in op.inputs:
            src = of_op.get(src_name)
            if src is not None and src is not dst:
                edges[(src.id, dst.id)] = edges.get((src.id, dst.id), 0) + 1
    for name, producers in outputs:
        block = Block(f"out{len(blocks)}", name, "output")
        blocks[block.id] = block
        for p in producers:
            src = of_op.get(p)
            if src is not None:
                edges[(src.id, block.id)] = edges.get((src.id, block.id), 0) + 1
    clusters = {layer: classes.get(layer, "") for layer in (b.layer for b in blocks.values()) if layer}
    return BlockGraph(title, blocks, edges, clusters, hidden=len(ops) - len(drawn))


def _strip(path: str) -> str | None:
    """HF module path from a captured-module path: ``model.transformer.h.0`` → ``transformer.h.0``."""
    if path == _NO_MODULE:
        return None
    if path in ("", "model"):
        return ""
    return path.removeprefix(_MODEL_PREFIX)


def _short_class(cls: Any) -> str:
    name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return name.rsplit(".", 1)[-1]


def _op_label(target: Any) -> str:
    import torch

    if isinstance(target, torch._ops.OpOverload):
        return target._overloadpacket.__name__
    return getattr(target, "__name__", str(target))


def program_block_graph(
    program: Any, title: str = "", depth: int | None = None, planned: dict[str, str] | None = None
) -> BlockGraph:
    """The block graph of a captured :class:`~peftc.program.Program`.

    Args:
        program: a program, adapted or not (adapter nodes are found by their ``peftc_site`` tag).
        title: caption of the picture.
        depth: cut module paths to this many name parts instead of the layer-aware default.
        planned: module name -> label (``"LORA r=8"``) for sites a plan would adapt: their blocks
            are marked as planned.
    """
    import torch

    ops: list[_Op] = []
    classes: dict[str, str] = {}
    inputs: list[tuple[str, bool]] = []
    names: dict[str, str] = {}  # fx node name -> graph input name
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    for i, node in enumerate(placeholders):
        name = node.meta.get("peftc_input") or (program.input_names[i] if i < len(program.input_names) else node.name)
        names[node.name] = name
        inputs.append((name, node.meta.get("peftc_role") == "lifted_input"))
    outputs: list[tuple[str, list[str]]] = []
    for node in program.graph.nodes:
        if node.op == "output":
            for j, arg in enumerate(_flat_nodes(node.args)):
                label = program.output_names[j] if j < len(program.output_names) else f"output_{j}"
                outputs.append((label, [arg.name]))
            continue
        if node.op not in ("call_function", "call_module", "call_method"):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        for path, cls in stack.values():
            stripped = _strip(path)
            if stripped:
                classes.setdefault(stripped, _short_class(cls))
        module = _strip(list(stack.values())[-1][0]) if stack else None
        val = node.meta.get("val")
        hidden = not _is_tensor_value(val, torch)
        site = site_module = None
        tag = node.meta.get("peftc_site")
        if tag:
            s = program.sites.get(tag)
            site = site_label(s.method if s else "adapter", s.rank if s else None)
            site_module = tag
        elif planned and module is not None:
            hit = next((m for m in planned if module == m or module.startswith(m + ".")), None)
            if hit is not None:
                site, site_module = planned[hit] + " (planned)", hit
        ins = [names.get(a.name, a.name) for a in node.all_input_nodes if a.op != "get_attr"]
        ops.append(_Op(node.name, _op_label(node.target), module, ins, hidden, site, site_module))
    graph = _build(title or "program", ops, inputs, outputs, classes, depth)
    if planned:
        for block in graph.blocks.values():
            block.planned = bool(block.adapters)
    return graph


def _flat_nodes(args: Any) -> list[Any]:
    from torch import fx

    out: list[Any] = []
    fx.node.map_arg(args, out.append)
    return out


def _is_tensor_value(val: Any, torch: Any) -> bool:
    if isinstance(val, torch.Tensor):
        return True
    if isinstance(val, (list, tuple)):
        return any(isinstance(v, torch.Tensor) for v in val)
    return False


def onnx_block_graph(model: Any, title: str = "", depth: int | None = None, method: Any = None) -> BlockGraph:
    """The block graph of an ``onnx.ModelProto`` (load it with ``load_external_data=False``).

    Ops are grouped by the module scopes the torch exporter records in ``metadata_props``
    (``pkg.torch.onnx.name_scopes``); without them, by ``/``-separated node-name scopes. Ops that read
    an adapter initializer or graph input (a tensor the method registry recognises: ``…lora_A``,
    ``…ia3_l``, ``…adaption_prompt``…) mark their block with the method's label.

    Args:
        model: the ONNX model.
        title: caption of the picture.
        depth: cut module paths to this many name parts instead of the layer-aware default.
        method: the ``peft_type`` the artifact declares (its manifest); default: the model's
            ``peftc.peft_type`` metadata, else guessed from the tensor names (LoRA and AdaLoRA look alike).
    """
    from .describe import onnx_method

    graph = model.graph
    init_dims = {i.name: list(i.dims) for i in graph.initializer}
    input_dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input}
    own = declared_method(method or onnx_method(model)) or guess_method([*init_dims, *input_dims])
    shape_only = _shape_values(model)
    producer: dict[str, str] = {}
    for node in graph.node:
        for out in node.output:
            producer[out] = node.name

    def adapter_tensor(name: str) -> Any:
        # initializers are named after graph paths (model.<module>…); graph inputs after the module itself
        return tensor_site(name, own, prefix="" if name in input_dims else _MODEL_PREFIX)

    adapter_inputs = {n for n in input_dims if adapter_tensor(n) is not None}
    data_inputs = [n for n in input_dims if n not in init_dims or n in adapter_inputs]
    graph_inputs = set(data_inputs)
    ops: list[_Op] = []
    classes: dict[str, str] = {}
    for i, node in enumerate(graph.node):
        name = node.name or f"node{i}"
        module, hidden = _onnx_scope(node, classes)
        hidden = hidden or (bool(node.output) and all(o in shape_only for o in node.output if o))
        site = site_module = None
        ins: list[str] = []
        for tensor in node.input:
            if not tensor:
                continue
            found = adapter_tensor(tensor) if tensor in init_dims or tensor in graph_inputs else None
            if found is not None:
                dims = input_dims.get(tensor) if tensor in graph_inputs else init_dims.get(tensor)
                rank = _onnx_rank(found, dims or [])
                if site is None or rank is not None:  # an op reading A and E (AdaLoRA's A⊙E) keeps A's rank
                    site = site_label(found.method, rank)
                # the adapted module the tensor names, when the op runs inside it (LLaMA-Adapter's gate runs
                # in o_proj's scope); else the op's own scope (the exporter may share one tensor between
                # sites with equal values, under the first site's name)
                inside = module is not None and (module == found.module or module.startswith(found.module + "."))
                site_module = found.module if inside or not module else module
            if tensor in producer:
                ins.append(producer[tensor])
            elif tensor in graph_inputs:
                ins.append(tensor)
        ops.append(_Op(name, node.op_type, module, ins, hidden, site, site_module))
    _rank_sites(ops)
    outputs = [(v.name, [producer[v.name]] if v.name in producer else []) for v in graph.output]
    inputs = [(n, n in adapter_inputs) for n in data_inputs]
    return _build(title or (graph.name or "onnx"), ops, inputs, outputs, classes, depth)


def _onnx_rank(site: Any, dims: list[Any]) -> Any:
    """The rank an adapter tensor shows, when its method reads a rank from that part (LoRA's A).

    The method's ``describe_site`` says whether the part carries the rank; the ONNX tensor may be stored
    ``[r, in]`` (torch exporter, Gemm transB) or ``[in, r]`` (MatMul), so the rank is the smaller dim;
    a named (symbolic) dim is a swappable input's rank: ``dynamic``.
    """
    describe = site.method.describe_site
    if not dims or describe is None or describe({site.part: list(dims)}).get("rank") is None:
        return None
    return "dynamic" if any(isinstance(d, str) and d for d in dims) else min(int(d) for d in dims)


def _shape_values(model: Any) -> set[str]:
    """Values that are shape arithmetic: int64 of rank ≤ 1 (what torch keeps as symbolic sizes, not tensors)."""
    import onnx

    out = set()
    for v in [*model.graph.value_info, *model.graph.output]:
        t = v.type.tensor_type
        if t.elem_type == onnx.TensorProto.INT64 and t.HasField("shape") and len(t.shape.dim) <= 1:
            out.add(v.name)
    return out


def _rank_sites(ops: list[_Op]) -> None:
    """A site's B matmul carries no rank: give every op of a site module the rank its A matmul showed."""
    ranks: dict[str, str] = {}
    for op in ops:
        if op.site and "r=" in op.site and op.site_module:
            ranks[op.site_module] = op.site
    for op in ops:
        if op.site and op.site_module in ranks:
            op.site = ranks[op.site_module]


def _onnx_scope(node: Any, classes: dict[str, str]) -> tuple[str | None, bool]:
    """(module path, shape-only) of an ONNX node from its exporter metadata or its name."""
    meta = {p.key: p.value for p in node.metadata_props}
    scopes_text = meta.get("pkg.torch.onnx.name_scopes")
    if scopes_text:
        try:
            scopes = ast.literal_eval(scopes_text)
            hierarchy = ast.literal_eval(meta.get("pkg.torch.onnx.class_hierarchy", "[]"))
        except (ValueError, SyntaxError):
            scopes, hierarchy = [], []
        paths = scopes[:-1]
        for path, cls in zip(paths, hierarchy[:-1], strict=False):
            stripped = _strip(path)
            if stripped:
                classes.setdefault(stripped, _short_class(cls))
        if paths and paths[-1] == _NO_MODULE:
            return None, True
        if paths:
            return _strip(paths[-1]), False
    if node.name.startswith("/") and node.name.count("/") > 1:  # TorchScript exporter: /model/h.0/attn/MatMul
        parts = [p for p in node.name.split("/")[1:-1] if p]
        return _strip(".".join(parts)) or "", False
    return None, False


# -- from anything with a graph ----------------------------------------------------------------


def block_graph(info: dict[str, Any], graph: Any, depth: int | None = None) -> BlockGraph:
    """The :class:`BlockGraph` of a :func:`~peftc.inspect.sources.describe` result, captioned from its ``info``.

    ONNX sites are labelled with the method ``info`` declares (an artifact's manifest), planned sites
    with the plan's labels.
    """
    title = f"{info.get('kind', 'graph')}: {info.get('path') or info.get('model') or ''}".rstrip(": ")
    manifest = info.get("manifest") or {}
    method = info.get("method") or manifest.get("method")
    if method and info.get("kind") != "plan":
        title += f" ({method}{', merged' if manifest.get('merged') else ''})"
    if type(graph).__name__ == "ModelProto":
        return onnx_block_graph(graph, title, depth=depth, method=method)
    return program_block_graph(graph, title, depth=depth, planned=info.get("planned") or None)


def graph_of(
    src: Any, depth: int | None = None, task: str | None = None, plan: dict[str, Any] | None = None
) -> BlockGraph:
    """The block-level graph of a path, a Program or an ONNX model.

    Args:
        src: anything :func:`~peftc.inspect.sources.describe` takes, a :class:`~peftc.program.Program`,
            or an ``onnx.ModelProto``.
        depth: group ops by the first ``depth`` module-name parts instead of per layer block.
        task: task for a model dir or preset.
        plan: draw a model's base program with the sites a plan would adapt marked
            (``{"method": "ia3", "target_modules": ..., "r": ..., "options": {...}}``).
    """
    from .sources import resolve

    info, graph = resolve(src, task, plan)
    return block_graph(info, graph, depth)


def draw(src: Any, target: str | Path, depth: int | None = None, task: str | None = None, force: bool = False) -> Any:
    """Write the block graph of ``src`` to ``target`` (``.dot``/``.gv``, or ``.svg``/``.png``/``.pdf``).

    Returns:
        :class:`GraphOutcome`: the file written, whether Graphviz rendered it, a message (without
        Graphviz's ``dot`` on PATH, a picture request writes the ``.dot`` beside it).
    """
    check_target(target, force)
    return write_graph(graph_of(src, depth=depth, task=task), target, force)


# -- writing ----------------------------------------------------------------------------------


@dataclass
class GraphOutcome:
    """Where a picture went: the file written, and whether Graphviz rendered it."""

    path: Path
    rendered: bool
    message: str


def write_graph(graph: BlockGraph, target: str | Path, force: bool = False, collapse: int = 3) -> GraphOutcome:
    """Write ``graph`` to ``target``: DOT text for ``.dot``/``.gv``; SVG drawn by peftc for ``.svg`` (no
    system binary; runs of ``collapse`` or more identical layers drawn once, ``0`` draws every layer);
    ``.png``/``.pdf`` through Graphviz's ``dot``.

    Without Graphviz's ``dot`` on ``PATH`` a picture request writes ``<target stem>.dot`` beside it
    and says so in the message (not an error); running the same request again replaces that ``.dot``
    when peftc wrote it (it starts with :data:`DOT_HEADER`), so a rerun works without ``--force``.
    Files are written whole (temp file, then rename).

    Raises:
        ConfigError: an unsupported suffix, or a missing parent directory.
        PeftcError: ``dot`` ran and failed.
    """
    target = check_target(target, force)
    suffix = target.suffix.lower()
    text = graph.to_dot()
    summary = f"{sum(b.kind == 'block' for b in graph.blocks.values())} blocks, {graph.adapter_sites} adapter sites"
    if suffix in _TEXT_FORMATS:
        write_atomic(target, text.encode())
        return GraphOutcome(target, False, f"graph: {target} (DOT, {summary})")
    if suffix == ".svg":
        from peftc.inspect.svg import render_svg

        write_atomic(target, render_svg(graph, collapse=collapse).encode())
        return GraphOutcome(target, True, f"graph: {target} (SVG drawn by peftc, {summary})")
    dot = shutil.which("dot")
    if dot is None:
        dot_path = target.with_suffix(".dot")
        replaced = " (replacing the existing file)" if dot_path.exists() else ""
        write_atomic(dot_path, text.encode())
        return GraphOutcome(
            dot_path,
            False,
            f"graph: Graphviz 'dot' is not on PATH; wrote DOT text to {dot_path}{replaced} "
            f"(render with: dot -T{suffix[1:]} {dot_path} -o {target}) ({summary})",
        )
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run(
            [dot, f"-T{suffix[1:]}", "-o", tmp], input=text.encode(), capture_output=True, timeout=300
        )
        if proc.returncode != 0 or not os.path.getsize(tmp):
            err = proc.stderr.decode(errors="replace").strip().splitlines()
            raise PeftcError(
                f"Graphviz dot failed rendering {target} (exit {proc.returncode}): "
                f"{err[0] if err else 'no output'}; write a .dot file instead"
            )
        os.replace(tmp, target)
    except subprocess.TimeoutExpired as e:
        raise PeftcError(f"Graphviz dot took over 300 s rendering {target}; write a .dot file instead") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return GraphOutcome(target, True, f"graph: {target} (rendered by {dot}, {summary})")


def check_target(target: str | Path, force: bool = False) -> Path:
    """``target`` as a Path when it names a file peftc can write a graph to (checked before any work).

    A picture requested without Graphviz goes to ``<stem>.dot``; an existing one that peftc wrote (a
    fallback of an earlier run: it starts with :data:`DOT_HEADER`) is replaced without ``force``, since
    the user asked for the picture, not for that file. Any other existing file needs ``force``.

    Raises:
        ConfigError: an unsupported suffix, a missing parent directory, or a directory.
        OutputExistsError: the file (or, for a picture without Graphviz, its ``.dot`` when peftc did not
            write it) exists and ``force`` is not set.
    """
    target = Path(target)
    suffix = target.suffix.lower()
    if suffix not in _TEXT_FORMATS + RENDER_FORMATS:
        raise ConfigError(
            f"--graph {target}: unknown format {suffix or '(none)'!r}; use a name ending in "
            + ", ".join(_TEXT_FORMATS + RENDER_FORMATS)
        )
    if target.is_dir():
        raise ConfigError(f"--graph {target} is a directory; give a file name such as {target / 'graph.svg'}")
    if not target.parent.is_dir():
        raise ConfigError(
            f"--graph {target}: directory {target.parent} does not exist; create it or choose another path"
        )
    if suffix in (*_TEXT_FORMATS, ".svg") or shutil.which("dot"):
        if target.exists() and not force:
            raise OutputExistsError(f"--graph: {target} exists; pass --force to replace it, or choose another file")
        return target
    fallback = target.with_suffix(".dot")
    if fallback.exists() and not force and not _written_by_peftc(fallback):
        raise OutputExistsError(
            f"--graph {target}: Graphviz 'dot' is not on PATH, so the DOT text goes to {fallback}, which exists "
            "and is not a peftc graph; pass --force to replace it, or choose another file"
        )
    return target


def _written_by_peftc(path: Path) -> bool:
    """Whether ``path`` is DOT text peftc wrote (its first line is :data:`DOT_HEADER`)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(DOT_HEADER) + 1) == (DOT_HEADER + "\n").encode()
    except OSError:
        return False
