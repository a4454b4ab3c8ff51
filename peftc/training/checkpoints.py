"""Checkpoints of a run: ``checkpoints/step-N``, written atomically, and what ``--resume`` reads back.

A checkpoint holds everything the rest of the trajectory depends on, so a resumed run reaches the
same adapter as an uninterrupted one::

    checkpoints/step-N/
      adapter_config.json, adapter_model.safetensors   the adapter (HF PEFT format)
      optimizer.safetensors   AdamW's moments, keyed "<parameter>::<slot>" (exp_avg, exp_avg_sq, step)
      rng.safetensors         torch's CPU RNG state (dropout), and the CUDA one on a GPU run
      trainer_state.json      step, epoch, batch position in the epoch, loss window, last eval, the run's
                              options, scheduler position, optimizer groups, Python's RNG state
      ...                     the method's own state (its TrainingHooks.save_state: AdaLoRA's rank allocator)

The data order is a pure function of (seed, epoch), so (epoch, batch) locates the next batch.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import torch

from peftc import __version__
from peftc.adapters import AdapterState
from peftc.errors import ConfigError
from peftc.files import atomic_dir
from peftc.methods import TrainingHooks
from peftc.training.options import TRAJECTORY_DEFAULTS, TRAJECTORY_FIELDS

__all__ = [
    "CHECKPOINTS",
    "TRAINER_STATE",
    "check_resume",
    "checkpoint_step",
    "latest_checkpoint",
    "read_trainer_state",
    "restore_checkpoint",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
_OPTIMIZER_FILE = "optimizer.safetensors"
_RNG_FILE = "rng.safetensors"
_PREFIX = "step-"

Params = list[tuple[str, torch.nn.Parameter]]


def checkpoint_step(ckpt: Path) -> int:
    """N of ``checkpoints/step-N``."""
    return int(ckpt.name[len(_PREFIX) :])


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint of ``run_dir`` with the highest step (one with a trainer state), if any."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return None
    steps = [
        (checkpoint_step(d), d)
        for d in root.iterdir()
        if d.is_dir() and d.name.startswith(_PREFIX) and d.name[len(_PREFIX) :].isdigit()
        if (d / TRAINER_STATE).is_file()
    ]
    return max(steps)[1] if steps else None


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / TRAINER_STATE).read_text())


def save_checkpoint(
    run_dir: Path,
    state: AdapterState,
    params: Params,
    opt: torch.optim.Optimizer,
    sched: Any,
    trainer: dict[str, Any],
    hooks: TrainingHooks,
) -> Path:
    """Write ``run_dir/checkpoints/step-<trainer['step']>`` atomically (replacing one of the same step).

    Args:
        state: the adapter being trained.
        params: ``(name, parameter)`` of everything the optimizer updates (names key the moments).
        opt: the AdamW optimizer.
        sched: its ``LambdaLR`` scheduler.
        trainer: the loop's position (``step``, ``epoch``, ``batch``, ``window``, ``last_eval``) and the
            run's options (``train_config``).
        hooks: the method's training hooks; they write its own state.
    """
    from safetensors.torch import save_file

    target = run_dir / CHECKPOINTS / f"{_PREFIX}{trainer['step']}"
    with atomic_dir(target, force=True) as tmp:
        state.write_into(tmp)
        hooks.save_state(tmp)
        by_id = {id(p): n for n, p in params}
        tensors: dict[str, torch.Tensor] = {}
        for group in opt.param_groups:
            for p in group["params"]:
                for key, value in opt.state.get(p, {}).items():
                    if torch.is_tensor(value):
                        tensors[f"{by_id[id(p)]}::{key}"] = value.detach().contiguous().clone()
        save_file(tensors, str(tmp / _OPTIMIZER_FILE), metadata={"format": "pt"})
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # dropout on a GPU draws from its generator
            rng["torch_cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / _RNG_FILE), metadata={"format": "pt"})
        sched_state = {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"}
        groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        saved = {
            **trainer,
            "peftc_version": __version__,
            "scheduler": sched_state,
            "param_groups": groups,
            "python_random": _jsonable(random.getstate()),
        }
        (tmp / TRAINER_STATE).write_text(json.dumps(saved, indent=2, sort_keys=True))
    return target


def restore_checkpoint(
    ckpt: Path, params: Params, opt: torch.optim.Optimizer, sched: Any, hooks: TrainingHooks
) -> dict[str, Any]:
    """Load the optimizer moments and groups, the scheduler, both RNGs and the method's state from ``ckpt``.

    The adapter itself is bound when the run is set up. Returns the trainer state (the loop's position).

    Raises:
        ConfigError: the checkpoint's optimizer state does not fit this run's parameters.
    """
    from safetensors.torch import load_file

    trainer = read_trainer_state(ckpt)
    moments = load_file(str(ckpt / _OPTIMIZER_FILE))
    opt_state = opt.state_dict()
    names = {id(p): n for n, p in params}
    by_name = {names[id(p)]: i for i, p in enumerate(p for group in opt.param_groups for p in group["params"])}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in moments.items():
        name, _, slot = key.rpartition("::")
        if name not in by_name:
            raise ConfigError(f"checkpoint {ckpt} holds optimizer state for {name}, which this run does not train")
        state.setdefault(by_name[name], {})[slot] = value
    saved_groups = trainer["param_groups"]
    if len(saved_groups) != len(opt_state["param_groups"]):
        raise ConfigError(
            f"checkpoint {ckpt} has {len(saved_groups)} optimizer groups, this run {len(opt_state['param_groups'])}"
        )
    groups = [
        {**saved, "params": cur["params"]} for saved, cur in zip(saved_groups, opt_state["param_groups"], strict=True)
    ]
    opt.load_state_dict({"state": state, "param_groups": groups})
    sched.load_state_dict({**trainer["scheduler"], "lr_lambdas": [None] * len(sched.lr_lambdas)})
    rng = load_file(str(ckpt / _RNG_FILE))
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])
    random.setstate(_from_jsonable(trainer["python_random"]))
    hooks.load_state(ckpt)
    return trainer


def check_resume(
    options: dict[str, Any], saved: dict[str, Any], ckpt: Path | None, run_dir: Path | None = None
) -> None:
    """Refuse to resume with options that change the trajectory (:data:`TRAJECTORY_FIELDS`).

    Args:
        options: this call's options.
        saved: the options the run was started with (a checkpoint's, or ``started.json``'s).
        ckpt: the checkpoint ``saved`` comes from, if any (its run directory is named in the message).
        run_dir: the run directory, when there is no checkpoint.

    Raises:
        ConfigError: naming the first option that differs, with both values.
    """
    where = run_dir if run_dir is not None else ckpt.parent.parent if ckpt is not None else "--out"
    options = json.loads(json.dumps(options))  # as saved: tuples become lists (target_modules=("q", "v"))
    for name in TRAJECTORY_FIELDS:
        before, now = saved.get(name, TRAJECTORY_DEFAULTS.get(name)), options.get(name, TRAJECTORY_DEFAULTS.get(name))
        if before != now:
            raise ConfigError(
                f"--resume: {name}={now!r} but the run in {where} was started with "
                f"{name}={before!r}; resume with the same options or start a new run"
            )
    for name in ("epochs", "max_steps"):
        if saved.get(name) != options.get(name):
            logger.warning(
                "--resume with %s=%r (was %r): the learning-rate schedule changes from here on",
                name,
                options.get(name),
                saved.get(name),
            )


def _jsonable(value: Any) -> Any:
    """``random.getstate()``'s nested tuples as JSON lists."""
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _from_jsonable(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_from_jsonable(v) for v in value)
    return value
