"""exporters.onnx_optimize: onnxscript's optimizer less SlicesSplit gives the graph the stock one gives."""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import captured
from peftc.exporters.onnx import _run_exporter
from peftc.exporters.onnx_optimize import SKIPPED_RULES, optimize


def _ops(onnx_program) -> Counter:
    return Counter(node.op_type for node in onnx_program.model.graph)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_graph_is_the_stock_optimizers(family):
    program, _ = captured(family, "causal-lm")
    ours, stock = _run_exporter(program, 18), _run_exporter(program, 18)  # both unoptimized
    before = sum(_ops(ours).values())
    optimize(ours)
    stock.optimize()  # what torch.onnx.export(optimize=True) runs
    assert _ops(ours) == _ops(stock)
    assert sum(_ops(ours).values()) < before / 2  # it did optimize: folded shapes, no Identity chains
    assert [v.name for v in ours.model.graph.outputs] == [v.name for v in stock.model.graph.outputs]


def test_the_skipped_rule_is_one_of_onnxscripts_defaults():
    """If onnxscript renames or drops it, the skip list is stale: look at the rule again."""
    from onnxscript import rewriter

    names = {getattr(rule, "name", None) for rule in rewriter._DEFAULT_REWRITE_RULES}
    assert SKIPPED_RULES <= names


def test_without_onnxscript_internals_the_stock_optimizer_runs(monkeypatch):
    """An onnxscript whose private module moved: ``optimize`` runs ``ONNXProgram.optimize()``."""
    import sys

    import onnxscript.optimizer  # noqa: F401 - the stock optimizer keeps its own reference to the module

    program, _ = captured("gpt2", "causal-lm")
    ours, stock = _run_exporter(program, 18), _run_exporter(program, 18)
    monkeypatch.setitem(sys.modules, "onnxscript.optimizer._constant_folding", None)  # import fails
    before = sum(_ops(ours).values())
    optimize(ours)
    monkeypatch.undo()
    stock.optimize()
    assert _ops(ours) == _ops(stock) and sum(_ops(ours).values()) < before / 2
