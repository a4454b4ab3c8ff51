"""Block graphs as SVG, drawn in pure Python: no Graphviz, no layout library.

:func:`render_svg` takes the :class:`~peftc.graph.BlockGraph` that ``peftc inspect --graph`` builds
(blocks with kinds, module classes, op counts and adapter sites; data-flow edges; layer clusters) and
returns SVG text. Adapter sites are filled (orange; blue for a plan's sites) and labelled with the
method, rank and adapted modules; a legend says what the marks mean; every box carries a tooltip
(``<title>``) with its full module path and op histogram.

Repeated layers are drawn once. Consecutive layers of one layer list (``transformer.h.0`` …
``transformer.h.31``) whose blocks have the same names, classes and internal edges form a *run*;
a run of at least ``collapse`` layers becomes one frame marked ``×N``, and each adapted block in it
lists the layers its sites are in (``LoRA r=8: c_attn · all 32 layers``, ``· layers 28–31``). A
32-layer model is then as large a picture as a 2-layer one.

Layout (Sugiyama-style, top-down): layer frames are laid out inside first and then placed as one
tall node of the whole graph; edges that enter a frame go through a *port* on its border, one per
outside neighbour. In each graph cycles are broken by reversing DFS back edges; ranks are longest
paths from the sources, then every node that feeds something is moved down to just above its first
consumer; edges spanning ranks get dummy nodes, shared by the edges of one source so a fan-out is
one trunk with branches; rank orders come from barycentre sweeps (the order with fewest crossings
is kept); x positions come from alternating sweeps that put each node at the mean of its
neighbours, solved per rank as an isotonic regression so boxes keep their order and spacing.
Text widths are estimated from Helvetica's glyph widths (+8% for wider fallback fonts).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any
from xml.sax.saxutils import escape

from peftc.errors import ConfigError, OutputExistsError
from peftc.files import write_atomic

__all__ = ["LayerRun", "find_runs", "render_svg", "write_svg"]

ADAPTER_FILL = "#ffcc80"
ADAPTER_STROKE = "#e65100"
PLANNED_FILL = "#c6e2ff"
PLANNED_STROKE = "#1565c0"
IO_FILL = "#eeeeee"
BLOCK_FILL = "#ffffff"
EDGE = "#7a7a7a"
FONT = "Helvetica, Arial, 'DejaVu Sans', sans-serif"

_TITLE_SIZE, _LINE_SIZE, _SMALL_SIZE = 12.5, 11.0, 10.0
_PAD_X, _PAD_Y = 9.0, 6.0
_GAP_X, _GAP_Y = 22.0, 34.0
_FRAME_PAD, _FRAME_TITLE, _FRAME_FOOT = 12.0, 36.0, 16.0
_STACK = 5.0  # offset of each card behind a collapsed frame
_WRAP = 300.0  # px: adapter lines wrap at ", " past this width
_BOLD = frozenset({"tb", "ta", "tp"})  # text classes drawn bold

# Helvetica advance widths (per 1000 em) for ASCII 32..126.
# fmt: off
_WIDTHS = [
    278, 278, 355, 556, 556, 889, 667, 191, 333, 333, 389, 584, 278, 333, 278, 278,
    556, 556, 556, 556, 556, 556, 556, 556, 556, 556, 278, 278, 584, 584, 584, 556,
    1015, 667, 667, 722, 722, 667, 611, 778, 722, 278, 500, 667, 556, 833, 722, 778,
    667, 778, 722, 667, 611, 722, 667, 944, 667, 667, 611, 278, 278, 278, 469, 556,
    333, 556, 556, 500, 556, 556, 278, 556, 556, 222, 222, 500, 222, 833, 556, 556,
    556, 556, 333, 500, 278, 556, 500, 722, 500, 500, 500, 334, 260, 334, 584,
]
# fmt: on
_OTHER_WIDTHS = {"×": 584, "–": 556, "—": 1000, "·": 278, "…": 1000, "→": 1000, "≈": 584}


def text_width(text: str, size: float, bold: bool = False) -> float:
    """Estimated width in px of ``text`` at ``size``: Helvetica metrics, widened for wider fonts (DejaVu Sans)."""
    units = 0
    for ch in text:
        code = ord(ch)
        units += _WIDTHS[code - 32] if 32 <= code <= 126 else _OTHER_WIDTHS.get(ch, 600)
    return units / 1000 * size * (1.26 if bold else 1.14)


# -- what is drawn -------------------------------------------------------------------------------


@dataclass
class LayerRun:
    """Consecutive layers of one layer list with the same structure, drawn once.

    Attributes:
        prefix: the layer list's path (``transformer.h``).
        indices: the layer numbers in the run (consecutive).
        layers: their paths (``transformer.h.0`` …).
        module_type: the layer's class (``GPT2Block``).
    """

    prefix: str
    indices: list[int]
    layers: list[str]
    module_type: str = ""

    @property
    def label(self) -> str:
        first, last = self.indices[0], self.indices[-1]
        name = f"{self.prefix}.{first}" if first == last else f"{self.prefix}.{first}–{last}"
        return name + (f" · {self.module_type}" if self.module_type else "")


def _split_layer(layer: str) -> tuple[str, int] | None:
    prefix, _, last = layer.rpartition(".")
    return (prefix, int(last)) if last.isdigit() else None


def _rel(key: str, layer: str) -> str:
    """``key`` relative to ``layer`` (``attn`` in ``transformer.h.0``); ``""`` for the layer itself."""
    if key == layer:
        return ""
    return key[len(layer) + 1 :] if key.startswith(layer + ".") else key


def find_runs(graph: Any, collapse: int = 3) -> list[LayerRun]:
    """Every layer of ``graph`` in its run: a run of ≥ ``collapse`` same-structure layers is one entry.

    Two layers have the same structure when their blocks have the same names relative to the layer
    and the same classes, and the edges between them are the same. Adapters do not count (a run
    stays one frame when only some of its layers are adapted). ``collapse`` ≤ 1 collapses nothing.
    """
    members: dict[str, list[Any]] = defaultdict(list)
    for block in graph.blocks.values():
        if block.kind == "block" and block.layer is not None:
            members[block.layer].append(block)
    layer_of = {b.id: b.layer for bs in members.values() for b in bs}
    inner: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for src, dst in graph.edges:
        layer = layer_of.get(src)
        if layer is not None and layer == layer_of.get(dst):
            inner[layer].add((_rel(graph.blocks[src].key, layer), _rel(graph.blocks[dst].key, layer)))

    def signature(layer: str) -> tuple[Any, ...]:
        blocks = tuple(sorted((_rel(b.key, layer), b.module_type) for b in members[layer]))
        return blocks, tuple(sorted(inner[layer])), graph.clusters.get(layer, "")

    runs: list[LayerRun] = []
    lists: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for layer in members:
        split = _split_layer(layer)
        if split is None:
            runs.append(LayerRun(layer, [0], [layer], graph.clusters.get(layer, "")))
        else:
            lists[split[0]].append((split[1], layer))
    for prefix, layers in lists.items():
        layers.sort()
        current: list[tuple[int, str]] = []
        for index, layer in layers:
            if (
                current
                and collapse > 1
                and index == current[-1][0] + 1
                and signature(layer) == signature(current[0][1])
            ):
                current.append((index, layer))
                continue
            runs.extend(_close_run(prefix, current, collapse, graph))
            current = [(index, layer)]
        runs.extend(_close_run(prefix, current, collapse, graph))
    order = {layer: i for i, layer in enumerate(members)}
    return sorted(runs, key=lambda r: order[r.layers[0]])


def _close_run(prefix: str, run: list[tuple[int, str]], collapse: int, graph: Any) -> list[LayerRun]:
    if not run:
        return []
    groups = [run] if len(run) >= max(collapse, 2) else [[item] for item in run]
    return [
        LayerRun(prefix, [i for i, _ in g], [layer for _, layer in g], graph.clusters.get(g[0][1], "")) for g in groups
    ]


def _ranges(indices: Sequence[int]) -> str:
    """``0–3, 28–31`` for [0, 1, 2, 3, 28, 29, 30, 31]."""
    out, start, prev = [], None, None
    for i in [*sorted(indices), None]:
        if start is not None and (i is None or i != prev + 1):
            out.append(str(start) if start == prev else f"{start}–{prev}" if prev > start + 1 else f"{start}, {prev}")
            start = None
        if i is not None and start is None:
            start = i
        prev = i
    return ", ".join(out)


@dataclass
class _Line:
    text: str
    size: float
    cls: str  # CSS class of the text


@dataclass
class _Box:
    """A drawn node: a block (possibly standing for the same block of every layer of a run), an input or an output."""

    id: str
    kind: str  # "block", "input", "output", "port", "dummy"
    lines: list[_Line] = field(default_factory=list)
    style: str = "blk"  # CSS class of the shape
    tooltip: str = ""
    w: float = 0.0
    h: float = 0.0

    def measure(self) -> None:
        if self.kind in ("port", "dummy"):
            return
        widths = [text_width(line.text, line.size, line.cls in _BOLD) for line in self.lines]
        self.h = sum(line.size + 3.5 for line in self.lines) + 2 * _PAD_Y
        rounded = self.h * 0.6 if self.kind in ("input", "output") else 0.0  # a pill's ends hold no text
        self.w = max(60.0, max(widths, default=0) + 2 * _PAD_X + rounded)


def _wrap(text: str, size: float, indent: str = "   ") -> list[str]:
    if text_width(text, size) <= _WRAP or ", " not in text:
        return [text]
    lines, current = [], ""
    for part in text.split(", "):
        candidate = f"{current}, {part}" if current else part
        if current and text_width(candidate, size) > _WRAP:
            lines.append(current + ",")
            current = indent + part
        else:
            current = candidate
    return [*lines, current]


def _ops_line(histograms: list[Counter]) -> str:
    """``"10 ops: mul 6, linear 4"``; for a run, the histogram most layers have, and the range of totals."""
    each = len(histograms) > 1
    ops = Counter(tuple(sorted(h.items())) for h in histograms).most_common(1)[0][0]
    common = Counter(dict(ops))
    totals = sorted({sum(h.values()) for h in histograms})
    total = f"{totals[0]}–{totals[-1]}" if len(totals) > 1 else str(totals[0])
    top = ", ".join(f"{op} {n}" for op, n in common.most_common(3))
    more = ", …" if len(common) > 3 else ""
    return f"{total} op{'s' if total != '1' else ''}{' each' if each else ''}: {top}{more}"


def _block_box(graph: Any, run: LayerRun | None, block: Any, by_key: dict[str, Any]) -> _Box:
    """The box of ``block``; in a collapsed run, it stands for the block at the same place in every layer."""
    layer = run.layers[0] if run else None
    name = _rel(block.key, layer) if layer else block.key
    head = (name or ("(layer)" if layer else "(model)")) + (f" · {block.module_type}" if block.module_type else "")
    same = [block]
    if run and len(run.layers) > 1:
        rel = _rel(block.key, run.layers[0])
        same = [by_key.get(f"{layer}.{rel}" if rel else layer) for layer in run.layers]
    lines = [
        _Line(head, _TITLE_SIZE, "tb"),
        _Line(_ops_line([b.ops for b in same if b is not None]), _SMALL_SIZE, "ts"),
    ]
    tooltip = [block.key + (f" ({block.module_type})" if block.module_type else "")]
    tooltip.append(", ".join(f"{op} {n}" for op, n in block.ops.most_common()))
    # (label, site module relative to the block) -> layer numbers it is adapted in
    where: dict[tuple[str, str], list[int]] = defaultdict(list)
    planned = block.planned
    for index, b in zip(run.indices if run else [0], same, strict=False):
        if b is None:
            continue
        planned = planned or b.planned
        for label, modules in b.adapters.items():
            for module in modules or [b.key]:
                where[(label, _rel(module, b.key) if module != b.key else module.rsplit(".", 1)[-1])].append(index)
    grouped: dict[tuple[str, tuple[int, ...]], list[str]] = defaultdict(list)
    for (label, module), indices in where.items():
        grouped[(label, tuple(sorted(set(indices))))].append(module)
    for (label, indices), modules in grouped.items():
        text = f"{label}: {', '.join(sorted(modules))}"
        if run and len(run.layers) > 1:
            n = len(run.layers)
            text += (
                f" · all {n} layers"
                if len(indices) == n
                else f" · layer{'s' if len(indices) > 1 else ''} {_ranges(indices)}"
            )
        for line in _wrap(text, _LINE_SIZE):
            lines.append(_Line(line, _LINE_SIZE, "tp" if planned else "ta"))
        tooltip.append(text)
    style = ("pln" if planned else "adp") if where else "blk"
    return _Box(block.id, "block", lines, style, "\n".join(tooltip))


def _io_box(block: Any) -> _Box:
    lines = [_Line(block.key, _LINE_SIZE, "tb" if block.adapter_input else "t")]
    if block.adapter_input:
        lines.append(_Line("adapter input", _SMALL_SIZE, "ts"))
    return _Box(block.id, block.kind, lines, "aio" if block.adapter_input else "io", f"graph {block.kind}: {block.key}")


# -- layout ----------------------------------------------------------------------------------------


@dataclass
class _Seg:
    """One hop of an edge between adjacent ranks; ``da``/``db`` are x offsets of its ends from the node centres."""

    a: str
    b: str
    da: float = 0.0
    db: float = 0.0


@dataclass
class _Layout:
    nodes: dict[str, _Box]
    rank: dict[str, int]
    order: list[list[str]]
    segs: list[_Seg]
    routes: dict[tuple[str, str], list[_Seg]]  # original edge -> its hops, top to bottom
    reversed_edges: set[tuple[str, str]]
    x: dict[str, float] = field(default_factory=dict)
    y: dict[str, float] = field(default_factory=dict)
    rank_top: list[float] = field(default_factory=list)
    rank_h: list[float] = field(default_factory=list)

    def top(self, n: str) -> float:
        return self.y[n] - self.nodes[n].h / 2

    def bottom(self, n: str) -> float:
        return self.y[n] + self.nodes[n].h / 2

    def bounds(self, ids: Iterable[str] | None = None) -> tuple[float, float, float, float]:
        ids = list(self.nodes if ids is None else ids)
        if not ids:
            return 0.0, 0.0, 0.0, 0.0
        return (
            min(self.x[n] - self.nodes[n].w / 2 for n in ids),
            min(self.top(n) for n in ids),
            max(self.x[n] + self.nodes[n].w / 2 for n in ids),
            max(self.bottom(n) for n in ids),
        )


def _acyclic(nodes: list[str], edges: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], set[tuple[str, str]]]:
    """The edges with DFS back edges reversed (so the graph is a DAG), and which were reversed."""
    succ: dict[str, list[str]] = defaultdict(list)
    for a, b in edges:
        succ[a].append(b)
    state: dict[str, int] = {}
    back: set[tuple[str, str]] = set()
    for root in nodes:
        if root in state:
            continue
        stack = [(root, iter(succ[root]))]
        state[root] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                back.add((node, nxt))
            elif nxt not in state:
                state[nxt] = 1
                stack.append((nxt, iter(succ[nxt])))
    return [(b, a) if (a, b) in back else (a, b) for a, b in edges], back


def _ranks(nodes: list[str], edges: list[tuple[str, str]], top: set[str], bottom: set[str]) -> dict[str, int]:
    """Longest-path ranks, then each node that feeds something moved down to just above its first consumer."""
    import heapq

    index = {n: i for i, n in enumerate(nodes)}
    preds: dict[str, list[str]] = defaultdict(list)
    succs: dict[str, list[str]] = defaultdict(list)
    for a, b in edges:
        preds[b].append(a)
        succs[a].append(b)
    indeg = {n: len(preds[n]) for n in nodes}
    heap = [(index[n], n) for n in nodes if indeg[n] == 0]
    heapq.heapify(heap)
    topo: list[str] = []
    while heap:
        _, n = heapq.heappop(heap)
        topo.append(n)
        for s in succs[n]:
            indeg[s] -= 1
            if indeg[s] == 0:
                heapq.heappush(heap, (index[s], s))
    rank = {n: 0 for n in nodes}
    for n in topo:
        for p in preds[n]:
            rank[n] = max(rank[n], rank[p] + 1)
    for n in reversed(topo):
        if succs[n] and n not in top:
            rank[n] = max(rank[n], min(rank[s] for s in succs[n]) - 1)
    inner = [n for n in nodes if n not in top and n not in bottom]
    low = min((rank[n] for n in inner), default=0)
    for n in top:
        rank[n] = low - 1
    high = max((rank[n] for n in inner), default=low)
    for n in bottom:
        rank[n] = high + 1
    base = min(rank.values(), default=0)
    return {n: r - base for n, r in rank.items()}


def _crossings(order: list[list[str]], segs_by_rank: dict[int, list[_Seg]]) -> int:
    total = 0
    for r, segs in segs_by_rank.items():
        if r + 1 >= len(order):
            continue
        pa = {n: i for i, n in enumerate(order[r])}
        pb = {n: i for i, n in enumerate(order[r + 1])}
        ends = sorted((pa[s.a], pb[s.b]) for s in segs)
        for i in range(len(ends)):
            for j in range(i + 1, len(ends)):
                if ends[i][0] != ends[j][0] and ends[i][1] > ends[j][1]:
                    total += 1
    return total


def _isotonic(targets: list[float], weights: list[float]) -> list[float]:
    """Non-decreasing values closest to ``targets`` in weighted least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for t, w in zip(targets, weights, strict=True):
        blocks.append([t, w, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, c2 = blocks.pop()
            m1, w1, c1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
    out: list[float] = []
    for mean, _, count in blocks:
        out += [mean] * int(count)
    return out


def _place(ids: list[str], desired: dict[str, float], nodes: dict[str, _Box], x: dict[str, float]) -> None:
    """Put the nodes of one rank as near their desired x as order and spacing allow."""
    offsets, total = [], 0.0
    for i, n in enumerate(ids):
        if i:
            total += (nodes[ids[i - 1]].w + nodes[n].w) / 2 + _gap(nodes[ids[i - 1]], nodes[n])
        offsets.append(total)
    weights = [0.5 if nodes[n].kind == "dummy" else 1.0 for n in ids]
    solved = _isotonic([desired[n] - o for n, o in zip(ids, offsets, strict=True)], weights)
    for n, s, o in zip(ids, solved, offsets, strict=True):
        x[n] = s + o


def _gap(a: _Box, b: _Box) -> float:
    if a.kind in ("dummy", "port") or b.kind in ("dummy", "port"):
        return 10.0
    return _GAP_X


def _layout(
    boxes: dict[str, _Box],
    edges: list[tuple[str, str]],
    offsets: dict[tuple[str, str], tuple[float, float]] | None = None,
    top: Iterable[str] = (),
    bottom: Iterable[str] = (),
    gap_y: float = _GAP_Y,
    first_gap: float | None = None,
    last_gap: float | None = None,
) -> _Layout:
    """Ranks, orders and coordinates for ``boxes`` (ordered: the order is the tie-break) and ``edges``.

    ``offsets[(a, b)]`` gives the x offsets of an edge's ends from the node centres (ports of a frame);
    ``top``/``bottom`` nodes are kept on the first/last rank (a frame's ports).
    """
    offsets = offsets or {}
    nodes = dict(boxes)
    names = list(nodes)
    edges = list(dict.fromkeys((a, b) for a, b in edges if a != b and a in nodes and b in nodes))
    dag, back = _acyclic(names, edges)
    rank = _ranks(names, dag, set(top), set(bottom))
    index = {n: i for i, n in enumerate(names)}
    segs: dict[tuple[str, str, float, float], _Seg] = {}
    routes: dict[tuple[str, str], list[_Seg]] = {}
    for (a, b), orig in zip(dag, edges, strict=True):
        da, db = offsets.get(orig, (0.0, 0.0))
        if orig in back:
            da, db = db, da
        hops, prev, prev_d = [], a, da
        for r in range(rank[a] + 1, rank[b]):
            d = f"_d:{a}:{round(da, 1)}:{r}"  # one trunk per source anchor
            if d not in nodes:
                nodes[d] = _Box(d, "dummy", w=2.0)
                rank[d] = r
                index[d] = index[a] + 0.5
            hops.append(segs.setdefault((prev, d, prev_d, 0.0), _Seg(prev, d, prev_d, 0.0)))
            prev, prev_d = d, 0.0
        hops.append(segs.setdefault((prev, b, prev_d, db), _Seg(prev, b, prev_d, db)))
        routes[orig] = hops
    n_ranks = max(rank.values(), default=-1) + 1
    order: list[list[str]] = [[] for _ in range(n_ranks)]
    for n in sorted(nodes, key=lambda n: index[n]):
        order[rank[n]].append(n)
    by_rank: dict[int, list[_Seg]] = defaultdict(list)
    preds: dict[str, list[_Seg]] = defaultdict(list)
    succs: dict[str, list[_Seg]] = defaultdict(list)
    for s in segs.values():
        by_rank[rank[s.a]].append(s)
        preds[s.b].append(s)
        succs[s.a].append(s)
    best, best_order = _crossings(order, by_rank), [list(r) for r in order]
    for _ in range(8):
        for direction in ("down", "up"):
            ranks = range(1, n_ranks) if direction == "down" else range(n_ranks - 2, -1, -1)
            for r in ranks:
                near = order[r - 1] if direction == "down" else order[r + 1]
                pos = {n: i for i, n in enumerate(near)}
                current = {n: i for i, n in enumerate(order[r])}

                def bary(n: str, pos: dict[str, int] = pos, current: dict[str, int] = current) -> float:
                    links = preds[n] if direction == "down" else succs[n]  # noqa: B023
                    ends = [pos[s.a if direction == "down" else s.b] for s in links]  # noqa: B023
                    return sum(ends) / len(ends) if ends else current[n]

                order[r].sort(key=bary)
            crossings = _crossings(order, by_rank)
            if crossings < best:
                best, best_order = crossings, [list(r) for r in order]
    order = best_order
    layout = _Layout(nodes, rank, order, list(segs.values()), routes, back)
    _coordinates(layout, preds, succs, gap_y, first_gap, last_gap)
    return layout


def _coordinates(
    lay: _Layout,
    preds: dict[str, list[_Seg]],
    succs: dict[str, list[_Seg]],
    gap_y: float,
    first_gap: float | None,
    last_gap: float | None,
) -> None:
    x = lay.x
    for ids in lay.order:
        total = sum(lay.nodes[n].w for n in ids) + _GAP_X * max(0, len(ids) - 1)
        cursor = -total / 2
        for n in ids:
            x[n] = cursor + lay.nodes[n].w / 2
            cursor += lay.nodes[n].w + _GAP_X

    def sweep(ranks: Iterable[int], use_preds: bool, use_succs: bool) -> None:
        for r in ranks:
            desired = {}
            for n in lay.order[r]:
                ends = []
                if use_preds:
                    ends += [x[s.a] + s.da - s.db for s in preds[n]]
                if use_succs:
                    ends += [x[s.b] + s.db - s.da for s in succs[n]]
                desired[n] = sum(ends) / len(ends) if ends else x[n]
            _place(lay.order[r], desired, lay.nodes, x)

    n = len(lay.order)
    for _ in range(6):
        sweep(range(1, n), True, False)
        sweep(range(n - 2, -1, -1), False, True)
    sweep(range(n), True, True)
    sweep(range(1, n), True, False)
    left = min((x[m] - lay.nodes[m].w / 2 for m in lay.nodes), default=0.0)
    for m in x:
        x[m] -= left
    y = 0.0
    for r, ids in enumerate(lay.order):
        if r:
            y += first_gap if (r == 1 and first_gap is not None) else gap_y
            if r == n - 1 and last_gap is not None and r > 1:
                y += last_gap - gap_y
        h = max((lay.nodes[m].h for m in ids), default=0.0)
        lay.rank_top.append(y)
        lay.rank_h.append(h)
        for m in ids:
            lay.y[m] = y + h / 2
        y += h


# -- the picture -----------------------------------------------------------------------------------


@dataclass
class _Frame:
    """One layer, or a collapsed run of layers: its own layout, drawn as a node of the whole graph."""

    id: str
    run: LayerRun
    boxes: dict[str, _Box]
    layout: _Layout | None = None
    entry: dict[str, str] = field(default_factory=dict)  # outside node -> port id
    exit: dict[str, str] = field(default_factory=dict)
    left: float = 0.0  # the frame's rectangle in its own layout's coordinates
    top: float = 0.0
    w: float = 0.0
    h: float = 0.0
    dx: float = 0.0  # own layout -> picture coordinates
    dy: float = 0.0

    @property
    def collapsed(self) -> bool:
        return len(self.run.layers) > 1

    @property
    def outer_w(self) -> float:
        """Width with the cards drawn behind a collapsed frame (they fan out right and down)."""
        return self.w + (2 * _STACK if self.collapsed else 0.0)

    @property
    def outer_h(self) -> float:
        return self.h + (2 * _STACK if self.collapsed else 0.0)

    def port_offset(self, port: str) -> float:
        """x of a port from the centre of the frame's node in the whole graph."""
        return self.layout.x[port] - self.left - self.outer_w / 2


def _path(points: list[tuple[float, float]]) -> str:
    """Vertical-tangent cubic curves between rank hops, straight lines through dummy ranks."""
    (x0, y0), rest = points[0], points[1:]
    out = [f"M{x0:.1f},{y0:.1f}"]
    for x1, y1 in rest:
        if abs(x1 - x0) < 0.05:
            out.append(f"L{x1:.1f},{y1:.1f}")
        else:
            mid = (y0 + y1) / 2
            out.append(f"C{x0:.1f},{mid:.1f} {x1:.1f},{mid:.1f} {x1:.1f},{y1:.1f}")
        x0, y0 = x1, y1
    return "".join(out)


def _edges(lay: _Layout, dx: float, dy: float, ends: dict[str, tuple[float, float]] | None = None) -> list[str]:
    """SVG paths of a layout's edges: each hop once (shared trunks are one line), each dummy's rank crossed
    by a straight line, an arrow where a hop reaches a box. ``ends[node]`` = (top, bottom) y of a frame
    node, where its ports are (the frame's rectangle, not the node with its cards)."""
    ends = ends or {}
    out: list[str] = []
    reversed_hops = {id(s) for e in lay.reversed_edges for s in lay.routes.get(e, [])}
    done: set[int] = set()
    for hops in lay.routes.values():
        for s in hops:
            if id(s) in done or id(s) in reversed_hops:
                continue
            done.add(id(s))
            out.append(_edge(_hop(lay, s, dx, dy, ends), lay.nodes[s.b].kind in ("block", "input", "output")))
    for n, box in lay.nodes.items():
        r = lay.rank[n]
        if box.kind == "dummy" and lay.rank_h[r] > 0:
            x, top = lay.x[n] + dx, lay.rank_top[r] + dy
            out.append(f'<path class="e" d="M{x:.1f},{top:.1f}V{top + lay.rank_h[r]:.1f}"/>')
    for edge in lay.reversed_edges:  # drawn against the flow: the arrow goes on the upper end
        hops = lay.routes.get(edge, [])
        pts = [p for s in hops for p in _hop(lay, s, dx, dy, ends)]
        if pts:
            out.append(_edge(pts[::-1], True))
    return out


def _hop(
    lay: _Layout, s: _Seg, dx: float, dy: float, ends: dict[str, tuple[float, float]]
) -> list[tuple[float, float]]:
    a, b = lay.nodes[s.a], lay.nodes[s.b]
    if a.kind == "dummy":
        y0 = lay.rank_top[lay.rank[s.a]] + lay.rank_h[lay.rank[s.a]]
    else:
        y0 = ends[s.a][1] if s.a in ends else lay.bottom(s.a)
    if b.kind == "dummy":
        y1 = lay.rank_top[lay.rank[s.b]]
    else:
        y1 = ends[s.b][0] if s.b in ends else lay.top(s.b)
    return [(lay.x[s.a] + s.da + dx, y0 + dy), (lay.x[s.b] + s.db + dx, y1 + dy)]


def _spread(lay: _Layout, routes: dict[Any, list[_Seg]]) -> None:
    """Fan the ends of several edges at one box's top or bottom across its width (boxes only, not ports)."""
    ends: dict[tuple[str, str], list[tuple[_Seg, str]]] = defaultdict(list)
    seen: set[int] = set()
    for hops in routes.values():
        for s in hops:
            if id(s) in seen:
                continue
            seen.add(id(s))
            if lay.nodes[s.a].kind in ("block", "input", "output"):
                ends[(s.a, "out")].append((s, "a"))
            if lay.nodes[s.b].kind in ("block", "input", "output"):
                ends[(s.b, "in")].append((s, "b"))
    for (node, _), items in ends.items():
        if len(items) < 2:
            continue
        items.sort(key=lambda it: lay.x[it[0].b if it[1] == "a" else it[0].a])
        span = min(lay.nodes[node].w * 0.6, 12.0 * (len(items) - 1))
        for i, (s, end) in enumerate(items):
            off = -span / 2 + span * i / (len(items) - 1)
            if end == "a":
                s.da = off
            else:
                s.db = off


def render_svg(graph: Any, collapse: int = 3, title: str | None = None) -> str:
    """SVG text of a :class:`~peftc.graph.BlockGraph`: blocks top-down, adapter sites marked, a legend.

    Args:
        graph: a block graph (``peftc inspect``'s, from a program or an ONNX file).
        collapse: draw runs of at least this many same-structure consecutive layers once, as ``×N``;
            ``0`` or ``1`` draws every layer.
        title: the caption (default: the graph's title).
    """
    runs = find_runs(graph, collapse)
    run_of: dict[str, LayerRun] = {layer: run for run in runs for layer in run.layers}
    # every block id -> the id drawn for it (in a collapsed run: the first layer's block at that place)
    by_key = {b.key: b.id for b in graph.blocks.values() if b.kind == "block"}
    drawn_as: dict[str, str] = {}
    frame_of: dict[str, str] = {}  # drawn block id -> frame id
    frames: dict[str, _Frame] = {}
    for i, run in enumerate(runs):
        frames[f"f{i}"] = _Frame(f"f{i}", run, {})
    frame_id = {f.run.layers[0]: fid for fid, f in frames.items()}
    for block in graph.blocks.values():
        layer = block.layer if block.kind == "block" else None
        if layer is None or layer not in run_of:
            drawn_as[block.id] = block.id
            continue
        run = run_of[layer]
        rel = _rel(block.key, layer)
        rep = f"{run.layers[0]}.{rel}" if rel else run.layers[0]
        rep_id = by_key.get(rep, block.id)
        drawn_as[block.id] = rep_id
        frame_of[rep_id] = frame_id[run.layers[0]]
    layer_of = {b.id: b.layer for b in graph.blocks.values() if b.kind == "block"}

    boxes: dict[str, _Box] = {}
    blocks_by_key = {b.key: b for b in graph.blocks.values() if b.kind == "block"}
    for block in graph.blocks.values():
        if drawn_as[block.id] != block.id:
            continue
        if block.kind == "block":
            box = _block_box(graph, run_of.get(block.layer) if block.layer else None, block, blocks_by_key)
        else:
            box = _io_box(block)
        box.measure()
        if block.id in frame_of:
            frames[frame_of[block.id]].boxes[block.id] = box
        else:
            boxes[block.id] = box
    # edges between drawn nodes; an edge between two layers of one collapsed run is the repetition itself
    edges: list[tuple[str, str]] = []
    for src, dst in graph.edges:
        a, b = drawn_as.get(src, src), drawn_as.get(dst, dst)
        la, lb = layer_of.get(src), layer_of.get(dst)
        if la and lb and la != lb and run_of.get(la) is not None and run_of.get(la) is run_of.get(lb):
            continue
        if a != b:
            edges.append((a, b))
    edges = list(dict.fromkeys(edges))

    top_of = {n: frame_of.get(n, n) for n in [*boxes, *frame_of]}
    top_boxes: dict[str, _Box] = {}
    order_hint = []
    for block in graph.blocks.values():
        n = drawn_as[block.id]
        t = top_of.get(n)
        if t is not None and t not in order_hint:
            order_hint.append(t)
    for t in order_hint:
        top_boxes[t] = boxes[t] if t in boxes else _Box(t, "frame")
    top_edges = list(dict.fromkeys((top_of[a], top_of[b]) for a, b in edges if top_of[a] != top_of[b]))
    # a first pass over the whole graph with frames as plain nodes gives each port's order
    rough = _layout({t: _Box(t, b.kind, w=b.w or 100, h=b.h or 100) for t, b in top_boxes.items()}, top_edges)
    rough_pos = {n: (rough.rank[n], i) for r in rough.order for i, n in enumerate(r)}
    for frame in frames.values():
        _layout_frame(frame, edges, top_of, rough_pos)
    offsets: dict[tuple[str, str], tuple[float, float]] = {}
    for a, b in top_edges:
        da = frames[a].port_offset(frames[a].exit[b]) if a in frames else 0.0
        db = frames[b].port_offset(frames[b].entry[a]) if b in frames else 0.0
        offsets[(a, b)] = (da, db)
    for fid, frame in frames.items():
        top_boxes[fid] = _Box(fid, "frame", w=frame.outer_w, h=frame.outer_h)
    lay = _layout(top_boxes, top_edges, offsets)
    _spread(lay, lay.routes)
    return _draw(graph, lay, frames, title, runs)


def _layout_frame(
    frame: _Frame, edges: list[tuple[str, str]], top_of: dict[str, str], rough_pos: dict[str, tuple[int, int]]
) -> None:
    """Lay out a frame's blocks with one entry port per outside source and one exit port per outside target."""
    inner = set(frame.boxes)
    local: list[tuple[str, str]] = []
    sources, targets = [], []
    for a, b in edges:
        if a in inner and b in inner:
            local.append((a, b))
        elif b in inner and top_of[a] != frame.id:
            sources.append(top_of[a])
            local.append((f"in:{top_of[a]}", b))
        elif a in inner and top_of[b] != frame.id:
            targets.append(top_of[b])
            local.append((a, f"out:{top_of[b]}"))
    sources = sorted(set(sources), key=lambda n: rough_pos.get(n, (0, 0)))
    targets = sorted(set(targets), key=lambda n: rough_pos.get(n, (0, 0)))
    boxes: dict[str, _Box] = {}
    for s in sources:
        boxes[f"in:{s}"] = _Box(f"in:{s}", "port", w=2.0)
    boxes.update(frame.boxes)
    for t in targets:
        boxes[f"out:{t}"] = _Box(f"out:{t}", "port", w=2.0)
    frame.entry = {s: f"in:{s}" for s in sources}
    frame.exit = {t: f"out:{t}" for t in targets}
    lay = _layout(
        boxes,
        local,
        top=frame.entry.values(),
        bottom=frame.exit.values(),
        gap_y=_GAP_Y * 0.8,
        first_gap=_FRAME_TITLE if sources else None,
        last_gap=_FRAME_FOOT if targets else None,
    )
    _spread(lay, lay.routes)
    frame.layout = lay
    x0, y0, x1, y1 = lay.bounds(frame.boxes)
    title_w = text_width(frame.run.label, _LINE_SIZE, True) + (60 if frame.collapsed else 20)
    if x1 - x0 + 2 * _FRAME_PAD < title_w:
        grow = (title_w - (x1 - x0) - 2 * _FRAME_PAD) / 2
        x0, x1 = x0 - grow, x1 + grow
    ports = [*frame.entry.values(), *frame.exit.values()]
    port_x = [lay.x[p] for p in ports]
    frame.left = min([x0 - _FRAME_PAD, *(px - _FRAME_PAD for px in port_x)])
    right = max([x1 + _FRAME_PAD, *(px + _FRAME_PAD for px in port_x)])
    frame.top = min([y0 - _FRAME_TITLE, *(lay.y[p] for p in frame.entry.values())])
    bottom = max([y1 + _FRAME_FOOT, *(lay.y[p] for p in frame.exit.values())])
    frame.w, frame.h = right - frame.left, bottom - frame.top


_CSS = Template("""
text{font-family:$font;fill:#222}
.t{font-size:11px}.tb{font-size:12.5px;font-weight:bold}.ts{font-size:10px;fill:#555}
.ta{font-size:11px;fill:#7a2e00;font-weight:bold}.tp{font-size:11px;fill:#0d3c7a;font-weight:bold}
.tt{font-size:16px;font-weight:bold}.tc{font-size:11.5px;fill:#444}
.tf{font-size:11px;font-weight:bold;fill:#555;paint-order:stroke;stroke:#fff;stroke-width:4px;stroke-linejoin:round}
.tx{font-size:13px;font-weight:bold;fill:#fff}
.blk{fill:$block;stroke:#444;stroke-width:1}.adp{fill:$adapter;stroke:$adapter_stroke;stroke-width:2}
.pln{fill:$planned;stroke:$planned_stroke;stroke-width:2}
.io{fill:$io;stroke:#777;stroke-width:1}.aio{fill:$adapter;stroke:$adapter_stroke;stroke-width:1.5}
.fr{fill:#fafafa;stroke:#999;stroke-width:1;stroke-dasharray:5 3}.st{fill:#f0f0f0;stroke:#bbb;stroke-width:1}
.bd{fill:#555}.e{fill:none;stroke:$edge;stroke-width:1.2}
""").substitute(
    font=FONT,
    block=BLOCK_FILL,
    adapter=ADAPTER_FILL,
    adapter_stroke=ADAPTER_STROKE,
    planned=PLANNED_FILL,
    planned_stroke=PLANNED_STROKE,
    io=IO_FILL,
    edge=EDGE,
)


def _shape(parts: list[str], box: _Box, cx: float, cy: float) -> None:
    x, y = cx - box.w / 2, cy - box.h / 2
    radius = box.h / 2 if box.kind in ("input", "output") else 5
    parts.append(f"<g><title>{escape(box.tooltip)}</title>")
    size = f'width="{box.w:.1f}" height="{box.h:.1f}" rx="{radius:.1f}"'
    parts.append(f'<rect class="{box.style}" x="{x:.1f}" y="{y:.1f}" {size}/>')
    ty = y + _PAD_Y
    for line in box.lines:
        ty += line.size + (0.5 if line is box.lines[0] else 3.5)
        parts.append(
            f'<text x="{cx:.1f}" y="{ty - 2:.1f}" class="{line.cls}" text-anchor="middle">{escape(line.text)}</text>'
        )
    parts.append("</g>")


def _edge(points: list[tuple[float, float]], arrow: bool) -> str:
    marker = ' marker-end="url(#a)"' if arrow else ""
    return f'<path class="e" d="{_path(points)}"{marker}/>'


def _draw(graph: Any, lay: _Layout, frames: dict[str, _Frame], title: str | None, runs: list[LayerRun]) -> str:
    margin = 16.0
    caption = title if title is not None else graph.title
    n_blocks = sum(b.kind == "block" for b in graph.blocks.values())
    n_ops = sum(sum(b.ops.values()) for b in graph.blocks.values())
    layers = sum(len(r.layers) for r in runs)
    sub = f"{n_blocks} blocks" + (f" in {layers} layers" if layers else "") + f", {n_ops} ops"
    if graph.hidden:
        sub += f" (+{graph.hidden} shape ops not drawn)"
    if graph.adapter_sites:
        sub += f"; {graph.adapter_sites} adapter site{'s' if graph.adapter_sites != 1 else ''}"
    collapsed = [r for r in runs if len(r.layers) > 1]
    if collapsed:
        sub += "; repeated layers drawn once"
    head_h = 50.0
    gx0, gy0 = margin, margin + head_h
    x0, _, x1, y1 = lay.bounds()
    graph_w, graph_h = x1 - x0, y1
    legend = _legend(graph, frames)
    legend_w = max(text_width(text, _LINE_SIZE) for _, text in legend) + 44
    legend_x = gx0 + graph_w + 28
    width = max(
        legend_x + legend_w + margin, margin * 2 + text_width(caption, 16, True), margin * 2 + text_width(sub, 11.5)
    )
    height = max(gy0 + graph_h, gy0 + 20 * len(legend) + 30) + margin
    back, mid, front, labels = [], [], [], []
    # frames: their cards, their inside edges and boxes
    for fid, frame in frames.items():
        fl = lay.x[fid] + gx0 - x0 - frame.outer_w / 2  # the frame's rectangle; its cards fan out right and down
        ft = lay.y[fid] + gy0 - frame.outer_h / 2
        if frame.collapsed:
            for k in (2, 1):
                back.append(
                    f'<rect class="st" x="{fl + k * _STACK:.1f}" y="{ft + k * _STACK:.1f}" width="{frame.w:.1f}" '
                    f'height="{frame.h:.1f}" rx="8"/>'
                )
        back.append(f'<rect class="fr" x="{fl:.1f}" y="{ft:.1f}" width="{frame.w:.1f}" height="{frame.h:.1f}" rx="8"/>')
        labels.append(f'<text x="{fl + 10:.1f}" y="{ft + 17:.1f}" class="tf">{escape(frame.run.label)}</text>')
        if frame.collapsed:
            badge = f"×{len(frame.run.layers)}"
            bw = text_width(badge, 13, True) + 14
            bx = fl + frame.w - bw - 8
            labels.append(f'<rect class="bd" x="{bx:.1f}" y="{ft + 5:.1f}" width="{bw:.1f}" height="19" rx="9.5"/>')
            labels.append(
                f'<text x="{bx + bw / 2:.1f}" y="{ft + 19:.1f}" class="tx" text-anchor="middle">{badge}</text>'
            )
        fl_in = frame.layout
        frame.dx, frame.dy = dx, dy = fl - frame.left, ft - frame.top
        mid += _edges(fl_in, dx, dy)
        for n, box in frame.boxes.items():
            _shape(front, box, fl_in.x[n] + dx, fl_in.y[n] + dy)
    # whole-graph edges end on a frame's rectangle, at its port; the frame's own edges go on from there
    ends = {}
    for fid, frame in frames.items():
        top = lay.top(fid)
        ends[fid] = (top, top + frame.h)
    mid += _edges(lay, gx0 - x0, gy0, ends)
    for n, box in lay.nodes.items():
        if box.kind in ("block", "input", "output"):
            _shape(front, box, lay.x[n] + gx0 - x0, lay.y[n] + gy0)
    head = [
        f'<text x="{margin:.1f}" y="{margin + 16:.1f}" class="tt">{escape(caption)}</text>',
        f'<text x="{margin:.1f}" y="{margin + 34:.1f}" class="tc">{escape(sub)}</text>',
    ]
    leg = _draw_legend(legend, legend_x, gy0)
    svg = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}">',
        f"<style>{_CSS}</style>",
        '<defs><marker id="a" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
        f'orient="auto"><path d="M0,1L10,5L0,9z" fill="{EDGE}"/></marker></defs>',
        f'<rect width="{width:.0f}" height="{height:.0f}" fill="#fff"/>',
        *head,
        *back,
        *mid,
        *front,
        *labels,
        *leg,
        "</svg>",
    ]
    return "\n".join(svg) + "\n"


def _legend(graph: Any, frames: dict[str, _Frame]) -> list[tuple[str, str]]:
    """(swatch kind, text) rows for the marks this picture uses."""
    blocks = [b for b in graph.blocks.values() if b.kind == "block"]
    labels = sorted({label for b in blocks for label in b.adapters})
    rows = [("blk", "block: module · class, op counts")]
    if any(b.adapters and not b.planned for b in blocks):
        rows.append(("adp", "adapter site: " + ", ".join(label for label in labels if "planned" not in label)))
    if any(b.planned and b.adapters for b in blocks):
        rows.append(("pln", "planned site (a plan; nothing changed yet)"))
    rows.append(("io", "graph input / output"))
    if any(b.adapter_input for b in graph.blocks.values()):
        rows.append(("aio", "adapter tensor as a graph input"))
    if any(not f.collapsed for f in frames.values()):
        rows.append(("fr", "one layer"))
    if any(f.collapsed for f in frames.values()):
        rows.append(("st", "×N: N same-structure layers drawn once"))
    return rows


def _draw_legend(rows: list[tuple[str, str]], x: float, y: float) -> list[str]:
    out = [f'<text x="{x:.1f}" y="{y + 4:.1f}" class="tb">Legend</text>']
    for i, (kind, text) in enumerate(rows):
        ry = y + 16 + i * 20
        if kind == "st":
            out.append(f'<rect class="st" x="{x + 6:.1f}" y="{ry + 4:.1f}" width="22" height="12" rx="3"/>')
            out.append(f'<rect class="fr" x="{x + 2:.1f}" y="{ry:.1f}" width="22" height="12" rx="3"/>')
        else:
            rx = 6 if kind in ("io", "aio") else 3
            out.append(f'<rect class="{kind}" x="{x:.1f}" y="{ry:.1f}" width="26" height="14" rx="{rx}"/>')
        out.append(f'<text x="{x + 34:.1f}" y="{ry + 11:.1f}" class="t">{escape(text)}</text>')
    return out


def write_svg(graph: Any, target: str | Path, force: bool = False, collapse: int = 3) -> Path:
    """Write :func:`render_svg` of ``graph`` to ``target`` (``.svg``), atomically.

    Raises:
        ConfigError: ``target`` does not end in ``.svg`` or its directory does not exist.
        OutputExistsError: ``target`` exists and ``force`` is not set.
    """
    target = Path(target)
    if target.suffix.lower() != ".svg":
        raise ConfigError(f"--graph {target}: peftc draws SVG itself; use a name ending in .svg")
    if not target.parent.is_dir():
        raise ConfigError(
            f"--graph {target}: directory {target.parent} does not exist; create it or choose another path"
        )
    if target.exists() and not force:
        raise OutputExistsError(f"--graph: {target} exists; pass --force to replace it, or choose another file")
    write_atomic(target, render_svg(graph, collapse=collapse))
    return target
