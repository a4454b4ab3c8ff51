"""Pass infrastructure: in-place / functional promises, post-pass checks, PassManager errors.

Uses tiny hand-made FX programs (no model capture), so every case is cheap and exact.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peftc.passes import FunctionalPass, InPlacePass, PassManager, PassResult, SiteDecision
from peftc.passes.base import graph_fingerprint
from torch import fx

from peftc.errors import ConfigError, PassError
from peftc.program import Program
from peftc.tasks import get_task

aten = torch.ops.aten


def _program() -> Program:
    def f(x):
        return aten.relu.default(aten.add.Tensor(x, 1.0))

    gm = fx.symbolic_trace(f)
    x = torch.randn(2, 3)
    return Program(gm, get_task("causal-lm"), "eval", None, ["x"], ["y"], {}, {}, (x,))


def _node(program, target):
    return next(n for n in program.graph.nodes if n.target == target)


def _double_output(program: Program) -> None:
    """out = 2 * relu(...)"""
    relu = _node(program, aten.relu.default)
    with program.graph.inserting_after(relu):
        mul = program.graph.call_function(aten.mul.Tensor, (relu, 2.0))
    relu.replace_all_uses_with(mul, delete_user_cb=lambda u: u is not mul)
    program.graph_module.recompile()


class Double(InPlacePass):
    def run(self, program):
        _double_output(program)
        return PassResult(program, True)

    def plan(self, program):
        return [SiteDecision("relu", "op", "rewrite")]


class Noop(InPlacePass):
    def run(self, program):
        return PassResult(program, False)


class InPlaceReturnsCopy(InPlacePass):
    def run(self, program):
        return PassResult(copy.deepcopy(program), True)


class FunctionalReturnsInput(FunctionalPass):
    def run(self, program):
        return PassResult(program, False)


class FunctionalMutatesInput(FunctionalPass):
    def run(self, program):
        new = copy.deepcopy(program)
        _double_output(program)
        return PassResult(new, True)


class FunctionalDouble(FunctionalPass):
    def run(self, program):
        new = copy.deepcopy(program)
        _double_output(new)
        return PassResult(new, True)


class Boom(InPlacePass):
    def run(self, program):
        e = RuntimeError("shape mismatch in rewrite")
        e.peftc_node = _node(program, aten.relu.default)
        raise e


class BoomWithoutNode(InPlacePass):
    def run(self, program):
        raise KeyError("model.lm_head.weight")


class RaisesUserError(InPlacePass):
    def run(self, program):
        raise ConfigError("r must be a positive integer, got r=0")


class LeavesUntypedSiteNode(InPlacePass):
    """Adds an adapter node without meta['val']: the post-pass check must catch it."""

    def run(self, program):
        relu = _node(program, aten.relu.default)
        with program.graph.inserting_after(relu):
            neg = program.graph.call_function(aten.neg.default, (relu,))
        neg.meta["peftc_site"] = "relu"
        return PassResult(program, True)


class BreaksTopologicalOrder(InPlacePass):
    def run(self, program):
        add, relu = _node(program, aten.add.Tensor), _node(program, aten.relu.default)
        with program.graph.inserting_before(add):
            program.graph.call_function(aten.neg.default, (relu,))  # uses relu before it is defined
        return PassResult(program, True)


def test_in_place_pass_rewrites_and_records_history():
    program = _program()
    x = torch.randn(2, 3)
    result = Double()(program)
    assert result.program is program and result.modified
    torch.testing.assert_close(program(x), 2 * torch.relu(x + 1), atol=0, rtol=0)
    assert program.history == ["Double"]
    assert Noop()(program).modified is False and program.history == ["Double"]  # only changes are recorded
    assert Double().name == "Double" and Double.in_place and not FunctionalDouble.in_place


def test_functional_pass_leaves_its_input_alone():
    program = _program()
    before = graph_fingerprint(program.graph)
    result = FunctionalDouble()(program)
    assert result.program is not program and result.modified
    assert graph_fingerprint(program.graph) == before and program.history == []
    assert result.program.history == ["FunctionalDouble"]
    x = torch.randn(2, 3)
    torch.testing.assert_close(result.program(x), 2 * program(x), atol=0, rtol=0)


@pytest.mark.parametrize(
    "bad,message",
    [
        (InPlaceReturnsCopy(), "InPlaceReturnsCopy is an in-place pass but returned a new program"),
        (FunctionalReturnsInput(), "FunctionalReturnsInput is a functional pass but returned its input"),
        (FunctionalMutatesInput(), "FunctionalMutatesInput is a functional pass but changed its input graph"),
    ],
)
def test_broken_promises_are_caught(bad, message):
    with pytest.raises(AssertionError, match=message):
        bad(_program())
    with pytest.raises(PassError, match=message):  # and reported by the manager like any pass failure
        PassManager("promise", [bad])(_program())


@pytest.mark.parametrize(
    "bad,fragment",
    [
        (LeavesUntypedSiteNode(), "node without meta['val']: %neg"),
        (BreaksTopologicalOrder(), "used before it has been defined"),
    ],
    ids=["missing-val", "lint"],
)
def test_post_pass_checks_catch_unhealthy_graphs(bad, fragment):
    with pytest.raises(Exception) as info:
        bad(_program())
    assert fragment in str(info.value)


def test_pass_manager_error_names_pass_previous_passes_and_node():
    program = _program()
    manager = PassManager("demo-pipeline", [Double(), Noop(), Boom(), Double()])
    with pytest.raises(PassError) as info:
        manager(program)
    msg = str(info.value)
    relu = _node(program, aten.relu.default)
    assert msg == (
        f"pipeline 'demo-pipeline': pass Boom failed after [Double, Noop] at node {relu.format_node()}: "
        "RuntimeError: shape mismatch in rewrite"
    )
    assert "\n" not in msg
    assert isinstance(info.value.__cause__, RuntimeError) and str(info.value.__cause__) == "shape mismatch in rewrite"
    assert program.history == ["Double"]  # the passes after the failure did not run
    with pytest.raises(PassError) as info:
        PassManager("p", [BoomWithoutNode()])(_program())
    assert (
        str(info.value) == "pipeline 'p': pass BoomWithoutNode failed after [nothing]: KeyError: 'model.lm_head.weight'"
    )


def test_pass_manager_lets_user_errors_through_unchanged():
    with pytest.raises(ConfigError) as info:
        PassManager("p", [Double(), RaisesUserError()])(_program())
    assert str(info.value) == "r must be a positive integer, got r=0" and info.value.__cause__ is None


def test_pass_manager_runs_in_order_and_reports_modified():
    program = _program()
    manager = PassManager("twice", [Double(), Noop(), Double()])
    assert [p.name for p in manager] == ["Double", "Noop", "Double"]
    assert manager.plan(program) == {"Double": [SiteDecision("relu", "op", "rewrite")], "Noop": []}
    result = manager(program)
    assert result.modified and result.program is program
    x = torch.randn(2, 3)
    torch.testing.assert_close(program(x), 4 * torch.relu(x + 1), atol=0, rtol=0)
    assert PassManager("none", [Noop(), Noop()])(_program()).modified is False
    functional = PassManager("f", [FunctionalDouble(), Double()])
    first = _program()
    out = functional(first)
    assert out.program is not first and out.program.history == ["FunctionalDouble", "Double"]
