"""Timing and memory helpers shared by the benchmark scripts (run as ``python bench/<script>.py``); no torch import."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from peftc.reporting import meter


def interleaved_medians(fns: dict[str, Callable[[], object]], warmup: int, runs: int) -> dict[str, float]:
    """Median ms of each callable, run round-robin so that load on a shared machine hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def proc_status_mb(key: str) -> float:
    """A memory figure of this process from ``/proc/self/status`` in MiB (``VmRSS``, ``VmHWM``); 0 without /proc."""
    return meter.proc_status_mb(key) or 0.0
