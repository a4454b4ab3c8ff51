"""MergeLoraPass: W' = W + s·B·A folded into the base weight; the graph becomes the base graph op for op."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, batch_for, captured, real_positions
from peftc.passes import EvalModePass, MergeLoraPass, insertion_pipeline, merge_pipeline
from peftc.passes.base import graph_fingerprint

from peftc.adapters import peft_key
from peftc.config import LoraConfig
from peftc.program import MODEL_PREFIX

CASES = sorted(FAMILIES)
IDS = [f"{f}-{t}" for f, t in CASES]
#: Attention and MLP targets per family (GPT-2's are all Conv1D: fan_in_fan_out).
TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "bert": ["query", "key", "value", "dense"],
}


def _perturb(state, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in state.tensors.values():
            t.add_(0.1 * torch.randn(t.shape, generator=gen))


def _run(program, inputs):
    with torch.no_grad():
        return program(*inputs)


def _base_histogram(case):
    """The base program's ops once eval-mode (eval captures keep inert dropout(train=False) nodes)."""
    base, _ = captured(*case)
    EvalModePass()(base)
    return base.op_histogram()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merged_equals_unmerged_and_base_graph(case):
    fam, task = case
    program, model = captured(*case)
    originals = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=TARGETS[fam],
        rank_pattern={TARGETS[fam][-1]: 2},
        modules_to_save=["classifier", "score"] if task == "seq-cls" else None,
        init_lora_weights=False,
    )
    insertion_pipeline(cfg)(program)
    _perturb(program.adapter)
    n_sites = len(program.sites)
    assert n_sites >= 8
    site = next(iter(program.sites.values()))
    w_path = f"{MODEL_PREFIX}{site.name}.weight"
    w = program.graph_module.get_parameter(w_path).detach().clone()
    a = program.adapter.tensors[peft_key(site.name, "lora_A.weight")].detach()
    b = program.adapter.tensors[peft_key(site.name, "lora_B.weight")].detach()
    assert [d.name for d in MergeLoraPass().plan(program)] == list(program.sites)

    inputs = batch_for(program)
    unmerged = _run(program, inputs)
    result = merge_pipeline()(program)
    assert result.modified and result.program is program
    merged = _run(program, inputs)
    sel = real_positions(program, inputs)
    torch.testing.assert_close(merged[sel], unmerged[sel], atol=1e-5, rtol=0)

    # structure: the base model's graph op for op, nothing of LoRA left
    assert program.op_histogram() == _base_histogram(case)
    assert not any(n.meta.get("peftc_site") for n in program.graph.nodes)
    assert not any("lora_" in name for name, _ in program.graph_module.named_parameters())
    assert program.sites == {} and program.history[-1] == "MergeLoraPass"
    # the folded weight, checked by hand (Conv1D stores W as [in, out])
    delta = site.scale * (b @ a)
    want = w + (delta.T if site.fan_in_fan_out else delta)
    assert site.fan_in_fan_out is (fam == "gpt2")
    torch.testing.assert_close(program.graph_module.get_parameter(w_path).detach(), want, atol=1e-6, rtol=0)
    # the base model's parameters are untouched (the merged weight is a new tensor)
    for k, v in model.state_dict().items():
        assert torch.equal(v, originals[k]), k
    # the adapter state still holds its tensors (merge changes the graph, not the adapter)
    assert sum("lora_A" in k for k in program.adapter.tensors) == n_sites


def test_merge_of_tied_lm_head_leaves_the_embedding_alone():
    """GPT-2 ties lm_head to wte; torch.export names the single shared get_attr after lm_head."""
    program, model = captured("gpt2", "causal-lm")
    wte = model.transformer.wte.weight.detach().clone()
    insertion_pipeline(LoraConfig(target_modules=["lm_head"], init_lora_weights=False))(program)
    assert set(program.sites) == {"lm_head"}
    inputs = batch_for(program)
    unmerged = _run(program, inputs)
    site = program.sites["lm_head"]
    a = program.adapter.tensors[peft_key("lm_head", "lora_A.weight")].detach()
    b = program.adapter.tensors[peft_key("lm_head", "lora_B.weight")].detach()
    merge_pipeline()(program)
    merged = _run(program, inputs)
    sel = real_positions(program, inputs)
    torch.testing.assert_close(merged[sel], unmerged[sel], atol=1e-5, rtol=0)
    gm = program.graph_module
    assert torch.equal(gm.get_parameter("model.transformer.wte.weight"), wte)
    assert gm.get_parameter("model.transformer.wte.weight") is model.transformer.wte.weight
    torch.testing.assert_close(
        gm.get_parameter("model.lm_head.weight").detach(), wte + site.scale * (b @ a), atol=1e-6, rtol=0
    )
    (emb,) = [
        n
        for n in program.graph.nodes
        if n.target == torch.ops.aten.embedding.default and n.args[0].target.endswith("wte.weight")
    ]
    (head,) = [n for n in program.graph.nodes if n.target == torch.ops.aten.linear.default]
    assert emb.args[0].target == "model.transformer.wte.weight" and head.args[1].target == "model.lm_head.weight"
    assert program.op_histogram() == _base_histogram(("gpt2", "causal-lm"))
    assert torch.equal(model.transformer.wte.weight, wte) and model.lm_head.weight is model.transformer.wte.weight


def test_merge_without_lora_sites_changes_nothing():
    program, _ = captured("llama", "causal-lm")
    before = graph_fingerprint(program.graph)
    assert MergeLoraPass().plan(program) == []
    assert MergeLoraPass()(program).modified is False
    assert merge_pipeline()(program).modified is False  # llama has no dropout either
    assert graph_fingerprint(program.graph) == before and program.history == []
    # merged once, a second merge finds nothing
    program, _ = captured("gpt2", "causal-lm")
    insertion_pipeline(LoraConfig())(program)
    assert merge_pipeline()(program).modified
    after = graph_fingerprint(program.graph)
    assert MergeLoraPass()(program).modified is False and graph_fingerprint(program.graph) == after
