"""``peftc inspect --graph`` pictures and ``peftc inspect --diff``.

A tiny GPT-2 base, a run dir with a non-identity LoRA adapter (B random, so merging changes the
weights and no two adapter tensors are equal), and its unmerged, merged and swappable ONNX exports
are built once for the module. Block graphs of the torch program and of the ONNX file are checked
against each other and against counts taken straight from the graphs; diffs against the adapter's
own tensors on disk.
"""

from __future__ import annotations

import json
import os
import re
import stat
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from conftest import captured, tiny_gpt2

from peftc.cli import main
from peftc.errors import ConfigError, PeftcError

R = 4
SITES = ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """base model dir, run dir (LoRA r=4 on c_attn, B random) and its unmerged/merged/swappable exports."""
    from peftc.passes import insertion_pipeline

    from peftc.config import LoraConfig
    from peftc.exporting import export
    from peftc.program import capture

    root = tmp_path_factory.mktemp("inspect-graph")
    model = tiny_gpt2()
    base = root / "base"
    model.save_pretrained(base, safe_serialization=True)
    program = capture(model, "causal-lm", mode="eval")
    insertion_pipeline(LoraConfig(r=R, lora_alpha=8, task_type="CAUSAL_LM"))(program)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for key, t in sorted(program.adapter.tensors.items()):
            if "lora_B" in key:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
    run = root / "run"
    program.adapter.save(run / "adapter")
    (run / "run.json").write_text(json.dumps({"task": "causal-lm", "model": {"spec": str(base), "source": str(base)}}))
    out = {
        "root": root,
        "base": base,
        "run": run,
        "unmerged": export(run, out=root / "unmerged"),
        "merged": export(run, merge=True, out=root / "merged"),
        "swap": export(run, adapters_as_inputs=True, out=root / "swap"),
    }
    return out


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def is_dag(graph) -> bool:
    indeg = {b: 0 for b in graph.blocks}
    for _, dst in graph.edges:
        indeg[dst] += 1
    ready = [b for b, n in indeg.items() if n == 0]
    seen = 0
    while ready:
        b = ready.pop()
        seen += 1
        for src, dst in graph.edges:
            if src == b:
                indeg[dst] -= 1
                if indeg[dst] == 0:
                    ready.append(dst)
    return seen == len(indeg)


def check_dot(text: str) -> None:
    """Structural DOT check: balanced braces, one statement per line, every edge end declared."""
    assert text.startswith("digraph peftc {") and text.rstrip().endswith("}")
    assert text.count("{") == text.count("}")
    declared = set(re.findall(r"^\s*(\w+) \[", text, re.M))
    for src, dst in re.findall(r"^\s*(\w+) -> (\w+);$", text, re.M):
        assert src in declared and dst in declared
    for label in re.findall(r'label="((?:[^"\\]|\\.)*)"', text):
        assert "\n" not in label


def marked(graph) -> dict[str, dict[str, list[str]]]:
    return {b.key: b.adapters for b in graph.blocks.values() if b.adapters}


# -- block graphs --------------------------------------------------------------------------------


def test_block_key_cuts_module_paths_at_layer_children():
    from peftc.inspect.graph import block_key

    assert block_key("transformer.h.0.attn.c_attn") == "transformer.h.0.attn"
    assert block_key("model.layers.11.mlp.act_fn") == "model.layers.11.mlp"
    assert block_key("bert.embeddings.word_embeddings") == "bert.embeddings"
    assert block_key("lm_head") == "lm_head"
    assert block_key("transformer.h.0.attn.c_attn", depth=2) == "transformer.h"


def test_program_graph_groups_blocks_and_marks_lora_sites():
    from peftc.passes import insertion_pipeline

    from peftc.config import LoraConfig
    from peftc.inspect.graph import program_block_graph

    program, _ = captured("gpt2", "causal-lm")
    insertion_pipeline(LoraConfig(r=R, task_type="CAUSAL_LM"))(program)
    graph = program_block_graph(program, "t")
    keys = {b.key for b in graph.blocks.values() if b.kind == "block"}
    layer = {f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("ln_1", "attn", "ln_2", "mlp")}
    assert layer | {"transformer.wte", "transformer.wpe", "transformer.ln_f", "lm_head"} <= keys
    assert marked(graph) == {f"transformer.h.{i}.attn": {f"LoRA r={R}": [SITES[i]]} for i in (0, 1)}
    assert set(graph.clusters) == {"transformer.h.0", "transformer.h.1"}
    # every tensor-valued op is in exactly one block; shape-only ops are counted apart
    tensor_ops = [
        n
        for n in program.graph.nodes
        if n.op == "call_function"
        and (isinstance(n.meta.get("val"), torch.Tensor) or isinstance(n.meta.get("val"), (list, tuple)))
    ]
    calls = [n for n in program.graph.nodes if n.op in ("call_function", "call_module")]
    assert sum(sum(b.ops.values()) for b in graph.blocks.values()) == len(tensor_ops)
    assert graph.hidden == len(calls) - len(tensor_ops)
    adapter_ops = sum(1 for n in program.graph.nodes if n.op == "call_function" and n.meta.get("peftc_site"))
    attn = [b for b in graph.blocks.values() if b.key.endswith(".attn")]
    assert adapter_ops == 8  # A, B, scale, add per site
    assert attn[0].ops["linear"] == 2  # the branch's A and B matmuls sit in the attention block
    assert is_dag(graph)
    names = {b.key for b in graph.blocks.values() if b.kind != "block"}
    assert names == {"input_ids", "attention_mask", "position_ids", "logits"}
    check_dot(graph.to_dot())


def test_onnx_graph_has_the_program_blocks_and_sites(built):
    """Independent grouping (exporter name scopes vs nn_module_stack) gives the same blocks and sites."""
    from peftc.inspect import graph_of

    prog = graph_of(built["run"])
    onnx_unmerged = graph_of(built["unmerged"] / "model.onnx")
    onnx_merged = graph_of(built["merged"])
    # the exporter drops eval-mode dropout, so a block of nothing but dropout has no ONNX ops
    keys = {b.key for b in prog.blocks.values() if b.kind == "block" and set(b.ops) != {"dropout"}}
    assert {b.key for b in onnx_unmerged.blocks.values() if b.kind == "block"} == keys
    assert (
        marked(onnx_unmerged)
        == marked(prog)
        == {f"transformer.h.{i}.attn": {f"LoRA r={R}": [SITES[i]]} for i in (0, 1)}
    )
    assert marked(onnx_merged) == {} and onnx_merged.adapter_sites == 0
    assert onnx_unmerged.adapter_sites == 2
    for graph in (prog, onnx_unmerged, onnx_merged):
        assert is_dag(graph)
        check_dot(graph.to_dot())
    # the merged graph holds 4 fewer Gemm (2 per site) in the attention blocks than the unmerged one
    gemm = [
        sum(b.ops["Gemm"] for b in g.blocks.values() if b.key.endswith(".attn")) for g in (onnx_unmerged, onnx_merged)
    ]
    assert gemm[0] - gemm[1] == 2 * len(SITES)


def test_swappable_graph_marks_adapter_inputs(built):
    from peftc.inspect import graph_of

    graph = graph_of(built["swap"])
    inputs = {b.key: b for b in graph.blocks.values() if b.kind == "input"}
    lifted = {f"{s}.lora_{w}" for s in SITES for w in "AB"}
    assert {k for k, b in inputs.items() if b.adapter_input} == lifted
    assert not any(inputs[k].adapter_input for k in ("input_ids", "attention_mask", "position_ids"))
    by_id = {b.id: b for b in graph.blocks.values()}
    for site in SITES:
        dst = {by_id[d].key for s, d in graph.edges if by_id[s].key == f"{site}.lora_A"}
        assert dst == {site.rsplit(".", 1)[0]}  # the input feeds its own attention block
    assert set(marked(graph)) == {"transformer.h.0.attn", "transformer.h.1.attn"}
    assert all("r=dynamic" in label for labels in marked(graph).values() for label in labels)
    dot = graph.to_dot()
    assert dot.count("(adapter input)") == 4


def test_depth_groups_coarser(built):
    from peftc.inspect import graph_of

    graph = graph_of(built["merged"], depth=2)
    keys = {b.key for b in graph.blocks.values() if b.kind == "block"}
    assert "transformer.h" in keys and not any(k.startswith("transformer.h.") for k in keys)


def test_planned_sites_are_marked_without_changing_the_model(built):
    from peftc.inspect import block_graph, describe

    plan = {"target_modules": ["c_attn", "c_fc"], "r": 2}
    info, program = describe(built["base"], plan=plan)
    graph = block_graph(info, program)
    assert program.sites == {} and program.parameter_counts()["trainable"] == 0
    rewrites = [d["name"] for d in info["decisions"] if d["action"] == "rewrite"]
    assert len(rewrites) == 4
    got = sorted(m for labels in marked(graph).values() for ms in labels.values() for m in ms)
    assert got == sorted(rewrites)
    assert all(b.planned for b in graph.blocks.values() if b.adapters)
    assert "LoRA r=2 (planned)" in graph.to_dot()


# -- writing pictures ----------------------------------------------------------------------------


def fake_dot(directory: Path, body: str) -> Path:
    """A stand-in ``dot`` executable: ``dot -Tfmt -o OUT`` reading DOT on stdin."""
    directory.mkdir(exist_ok=True)
    script = directory / "dot"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return directory


def test_write_graph_dot_text_and_missing_graphviz(tmp_path, monkeypatch):
    from peftc.inspect import graph_of
    from peftc.inspect.graph import write_graph

    program, _ = captured("gpt2", "causal-lm")
    graph = graph_of(program)
    outcome = write_graph(graph, tmp_path / "g.dot")
    assert not outcome.rendered and (tmp_path / "g.dot").read_text() == graph.to_dot()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    outcome = write_graph(graph, tmp_path / "g2.png")
    assert not outcome.rendered and outcome.path == tmp_path / "g2.dot"
    assert not (tmp_path / "g2.png").exists() and (tmp_path / "g2.dot").read_text() == graph.to_dot()
    assert "not on PATH" in outcome.message and "\n" not in outcome.message
    with pytest.raises(ConfigError, match="unknown format"):
        write_graph(graph, tmp_path / "g.txt")
    with pytest.raises(ConfigError, match="does not exist"):
        write_graph(graph, tmp_path / "no" / "g.svg")
    # SVG needs no binary: peftc draws it, with the adapter sites labelled
    outcome = write_graph(graph, tmp_path / "g3.svg")
    assert outcome.rendered and outcome.path == tmp_path / "g3.svg" and "drawn by peftc" in outcome.message
    root = ET.fromstring((tmp_path / "g3.svg").read_text())
    assert root.tag.endswith("svg") and not (tmp_path / "g3.dot").exists()


def test_write_graph_renders_through_dot_on_path(tmp_path, monkeypatch):
    from peftc.inspect import graph_of
    from peftc.inspect.graph import write_graph

    program, _ = captured("gpt2", "causal-lm")
    graph = graph_of(program)
    # the fake records its argv and its stdin, so the test sees exactly what dot was asked
    bindir = fake_dot(
        tmp_path / "bin",
        'out=""; while [ $# -gt 0 ]; do [ "$1" = -o ] && out="$2"; echo "$1" >> "$0.args"; shift; done; cat > "$out"\n',
    )
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    outcome = write_graph(graph, tmp_path / "g.pdf")
    assert outcome.rendered and outcome.path == tmp_path / "g.pdf"
    assert (tmp_path / "g.pdf").read_text() == graph.to_dot()
    assert (bindir / "dot.args").read_text().split()[0] == "-Tpdf"
    assert not list(tmp_path.glob(".g.pdf.*"))  # no temp file left

    fake_dot(tmp_path / "bad", "echo 'Error: syntax error in line 3' >&2; exit 1\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bad'}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(PeftcError, match="syntax error in line 3"):
        write_graph(graph, tmp_path / "h.png")
    assert not (tmp_path / "h.png").exists() and not list(tmp_path.glob(".h.png.*"))


# -- diffs ---------------------------------------------------------------------------------------


def lora_tensors(run: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    with safe_open(str(run / "adapter" / "adapter_model.safetensors"), "pt") as f:
        return {k.removeprefix("base_model.model."): list(f.get_slice(k).get_shape()) for k in f.keys()}


def test_diff_merged_vs_unmerged_export(built):
    from peftc.inspect import diff, render_diff

    d = diff(built["unmerged"], built["merged"])
    ops = {o["op"]: o["delta"] for o in d["ops"]["changed"]}
    assert ops == {"Gemm": -2 * len(SITES), "Mul": -len(SITES), "Add": -len(SITES)}
    lora = lora_tensors(built["run"])
    p = d["parameters"]
    assert {t["name"]: t["shape"] for t in p["removed"]} == lora and p["added"] == []
    assert p["elements"]["delta"] == -sum(a * b for a, b in lora.values())
    assert sorted(p["values_changed"]) == [f"{s}.weight" for s in SITES]
    assert p["constants"]["removed"] == [{"shape": [], "dtype": "float32", "count": 1}]  # the scale s
    assert d["inputs"]["changed"] == d["inputs"]["added"] == d["inputs"]["removed"] == []
    assert d["outputs"]["added"] == d["outputs"]["removed"] == d["outputs"]["changed"] == []
    assert "logits" in d["outputs"]["a"]
    assert not d["identical"]
    text = render_diff(d)
    assert "Gemm" in text and f"- {SITES[0]}.lora_A.weight [{R}, 64] float32" in text


def test_diff_of_a_thing_with_itself_is_identical(built):
    from peftc.inspect import diff, render_diff

    d = diff(built["merged"] / "model.onnx", built["merged"])
    assert d["identical"] and d["ops"]["changed"] == [] and d["parameters"]["values_changed"] == []
    assert "identical" in render_diff(d)


def test_diff_swappable_inputs(built):
    from peftc.inspect import diff

    d = diff(built["swap"], built["unmerged"])
    removed = {v["name"]: v for v in d["inputs"]["removed"]}
    assert set(removed) == {f"{s}.lora_{w}" for s in SITES for w in "AB"}
    assert all(v["default"] for v in removed.values())
    assert removed[f"{SITES[0]}.lora_A"]["shape"] == ["lora_rank", 64]


def test_diff_programs_around_merge_and_back_to_base(built):
    """A pass's effect: LoRA ops and tensors gone, weights changed, and op for op the base graph."""
    from peftc.passes import insertion_pipeline, merge_pipeline

    from peftc.adapters import AdapterState
    from peftc.inspect import diff, diff_programs, program_facts
    from peftc.models import load_model
    from peftc.program import capture

    state = AdapterState.load(built["run"] / "adapter")
    program = capture(load_model(built["base"], "causal-lm").model, "causal-lm", mode="eval")
    base = program_facts(program, "base")
    insertion_pipeline(state.config, state)(program)
    adapted = program_facts(program, "adapted")
    merge_pipeline()(program)
    d = diff_programs(adapted, program)
    dropouts = base["ops"]["dropout.default"]  # merge_pipeline also drops eval-mode dropout (a no-op)
    assert dropouts > 0
    assert {o["op"]: o["delta"] for o in d["ops"]["changed"]} == {
        "linear.default": -2 * len(SITES),
        "mul.Tensor": -len(SITES),
        "add.Tensor": -len(SITES),
        "dropout.default": -dropouts,
    }
    assert {t["name"] for t in d["parameters"]["removed"]} == set(lora_tensors(built["run"]))
    assert sorted(d["parameters"]["values_changed"]) == [f"{s}.weight" for s in SITES]
    assert d["sites"] == {"added": [], "removed": SITES, "a": 2, "b": 0}
    back = diff(base, program)
    assert back["ops"]["changed"] == [{"op": "dropout.default", "a": dropouts, "b": 0, "delta": -dropouts}]
    assert back["parameters"]["tensors"]["delta"] == 0 and back["parameters"]["added"] == []
    assert back["parameters"]["elements"]["delta"] == 0
    assert sorted(back["parameters"]["values_changed"]) == [f"{s}.weight" for s in SITES]


def test_diff_program_vs_onnx_notes_the_ir(built):
    from peftc.inspect import diff

    d = diff(built["run"], built["merged"])
    assert any("op names differ by IR" in n for n in d["notes"])
    assert d["a"]["kind"] == "program" and d["b"]["kind"] == "onnx"


# -- CLI -----------------------------------------------------------------------------------------


def test_cli_graph_without_graphviz(capsys, tmp_path, built, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    code, out, err = run_cli(capsys, "inspect", str(built["unmerged"]), "--graph", str(tmp_path / "g.png"))
    assert code == 0, err
    last = out.strip().splitlines()[-1]
    assert "Graphviz 'dot' is not on PATH" in last and str(tmp_path / "g.dot") in last
    assert "2 adapter sites" in last
    check_dot((tmp_path / "g.dot").read_text())
    code, out, err = run_cli(capsys, "inspect", str(built["unmerged"]), "--graph", str(tmp_path / "g.svg"))
    assert code == 0, err
    assert "SVG drawn by peftc" in out.strip().splitlines()[-1]
    assert "LoRA" in (tmp_path / "g.svg").read_text()


def test_cli_graph_without_graphviz_reruns(capsys, tmp_path, built, monkeypatch):
    """The fallback ``.dot`` a picture request wrote is replaced by the same request; a file peftc did not
    write is not (``--force`` replaces it)."""
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    argv = ["inspect", str(built["merged"]), "--graph", str(tmp_path / "g.png")]
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    first = (tmp_path / "g.dot").read_text()
    (tmp_path / "g.dot").write_text(first.replace("digraph peftc {", "digraph peftc {\n  // stale", 1))
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "replacing the existing file" in out.strip().splitlines()[-1]
    assert (tmp_path / "g.dot").read_text() == first
    (tmp_path / "g.dot").write_text("digraph mine { a -> b; }\n")
    code, _, err = run_cli(capsys, *argv)
    one_line_error(code, err, "g.dot, which exists and is not a peftc graph", "--force")
    assert (tmp_path / "g.dot").read_text() == "digraph mine { a -> b; }\n"
    code, _, err = run_cli(capsys, *argv, "--force")
    assert code == 0, err
    assert (tmp_path / "g.dot").read_text() == first
    code, _, err = run_cli(capsys, "inspect", str(built["merged"]), "--graph", str(tmp_path / "g.dot"))
    one_line_error(code, err, "g.dot exists; pass --force")  # asked for by name: never replaced silently


def test_cli_graph_json_and_plan(capsys, tmp_path, built):
    code, out, err = run_cli(capsys, "inspect", str(built["run"]), "--graph", str(tmp_path / "run.dot"), "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["graph"] == {"path": str(tmp_path / "run.dot"), "rendered": False, "blocks": 14, "adapter_sites": 2}
    code, out, err = run_cli(
        capsys, "inspect", str(built["base"]), "--plan", "--target-modules", "c_fc", "--graph", str(tmp_path / "p.gv")
    )
    assert code == 0, err
    assert (tmp_path / "p.gv").read_text().count("(planned)") == 2


def test_cli_diff_text_and_json(capsys, built):
    code, out, err = run_cli(capsys, "inspect", "--diff", str(built["unmerged"]), str(built["merged"]))
    assert code == 0, err
    assert out.startswith("A: artifact") and "Gemm" in out and "values changed: 2" in out
    code, out, err = run_cli(capsys, "inspect", "--diff", str(built["base"]), str(built["run"]), "--json")
    assert code == 0, err
    d = json.loads(out)
    assert {t["name"] for t in d["parameters"]["added"]} == set(lora_tensors(built["run"]))
    assert d["sites"]["added"] == SITES


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--diff", "{run}"], ["--diff compares two graphs", "got 1"]),
        (["--diff", "{run}", "{root}/missing"], ["missing does not exist"]),
        (["{root}/bad.onnx", "--graph", "{root}/x.dot"], ["not a readable ONNX model"]),
        (["--diff", "{merged}", "{root}/bad.onnx"], ["not a readable ONNX model"]),
        (["{merged}", "--graph", "{root}/x.txt"], ["unknown format '.txt'"]),
        (["{merged}", "--graph", "{root}/nodir/x.svg"], ["does not exist"]),
        (["{merged}", "--depth", "2"], ["--depth 2: needs --graph"]),
        (["{merged}", "{run}"], ["one PATH (two with --diff), got 2"]),
        (["--diff", "{merged}", "{run}", "--graph", "{root}/x.dot"], ["exclude each other"]),
        ([], ["got 0"]),
    ],
)
def test_cli_bad_input_is_one_line(capsys, built, argv, needles):
    (built["root"] / "bad.onnx").write_bytes(b"not a model")
    args = [a.format(**{k: str(v) for k, v in built.items()}) for a in argv]
    code, _, err = run_cli(capsys, "inspect", *args)
    one_line_error(code, err, *needles)


def test_onnx_without_exporter_metadata_groups_by_name_scopes():
    """TorchScript-exporter style names (``/transformer/h.0/attn/MatMul``) still give blocks and sites."""
    import onnx
    from onnx import TensorProto, helper

    from peftc.inspect.graph import onnx_block_graph

    w = helper.make_tensor("transformer.h.0.attn.c_attn.weight", TensorProto.FLOAT, [4, 4], [0.0] * 16)
    a = helper.make_tensor("transformer.h.0.attn.c_attn.lora_A.weight", TensorProto.FLOAT, [4, 2], [0.0] * 8)
    b = helper.make_tensor("transformer.h.0.attn.c_attn.lora_B.weight", TensorProto.FLOAT, [2, 4], [0.0] * 8)
    nodes = [
        helper.make_node("MatMul", ["x", w.name], ["base"], name="/transformer/h.0/attn/c_attn/MatMul"),
        helper.make_node("MatMul", ["x", a.name], ["ax"], name="/transformer/h.0/attn/c_attn/MatMul_1"),
        helper.make_node("MatMul", ["ax", b.name], ["bax"], name="/transformer/h.0/attn/c_attn/MatMul_2"),
        helper.make_node("Add", ["base", "bax"], ["h"], name="/transformer/h.0/attn/c_attn/Add"),
        helper.make_node("Relu", ["h"], ["y"], name="/transformer/h.0/mlp/act/Relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [w, a, b],
    )
    blocks = onnx_block_graph(helper.make_model(graph), "by name")
    got = {b.key: dict(b.ops) for b in blocks.blocks.values() if b.kind == "block"}
    assert got == {"transformer.h.0.attn": {"MatMul": 3, "Add": 1}, "transformer.h.0.mlp": {"Relu": 1}}
    assert marked(blocks) == {"transformer.h.0.attn": {"LoRA r=2": ["transformer.h.0.attn.c_attn"]}}
    by_id = {b.id: b.key for b in blocks.blocks.values()}
    assert {(by_id[s], by_id[d]) for s, d in blocks.edges} == {
        ("x", "transformer.h.0.attn"),
        ("transformer.h.0.attn", "transformer.h.0.mlp"),
        ("transformer.h.0.mlp", "y"),
    }
    onnx.checker.check_model(helper.make_model(graph))


def test_diff_model_against_its_plan(built):
    """``--diff MODEL MODEL --plan``: B gets the plan's fresh LoRA sites; sizes follow r·(in+out) per site."""
    from peftc.inspect import diff

    d = diff(built["base"], built["base"], plan={"target_modules": ["c_attn", "c_fc"], "r": 2})
    added = {t["name"]: t["shape"] for t in d["parameters"]["added"]}
    assert len(added) == 8 and d["parameters"]["removed"] == []
    out = {"attn.c_attn": 192, "mlp.c_fc": 256}
    want = sum(2 * (64 + out[m]) for m in out) * 2  # r=2, in=64, two layers
    assert d["parameters"]["elements"]["delta"] == want == sum(a * b for a, b in added.values())
    assert {o["op"]: o["delta"] for o in d["ops"]["changed"]} == {"linear.default": 8, "mul.Tensor": 4, "add.Tensor": 4}
    assert d["b"]["label"].startswith("plan:") and len(d["sites"]["added"]) == 4


def test_existing_graph_file_needs_force(tmp_path):
    from peftc.errors import OutputExistsError
    from peftc.inspect import graph_of
    from peftc.inspect.graph import write_graph

    program, _ = captured("gpt2", "causal-lm")
    graph = graph_of(program)
    target = tmp_path / "g.dot"
    target.write_text("keep me")
    with pytest.raises(OutputExistsError, match="--force"):
        write_graph(graph, target)
    assert target.read_text() == "keep me"
    assert write_graph(graph, target, force=True).path == target and target.read_text() == graph.to_dot()
