"""EvalModePass: dropout becomes the identity and scaled_dot_product_attention's dropout_p becomes 0."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, batch_for, captured, real_positions
from peftc.passes import EvalModePass, insertion_pipeline
from peftc.passes.base import graph_fingerprint
from torch import fx

from peftc.config import LoraConfig
from peftc.program import Program
from peftc.tasks import get_task

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


def _dropout_nodes(program):
    return [
        n for n in program.graph.nodes if n.op == "call_function" and "dropout" in str(n.target) and n.target != SDPA
    ]


def _sdpa_p(program):
    return [
        n.args[4] if len(n.args) > 4 else n.kwargs.get("dropout_p", 0.0)
        for n in program.graph.nodes
        if n.target == SDPA
    ]


@pytest.mark.parametrize("case", [("gpt2", "causal-lm"), ("bert", "seq-cls")], ids=["gpt2", "bert"])
def test_train_program_becomes_the_eval_model(case):
    program, _ = captured(*case, mode="train")
    n_drop = len(_dropout_nodes(program))
    n_nodes = len(program.graph.nodes)
    assert n_drop >= 5 and all(p > 0 for p in _sdpa_p(program))
    result = EvalModePass()(program)
    assert result.modified and result.program is program
    assert _dropout_nodes(program) == [] and _sdpa_p(program) == [0.0, 0.0]
    assert len(program.graph.nodes) == n_nodes - n_drop  # only the dropouts went
    assert program.mode == "eval" and program.history == ["EvalModePass"]
    # numerically the eager model in eval mode (an independent reference)
    model = FAMILIES[case]()
    inputs = batch_for(program)
    kwargs = dict(zip(program.input_names, inputs, strict=True))
    with torch.no_grad():
        got = program(*inputs)
        want = model(**kwargs, **({"use_cache": False} if case[1] == "causal-lm" else {})).logits
    sel = real_positions(program, inputs)
    torch.testing.assert_close(got[sel], want[sel], atol=1e-5, rtol=0)
    # a second run finds nothing to do
    before = graph_fingerprint(program.graph)
    assert EvalModePass()(program).modified is False
    assert graph_fingerprint(program.graph) == before and program.history == ["EvalModePass"]


def test_lora_dropout_is_removed_too():
    """A train program with LoRA dropout, once eval-mode, equals the eval program bound to the same adapter."""
    cfg = LoraConfig(lora_dropout=0.2, init_lora_weights=False)
    train, _ = captured("gpt2", "causal-lm", mode="train")
    insertion_pipeline(cfg)(train)
    evl, _ = captured("gpt2", "causal-lm", mode="eval")
    insertion_pipeline(cfg, train.adapter)(evl)
    assert any(n.meta.get("peftc_role") == "lora_dropout" for n in train.graph.nodes)
    EvalModePass()(train)
    assert not any(n.meta.get("peftc_role") == "lora_dropout" for n in train.graph.nodes)
    inputs = batch_for(evl)
    with torch.no_grad():
        torch.testing.assert_close(train(*inputs), evl(*inputs), atol=1e-6, rtol=0)


def test_eval_program_without_dropout_is_not_modified():
    program, _ = captured("llama", "causal-lm")
    before = graph_fingerprint(program.graph)
    assert _dropout_nodes(program) == []
    assert EvalModePass()(program).modified is False
    assert graph_fingerprint(program.graph) == before and program.history == []


def test_eval_capture_inert_dropouts_are_removed_without_changing_numbers():
    program, _ = captured("gpt2", "causal-lm")
    inert = _dropout_nodes(program)
    assert inert and all(n.args[2] is False for n in inert)  # dropout(x, p, train=False)
    inputs = batch_for(program)
    with torch.no_grad():
        want = program(*inputs)
    assert EvalModePass()(program).modified
    assert _dropout_nodes(program) == []
    with torch.no_grad():
        assert torch.equal(program(*inputs), want)


def _sdpa_program(**kwargs) -> Program:
    def attend(q, k, v):
        return SDPA(q, k, v, **kwargs)

    gm = fx.symbolic_trace(attend)
    x = torch.randn(1, 2, 4, 8)
    return Program(gm, get_task("causal-lm"), "train", None, ["q", "k", "v"], ["out"], {}, {}, (x, x, x))


def test_sdpa_dropout_p_given_as_keyword_is_zeroed():
    program = _sdpa_program(dropout_p=0.3)
    (node,) = [n for n in program.graph.nodes if n.target == SDPA]
    assert node.kwargs["dropout_p"] == 0.3
    assert EvalModePass()(program).modified
    assert node.kwargs["dropout_p"] == 0.0
    q = torch.randn(1, 2, 4, 8)
    torch.testing.assert_close(
        program(q, q, q), torch.nn.functional.scaled_dot_product_attention(q, q, q), atol=1e-6, rtol=0
    )
    assert EvalModePass()(_sdpa_program(dropout_p=0.0)).modified is False
    assert EvalModePass()(_sdpa_program()).modified is False
