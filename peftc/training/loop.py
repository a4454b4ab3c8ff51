"""The training loop: set a run up, step AdamW over the captured graph, evaluate, finish the run.

The loop trains the *captured graph*, not the eager model: the base model is captured in train mode
(dropout baked in), the method's insertion pipeline adds the adapter, and AdamW updates the adapter's
tensors (the only trainable parameters). A second, eval-mode capture bound to the same
:class:`~peftc.adapters.AdapterState` shares those tensors, so evaluation always sees the current
adapter without copying anything.

One optimizer step over ``grad_accum`` micro-batches minimises the mean loss over all their targets
(each micro-batch's mean loss weighted by its share of the targets, so accumulation equals one big
batch); the learning rate warms up linearly over ``warmup_ratio`` of the steps, then decays linearly to
0. The method's :class:`~peftc.methods.TrainingHooks` add a loss term, act after each step and shape
the saved adapter (AdaLoRA: orthogonal regularisation, rank allocation, tensors cut to the kept ranks).

Scale lives in modules of its own: the device and data parallelism in
:mod:`~peftc.training.distributed` (the loop asks it for this rank's slice of each global micro-batch and
to sum the gradients), mixed precision in :mod:`~peftc.training.precision` (the forward runs under its
autocast, the backward on its scaled loss), gradient checkpointing in
:mod:`~peftc.training.checkpointing`, ``--fsdp`` (the frozen base sharded per block; evaluation then runs on
every rank) in :mod:`~peftc.training.fsdp`; ``--compile`` wraps whichever module the step calls in
``torch.compile``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peftc import __version__
from peftc.adapters import AdapterState
from peftc.config import MethodConfig, PromptLearningConfig
from peftc.dataset import Dataset, Encoded, batch_order, collate, count_targets, encode, read_jsonl
from peftc.errors import ConfigError, ModelLoadError, OutputExistsError, TrainingStopped
from peftc.methods import get_method
from peftc.models import LoadedModel, check_model_spec, load_model
from peftc.program import Program, capture
from peftc.reporting import StepMeter, count_tokens, make_reporters
from peftc.runs import RUN_FILE
from peftc.tasks import HEAD_TASKS, TaskSpec, get_task
from peftc.training.checkpoints import (
    CHECKPOINTS,
    check_resume,
    checkpoint_step,
    latest_checkpoint,
    read_trainer_state,
    restore_checkpoint,
    save_checkpoint,
)
from peftc.training.distributed import Distributed, setup
from peftc.training.lock import run_lock
from peftc.training.options import TrainConfig, infer_task, method_config, method_name, resolve_data
from peftc.training.precision import Precision, adapter_to_float32, base_dtype, precision
from peftc.training.rundir import (
    ADAPTER_DIR,
    BASE_MODEL_DIR,
    RunWriter,
    check_no_exports,
    contents,
    exports_in,
    started_options,
    unfinished_leftovers,
)

__all__ = ["TrainResult", "evaluate", "train"]

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished run produced.

    Attributes:
        run_dir: the run directory.
        adapter_dir: ``run_dir/adapter`` (loadable by ``peft.PeftModel.from_pretrained``).
        step: optimizer steps done in total (including those before a resume).
        epoch: epochs done (fractional when ``max_steps`` stops mid-epoch).
        train_loss: mean training loss over the last ``log_every`` steps.
        eval_metrics: the last evaluation (``loss`` plus ``accuracy`` or ``perplexity``); empty
            when there is no eval data.
        seconds: wall time of this call.
        trainable_parameters: parameters the optimizer updated.
        resumed_from: the checkpoint step this call continued from, if any.
        id2label: class names of a seq-cls run.
    """

    run_dir: Path
    adapter_dir: Path
    step: int
    epoch: float
    train_loss: float | None
    eval_metrics: dict[str, float]
    seconds: float
    trainable_parameters: int
    resumed_from: int | None = None
    id2label: dict[int, str] | None = None

    @property
    def metrics(self) -> dict[str, float]:
        """The final evaluation metrics (what the CLI prints)."""
        return {k: v for k, v in self.eval_metrics.items() if k != "examples"}


# -- setup ---------------------------------------------------------------------------------------


def _set_threads() -> None:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    torch.set_num_threads(max(1, min(torch.get_num_threads(), cpus)))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass
    torch.manual_seed(seed)


@dataclass
class _Setup:
    """A run ready to step: the programs, the adapter, the encoded data."""

    loaded: LoadedModel
    train_prog: Program
    eval_prog: Program
    state: AdapterState
    config: MethodConfig
    train_enc: Encoded  # or peftc.images.ImageEncoded (image tasks)
    eval_enc: Encoded | None
    train_data: Dataset  # or peftc.images.ImageData
    id2label: dict[int, str] | None
    base_source: str
    params: list[tuple[str, torch.nn.Parameter]]


def _text_data(
    cfg: TrainConfig, task: str, config: MethodConfig, data_path: str, eval_path: str | None, dtype: torch.dtype
):
    """Text data read and tokenised with the base model's tokenizer (loaded here, with the head's classes)."""
    train_data = read_jsonl(data_path, task)
    eval_data = read_jsonl(eval_path, task, **train_data.eval_kwargs()) if eval_path else None
    id2label = train_data.id2label if task in HEAD_TASKS else None
    loaded = load_model(
        cfg.model,
        task,
        num_labels=len(id2label) if id2label else None,
        id2label=id2label,
        dtype=None if dtype == torch.float32 else dtype,  # bf16 weights load as bf16: no float32 copy first
    )
    if loaded.tokenizer is None:
        raise ModelLoadError(
            f"{loaded.source} has no tokenizer (tokenizer.json, vocab.txt or tokenizer_config.json); "
            "save the model's tokenizer into the directory with tokenizer.save_pretrained"
        )
    vocab = getattr(loaded.model.config, "vocab_size", None)
    if vocab and len(loaded.tokenizer) > vocab:
        raise ModelLoadError(
            f"the tokenizer in {loaded.source or cfg.model} has {len(loaded.tokenizer)} tokens but the model's "
            f"vocab_size is {vocab}; save the tokenizer the model was trained with"
        )
    max_length = cfg.max_length
    max_pos = getattr(loaded.model.config, "n_positions", None) or getattr(
        loaded.model.config, "max_position_embeddings", None
    )
    if max_pos and isinstance(config, PromptLearningConfig):
        max_pos -= config.num_virtual_tokens  # virtual tokens / the prefix take the first positions
    if max_pos and max_length > max_pos:
        logger.warning("max_length=%d exceeds the model's %d usable positions; using %d", max_length, max_pos, max_pos)
        max_length = max_pos
    # decoder classifiers find the last token by the model's pad id; seq2seq shifts labels in with it
    pad_id = loaded.model.config.pad_token_id if task in ("seq-cls", "seq2seq") else None
    start = getattr(loaded.model.config, "decoder_start_token_id", None) if task == "seq2seq" else None
    train_enc = encode(train_data, loaded.tokenizer, task, max_length, pad_id, start)
    eval_enc = encode(eval_data, loaded.tokenizer, task, max_length, pad_id, start) if eval_data else None
    return train_enc, eval_enc, train_data, id2label, loaded


def _image_data(cfg: TrainConfig, task: str, data_path: str, eval_path: str | None, dtype: torch.dtype):
    """Image data (:mod:`peftc.images`) and the base model, whose head gets the training data's classes."""
    from peftc.images import encode_images, read_images

    train_data = read_images(data_path, task)
    eval_data = read_images(eval_path, task, **train_data.eval_kwargs()) if eval_path else None
    id2label = train_data.id2label
    loaded = load_model(
        cfg.model,
        task,
        num_labels=len(id2label or {}),
        id2label=id2label,
        dtype=None if dtype == torch.float32 else dtype,
    )
    train_enc = encode_images(train_data, loaded.image_processor)
    eval_enc = encode_images(eval_data, loaded.image_processor) if eval_data else None
    return train_enc, eval_enc, train_data, id2label, loaded


def _build(
    cfg: TrainConfig,
    task: str,
    config: MethodConfig,
    data_path: str,
    eval_path: str | None,
    run_dir: Path,
    checkpoint: Path | None,
    device: torch.device,
) -> _Setup:
    """Read and encode the data, load and capture the model twice, insert (or bind) the adapter.

    The base is loaded in ``--base-dtype`` (bf16 weights load as bf16: no float32 copy first) and moved to
    ``device`` before capture; the adapter is made (or read) on the CPU, then moved to ``device`` as float32.
    """
    dtype = base_dtype(cfg.base_dtype)
    if task == "text-to-image":  # a Stable Diffusion pipeline: VAE latents and prompt embeddings (peftc.diffusion)
        from peftc.diffusion import diffusion_data

        train_enc, eval_enc, train_data, id2label, loaded = diffusion_data(
            cfg.model, data_path, eval_path, None if dtype == torch.float32 else dtype
        )
    elif get_task(task).vision:  # images: read with Pillow, preprocessed per batch by the model's image processor
        train_enc, eval_enc, train_data, id2label, loaded = _image_data(cfg, task, data_path, eval_path, dtype)
    elif task == "image-to-text":  # images and captions, batched by the model's Blip2Processor
        from peftc.blip2 import caption_data

        half = None if dtype == torch.float32 else dtype
        train_enc, eval_enc, train_data, id2label, loaded = caption_data(
            cfg.model, data_path, eval_path, cfg.max_length, half
        )
    else:
        train_enc, eval_enc, train_data, id2label, loaded = _text_data(cfg, task, config, data_path, eval_path, dtype)

    if loaded.preset == "tiny-gpt2":  # generated: saved into the run (base_model/), it exists nowhere else
        base_source = str((run_dir / BASE_MODEL_DIR).resolve())
    elif loaded.preset is not None:  # the name resolves on any machine; the site-packages path would not
        base_source = loaded.preset
    else:
        base_source = loaded.source
    config.base_model_name_or_path = base_source
    # --fsdp: the base stays in host memory (memory-mapped) and fully_shard moves each block's shard to the
    # device as it shards it, so a base larger than one device loads; only the adapter is moved here
    loaded.model.to(device=None if cfg.fsdp else device, dtype=dtype)
    transform = None
    if task == "text-to-image":  # training draws one timestep per row
        from peftc.diffusion import per_sample_timesteps as transform
    train_prog = capture(loaded.model, task, mode="train", transform=transform)
    eval_prog = capture(loaded.model, task, mode="eval", transform=transform)
    from peftc.passes import insertion_pipeline

    if checkpoint is not None:
        state = AdapterState.load(checkpoint)
        state.config = config
        state.trainable_(True)
        insertion_pipeline(config, state)(train_prog)
    else:
        _seed_everything(cfg.seed)  # the fresh adapter's init depends on the seed only
        insertion_pipeline(config)(train_prog)
        state = train_prog.adapter
    _to_device(train_prog.graph_module, device, cfg.fsdp)  # the adapter's tensors (same Parameters, new storage)
    adapter_to_float32(p for p in train_prog.graph_module.parameters() if p.requires_grad)
    insertion_pipeline(config, state)(eval_prog)
    _to_device(eval_prog.graph_module, device, cfg.fsdp)
    params = [(n, p) for n, p in train_prog.graph_module.named_parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"method {config.peft_type} left nothing to train in {cfg.model}")
    return _Setup(
        loaded, train_prog, eval_prog, state, config, train_enc, eval_enc, train_data, id2label, base_source, params
    )


# -- optimisation --------------------------------------------------------------------------------


def _optimizer(cfg: TrainConfig, params: list[tuple[str, torch.nn.Parameter]]) -> torch.optim.AdamW:
    decay = [p for _, p in params if p.ndim >= 2]
    no_decay = [p for _, p in params if p.ndim < 2]
    groups = [
        g
        for g in ({"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0})
        if g["params"]
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _step_loss(
    loss_of: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    task_spec: TaskSpec,
    micro: list[dict[str, torch.Tensor]],
    regularization: Callable[[], torch.Tensor | float],
    amp: Precision | None = None,
    dist: Distributed | None = None,
    device: torch.device | None = None,
) -> float:
    """Forward/backward a group of micro-batches; the mean loss over all their targets.

    ``regularization()`` is the method's extra loss term, added to every micro-batch loss. Under data
    parallelism ``micro`` is this rank's share of the step: each loss is weighted by its share of the
    targets of *all* ranks, so the gradients summed over the ranks (and the value returned, summed here)
    are those of the one-process step.
    """
    dist = dist or Distributed()
    counts = [count_targets(b, task_spec.name) for b in micro]
    total = dist.sum([sum(counts)], device or torch.device("cpu"))[0] if dist.enabled else sum(counts)
    value = 0.0
    for batch, count in zip(micro, counts, strict=True):
        if count == 0:
            continue
        with amp.autocast() if amp is not None else contextlib.nullcontext():
            loss = loss_of(batch) + regularization()
        weight = count / total
        scaled = loss * weight
        (amp.scale(scaled) if amp is not None else scaled).backward()
        value += float(loss.detach()) * weight
    return value


@torch.no_grad()
def evaluate(
    program: Program,
    enc: Encoded,
    batch_size: int = 32,
    device: torch.device | None = None,
    amp: Precision | None = None,
    forward: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Loss (mean over examples / targets) plus the task's metrics (:meth:`~peftc.tasks.TaskSpec.metric`):
    accuracy (classifiers), perplexity (causal-lm), mean IoU and pixel accuracy (semantic-segmentation).

    Args:
        program: an eval-mode program with the adapter bound.
        enc: encoded evaluation data.
        batch_size: examples per forward.
        device: where the program's tensors are (the batches go there); default the CPU.
        amp: the run's precision (the forward runs under its autocast).
        forward: what runs a batch instead of ``program.forward_batch`` (``--fsdp``: the sharded eval program).
    """
    task = program.task
    lengths = getattr(enc, "input_ids", None)
    order = sorted(range(len(enc)), key=lambda i: len(lengths[i])) if lengths is not None else list(range(len(enc)))
    loss_sum, count, metric = 0.0, 0, task.metric()  # less padding: texts sorted by length
    for start in range(0, len(order), batch_size):
        batch = _to(collate(enc, order[start : start + batch_size], program.input_names), device)
        n = count_targets(batch, task.name)
        if n == 0:
            continue
        with amp.autocast() if amp is not None else contextlib.nullcontext():
            logits = (forward or program.forward_batch)(batch)
            loss_sum += float(task.loss(logits, batch)) * n
        count += n
        metric.update(logits, batch)
    if count == 0:
        return {}
    loss = loss_sum / count
    out = {"loss": loss, **metric.result(loss)}
    out["examples"] = len(enc)
    return out


def _to(batch: dict[str, torch.Tensor], device: torch.device | None) -> dict[str, torch.Tensor]:
    if device is None or device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _to_device(gm: torch.nn.Module, device: torch.device, trainable_only: bool) -> None:
    """Move a captured program to ``device``: all of it, or (``--fsdp``, which moves the base) its trainable tensors."""
    if not trainable_only:
        gm.to(device)
        return
    for p in gm.parameters():
        if p.requires_grad and p.device != device:
            p.data = p.data.to(device)


def _step_module(cfg: TrainConfig, s: _Setup, dist: Distributed) -> tuple[Any, Any, dict[str, int] | None]:
    """What a training step calls on a batch for its loss (:func:`training_loss` with the run's options);
    under ``--fsdp`` also what evaluation calls instead of the eval program (both programs over the sharded
    base) and the sharding's summary for ``run.json``."""
    program = s.train_prog
    names = program.input_names
    if cfg.fsdp:
        from peftc.training.fsdp import shard_programs

        # rank 0 saves a generated preset's base (base_model/) after the first step: it keeps the full tensors
        keep = dist.is_main and s.loaded.preset == "tiny-gpt2"
        sharded = shard_programs(
            program.graph_module, s.eval_prog.graph_module, cfg.gradient_checkpointing, release=not keep
        )

        def evaluate_sharded(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            with sharded.evaluating():
                return sharded(*(batch[name] for name in names))

        # the head stays in the sharded root unit (its weight is gathered inside the module's forward only):
        # not fused into the loss
        loss = program.task.loss
        return lambda batch: loss(sharded(*(batch[name] for name in names)), batch), evaluate_sharded, sharded.summary
    step_loss = training_loss(program, gradient_checkpointing=cfg.gradient_checkpointing, compile=cfg.compile,
                              model_name=cfg.model)  # fmt: skip
    return step_loss, None, None


def training_loss(
    program: Program,
    *,
    gradient_checkpointing: bool = False,
    compile: bool = False,
    fuse_head: bool = True,
    model_name: str = "the model",
) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """``batch -> loss`` of a train-mode program: what a training step differentiates.

    Args:
        program: the captured training program, adapter inserted.
        gradient_checkpointing: recompute each transformer block in the backward
            (:mod:`peftc.training.checkpointing`).
        compile: ``torch.compile`` the program (Inductor, whole graph: :func:`compile_module`).
        fuse_head: a language model's head computed inside its cross-entropy, chunk by chunk, so that the
            logits are never held whole (:mod:`peftc.training.head_loss`); the loss is the same. Off only
            to measure what it saves.
        model_name: named in the notice when checkpointing finds no blocks.
    """
    from peftc.training.head_loss import split_head

    module: Any = program.graph_module
    loss: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor] = program.task.loss
    if fuse_head and (fused := split_head(module, program.task)) is not None:
        module, loss = fused
    if gradient_checkpointing:
        from peftc.training.checkpointing import checkpoint_blocks

        module, blocks = checkpoint_blocks(module)
        if not blocks:
            _notice("--gradient-checkpointing: no transformer blocks (modules named like layers.N) in %s", model_name)
    if compile:
        module = compile_module(module, next(iter(program.graph_module.parameters())).device)
    names = program.input_names
    return lambda batch: loss(module(*(batch[name] for name in names)), batch)


def compile_module(module: torch.nn.Module, device: torch.device) -> Any:
    """``torch.compile(module)`` with Inductor (``fullgraph=True``: a graph break is an error, not a slowdown).

    Raises:
        ConfigError: on the CPU without a C++ compiler (Inductor generates and builds C++ there).
    """
    if device.type == "cpu":
        cxx = os.environ.get("CXX") or next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
        if cxx is None or shutil.which(cxx) is None:
            raise ConfigError(
                "--compile on the CPU needs a C++ compiler (Inductor builds C++ kernels): install g++ or clang++ "
                "(or set CXX), or train without --compile"
            )
    return torch.compile(module, backend="inductor", fullgraph=True)


# -- the run -------------------------------------------------------------------------------------


def _notice(message: str, *args: Any) -> None:
    """A line for the user on stderr (the CLI logs warnings and above, bare)."""
    logger.warning(message, *args)


def _find_checkpoint(cfg: TrainConfig, run_dir: Path, options: dict[str, Any]) -> tuple[Path | None, bool]:
    """Decide what this call does with ``run_dir``: ``(checkpoint to continue from, replace what it holds)``.

    Without ``--resume``: a fresh run, into an empty ``run_dir`` (with ``--force``: replacing it, unless it
    holds exports). A directory holding a run's checkpoints is refused with ``--resume`` named first.
    With ``--resume``: the newest checkpoint (the options checked against the run's); none in an empty or
    missing ``run_dir``: a new run; none, and only what an unfinished run of the same options wrote before
    its first checkpoint: that run starts afresh (both with a line saying so). Anything else is refused.
    """
    ckpt = latest_checkpoint(run_dir)
    held = contents(run_dir)
    if not cfg.resume:
        if held and not cfg.force:
            raise OutputExistsError(_occupied(run_dir, ckpt))
        if held:
            check_no_exports(run_dir)
        return None, bool(held)
    if ckpt is None:
        if not held:
            _notice("--resume: no run in %s yet; starting a new one", run_dir)
            return None, False
        started = started_options(run_dir) if unfinished_leftovers(run_dir) else None
        if started is not None:
            check_resume(options, started, None, run_dir=run_dir)
            _notice(
                "--resume: %s holds an unfinished run of these options that stopped before its first checkpoint; "
                "starting it afresh",
                run_dir,
            )
            return None, True
        if cfg.force:
            check_no_exports(run_dir)
            return None, True
        what = "a finished run" if (run_dir / RUN_FILE).is_file() else "files no unfinished peftc run wrote"
        raise ConfigError(
            f"--resume: {run_dir} holds no checkpoint (checkpoints/step-N, written with --save-every N) but "
            f"{what} ({', '.join(p.name for p in held[:5])}{', …' if len(held) > 5 else ''}); pass --force to "
            "replace it, or choose another --out"
        )
    check_resume(options, read_trainer_state(ckpt)["train_config"], ckpt)
    return ckpt, False


def _occupied(run_dir: Path, ckpt: Path | None) -> str:
    """Why a non-empty ``--out`` is refused without ``--resume``/``--force`` (``--resume`` first where it applies)."""
    exports = exports_in(run_dir)
    keep = f"; it holds exports ({', '.join(exports)}): move them out first" if exports else ""
    if (run_dir / RUN_FILE).is_file():
        newest = f" (checkpoints up to step {checkpoint_step(ckpt)})" if ckpt is not None else ""
        if ckpt is not None:
            return (
                f"output directory {run_dir} holds a finished run{newest}: train it further with --resume (and "
                f"more --epochs or --max-steps), choose another --out, or pass --force to replace it{keep}"
            )
        return (
            f"output directory {run_dir} holds a finished run; choose another --out, or pass --force to replace "
            f"it{keep}"
        )
    if ckpt is not None:
        return (
            f"output directory {run_dir} holds an unfinished run with checkpoints (newest: "
            f"{ckpt.relative_to(run_dir)}): continue it with --resume and the same options, or pass --force to "
            f"delete it and start over{keep}"
        )
    if unfinished_leftovers(run_dir):
        return (
            f"output directory {run_dir} holds an unfinished run that stopped before its first checkpoint: "
            "rerun with --resume (it starts afresh), or pass --force to replace it"
        )
    return f"output directory {run_dir} is not empty; pass --force to replace it or choose another --out{keep}"


class _StopOnSigterm:
    """SIGTERM (what a scheduler sends before it kills a job) asks the loop to stop at the next step boundary.

    Before the first step there is nothing to save: the signal stops setup at once. Installed only in the
    main thread (Python delivers signals there), for the duration of :func:`train`; the previous handler
    comes back after.
    """

    def __init__(self) -> None:
        self.requested = False
        self.in_loop = False
        self._previous: Any = None

    def __enter__(self) -> _StopOnSigterm:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        if not self.in_loop:
            raise _SetupStopped  # a BaseException, like KeyboardInterrupt: no library's `except Exception` eats it


class _SetupStopped(BaseException):
    """SIGTERM during setup (loading, capture): nothing of this call's training to save."""


_SETUP_STOPPED = "stopped by SIGTERM during setup, before this run's first training step; it wrote nothing new"


def train(cfg: TrainConfig | None = None) -> TrainResult:
    """Train an adapter and write a run directory (see :mod:`peftc.runs` for the layout).

    The run holds ``--out``'s lock (:mod:`peftc.training.lock`) throughout. In the main thread, SIGTERM
    makes it write a checkpoint at the next step boundary and raise :class:`TrainingStopped` (the CLI
    exits 75); ``--resume`` continues from there.

    Args:
        cfg: the options; ``None`` or ``TrainConfig()`` fine-tunes MiniLM on the shipped sentiment data.

    Returns:
        A :class:`TrainResult` with the final metrics and where the adapter is.

    Raises:
        ConfigError: impossible options, a ``--resume`` whose options differ from the run's.
        DataError: a data file is unreadable or has a malformed line (``file:line`` in the message).
        ModelLoadError: the base model or its tokenizer cannot be loaded.
        CaptureError: ``torch.export`` cannot capture the model.
        TargetNotFoundError: ``target_modules`` matched nothing.
        OutputExistsError: ``out`` is not empty and neither ``force`` nor ``resume`` was given, or ``force``
            would delete exports.
        RunLockedError: another ``peftc train`` is writing ``out``.
        TrainingStopped: SIGTERM; a checkpoint was written (unless it came before the first step).
    """
    cfg = cfg or TrainConfig()
    started = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _set_threads()
    cfg.validate()
    run_dir = Path(cfg.out).expanduser()
    check_model_spec(cfg.model)
    task = cfg.task or infer_task(cfg.model)
    data_path, eval_path = resolve_data(cfg, task)
    config = method_config(cfg, task)  # flag errors before the slow model load
    dist, device = setup(cfg.device)
    if cfg.fsdp and not dist.enabled:
        raise ConfigError(
            "--fsdp shards the frozen base over the processes of a launcher and this is one process: run under "
            "torchrun --nproc-per-node N (N >= 2) or accelerate launch, or without --fsdp"
        )
    precision(cfg.precision, device)  # fp16 without CUDA: refused before the model loads
    options = {
        **cfg.to_dict(),
        "task": task,
        "data": data_path,
        "eval_data": eval_path,
        "method": method_name(config, cfg.method.lower() if cfg.method else None),
        "world_size": dist.world_size,
    }
    lock = run_lock(run_dir) if dist.is_main else contextlib.nullcontext()  # rank 0 writes, and holds the lock
    try:
        with _StopOnSigterm() as stop, lock:
            return _train(cfg, run_dir, task, config, options, data_path, eval_path, stop, started, dist, device)
    except _SetupStopped:
        raise TrainingStopped(_SETUP_STOPPED, run_dir=run_dir) from None
    finally:
        dist.close()


def _train(
    cfg: TrainConfig,
    run_dir: Path,
    task: str,
    config: MethodConfig,
    options: dict[str, Any],
    data_path: str,
    eval_path: str | None,
    stop: _StopOnSigterm,
    started: float,
    dist: Distributed,
    device: torch.device,
) -> TrainResult:
    ckpt, replace = _find_checkpoint(cfg, run_dir, options) if dist.is_main else (None, False)
    if dist.enabled:  # rank 0 decided (it alone may replace --out); the others continue from the same step
        found = dist.broadcast_int(checkpoint_step(ckpt) if ckpt is not None else -1, device)
        ckpt = run_dir / CHECKPOINTS / f"step-{found}" if found >= 0 else None

    s = _build(cfg, task, config, data_path, eval_path, run_dir, ckpt, device)
    amp = precision(cfg.precision, device)
    counts = s.train_prog.parameter_counts()  # before --fsdp shards the base
    loss_of, eval_forward, sharding = _step_module(cfg, s, dist)
    opt = _optimizer(cfg, s.params)
    global_batch = cfg.batch_size * dist.world_size  # one micro-batch of every rank
    n_batches = math.ceil(len(s.train_enc) / global_batch)
    steps_per_epoch = math.ceil(n_batches / cfg.grad_accum)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    from transformers import get_linear_schedule_with_warmup

    sched = get_linear_schedule_with_warmup(opt, math.ceil(cfg.warmup_ratio * total_steps), total_steps)
    hooks = get_method(s.config).hooks(s.config, s.state, total_steps)
    params = [p for _, p in s.params]

    step, epoch, batch_pos, window, last_eval = 0, 0, 0, [], {}
    writer = _RankWriter(RunWriter(run_dir, replace, resumed=ckpt is not None, loaded=s.loaded, options=options), dist)
    if ckpt is not None:
        trainer = restore_checkpoint(ckpt, s.params, opt, sched, hooks)
        step, epoch, batch_pos = trainer["step"], trainer["epoch"], trainer["batch"]
        window, last_eval = list(trainer["window"]), dict(trainer["last_eval"])
        if amp.scaler is not None and "grad_scaler" in trainer:
            amp.scaler.load_state_dict(trainer["grad_scaler"])
        writer.truncate_metrics(step)
        if dist.is_main:
            _notice("resuming %s from %s (step %d of %d)", run_dir, ckpt.relative_to(run_dir), step, total_steps)
    else:
        _seed_everything(cfg.seed)
    # trackers open lazily at the first record (after the run dir exists); rank 0 only under torchrun
    reporters = make_reporters(
        cfg.report_to, run_dir, config=options, resume_step=step if ckpt is not None else None, rank=dist.rank
    )
    meter = StepMeter(device=params[0].device)

    logger.info(
        "training %s (%s, %s) on %d examples: %d steps, %d trainable of %d parameters",
        cfg.model,
        task,
        options["method"],
        len(s.train_enc),
        total_steps,
        counts["trainable"],
        counts["total"],
    )
    from tqdm import tqdm

    bar = tqdm(
        total=total_steps,
        initial=step,
        disable=not (cfg.progress and dist.is_main),
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )
    task_spec = s.train_prog.task
    saved_step = checkpoint_step(ckpt) if ckpt is not None else None

    def save() -> None:
        nonlocal saved_step
        e, b = (epoch + 1, 0) if batch_pos >= n_batches else (epoch, batch_pos)
        trainer = {
            "step": step,
            "epoch": e,
            "batch": b,
            "window": window,
            "last_eval": last_eval,
            "train_config": options,
            "total_steps": total_steps,
        }
        if amp.scaler is not None:  # fp16: the loss scale reached so far
            trainer["grad_scaler"] = amp.scaler.state_dict()
        if dist.is_main:
            save_checkpoint(run_dir, s.state, s.params, opt, sched, trainer, hooks)
        saved_step = step

    stop.in_loop = True
    if stop.requested:  # came during setup, after the handler's own check
        raise TrainingStopped(_SETUP_STOPPED, run_dir=run_dir)
    try:
        while step < total_steps:
            batches = batch_order(len(s.train_enc), global_batch, cfg.seed, epoch)
            while batch_pos < n_batches and step < total_steps:
                group = batches[batch_pos : batch_pos + cfg.grad_accum]
                shards = [dist.shard(idx, cfg.batch_size) for idx in group]
                micro = [_to(collate(s.train_enc, idx, s.train_prog.input_names), device) for idx in shards if idx]
                loss = _step_loss(loss_of, task_spec, micro, hooks.regularization, amp, dist, device)
                dist.all_reduce_grads(params)
                tokens = count_tokens(micro)
                if dist.enabled:  # the step's loss and tokens over all ranks; every rank stops at the same step
                    loss, tokens, stopping = dist.sum([loss, tokens, float(stop.requested)], device)
                    stop.requested = stop.requested or stopping > 0
                meter.add(int(tokens))
                if not math.isfinite(loss):
                    raise ConfigError(
                        f"training diverged: loss is {loss} at step {step + 1}; lower --lr (now {cfg.lr})"
                    )
                amp.unscale_(opt)
                if cfg.max_grad_norm > 0:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
                else:  # a group without targets leaves no gradients
                    norms = [p.grad.norm() for p in params if p.grad is not None]
                    grad_norm = float(torch.norm(torch.stack(norms))) if norms else 0.0
                lr = opt.param_groups[0]["lr"]
                amp.step(opt)
                sched.step()
                hooks.after_step(step + 1)  # needs this step's gradients
                opt.zero_grad(set_to_none=True)
                step += 1
                batch_pos += len(group)
                writer.open()
                window.append(loss)
                window = window[-cfg.log_every :]
                ep = epoch + batch_pos / n_batches
                if step % cfg.log_every == 0 or step == total_steps:
                    mean = sum(window) / len(window)
                    record = {"type": "train", "step": step, "epoch": round(ep, 4), "loss": mean, "lr": lr}
                    record.update(grad_norm=grad_norm, **meter.read())
                    writer.log(record)
                    reporters.log(record)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                # rank 0 evaluates; under --fsdp every rank takes part (the blocks are gathered collectively)
                evaluating = dist.is_main or eval_forward is not None
                if s.eval_enc is not None and evaluating and (batch_pos >= n_batches or step == total_steps):
                    with meter.paused():
                        last_eval = evaluate(
                            s.eval_prog, s.eval_enc, max(cfg.batch_size, 32), device, amp, forward=eval_forward
                        )
                    eval_record = {"type": "eval", "step": step, "epoch": round(ep, 4), **last_eval}
                    writer.log(eval_record)
                    reporters.log(eval_record)
                    line = f"epoch {ep:.2f} step {step}: eval {_fmt(last_eval)}"
                    if dist.is_main and cfg.progress:
                        bar.write(line)
                    elif dist.is_main:  # no bar, but the eval lines still
                        print(line, file=sys.stderr, flush=True)  # where the bar would have written it
                if cfg.save_every and step % cfg.save_every == 0:
                    with meter.paused():
                        save()
                if stop.requested and step < total_steps:
                    if saved_step != step:
                        with meter.paused():
                            save()
                    raise TrainingStopped(
                        f"stopped by SIGTERM at step {step} of {total_steps}: checkpoint "
                        f"{run_dir / CHECKPOINTS / f'step-{step}'} written; continue with --resume and the same "
                        "options",
                        run_dir=run_dir,
                        step=step,
                    )
            if batch_pos >= n_batches:
                epoch, batch_pos = epoch + 1, 0
    finally:
        bar.close()
        reporters.close()
    writer.open()  # a no-op unless nothing ran (a resume of a finished run with no checkpoint)

    final_epoch = epoch + batch_pos / n_batches
    train_loss = sum(window) / len(window) if window else None
    adapter_dir = run_dir / ADAPTER_DIR
    final = dataclasses.replace(s.state, config=dataclasses.replace(s.config, inference_mode=True))
    final = hooks.finalize(final)  # e.g. AdaLoRA cuts tensors to the kept ranks, as HF PEFT saves them
    if dist.is_main:
        final.save(adapter_dir, force=True)
    seconds = time.perf_counter() - started
    resumed_from = checkpoint_step(ckpt) if ckpt is not None else None
    run = {
        "peftc_version": __version__,
        "task": task,
        "model": {"spec": cfg.model, "source": s.base_source, "preset": s.loaded.preset},
        "method": options["method"],
        "peft_type": s.config.peft_type,
        "input_names": list(s.eval_prog.input_names),
        "train_config": options,
        "metrics": {"step": step, "epoch": round(final_epoch, 4), "train_loss": train_loss, "eval": last_eval},
        "parameters": counts,
        "seconds": round(seconds, 2),
        "resumed_from": resumed_from,
    }
    if sharding is not None:
        run["fsdp"] = sharding  # rank 0's shard: the others hold the same share, give or take padding
    if s.id2label:
        run["id2label"] = {str(k): v for k, v in s.id2label.items()}
    writer.write_run(run)
    dist.barrier()  # the other ranks return once the adapter is on disk
    logger.info("done: %d steps in %.0fs; final eval: %s; adapter in %s", step, seconds, _fmt(last_eval), adapter_dir)
    return TrainResult(
        run_dir=run_dir,
        adapter_dir=adapter_dir,
        step=step,
        epoch=final_epoch,
        train_loss=train_loss,
        eval_metrics=last_eval,
        seconds=seconds,
        trainable_parameters=counts["trainable"],
        resumed_from=resumed_from,
        id2label=s.id2label,
    )


class _RankWriter:
    """The run writer on rank 0; on the other ranks, a writer that writes nothing."""

    def __init__(self, writer: RunWriter, dist: Distributed) -> None:
        self._writer, self._main = writer, dist.is_main

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._writer, name)
        return method if self._main else lambda *args, **kwargs: None


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "examples") or "no eval data"
