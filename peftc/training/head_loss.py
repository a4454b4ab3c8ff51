"""The language-model head and its cross-entropy, fused and computed chunk by chunk in training.

In a language model's training step the logits ``[batch, sequence, vocabulary]`` are the largest
activations by far: the logits, the float32 log-softmax that ``cross_entropy`` saves for its backward,
and their gradient are 3 × B·S·V floats (GPT-2, batch 4 × 128 tokens: 3 × 103 MB, against ~30 MB per
transformer block). None of them is needed once the loss and the gradient of the head's *input* are
known, and both can be computed a few hundred rows at a time.

`split_head` does that on the captured training program. When the program's one output is a
linear layer (``aten.linear(h, W[, b])``: GPT-2, LLaMA, OPT, T5, BART … heads) and the task scores
positions with cross-entropy (causal LM and image-to-text, shifted by one; seq2seq and token
classification, per position: :attr:`~peftc.tasks.TaskSpec.scores_positions`), the
module it returns stops before the head and returns ``h``; the loss picks the scored rows of ``h`` (the
task's :meth:`~peftc.tasks.TaskSpec.scored` rule: labels not -100) and :class:`HeadCrossEntropy`
computes, chunk by chunk, the logits, their log-sum-exp, the loss and — in the same pass — the gradient
``(softmax − one-hot) / n`` pushed back through the head to ``h`` (and to ``W``, ``b`` when they are
trained). Only that gradient (the size of ``h``) is kept for the backward; a chunk's logits are freed
before the next. The head's matrix products are the ones the unfused step does (forward, and the
gradient of ``h``), none is recomputed. This is what Liger-Kernel's fused linear cross-entropy and
Apple's Cut Cross-Entropy do with custom kernels; here it is plain PyTorch ops, on any device, under
autocast, and inside ``torch.compile``'s graph for the body. The loss equals the unfused one to float
rounding (summation order); evaluation and export never see this module.
"""

from __future__ import annotations

import copy
import logging
import math
import operator

import torch
import torch.nn.functional as F
from torch import fx

from peftc.tasks import TaskSpec

__all__ = ["CHUNK_ELEMENTS", "HeadCrossEntropy", "HeadLoss", "split_head"]

logger = logging.getLogger(__name__)

#: Most logits held at once by the fused head (64 MB in float32): GPT-2's 50257-word head takes 333 rows a chunk.
CHUNK_ELEMENTS = 1 << 24


class HeadCrossEntropy(torch.autograd.Function):
    """``cross_entropy(linear(h, weight, bias), targets)`` (mean over the rows), computed in row chunks.

    The forward computes the gradients as well (the loss is a scalar at the end of the step, so its
    gradient is known up to the incoming scale); the backward only scales them.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk_rows: int):  # noqa: ANN001, ANN205 - autograd's signature
        n = targets.numel()
        want_w = ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, n, chunk_rows):
            rows = h[start : start + chunk_rows]
            target = targets[start : start + chunk_rows]
            logits = F.linear(rows, weight, bias).float()
            picked = logits.gather(1, target[:, None])
            top = logits.amax(dim=-1, keepdim=True)
            grad = logits.sub_(top).exp_()  # in place of the logits: exp(z - max)
            norm = grad.sum(dim=-1, keepdim=True)
            total += (top + norm.log() - picked).sum()  # log-sum-exp minus the target's logit
            grad.div_(norm)  # softmax
            grad[torch.arange(grad.size(0), device=grad.device), target] -= 1.0
            grad.div_(n)
            grad_rows = grad.to(weight.dtype) @ weight
            grad_h[start : start + chunk_rows] = grad_rows
            if want_w:
                grad_w += grad.t() @ rows.float()
            if want_b:
                grad_b += grad.sum(0)
            del logits, grad, grad_rows, picked
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total / max(n, 1)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        scale = grad_out.to(torch.float32)
        return (
            grad_h * scale.to(grad_h.dtype),
            (grad_w * scale).to(w_dtype) if grad_w is not None else None,
            (grad_b * scale).to(b_dtype) if grad_b is not None else None,
            None,
            None,
        )


def split_head(gm: fx.GraphModule, task: TaskSpec) -> tuple[fx.GraphModule, HeadLoss] | None:
    """``gm`` without its linear head, and the fused head-and-loss that completes it; or ``None``.

    Args:
        gm: the captured training program. It is not modified: the body is a copy of its graph that shares
            its parameters (gradient checkpointing and ``torch.compile`` then apply to the body).
        task: the program's task; only tasks scoring positions with cross-entropy over a vocabulary
            (``task.scores_positions``: causal LM, image-to-text, seq2seq, token classification) are fused.

    Returns:
        ``(body, loss)``: ``loss(body(*inputs), batch)`` is the task's loss of ``gm(*inputs)``. ``None`` when
        the program does not end in a plain linear head (a LoRA on the head, logit soft-capping …).
    """
    if not task.scores_positions:
        return None
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    outs = output.args[0]
    flat = outs if isinstance(outs, (tuple, list)) else (outs,)
    if len(flat) != 1 or not isinstance(flat[0], fx.Node):
        return None
    head = flat[0]
    if head.op != "call_function" or head.target is not torch.ops.aten.linear.default or len(head.users) != 1:
        return None
    hidden, weight, *rest = head.args
    bias = rest[0] if rest else None
    attrs = [weight] if bias is None else [weight, bias]
    if not all(isinstance(node, fx.Node) and node.op == "get_attr" for node in attrs):
        return None
    tensors = [operator.attrgetter(node.target)(gm) for node in attrs]
    graph = copy.deepcopy(gm.graph)
    copied = {n.name: n for n in graph.nodes}
    new_hidden = copied[hidden.name]
    copied[output.name].args = (type(outs)([new_hidden]) if isinstance(outs, (tuple, list)) else new_hidden,)
    graph.erase_node(copied[head.name])
    body = fx.GraphModule(gm, graph)
    body.graph.eliminate_dead_code()
    body.graph.lint()
    body.recompile()
    loss = HeadLoss(task, tensors[0], tensors[1] if bias is not None else None)
    logger.info("LM head (%d × %d) fused into the loss", *tensors[0].shape)
    return body, loss


class HeadLoss:
    """The task's cross-entropy of ``linear(hidden, weight, bias)``, fused (:class:`HeadCrossEntropy`)."""

    def __init__(self, task: TaskSpec, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.task, self.weight, self.bias = task, weight, bias

    def rows_per_chunk(self, rows: int) -> int:
        """Rows of logits computed at once: equal chunks of at most :data:`CHUNK_ELEMENTS` logits.

        Every chunk reads the whole head weight twice (its logits, its gradient), so chunks are as few as
        the bound allows: on a CPU, halving the chunk made the head ~1.3x slower (GPT-2's 50257 x 768).
        """
        chunks = max(1, math.ceil(rows * self.weight.shape[0] / CHUNK_ELEMENTS))
        return max(1, math.ceil(rows / chunks))

    def __call__(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        rows, targets = self.task.scored(hidden, batch)
        return HeadCrossEntropy.apply(rows, self.weight, self.bias, targets, self.rows_per_chunk(len(targets)))
