"""Devices and data parallelism: ``--device`` and ``torchrun``/``accelerate launch`` runs.

**Device.** ``auto`` is ``cuda`` when torch sees a GPU, else ``cpu``; under a launcher ``cuda`` means
``cuda:LOCAL_RANK``. The base is moved there before capture (``torch.export`` bakes the device of
factory ops such as ``arange`` into the graph, so a graph captured on the CPU cannot run on a GPU), the
adapter is created on the CPU (the same init on every device) and moved there, batches are moved there.

**Data parallel.** A launcher (``torchrun --nproc-per-node N -m peftc train …``, ``accelerate launch -m
peftc train …``) starts N processes with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` set; :func:`setup` joins them into a process group (NCCL on CUDA, gloo on the CPU). The
data order is the one-process order of *global* micro-batches of ``N·batch_size`` examples, and rank r
takes its slice ``[r·B, (r+1)·B)`` of each: every optimizer step sees the same examples whatever N is.
Each rank weights its micro-batch losses by their share of the *global* number of targets, and one
all-reduce (a sum over a single flat buffer) of the trainable tensors' gradients per optimizer step makes
every rank's gradient the one-process gradient of the global batch. The frozen base is never
communicated; the ranks start from the same seeded adapter and take identical steps, so they stay equal.
This is DDP's arithmetic without its bucketed overlap with the backward pass: a LoRA's gradients are a few
MB, one all-reduce after the backward costs little, and it composes with ``--compile``, gradient
checkpointing and gradient accumulation without ``no_sync`` bookkeeping.

Rank 0 alone holds the run lock, evaluates, logs and writes (run directory, checkpoints, adapter);
dropout masks come from each rank's own RNG stream, so with dropout > 0 the runs for different N are
equal in distribution, not bit for bit (with dropout 0 they agree to float rounding).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from peftc.errors import ConfigError

__all__ = ["Distributed", "resolve_device", "setup"]

logger = logging.getLogger(__name__)


@dataclass
class Distributed:
    """This process's place in the run: rank, world size, local rank (one process: 0, 1, 0)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """True on the process that logs and writes (rank 0)."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def shard(self, indices: Sequence[int], batch_size: int) -> list[int]:
        """This rank's slice of a global micro-batch (``batch_size`` examples per rank; may be empty at the end)."""
        return list(indices[self.rank * batch_size : (self.rank + 1) * batch_size])

    def sum(self, values: Sequence[float], device: torch.device) -> list[float]:
        """The element-wise sum of ``values`` over the ranks (float64)."""
        if not self.enabled:
            return [float(v) for v in values]
        t = torch.tensor(list(values), dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def all_reduce_grads(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over the ranks, in one flat buffer (a missing gradient counts as zero)."""
        if not self.enabled:
            return
        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        flat = torch._utils._flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat)
        for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
            g.copy_(synced)

    def broadcast_int(self, value: int, device: torch.device) -> int:
        """Rank 0's ``value`` on every rank."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        torch.distributed.broadcast(t, src=0)
        return int(t.item())

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def close(self) -> None:
        """Leave the process group (the process joined it in :func:`setup`)."""
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def resolve_device(spec: str, local_rank: int = 0, distributed: bool = False) -> torch.device:
    """The torch device of ``--device spec`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) for this process.

    Raises:
        ConfigError: CUDA asked for but not available, or ``cuda:N`` beyond the devices torch sees.
    """
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(
            f"--device {spec}: torch {torch.__version__} ({build}) sees no CUDA device; use --device cpu or auto"
        )
    if spec == "cuda":
        index = local_rank if distributed else torch.cuda.current_device()
    else:
        index = int(spec.split(":", 1)[1])
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"--device {spec}: device cuda:{index} does not exist; torch sees {count} CUDA device(s)")
    return torch.device("cuda", index)


def setup(device_spec: str) -> tuple[Distributed, torch.device]:
    """Join the launcher's process group when ``WORLD_SIZE`` > 1, and pick this process's device.

    Returns:
        ``(Distributed, device)``; one process without a launcher: ``(Distributed(), device)``.

    Raises:
        ConfigError: a bad ``--device``, or a launcher environment that is incomplete.
    """
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return Distributed(), resolve_device(device_spec)
    rank, local_rank = _env_int("RANK", -1), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise ConfigError(f"WORLD_SIZE={world} but RANK={os.environ.get('RANK')!r}; launch with torchrun or accelerate")
    device = resolve_device(device_spec, local_rank, distributed=True)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world)
    logger.info("data parallel: rank %d of %d (%s) on %s", rank, world, backend, device)
    return Distributed(rank, world, local_rank, backend), device
