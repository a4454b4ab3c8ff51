"""``--gradient-checkpointing``: recompute each transformer block's activations in the backward pass.

The captured graph is cut into consecutive segments by the transformer block that owns each node (the
outermost entry of ``node.meta["nn_module_stack"]`` whose module name ends in a list index:
``transformer.h.3``, ``bert.encoder.layer.0``, ``model.layers.11``); nodes outside any block (embeddings,
masks, the head) form segments of their own. :func:`torch.fx.passes.split_module.split_module` turns each
segment into a submodule that shares the original parameters, and every block's call becomes
``torch.utils.checkpoint.checkpoint(block, *inputs, use_reentrant=False)``: the forward keeps only each
block's inputs, the backward reruns the block (with the RNG state of the forward, so dropout masks are the
same) and so the gradients equal those without checkpointing. Peak activation memory drops from
O(layers · activations per block) to O(layers · block input + one block's activations).

The checkpointed module is a :class:`torch.fx.GraphModule` too, so ``--compile`` compiles it
(``torch.compile`` understands ``checkpoint`` as a higher-order op).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection

import torch
from torch import fx

__all__ = ["block_of", "checkpoint_blocks", "checkpoint_calls", "split_blocks"]

logger = logging.getLogger(__name__)

_INDEXED = re.compile(r"\.\d+$")


def block_of(node: fx.Node) -> str | None:
    """The module name of the transformer block that owns ``node`` (``model.transformer.h.0``), or ``None``."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _cls in stack.values():  # outermost first
        if isinstance(path, str) and _INDEXED.search(path):
            return path
    return None


def split_blocks(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, str]]:
    """``gm`` cut into consecutive segments by the transformer block that owns each node.

    Args:
        gm: a captured graph module; its parameters are shared, not copied.

    Returns:
        ``(split, blocks)``: the split module (a root calling ``submod_N`` in order) and, for each submodule
        that is a transformer block, its name in ``split`` -> the block's module name
        (``submod_1`` -> ``model.transformer.h.0``). ``(gm, {})``, unchanged, when no node belongs
        to an indexed block.
    """
    from torch.fx.passes.split_module import split_module

    partition: dict[str, int] = {}
    names: dict[int, str] = {}
    current: tuple[str | None] | None = None
    index = -1
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        key = (block_of(node),)
        if key != current:
            index, current = index + 1, key
            if key[0] is not None:
                names[index] = key[0]
        partition[node.name] = index
    if not names:
        return gm, {}
    split = split_module(gm, None, lambda node: partition.get(node.name, index), keep_original_order=True)
    split.graph._codegen = gm.graph._codegen  # torch.export's pytree calling convention (a tensor, not a tuple)
    split.recompile()
    return split, {f"submod_{i}": name for i, name in names.items()}


def checkpoint_calls(split: fx.GraphModule, targets: Collection[str]) -> int:
    """Replace each call of a submodule in ``targets`` by ``checkpoint(submodule, *args)``, in place; how many."""
    n = 0
    for node in list(split.graph.nodes):
        if node.op != "call_module" or node.target not in targets:
            continue
        with split.graph.inserting_before(node):
            sub = split.graph.get_attr(node.target)
            call = split.graph.call_function(
                torch.utils.checkpoint.checkpoint, (sub, *node.args), {**node.kwargs, "use_reentrant": False}
            )
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        split.graph.erase_node(node)
        n += 1
    split.graph.lint()
    split.recompile()
    return n


def checkpoint_blocks(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    """A module computing what ``gm`` computes, each transformer block under activation checkpointing.

    Args:
        gm: a captured (train-mode) graph module; its parameters are shared, not copied.

    Returns:
        ``(module, blocks)``: the split module and how many block segments it checkpoints (0: ``gm``
        itself, unchanged, when no node belongs to an indexed block).
    """
    split, blocks = split_blocks(gm)
    if not blocks:
        return gm, 0
    n = checkpoint_calls(split, blocks)
    logger.info("gradient checkpointing: %d block segments recomputed in the backward pass", n)
    return split, n
