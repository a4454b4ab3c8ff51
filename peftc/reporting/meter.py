"""Throughput and peak memory per logged step, for the training loop to add to its records.

``tokens_per_s`` = tokens the optimizer steps since the last read consumed ÷ the wall time they took
(time spent in :meth:`StepMeter.paused` — evaluation, checkpoints — is not counted). A token is a
position the attention mask keeps (padding is not work), or every ``input_ids`` position when the
batch has no mask. ``peak_memory_mb`` (MiB):

- CUDA: ``torch.cuda.max_memory_allocated`` since the last read (the peak is reset at each read), the
  memory tensors held, as PyTorch's allocator counts it.
- CPU: the process's peak resident set size: ``VmHWM`` of ``/proc/self/status`` on Linux (the peak
  of this program's own address space; ``ru_maxrss`` would start at the peak of the process that
  spawned it), else ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (bytes on macOS). The kernel keeps
  one peak for the life of the process, so this one only grows; absent where neither is (Windows).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

__all__ = ["StepMeter", "count_tokens", "peak_memory_mb", "proc_status_mb"]

_MIB = 1024 * 1024


def count_tokens(batch: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> int:
    """Tokens in a collated batch (or a list of micro-batches): the attention mask's ones, else ``input_ids``' size."""
    if not isinstance(batch, Mapping):
        return sum(count_tokens(b) for b in batch)
    mask = batch.get("attention_mask")
    if mask is not None:
        return int(mask.sum())
    ids = batch.get("input_ids")
    return int(ids.numel()) if ids is not None else 0


def _is_cuda(device: Any) -> bool:
    return device is not None and str(device).startswith("cuda")


def peak_memory_mb(device: Any = None, reset: bool = False) -> float | None:
    """Peak memory in MiB: the CUDA allocator's peak on a ``cuda`` device, else the process's peak RSS.

    ``None`` where neither is known (a CPU run on Windows).
    """
    if _is_cuda(device):
        import torch

        peak = torch.cuda.max_memory_allocated(device) / _MIB
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return peak
    peak = proc_status_mb("VmHWM")
    if peak is not None:
        return peak
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / _MIB if sys.platform == "darwin" else rss / 1024


def proc_status_mb(key: str) -> float | None:
    """A memory figure of this process from ``/proc/self/status`` in MiB (``VmRSS`` now, ``VmHWM`` its peak).

    ``None`` without ``/proc`` (not Linux) or where the kernel does not report ``key``.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


class StepMeter:
    """Counts tokens and time between reads; :meth:`read` gives ``tokens_per_s`` and ``peak_memory_mb``.

    >>> meter = StepMeter()
    >>> meter.add(512)                                            # after each optimizer step
    >>> sorted(meter.read())                                      # when the step is logged
    ['peak_memory_mb', 'tokens_per_s']
    """

    def __init__(self, device: Any = None, clock: Any = time.perf_counter):
        self.device = device
        self._clock = clock
        self._tokens = 0
        self._paused = 0.0
        self._since = clock()
        if _is_cuda(device):
            import torch

            torch.cuda.reset_peak_memory_stats(device)

    def add(self, tokens: int) -> None:
        """Count the tokens one optimizer step consumed."""
        self._tokens += int(tokens)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time inside this block (evaluation, saving a checkpoint) is not training time."""
        start = self._clock()
        try:
            yield
        finally:
            self._paused += self._clock() - start

    def read(self) -> dict[str, float]:
        """The figures since the previous read (or the start), then start a new window."""
        if _is_cuda(self.device):
            import torch

            torch.cuda.synchronize(self.device)  # the steps' kernels are part of their time
        now = self._clock()
        seconds = now - self._since - self._paused
        out: dict[str, float] = {}
        if seconds > 0 and self._tokens:
            out["tokens_per_s"] = round(self._tokens / seconds, 2)
        peak = peak_memory_mb(self.device, reset=True)
        if peak is not None:
            out["peak_memory_mb"] = round(peak, 1)
        self._tokens, self._paused, self._since = 0, 0.0, now
        return out
