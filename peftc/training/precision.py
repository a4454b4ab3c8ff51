"""``--precision`` and ``--base-dtype``: mixed precision for the frozen base, float32 for the adapter.

As HF PEFT with ``autocast_adapter_dtype=True`` (and the Trainer's ``bf16=True``/``fp16=True``): the frozen
base may be *stored* in bfloat16/float16 (``--base-dtype``: half its memory) and *runs* under
``torch.autocast`` in the ``--precision`` dtype; the adapter's trainable tensors, their gradients and
AdamW's moments are float32 (the update ``p -= lr·m/(√v+ε)`` would lose most of its bits in bfloat16), so
the saved adapter is float32 whatever the base. fp16's narrow range makes small gradients underflow:
:class:`torch.amp.GradScaler` multiplies the loss by a dynamic scale and divides the gradients back before
clipping and the step (skipping steps whose gradients overflowed). bf16 has float32's range and needs no
scaler; it autocasts on CPU as well as on CUDA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from peftc.errors import ConfigError

__all__ = ["Precision", "adapter_to_float32", "base_dtype", "precision"]

_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_BASE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def base_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``--base-dtype`` value."""
    return _BASE[name]


@dataclass
class Precision:
    """How a step runs: the autocast dtype (``None``: float32, no autocast) and the fp16 loss scaler."""

    name: str
    device_type: str
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The context the forward and the loss run in."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call ``backward`` on (multiplied by the fp16 scale)."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the scale (before clipping and the step); a no-op without a scaler."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()``; with a scaler, skipped when the gradients overflowed, and the scale updated."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()


def precision(name: str, device: torch.device) -> Precision:
    """The :class:`Precision` of ``--precision name`` on ``device``.

    Raises:
        ConfigError: fp16 anywhere but CUDA (CPU autocast to float16 is not a supported training path; use bf16).
    """
    dtype = _AUTOCAST[name]
    if name == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"--precision fp16 needs a CUDA device (got {device}): float16 training on the CPU has no loss-scaling "
            "support in torch; use --precision bf16 there"
        )
    scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None
    return Precision(name, device.type, dtype, scaler)


def adapter_to_float32(params: Iterable[torch.nn.Parameter]) -> None:
    """Make the trainable tensors float32 in place (same Parameter objects: shared programs keep sharing them)."""
    for p in params:
        if p.dtype != torch.float32:
            p.data = p.data.float()
