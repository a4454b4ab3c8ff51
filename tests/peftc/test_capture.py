"""capture(): torch.export of GPT-2, LLaMA (grouped-query attention) and BERT, checked against the eager model.

Captures are cached per family (``conftest.captured``); every test gets its own copy of the graph.
"""

from __future__ import annotations

import types

import pytest
import torch
from conftest import FAMILIES, batch_for, captured, real_positions
from torch import nn
from transformers import PretrainedConfig

from peftc.errors import CaptureError, ConfigError
from peftc.program import MODEL_PREFIX, capture

aten = torch.ops.aten
CASES = sorted(FAMILIES)
IDS = [f"{f}-{t}" for f, t in CASES]

#: (graph inputs, aten.linear calls, aten.addmm calls) per family: the linear layers each model runs.
EXPECTED = {
    ("gpt2", "causal-lm"): (["input_ids", "attention_mask", "position_ids"], 1, 8),  # lm_head; 4 Conv1D x 2 layers
    ("gpt2", "seq-cls"): (["input_ids", "attention_mask"], 1, 8),  # score
    ("llama", "causal-lm"): (["input_ids", "attention_mask", "position_ids"], 15, 0),  # 7 x 2 layers + lm_head
    ("llama", "seq-cls"): (["input_ids", "attention_mask"], 15, 0),  # 7 x 2 + score
    ("bert", "seq-cls"): (["input_ids", "attention_mask", "token_type_ids"], 14, 0),  # 6 x 2 + pooler + classifier
}


def _eager(model, program, inputs):
    kwargs = dict(zip(program.input_names, inputs, strict=True))
    if program.task.name == "causal-lm":
        kwargs["use_cache"] = False
    with torch.no_grad():
        return model(**kwargs).logits


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_capture_structure(case):
    program, model = captured(*case)
    names, n_linear, n_addmm = EXPECTED[case]
    assert program.input_names == names
    assert program.output_names == ["logits"]
    assert program.mode == "eval" and program.task.name == case[1]
    assert program.dynamic_dims == {n: {0: "batch", 1: "sequence"} for n in names}
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == len(names)
    hist = program.op_histogram()
    assert hist.get("linear.default", 0) == n_linear
    assert hist.get("addmm.default", 0) == n_addmm
    assert hist["scaled_dot_product_attention.default"] == 2  # one per layer: the masks are vmap-free
    assert not any("vmap" in k for k in hist)
    # Parameters are the model's own tensors (no copy), frozen.
    gm = program.graph_module
    for name, param in model.named_parameters():
        assert gm.get_parameter(MODEL_PREFIX + name) is param
        assert not param.requires_grad
    assert program.parameters(trainable=True) == []
    counts = program.parameter_counts()
    assert counts["trainable"] == 0 and counts["frozen"] == sum(p.numel() for p in model.parameters())
    if case[0] == "llama":  # grouped-query attention: 2 KV heads of 16 for 4 query heads
        attn = "model.model.layers.0.self_attn."
        assert tuple(gm.get_parameter(attn + "q_proj.weight").shape) == (64, 64)
        assert tuple(gm.get_parameter(attn + "k_proj.weight").shape) == (32, 64)
        assert program.module_types["model.layers.0.self_attn.k_proj"] == "Linear"
    if case[0] == "gpt2":
        assert program.module_types["transformer.h.0.attn.c_attn"] == "Conv1D"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_capture_matches_eager_on_other_shapes(case):
    """Dynamic batch and sequence: shapes unlike the (2, 8) example, incl. batch 1 and sequence 1."""
    program, model = captured(*case)
    assert tuple(program.example_inputs[0].shape) == (2, 8)
    shapes = [(1, 1), (1, 6), (4, 1), (3, 17)]
    runs = [batch_for(program, b, s, left_pad=False, seed=b * 100 + s) for b, s in shapes]
    runs.append(batch_for(program, 3, 9, left_pad=True))
    for inputs in runs:
        with torch.no_grad():
            got = program(*inputs)
        want = _eager(model, program, inputs)
        assert got.shape == want.shape
        sel = real_positions(program, inputs)
        torch.testing.assert_close(got[sel], want[sel], atol=1e-5, rtol=0)


def _dropouts(program, active: bool):
    nodes = [n for n in program.graph.nodes if n.op == "call_function" and n.target == aten.dropout.default]
    return [n for n in nodes if bool(n.args[2]) == active and n.args[1] > 0]


def _sdpa_dropout_p(program):
    out = []
    for n in program.graph.nodes:
        if n.target == aten.scaled_dot_product_attention.default:
            out.append(n.args[4] if len(n.args) > 4 else n.kwargs.get("dropout_p", 0.0))
    return out


@pytest.mark.parametrize("case", [("gpt2", "causal-lm"), ("bert", "seq-cls")], ids=["gpt2", "bert"])
def test_train_capture_has_dropout_eval_has_none_active(case):
    train, _ = captured(*case, mode="train")
    evl, model = captured(*case, mode="eval")
    assert train.mode == "train"
    n_active = len(_dropouts(train, active=True))
    assert n_active >= 5  # embeddings, attention output, MLP output per layer
    assert all(p == pytest.approx(0.1) for p in _sdpa_dropout_p(train))
    assert _dropouts(evl, active=True) == []
    assert all(p == 0.0 for p in _sdpa_dropout_p(evl))
    # numerically: train mode is random, eval mode is the eager model
    inputs = batch_for(evl)
    with torch.no_grad():
        torch.manual_seed(0)
        a = train(*inputs)
        torch.manual_seed(1)
        b = train(*inputs)
        e1, e2 = evl(*inputs), evl(*inputs)
    assert (a - b).abs().max() > 1e-3
    assert torch.equal(e1, e2)
    sel = real_positions(evl, inputs)
    torch.testing.assert_close(e1[sel], _eager(model, evl, inputs)[sel], atol=1e-5, rtol=0)


class BranchyLM(nn.Module):
    """A causal LM whose forward branches on tensor data: torch.export cannot capture it."""

    def __init__(self):
        super().__init__()
        self.config = PretrainedConfig(vocab_size=16)
        self.embed = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 16)

    def forward(self, input_ids, attention_mask, return_dict=True):
        h = self.embed(input_ids)
        if h.sum() > 0:  # data-dependent Python control flow
            h = h * 2
        return types.SimpleNamespace(logits=self.head(h))


def test_capture_error_names_model_task_and_source_line():
    with pytest.raises(CaptureError) as info:
        capture(BranchyLM(), "causal-lm", mode="eval")
    msg = str(info.value)
    assert "\n" not in msg
    assert "BranchyLM" in msg
    assert "'causal-lm'" in msg
    assert "test_capture.py" in msg and "if h.sum() > 0:" in msg  # the model's own line, not torch's
    assert info.value.__cause__ is not None


def test_capture_refuses_bad_task_and_mode():
    with pytest.raises(ConfigError, match="unknown task 'translation'"):
        capture(BranchyLM(), "translation")
    with pytest.raises(ValueError, match="mode must be"):
        capture(BranchyLM(), "causal-lm", mode="inference")


def test_train_capture_of_a_layerdrop_stack():
    """OPT's decoder draws ``rand() < layerdrop`` per layer in training: at layerdrop 0 it is captured, dropout kept."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(
        num_hidden_layers=2, hidden_size=32, ffn_dim=64, num_attention_heads=4, vocab_size=64, word_embed_proj_dim=32
    )
    model = OPTForCausalLM(cfg)
    assert model.model.decoder.layerdrop == 0
    program = capture(model, "causal-lm", mode="train")
    inputs = program.example_inputs
    torch.manual_seed(1)
    first = program(*inputs)
    torch.manual_seed(1)
    again = program(*inputs)
    torch.manual_seed(2)
    other = program(*inputs)
    assert torch.equal(first, again) and (first - other).abs().max() > 0  # seeded dropout, not eval mode
    model.eval()
    assert (first - model(*inputs[:2], position_ids=inputs[2]).logits).abs().max() > 0
    cfg.layerdrop = 0.5  # a real LayerDrop stays a capture error, never silently dropped
    with pytest.raises(CaptureError, match="layerdrop"):
        capture(OPTForCausalLM(cfg), "causal-lm", mode="train")
