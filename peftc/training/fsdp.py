"""``--fsdp``: the frozen base sharded over the launcher's processes, per transformer block, with FSDP2.

FSDP2's :func:`~torch.distributed.fsdp.fully_shard` shards a module's parameters (rank r keeps the r-th
1/N of each, a ``DTensor``) and gathers them in a pre-forward hook of that module, freeing them again
after its forward (and after its part of the backward). A ``torch.export`` graph reads every weight at
its root (``get_attr``) and hands the tensors to the code that uses them, so no hook would fire where a
weight is used. The way in is the per-block split that gradient checkpointing makes
(:func:`~peftc.training.checkpointing.split_blocks`), with one more step, :func:`own_frozen_params`: each
block's submodule *owns* the frozen parameters only it uses (a ``get_attr`` inside it instead of an
argument), so ``fully_shard(block)`` gathers them right before the block runs and frees them right after.
``fully_shard`` of the root then shards the rest (embeddings, final norm, head).

The trainable adapter tensors are *not* sharded (``ignored_params``): they are a few MB, stay ordinary
replicated tensors, and their gradients are summed by the data-parallel all-reduce of
:mod:`~peftc.training.distributed` as without ``--fsdp``, so the optimizer, checkpoints and the saved
adapter (rank 0 writes it, HF PEFT format) are unchanged. The frozen base keeps ``requires_grad=False``:
no gradient of it is computed or communicated.

The train and eval captures compute different graphs (dropout) over the same weights. Each block is one
:class:`_Block` holding both captures' submodules of that block, which share the block's parameters, and
the root one :class:`Sharded` holding both split roots: one FSDP unit per block serves training and
evaluation, each weight is sharded once, and evaluation (all ranks take part in its gathers; rank 0
reports) runs through :meth:`Sharded.evaluating`. Once sharded, the full tensors are released (their
storage emptied): what still referenced them (the unsplit captures, the eager model) must not be run.

Memory: the base stays in host memory (memory-mapped from its safetensors) until ``fully_shard`` moves each
block's tensors to the device and keeps this rank's shard; the full copy is freed right after each block's
``fully_shard``, so a device holds its shards plus one block at a time, never the whole base (on CUDA; on
the CPU the host copy is the base's memory map).

``--compile`` is refused with ``--fsdp`` (FSDP2's hooks are not traced into the captured graph's
``fullgraph`` compile here); ``--gradient-checkpointing`` composes: the checkpointed call runs the FSDP
unit, whose hooks gather the block again for the recompute.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn

from peftc.errors import ConfigError
from peftc.training.checkpointing import checkpoint_calls, split_blocks

__all__ = ["Sharded", "own_frozen_params", "shard_programs"]

logger = logging.getLogger(__name__)


def own_frozen_params(split: fx.GraphModule, blocks: dict[str, str]) -> int:
    """Move each frozen parameter that one block submodule alone uses into that submodule, in place.

    The root's ``get_attr`` of the parameter, passed to ``submod_N`` as an argument, becomes a ``get_attr``
    inside ``submod_N`` of the same ``nn.Parameter`` (registered there under its flattened name); the
    computation is unchanged. Trainable tensors, buffers and parameters used by several segments (tied
    embeddings) stay at the root.

    Returns:
        how many parameters moved.
    """
    moved = 0
    for call in list(split.graph.nodes):
        if call.op != "call_module" or call.target not in blocks:
            continue
        sub: fx.GraphModule = split.get_submodule(call.target)
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(call.args) or call.kwargs:
            raise AssertionError(f"{call.target}: {len(call.args)} arguments for {len(placeholders)} placeholders")
        keep = []
        for arg, ph in zip(call.args, placeholders, strict=True):
            value = split.get_parameter(arg.target) if _is_param(split, arg) else None
            if value is None or value.requires_grad or len(arg.users) != 1:
                keep.append(arg)
                continue
            name = arg.target.replace(".", "_")
            sub.register_parameter(name, value)
            with sub.graph.inserting_before(ph):
                got = sub.graph.get_attr(name)
            got.meta = dict(ph.meta)
            ph.replace_all_uses_with(got)
            sub.graph.erase_node(ph)
            moved += 1
        call.args = tuple(keep)
        sub.graph.lint()
        sub.recompile()
    split.graph.eliminate_dead_code()
    split.graph.lint()
    split.recompile()
    _delete_unused_params(split)
    return moved


def _is_param(gm: fx.GraphModule, node: Any) -> bool:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return False
    try:
        gm.get_parameter(node.target)
    except AttributeError:
        return False
    return True


def _delete_unused_params(gm: fx.GraphModule) -> None:
    """Drop the root's attributes that no ``get_attr`` reads any more (moved into a block)."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters(recurse=True, remove_duplicate=False)):
        owner, _, leaf = name.rpartition(".")
        if owner.startswith("submod_") or name.startswith("submod_") or name in used:
            continue
        mod = gm.get_submodule(owner) if owner else gm
        del mod._parameters[leaf]


class _Mode:
    """Which capture the shared FSDP units run: ``"train"`` or ``"eval"``."""

    def __init__(self) -> None:
        self.name = "train"


class _Block(nn.Module):
    """One transformer block of both captures (sharing its parameters): one FSDP unit for training and eval."""

    def __init__(self, train: nn.Module, evaluation: nn.Module, mode: _Mode) -> None:
        super().__init__()
        self.train_block, self.eval_block, self._mode = train, evaluation, mode

    def forward(self, *args: Any) -> Any:
        return (self.eval_block if self._mode.name == "eval" else self.train_block)(*args)


class Sharded(nn.Module):
    """The train and eval programs over one sharded base; calling it runs the train program.

    Attributes:
        blocks: how many transformer blocks are FSDP units of their own.
        moved: how many frozen-parameter reads moved into the blocks, over both captures (each weight twice).
        summary: what ``run.json`` records: ``world_size``, ``blocks``, ``frozen_elements`` (the whole base),
            ``frozen_elements_this_rank`` (this process's shards), ``adapter_tensors`` (replicated).
    """

    def __init__(self, train: fx.GraphModule, evaluation: fx.GraphModule, mode: _Mode) -> None:
        super().__init__()
        self.train_root, self.eval_root, self._mode = train, evaluation, mode
        self.blocks, self.moved = 0, 0
        self.summary: dict[str, int] = {}

    def forward(self, *args: Any) -> Any:
        return (self.eval_root if self._mode.name == "eval" else self.train_root)(*args)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Calls inside run the eval program (every rank must call it: the blocks are gathered collectively)."""
        self._mode.name = "eval"
        try:
            yield
        finally:
            self._mode.name = "train"


def shard_programs(
    train: fx.GraphModule, evaluation: fx.GraphModule, gradient_checkpointing: bool = False, release: bool = True
) -> Sharded:
    """The train and eval captures (same base, same adapter tensors) split per block and sharded with FSDP2.

    Args:
        train: the train-mode capture with the adapter inserted.
        evaluation: the eval-mode capture bound to the same adapter (its tensors are the same objects).
        gradient_checkpointing: run the train program's blocks under ``torch.utils.checkpoint``.
        release: empty the storage of the full frozen tensors once sharded (anything else holding them,
            the eager model included, can no longer run).

    Raises:
        ConfigError: no process group, or a model without transformer blocks the two captures agree on.
    """
    from torch.distributed.fsdp import fully_shard

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ConfigError("--fsdp shards over the processes of a launcher: run under torchrun or accelerate launch")
    trainable = {id(p): p for p in [*train.parameters(), *evaluation.parameters()] if p.requires_grad}
    frozen = {id(p): p for p in [*train.parameters(), *evaluation.parameters()] if not p.requires_grad}
    full = {k: (p.shape, p.numel()) for k, p in frozen.items()}
    mode = _Mode()
    splits, moved = [], 0
    for gm in (train, evaluation):
        split, blocks = split_blocks(gm)
        if not blocks:
            raise ConfigError(
                "--fsdp shards per transformer block (modules named like layers.N); the model has none: train "
                "without --fsdp"
            )
        moved += own_frozen_params(split, blocks)
        splits.append((split, blocks))
    (train_split, train_blocks), (eval_split, eval_blocks) = splits
    if list(train_blocks.values()) != list(eval_blocks.values()):  # segments in graph order, paired by position
        raise ConfigError(
            f"--fsdp: the train and eval captures split into different blocks ({list(train_blocks.values())} "
            f"vs {list(eval_blocks.values())})"
        )
    sharded = Sharded(train_split, eval_split, mode)
    for target, eval_target in zip(train_blocks, eval_blocks, strict=True):
        block = _Block(train_split.get_submodule(target), eval_split.get_submodule(eval_target), mode)
        setattr(train_split, target, block)  # both roots call the same unit
        setattr(eval_split, eval_target, block)
        owned = [p for p in block.parameters() if not p.requires_grad]
        fully_shard(block, ignored_params=set(trainable.values()))
        if release:  # fully_shard moved the full tensors to the device first: free them block by block
            _release(owned)
    if gradient_checkpointing:
        checkpoint_calls(train_split, train_blocks)
    fully_shard(sharded, ignored_params=set(trainable.values()))
    sharded.blocks = len(train_blocks)
    sharded.moved = moved
    from torch.distributed.tensor import DTensor

    local = {id(p): p.to_local().numel() for p in sharded.parameters() if isinstance(p, DTensor)}
    sharded.summary = {
        "world_size": torch.distributed.get_world_size(),
        "blocks": len(train_blocks),
        "frozen_elements": sum(n for _, n in full.values()),
        "frozen_elements_this_rank": sum(local.values()),
        "adapter_tensors": len(trainable),
    }
    if release:
        _release(frozen.values())
    logger.info("fsdp: %s", sharded.summary)
    return sharded


def _release(params) -> None:
    """Empty the storage of full (unsharded) tensors: their shards live on in the FSDP units."""
    for p in params:
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)
