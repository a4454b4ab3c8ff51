"""Eval mode: dropout becomes the identity and attention dropout probability becomes 0.

Used on a train program to evaluate it without a second capture; exports still start from an
eval capture (train captures may hold other train-only behaviour this pass does not know).
"""

from __future__ import annotations

import torch

from peftc.program import Program

from .base import InPlacePass, PassResult, finish

__all__ = ["EvalModePass"]

aten = torch.ops.aten
_DROPOUTS = (aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default)


class EvalModePass(InPlacePass):
    """Removes every dropout and zeroes scaled_dot_product_attention's dropout_p."""

    def run(self, program: Program) -> PassResult:
        modified = False
        for node in list(program.graph.nodes):
            if node.op != "call_function":
                continue
            if node.target in _DROPOUTS:
                node.replace_all_uses_with(node.args[0])
                program.graph.erase_node(node)
                modified = True
            elif node.target == aten.scaled_dot_product_attention.default and len(node.args) > 4 and node.args[4]:
                node.args = (*node.args[:4], 0.0, *node.args[5:])
                modified = True
            elif node.target == aten.scaled_dot_product_attention.default and node.kwargs.get("dropout_p"):
                node.kwargs = {**node.kwargs, "dropout_p": 0.0}
                modified = True
        program.mode = "eval"
        if modified:
            finish(program)
        return PassResult(program, modified)
