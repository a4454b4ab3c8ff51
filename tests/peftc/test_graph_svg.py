"""``peftc.inspect.svg``: block graphs drawn as SVG in pure Python.

Synthetic block graphs (built in the test, any number of layers) check the collapse of repeated
layers and the listing of adapted layers; real ones — a tiny GPT-2 with LoRA, a 32-layer tiny
LLaMA with LoRA on its last 4 layers — check that a captured model draws as well-formed SVG whose
boxes do not overlap, with the adapter sites labelled, and that 32 layers cost no more than one.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections import Counter

import pytest
import torch
from conftest import tiny_gpt2

from peftc.errors import ConfigError, OutputExistsError
from peftc.inspect.svg import find_runs, render_svg, write_svg

NS = "{http://www.w3.org/2000/svg}"


def block_classes():
    # peftc.graph is moving into the peftc.inspect package; the data classes keep their names
    try:
        from peftc.inspect.graph import Block, BlockGraph
    except ImportError:  # pragma: no cover
        raise
    return Block, BlockGraph


def synthetic(n_layers: int, adapted=(), odd_layer: int | None = None, planned: bool = False):
    """A LLaMA-like block graph: embed, mask glue, per layer norm → attn → mlp (residuals), norm, head."""
    Block, BlockGraph = block_classes()
    blocks, edges = {}, {}

    def add(bid, key, kind="block", module_type="", ops=None, adapters=None):
        blocks[bid] = Block(bid, key, kind, module_type, Counter(ops or {"add": 1}), adapters or {}, planned=planned)
        return bid

    def edge(a, b):
        edges[(a, b)] = edges.get((a, b), 0) + 1

    add("in0", "input_ids", "input")
    add("in1", "attention_mask", "input")
    emb = add("b_emb", "model.embed_tokens", module_type="Embedding", ops={"embedding": 1})
    mask = add("b_mask", "model", module_type="LlamaModel", ops={"arange": 3, "unsqueeze": 4})
    edge("in0", emb)
    edge("in1", mask)
    prev = emb
    for i in range(n_layers):
        layer = f"model.layers.{i}"
        norm = add(f"b{i}n", f"{layer}.input_layernorm", module_type="LlamaRMSNorm", ops={"mul": 2, "pow": 1})
        label = "LoRA r=8 (planned)" if planned else "LoRA r=8"
        sites = {label: [f"{layer}.self_attn.q_proj", f"{layer}.self_attn.v_proj"]} if i in adapted else {}
        ops = {"linear": 4 + 4 * bool(sites), "mul": 6}
        attn = add(f"b{i}a", f"{layer}.self_attn", module_type="LlamaAttention", ops=ops, adapters=sites)
        mlp = add(f"b{i}m", f"{layer}.mlp", module_type="LlamaMLP", ops={"linear": 3, "silu": 1})
        for a, b in [(prev, norm), (prev, attn), (norm, attn), (mask, attn), (attn, mlp)]:
            edge(a, b)
        if i == odd_layer:  # a layer with one more block breaks a run
            extra = add(f"b{i}x", f"{layer}.cross_attn", module_type="CrossAttention")
            edge(mlp, extra)
            mlp = extra
        prev = mlp
    norm = add("b_norm", "model.norm", module_type="LlamaRMSNorm")
    head = add("b_head", "lm_head", module_type="Linear", ops={"linear": 1})
    add("out", "logits", "output")
    for a, b in [(prev, norm), (norm, head), (head, "out")]:
        edge(a, b)
    clusters = {f"model.layers.{i}": "LlamaDecoderLayer" for i in range(n_layers)}
    return BlockGraph(f"synthetic {n_layers} layers", blocks, edges, clusters)


def boxes(svg: str) -> list[tuple[str, float, float, float, float]]:
    """(tooltip, x, y, w, h) of every drawn box (a ``<g>`` with a ``<title>`` and a ``<rect>``)."""
    root = ET.fromstring(svg)
    out = []
    for g in root.iter(f"{NS}g"):
        title, rect = g.find(f"{NS}title"), g.find(f"{NS}rect")
        out.append((title.text, *(float(rect.get(k)) for k in ("x", "y", "width", "height"))))
    return out


def assert_no_overlap(svg: str) -> None:
    root = ET.fromstring(svg)
    width, height = float(root.get("width")), float(root.get("height"))
    drawn = boxes(svg)
    for i, (name, x, y, w, h) in enumerate(drawn):
        assert 0 <= x and x + w <= width + 0.5 and 0 <= y and y + h <= height + 0.5, name
        for other, x2, y2, w2, h2 in drawn[i + 1 :]:
            apart = x + w <= x2 or x2 + w2 <= x or y + h <= y2 or y2 + h2 <= y
            assert apart, f"{name!r} overlaps {other!r}"


def texts(svg: str) -> list[str]:
    return [t.text or "" for t in ET.fromstring(svg).iter(f"{NS}text")]


# -- synthetic graphs ------------------------------------------------------------------------------


def test_32_layers_draw_as_one_frame_with_the_adapted_layers_listed():
    graph = synthetic(32, adapted=range(28, 32))
    (run,) = find_runs(graph)
    assert run.indices == list(range(32)) and run.label == "model.layers.0–31 · LlamaDecoderLayer"
    svg = render_svg(graph)
    words = texts(svg)
    assert "×32" in words and "model.layers.0–31 · LlamaDecoderLayer" in words
    assert "LoRA r=8: q_proj, v_proj · layers 28–31" in words
    assert "10–14 ops each: mul 6, linear 4" in words  # most layers have no adapter ops; 28–31 have 4 more
    # inputs 2, embed, mask glue, one layer's 3 blocks, norm, head, output
    assert len(boxes(svg)) == 10
    assert_no_overlap(svg)
    every = render_svg(graph, collapse=0)
    assert len(boxes(every)) == 7 + 3 * 32 and "×32" not in texts(every)
    assert_no_overlap(every)
    assert len(svg) < 15_000 < len(every)
    assert len(render_svg(synthetic(64, adapted=range(64)))) < len(svg) + 500  # size does not grow with depth


def test_every_layer_adapted_says_all():
    words = texts(render_svg(synthetic(12, adapted=range(12))))
    assert "LoRA r=8: q_proj, v_proj · all 12 layers" in words and "×12" in words


def test_a_different_layer_breaks_the_run():
    graph = synthetic(21, adapted=[0, 15], odd_layer=10)
    assert [r.indices for r in find_runs(graph)] == [list(range(10)), [10], list(range(11, 21))]
    words = texts(render_svg(graph))
    assert {"×10", "model.layers.0–9 · LlamaDecoderLayer", "model.layers.10 · LlamaDecoderLayer"} <= set(words)
    assert "LoRA r=8: q_proj, v_proj · layer 0" in words and "LoRA r=8: q_proj, v_proj · layer 15" in words
    assert "cross_attn · CrossAttention" in words


def test_short_runs_are_not_collapsed():
    graph = synthetic(2, adapted=[1])
    assert [r.indices for r in find_runs(graph)] == [[0], [1]]
    assert [r.indices for r in find_runs(graph, collapse=2)] == [[0, 1]]
    words = texts(render_svg(graph))
    assert "model.layers.1 · LlamaDecoderLayer" in words and "LoRA r=8: q_proj, v_proj" in words


def test_whole_layer_blocks_collapse_too():
    # inspect --graph --depth 3: one block per layer, keyed by the layer itself
    Block, BlockGraph = block_classes()
    blocks = {"in": Block("in", "input_ids", "input")}
    edges, prev = {}, "in"
    for i in range(6):
        sites = {"IA3": [f"enc.layer.{i}.ff.wo"]} if i >= 3 else {}
        blocks[f"b{i}"] = Block(f"b{i}", f"enc.layer.{i}", "block", "Layer", Counter({"mm": 2}), sites)
        edges[(prev, f"b{i}")] = 1
        prev = f"b{i}"
    svg = render_svg(BlockGraph("depth 3", blocks, edges, {f"enc.layer.{i}": "Layer" for i in range(6)}))
    words = texts(svg)
    assert "×6" in words and "(layer) · Layer" in words and "IA3: ff.wo · layers 3–5" in words
    assert len(boxes(svg)) == 2


def test_well_formed_with_a_legend_and_tooltips():
    svg = render_svg(synthetic(4, adapted=[0, 1, 2, 3]), title="a <title> & more")
    root = ET.fromstring(svg)  # escaping holds
    assert root.tag == f"{NS}svg" and float(root.get("width")) > 0
    words = texts(svg)
    assert "a <title> & more" in words and "Legend" in words
    assert "adapter site: LoRA r=8" in words and "×N: N same-structure layers drawn once" in words
    tips = [name for name, *_ in boxes(svg)]
    assert any(t.startswith("model.layers.0.self_attn (LlamaAttention)") for t in tips)
    assert 'class="adp"' in svg and 'class="pln"' not in svg


def test_planned_sites_are_marked_apart():
    svg = render_svg(synthetic(3, adapted=[0, 1, 2], planned=True))
    assert 'class="pln"' in svg and 'class="adp"' not in svg
    assert "planned site (a plan; nothing changed yet)" in texts(svg)
    assert "LoRA r=8 (planned): q_proj, v_proj · all 3 layers" in texts(svg)


def test_a_cycle_still_draws():
    Block, BlockGraph = block_classes()
    blocks = {i: Block(i, k, "block", "M", Counter({"add": 1})) for i, k in [("a", "x.a"), ("b", "x.b"), ("c", "x.c")]}
    graph = BlockGraph("cycle", blocks, {("a", "b"): 1, ("b", "c"): 1, ("c", "a"): 1}, {})
    svg = render_svg(graph)
    assert len(boxes(svg)) == 3 and svg.count('marker-end="url(#a)"') == 3
    assert_no_overlap(svg)


def test_write_svg(tmp_path):
    graph = synthetic(3)
    out = write_svg(graph, tmp_path / "g.svg")
    assert ET.parse(out).getroot().tag == f"{NS}svg"
    with pytest.raises(OutputExistsError, match="pass --force"):
        write_svg(graph, out)
    assert write_svg(graph, out, force=True) == out
    with pytest.raises(ConfigError, match="peftc draws SVG itself; use a name ending in .svg"):
        write_svg(graph, tmp_path / "g.png")
    with pytest.raises(ConfigError, match="does not exist"):
        write_svg(graph, tmp_path / "no" / "g.svg")


# -- captured models -------------------------------------------------------------------------------


def lora_graph(model, **lora):
    from peftc.passes import insertion_pipeline

    from peftc.config import LoraConfig
    from peftc.inspect import graph_of
    from peftc.program import capture

    program = capture(model, "causal-lm", mode="eval")
    insertion_pipeline(LoraConfig(task_type="CAUSAL_LM", **lora))(program)
    return graph_of(program)


def test_tiny_gpt2_with_lora():
    graph = lora_graph(tiny_gpt2(), r=4, lora_alpha=8)
    svg = render_svg(graph)
    words = texts(svg)
    assert words.count("LoRA r=4: c_attn") == 2 and words.count("attn · GPT2Attention") == 2
    assert {"transformer.h.0 · GPT2Block", "transformer.h.1 · GPT2Block", "input_ids", "logits"} <= set(words)
    assert len(boxes(svg)) == len(graph.blocks)  # two layers: nothing collapsed
    marked = [g for g in ET.fromstring(svg).iter(f"{NS}g") if g.find(f"{NS}rect").get("class") == "adp"]
    assert len(marked) == graph.adapter_sites == 2
    assert_no_overlap(svg)


@pytest.mark.slow
def test_32_layer_llama_stays_small():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        num_hidden_layers=32,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    graph = lora_graph(
        LlamaForCausalLM(cfg).eval(),
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        layers_to_transform=list(range(28, 32)),
    )
    assert graph.adapter_sites == 8
    per_layer = {k.split(".", 3)[-1] for k in (b.key for b in graph.blocks.values()) if k.startswith("model.layers.")}
    outside = [b for b in graph.blocks.values() if not (b.layer or "").startswith("model.layers.")]
    svg = render_svg(graph)
    assert len(boxes(svg)) == len(outside) + len(per_layer) < 20 < len(graph.blocks)
    assert len(svg) < 20_000, len(svg)
    words = texts(svg)
    assert "×32" in words and "model.layers.0–31 · LlamaDecoderLayer" in words
    assert "LoRA r=8: q_proj, v_proj · layers 28–31" in words
    assert re.search(r"\b32 layers\b", " ".join(words))
    assert_no_overlap(svg)
