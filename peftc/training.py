"""Training: fit an adapter on a captured program and write a run directory.

``train(TrainConfig(...))`` is the whole of ``peftc train``: the CLI maps its flags 1:1 onto
:class:`TrainConfig`. The loop trains the *captured graph*, not the eager model: the base model
is captured in train mode (dropout baked in), the method's insertion pipeline adds the adapter,
and AdamW updates the adapter's tensors (the only trainable parameters). A second, eval-mode
capture bound to the same :class:`~peftc.adapters.AdapterState` shares those tensors, so
evaluation always sees the current adapter without copying anything.

The run directory layout is documented in :mod:`peftc.runs`. Writing rules:

* nothing is written before the first optimizer step has succeeded, so a bad flag, data file or
  model (any :class:`~peftc.errors.PeftcError` raised while setting up) leaves no trace on disk;
* an existing non-empty ``out`` is refused (:class:`~peftc.errors.OutputExistsError`) unless
  ``force`` (replace it) or ``resume`` (continue it);
* checkpoints (``checkpoints/step-N``) and the final ``adapter/`` are written atomically;
  ``run.json`` is replaced atomically;
* a run resumed from ``checkpoints/step-N`` reaches the same adapter as an uninterrupted run: the
  checkpoint holds the adapter, AdamW's moments, the scheduler position and the torch RNG state
  (dropout), and the data order is a pure function of (seed, epoch).

Without arguments, ``train(TrainConfig())`` fine-tunes the real pretrained MiniLM (preset
``minilm``) with LoRA for binary sentiment classification on the data shipped in ``peftc.data``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from peftc import __version__
from peftc.adapters import AdapterState
from peftc.config import TASK_TYPES, MethodConfig, PromptLearningConfig, config_from_dict, load_config
from peftc.dataset import Dataset, Encoded, batch_order, collate, count_targets, default_data, encode, read_jsonl
from peftc.errors import ConfigError, DataError, ModelLoadError
from peftc.files import atomic_dir, check_output_dir, write_atomic
from peftc.models import PRESETS, LoadedModel, check_model_spec, load_model, save_base_model
from peftc.program import Program, capture
from peftc.runs import RUN_FILE
from peftc.tasks import HEAD_TASKS

__all__ = ["TrainConfig", "TrainResult", "evaluate", "train"]

logger = logging.getLogger(__name__)

#: Method-config fields the LoRA-style flags set; a flag on a method without the field is an error.
_OVERRIDES = ("r", "lora_alpha", "lora_dropout", "target_modules", "num_virtual_tokens")
#: Fields that decide the training trajectory: a resumed run must use the values it started with.
_RESUME_FIELDS = (
    "model",
    "task",
    "method",
    "config_file",
    "data",
    "lr",
    "batch_size",
    "grad_accum",
    "warmup_ratio",
    "max_grad_norm",
    "weight_decay",
    "seed",
    "max_length",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "num_virtual_tokens",
    "options",
)
CHECKPOINTS = "checkpoints"
METRICS_FILE = "metrics.jsonl"
ADAPTER_DIR = "adapter"
BASE_MODEL_DIR = "base_model"
_TRAINER_STATE = "trainer_state.json"
_OPTIMIZER_FILE = "optimizer.safetensors"
_RNG_FILE = "rng.safetensors"


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class TrainConfig:
    """Everything ``peftc train`` takes; each field is one CLI flag (``max_steps`` → ``--max-steps``).

    ``None`` means "the default for this model/method" (see each field's help).
    """

    model: str = _help("Base model: a preset (minilm, tiny-gpt2) or a local HF model directory.", default="minilm")
    task: str | None = _help(
        "causal-lm or seq-cls. Default: the preset's task; for a directory, causal-lm when its config.json "
        "names a *ForCausalLM/*LMHeadModel architecture, else seq-cls.",
        default=None,
    )
    method: str | None = _help(
        "PEFT method (lora). None: the method of --config-file, else lora.",
        default="lora",
    )
    config_file: str | None = _help(
        "An HF PEFT adapter_config.json-style file with method options; explicit flags override its fields.",
        default=None,
    )
    data: str | None = _help(
        "Training data, JSON lines: {'text': ...} (causal-lm), {'text': ..., 'label': int|str} (seq-cls) or "
        "{'tokens': [...], 'labels': [...]} (token-cls). "
        "Default: the data shipped for the minilm and tiny-gpt2 presets.",
        default=None,
    )
    eval_data: str | None = _help(
        "Evaluation data (same format), evaluated after every epoch. Default: the shipped eval set when "
        "--data is the default, else no evaluation.",
        default=None,
    )
    out: str = _help("Run directory to write.", default="peftc-run")
    epochs: int = _help("Passes over the training data (ignored when --max-steps is given).", default=3)
    max_steps: int | None = _help("Stop after this many optimizer steps (cycling the data as needed).", default=None)
    lr: float = _help("Peak learning rate of AdamW (linear warmup, then linear decay to 0).", default=2e-3)
    batch_size: int = _help("Examples per micro-batch.", default=16)
    grad_accum: int = _help("Micro-batches accumulated into one optimizer step.", default=1)
    warmup_ratio: float = _help("Fraction of the optimizer steps spent warming the learning rate up.", default=0.06)
    max_grad_norm: float = _help("Clip the global gradient norm to this (0 disables clipping).", default=1.0)
    weight_decay: float = _help("AdamW weight decay on matrices (never on biases or norms).", default=0.0)
    seed: int = _help("Seed of the adapter init, dropout and data order.", default=42)
    max_length: int = _help("Truncate texts to this many tokens.", default=128)
    r: int | None = _help("LoRA rank (default 8, or the config file's).", default=None)
    lora_alpha: float | None = _help("LoRA alpha: scale = alpha / r (default 16, or the config file's).", default=None)
    lora_dropout: float | None = _help("Dropout on the LoRA input (default 0.05, or the config file's).", default=None)
    target_modules: list[str] | str | None = _help(
        "Modules to adapt: names/suffixes, or one regex string. Default: HF PEFT's table for the model type.",
        default=None,
    )
    num_virtual_tokens: int | None = _help(
        "Virtual tokens of prompt tuning, P-tuning and prefix tuning (default 20, or the config file's).",
        default=None,
    )
    options: dict[str, Any] | None = _help(
        "Any other method-config field by its HF PEFT name, e.g. {'init_r': 12, 'adapter_len': 10}; "
        "overrides the config file (CLI: --set init_r=12, values parsed as JSON).",
        default=None,
    )
    save_every: int | None = _help("Write checkpoints/step-N every N optimizer steps.", default=None)
    resume: bool = _help("Continue from the newest checkpoint in --out.", default=False)
    force: bool = _help("Replace a non-empty --out.", default=False)
    progress: bool = _help("Show a progress bar and print the eval metrics after each epoch.", default=True)
    log_every: int = _help("Write the mean training loss to metrics.jsonl every N optimizer steps.", default=10)

    def validate(self) -> None:
        """Raise :class:`ConfigError` for values no run can use."""
        positive = {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "log_every": self.log_every,
            "max_length": self.max_length,
        }
        for name in ("max_steps", "save_every", "r"):
            if getattr(self, name) is not None:
                positive[name] = getattr(self, name)
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.max_length < 2:
            raise ConfigError(f"max_length must be at least 2, got {self.max_length}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise ConfigError(f"lr must be in (0, 1), got {self.lr!r}; LoRA usually trains well at 1e-4..2e-3")
        if not 0 <= self.warmup_ratio <= 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if self.max_grad_norm < 0:
            raise ConfigError(f"max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.task is not None and self.task not in ("causal-lm", "seq-cls", "token-cls"):
            raise ConfigError(f"task {self.task!r} cannot be trained; use causal-lm, seq-cls or token-cls")
        if self.method is not None:
            from peftc.methods import method_by_name

            method_by_name(self.method)  # an unknown name: ConfigError listing the known ones

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """Field name -> help text (for the CLI's ``--help``)."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


#: LoRA options peftc train uses when neither a flag nor the config file sets them (HF PEFT's
#: LoraConfig defaults are r=8, alpha=8, dropout=0; alpha = 2r trains faster at the same lr).
_TRAIN_LORA_DEFAULTS = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05}


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


def _infer_task(model: str) -> str:
    if model in PRESETS:
        return PRESETS[model][1]
    try:
        archs = json.loads((Path(model).expanduser() / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        archs = []
    if any(a.endswith("ForTokenClassification") for a in archs):
        return "token-cls"
    return "causal-lm" if any("CausalLM" in a or "LMHeadModel" in a for a in archs) else "seq-cls"


def _resolve_data(cfg: TrainConfig, task: str) -> tuple[str, str | None]:
    if cfg.data is not None:
        return str(Path(cfg.data).expanduser().resolve()), (
            str(Path(cfg.eval_data).expanduser().resolve()) if cfg.eval_data else None
        )
    shipped = default_data(cfg.model, task)
    if shipped is None:
        raise DataError(
            f"no training data: pass --data FILE (JSON lines); built-in data exists only for "
            f"{', '.join(f'--model {m} --task {t}' for m, t in _default_pairs())}"
        )
    eval_path = str(Path(cfg.eval_data).expanduser().resolve()) if cfg.eval_data else str(shipped[1])
    return str(shipped[0]), eval_path


def _default_pairs() -> list[tuple[str, str]]:
    from peftc.dataset import DEFAULT_DATA

    return list(DEFAULT_DATA)


def _method_config(cfg: TrainConfig, task: str) -> MethodConfig:
    """The method config from --config-file and flags (flags win); base path is filled in later."""
    data: dict[str, Any] = {}
    if cfg.config_file:
        data = load_config(cfg.config_file).to_dict()
    from peftc.methods import cli_names, get_method, method_by_name

    method = cfg.method.lower() if cfg.method else None
    if method:
        chosen = method_by_name(method)
    else:
        chosen = get_method(data["peft_type"]) if data else method_by_name(cli_names()[0])
    peft_type = chosen.peft_type
    if data and data.get("peft_type") != peft_type:
        raise ConfigError(
            f"--config-file {cfg.config_file} holds peft_type={data.get('peft_type')!r} but --method is "
            f"{cfg.method!r}; pass the matching --method or another config file"
        )
    for name, value in (chosen.cli_names.get(method, {}) if method else {}).items():
        data.setdefault(name, value)  # what the --method name presets (dora: use_dora=True)
    data["peft_type"] = peft_type
    fields = {f.name for f in dataclasses.fields(chosen.config_class)}
    for name in _OVERRIDES:
        value = getattr(cfg, name)
        if value is None:
            if name in fields and name in _TRAIN_LORA_DEFAULTS and name not in data:
                data[name] = _TRAIN_LORA_DEFAULTS[name]
            continue
        if name not in fields:
            raise ConfigError(f"--{name.replace('_', '-')} does not apply to method {method or peft_type!r}")
        data[name] = list(value) if isinstance(value, tuple) else value
    for name, value in (cfg.options or {}).items():
        if name not in fields or name in ("peft_type", "task_type", "inference_mode", "base_model_name_or_path"):
            settable = sorted(f for f in fields if not f.startswith("_") and f not in ("peft_type", "task_type"))
            raise ConfigError(
                f"--set {name}: not a field of {peft_type} configs (or not settable); fields: {', '.join(settable)}"
            )
        data[name] = value
    data["task_type"] = TASK_TYPES[task]
    if task in HEAD_TASKS and "modules_to_save" in fields and not data.get("modules_to_save"):
        data["modules_to_save"] = ["classifier", "score"]  # HF PEFT's convention for classification heads
    data["inference_mode"] = False
    return config_from_dict(data, source=cfg.config_file or "training options")


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
    task: str
    loaded: LoadedModel
    train_prog: Program
    eval_prog: Program
    state: AdapterState
    config: MethodConfig
    train_enc: Encoded
    eval_enc: Encoded | None
    train_data: Dataset
    id2label: dict[int, str] | None
    base_source: str
    params: list[tuple[str, torch.nn.Parameter]]


def _build(
    cfg: TrainConfig, task: str, data_path: str, eval_path: str | None, run_dir: Path, checkpoint: Path | None
) -> _Setup:
    method_config = _method_config(cfg, task)  # flag errors before the slow model load
    train_data = read_jsonl(data_path, task)
    eval_data = read_jsonl(eval_path, task, **train_data.eval_kwargs()) if eval_path else None
    id2label = train_data.id2label if task in HEAD_TASKS else None
    loaded = load_model(cfg.model, task, num_labels=len(id2label) if id2label else None, id2label=id2label)
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
    if max_pos and isinstance(method_config, PromptLearningConfig):
        max_pos -= method_config.num_virtual_tokens  # virtual tokens / the prefix take the first positions
    if max_pos and max_length > max_pos:
        logger.warning("max_length=%d exceeds the model's %d usable positions; using %d", max_length, max_pos, max_pos)
        max_length = max_pos
    pad_id = loaded.model.config.pad_token_id if task == "seq-cls" else None
    train_enc = encode(train_data, loaded.tokenizer, task, max_length, pad_id)
    eval_enc = encode(eval_data, loaded.tokenizer, task, max_length, pad_id) if eval_data else None

    base_source = str((run_dir / BASE_MODEL_DIR).resolve()) if loaded.preset == "tiny-gpt2" else loaded.source
    method_config.base_model_name_or_path = base_source
    train_prog = capture(loaded.model, task, mode="train")
    eval_prog = capture(loaded.model, task, mode="eval")
    from peftc.passes import insertion_pipeline

    if checkpoint is not None:
        state = AdapterState.load(checkpoint)
        state.config = method_config
        state.trainable_(True)
        insertion_pipeline(method_config, state)(train_prog)
    else:
        _seed_everything(cfg.seed)  # the fresh adapter's init depends on the seed only
        insertion_pipeline(method_config)(train_prog)
        state = train_prog.adapter
    insertion_pipeline(method_config, state)(eval_prog)
    params = [(n, p) for n, p in train_prog.graph_module.named_parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"method {method_config.peft_type} left nothing to train in {cfg.model}")
    return _Setup(
        task,
        loaded,
        train_prog,
        eval_prog,
        state,
        method_config,
        train_enc,
        eval_enc,
        train_data,
        id2label,
        base_source,
        params,
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
    program: Program, task_spec: Any, micro: list[dict[str, torch.Tensor]], regularization: Any = None
) -> float:
    """Forward/backward a group of micro-batches; the mean loss over all their targets.

    ``regularization()``, when given, is a method's extra loss term added to every micro-batch loss.
    """
    counts = [count_targets(b, task_spec.name) for b in micro]
    total = sum(counts)
    value = 0.0
    for batch, count in zip(micro, counts, strict=True):
        if count == 0:
            continue
        loss = task_spec.loss(program.forward_batch(batch), batch)
        if regularization is not None:
            loss = loss + regularization()
        weight = count / total
        (loss * weight).backward()
        value += float(loss.detach()) * weight
    return value


@torch.no_grad()
def evaluate(program: Program, enc: Encoded, batch_size: int = 32) -> dict[str, float]:
    """Loss (mean over examples / next-token targets) plus accuracy (seq-cls) or perplexity (causal-lm).

    Args:
        program: an eval-mode program with the adapter bound.
        enc: encoded evaluation data.
        batch_size: examples per forward.
    """
    task = program.task
    order = sorted(range(len(enc)), key=lambda i: len(enc.input_ids[i]))  # less padding
    loss_sum, count, correct = 0.0, 0, 0
    for start in range(0, len(order), batch_size):
        batch = collate(enc, order[start : start + batch_size], program.input_names)
        n = count_targets(batch, task.name)
        if n == 0:
            continue
        logits = program.forward_batch(batch)
        loss_sum += float(task.loss(logits, batch)) * n
        count += n
        if task.name in HEAD_TASKS:  # token-cls: labelled positions only (-100 never equals an argmax)
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
    if count == 0:
        return {}
    loss = loss_sum / count
    out = {"loss": loss}
    if task.name in HEAD_TASKS:
        out["accuracy"] = correct / count
    else:
        out["perplexity"] = math.exp(min(loss, 50.0))
    out["examples"] = len(enc)
    return out


# -- run directory -------------------------------------------------------------------------------


class _RunWriter:
    """Owns the run directory; creates it lazily, after the first optimizer step succeeded."""

    def __init__(self, path: Path, force: bool, resumed: bool, loaded: LoadedModel | None = None):
        self.path = path
        self.force = force
        self.opened = resumed
        self.loaded = loaded
        self.pending: list[dict[str, Any]] = []

    def open(self) -> None:
        if self.opened:
            return
        check_output_dir(self.path, self.force)
        if self.path.exists() and any(self.path.iterdir()):
            shutil.rmtree(self.path)  # force: the new run has taken its first step; replace the old one
        self.path.mkdir(parents=True, exist_ok=True)
        if self.loaded is not None and self.loaded.preset == "tiny-gpt2":
            with atomic_dir(self.path / BASE_MODEL_DIR) as tmp:
                save_base_model(self.loaded, tmp)
        self.opened = True
        for record in self.pending:
            self._append(record)
        self.pending = []

    def log(self, record: dict[str, Any]) -> None:
        if self.opened:
            self._append(record)
        else:
            self.pending.append(record)

    def _append(self, record: dict[str, Any]) -> None:
        with open(self.path / METRICS_FILE, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """Drop records a crashed run logged after the checkpoint it resumes from."""
        path = self.path / METRICS_FILE
        if not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except ValueError:
                continue  # a line cut short by the crash
        write_atomic(path, "".join(x + "\n" for x in kept))


def _latest_checkpoint(run_dir: Path) -> Path | None:
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return None
    steps = []
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith("step-") and d.name[5:].isdigit() and (d / _TRAINER_STATE).is_file():
            steps.append((int(d.name[5:]), d))
    return max(steps)[1] if steps else None


def _save_checkpoint(
    run_dir: Path, s: _Setup, opt: torch.optim.Optimizer, sched: Any, trainer: dict[str, Any], hooks: Any = None
) -> Path:
    from safetensors.torch import save_file

    target = run_dir / CHECKPOINTS / f"step-{trainer['step']}"
    with atomic_dir(target, force=True) as tmp:
        s.state.write_into(tmp)
        if hooks is not None:  # the method's own training state (AdaLoRA: the rank allocator)
            hooks.save_state(tmp)
        by_id = {id(p): n for n, p in s.params}
        tensors: dict[str, torch.Tensor] = {}
        for group in opt.param_groups:
            for p in group["params"]:
                for key, value in opt.state.get(p, {}).items():
                    if torch.is_tensor(value):
                        tensors[f"{by_id[id(p)]}::{key}"] = value.detach().contiguous().clone()
        save_file(tensors, str(tmp / _OPTIMIZER_FILE), metadata={"format": "pt"})
        save_file({"torch_cpu": torch.get_rng_state()}, str(tmp / _RNG_FILE), metadata={"format": "pt"})
        sched_state = {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"}
        groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        state = {
            **trainer,
            "peftc_version": __version__,
            "scheduler": sched_state,
            "param_groups": groups,
            "python_random": _jsonable(random.getstate()),
        }
        (tmp / _TRAINER_STATE).write_text(json.dumps(state, indent=2, sort_keys=True))
    return target


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _from_jsonable(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_from_jsonable(v) for v in value)
    return value


def _restore_checkpoint(ckpt: Path, s: _Setup, opt: torch.optim.Optimizer, sched: Any) -> dict[str, Any]:
    from safetensors.torch import load_file

    trainer = json.loads((ckpt / _TRAINER_STATE).read_text())
    moments = load_file(str(ckpt / _OPTIMIZER_FILE))
    opt_state = opt.state_dict()
    index = 0
    by_name: dict[str, int] = {}
    for group in opt.param_groups:
        for p in group["params"]:
            by_name[next(n for n, q in s.params if q is p)] = index
            index += 1
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
    torch.set_rng_state(load_file(str(ckpt / _RNG_FILE))["torch_cpu"])
    random.setstate(_from_jsonable(trainer["python_random"]))
    return trainer


def _check_resume(cfg_dict: dict[str, Any], saved: dict[str, Any], ckpt: Path) -> None:
    for name in _RESUME_FIELDS:
        if saved.get(name) != cfg_dict.get(name):
            raise ConfigError(
                f"--resume: {name}={cfg_dict.get(name)!r} but the run in {ckpt.parent.parent} was started with "
                f"{name}={saved.get(name)!r}; resume with the same options or start a new run"
            )
    for name in ("epochs", "max_steps"):
        if saved.get(name) != cfg_dict.get(name):
            logger.warning(
                "--resume with %s=%r (was %r): the learning-rate schedule changes from here on",
                name,
                cfg_dict.get(name),
                saved.get(name),
            )


# -- the loop ------------------------------------------------------------------------------------


def train(cfg: TrainConfig | None = None) -> TrainResult:
    """Train an adapter and write a run directory (see :mod:`peftc.runs` for the layout).

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
        OutputExistsError: ``out`` is not empty and neither ``force`` nor ``resume`` was given.
    """
    cfg = cfg or TrainConfig()
    started = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _set_threads()
    cfg.validate()
    run_dir = Path(cfg.out).expanduser()
    check_model_spec(cfg.model)
    task = cfg.task or _infer_task(cfg.model)
    data_path, eval_path = _resolve_data(cfg, task)
    cfg_dict = {
        **cfg.to_dict(),
        "task": task,
        "data": data_path,
        "eval_data": eval_path,
        "method": (cfg.method or "").lower() or None,
    }
    ckpt = None
    if cfg.resume:
        ckpt = _latest_checkpoint(run_dir)
        if ckpt is None:
            if run_dir.exists() and not run_dir.is_dir():
                check_output_dir(run_dir, False)
            if run_dir.is_dir() and any(run_dir.iterdir()) and not cfg.force:
                raise ConfigError(
                    f"--resume: {run_dir} holds no checkpoint (checkpoints/step-N); checkpoints are written "
                    "with --save-every N; pass --force to start over"
                )
            logger.info("--resume: no checkpoint in %s; starting a new run", run_dir)
        else:
            saved = json.loads((ckpt / _TRAINER_STATE).read_text())
            _check_resume(cfg_dict, saved["train_config"], ckpt)
    else:
        check_output_dir(run_dir, cfg.force)

    s = _build(cfg, task, data_path, eval_path, run_dir, ckpt)
    opt = _optimizer(cfg, s.params)
    n_batches = math.ceil(len(s.train_enc) / cfg.batch_size)
    steps_per_epoch = math.ceil(n_batches / cfg.grad_accum)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    from transformers import get_linear_schedule_with_warmup

    sched = get_linear_schedule_with_warmup(opt, math.ceil(cfg.warmup_ratio * total_steps), total_steps)
    from peftc.methods import get_method

    # the method's hooks (AdaLoRA: orthogonal regularisation, rank allocation, final resize)
    hooks = get_method(s.config).hooks(s.config, s.state, total_steps)
    regularization = hooks.regularization

    step, epoch, batch_pos, window, last_eval = 0, 0, 0, [], {}
    writer = _RunWriter(run_dir, cfg.force, resumed=ckpt is not None, loaded=s.loaded)
    if ckpt is not None:
        trainer = _restore_checkpoint(ckpt, s, opt, sched)
        hooks.load_state(ckpt)
        step, epoch, batch_pos = trainer["step"], trainer["epoch"], trainer["batch"]
        window, last_eval = list(trainer["window"]), dict(trainer["last_eval"])
        writer.truncate_metrics(step)
        logger.info("resuming %s from step %d (epoch %d, batch %d)", run_dir, step, epoch, batch_pos)
    else:
        _seed_everything(cfg.seed)

    counts = s.train_prog.parameter_counts()
    logger.info(
        "training %s (%s, %s) on %d examples: %d steps, %d trainable of %d parameters",
        cfg.model,
        task,
        s.config.peft_type,
        len(s.train_enc),
        total_steps,
        counts["trainable"],
        counts["total"],
    )
    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=step, disable=not cfg.progress, desc="train", unit="step", dynamic_ncols=True)
    task_spec = s.train_prog.task
    try:
        while step < total_steps:
            batches = batch_order(len(s.train_enc), cfg.batch_size, cfg.seed, epoch)
            while batch_pos < n_batches and step < total_steps:
                group = batches[batch_pos : batch_pos + cfg.grad_accum]
                micro = [collate(s.train_enc, idx, s.train_prog.input_names) for idx in group]
                loss = _step_loss(s.train_prog, task_spec, micro, regularization)
                if not math.isfinite(loss):
                    raise ConfigError(
                        f"training diverged: loss is {loss} at step {step + 1}; lower --lr (now {cfg.lr})"
                    )
                params = [p for _, p in s.params]
                if cfg.max_grad_norm > 0:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
                else:
                    grad_norm = float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
                lr = opt.param_groups[0]["lr"]
                opt.step()
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
                    writer.log(
                        {
                            "type": "train",
                            "step": step,
                            "epoch": round(ep, 4),
                            "loss": mean,
                            "lr": lr,
                            "grad_norm": grad_norm,
                        }
                    )
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                if s.eval_enc is not None and (batch_pos >= n_batches or step == total_steps):
                    last_eval = evaluate(s.eval_prog, s.eval_enc, max(cfg.batch_size, 32))
                    writer.log({"type": "eval", "step": step, "epoch": round(ep, 4), **last_eval})
                    if cfg.progress:
                        bar.write(f"epoch {ep:.2f} step {step}: eval {_fmt(last_eval)}")
                if cfg.save_every and step % cfg.save_every == 0:
                    e, b = (epoch + 1, 0) if batch_pos >= n_batches else (epoch, batch_pos)
                    trainer = {
                        "step": step,
                        "epoch": e,
                        "batch": b,
                        "window": window,
                        "last_eval": last_eval,
                        "train_config": cfg_dict,
                        "total_steps": total_steps,
                    }
                    _save_checkpoint(run_dir, s, opt, sched, trainer, hooks)
            if batch_pos >= n_batches:
                epoch, batch_pos = epoch + 1, 0
    finally:
        bar.close()
    if not writer.opened:  # nothing to do (a resume of a finished run with no checkpoint)
        writer.open()

    final_epoch = epoch + batch_pos / n_batches
    train_loss = sum(window) / len(window) if window else None
    adapter_dir = run_dir / ADAPTER_DIR
    final = dataclasses.replace(s.state, config=dataclasses.replace(s.config, inference_mode=True))
    final = hooks.finalize(final)  # e.g. AdaLoRA cuts tensors to the kept ranks, as HF PEFT saves them
    final.save(adapter_dir, force=True)
    seconds = time.perf_counter() - started
    metrics = {"step": step, "epoch": round(final_epoch, 4), "train_loss": train_loss, "eval": last_eval}
    run = {
        "peftc_version": __version__,
        "task": task,
        "model": {"spec": cfg.model, "source": s.base_source, "preset": s.loaded.preset},
        "method": cfg_dict["method"] or next(iter(get_method(s.config).cli_names)),
        "peft_type": s.config.peft_type,
        "input_names": list(s.eval_prog.input_names),
        "train_config": cfg_dict,
        "metrics": metrics,
        "parameters": counts,
        "seconds": round(seconds, 2),
        "resumed_from": int(ckpt.name[5:]) if ckpt is not None else None,
    }
    if s.id2label:
        run["id2label"] = {str(k): v for k, v in s.id2label.items()}
    write_atomic(run_dir / RUN_FILE, json.dumps(run, indent=2, sort_keys=True))
    result = TrainResult(
        run_dir=run_dir,
        adapter_dir=adapter_dir,
        step=step,
        epoch=final_epoch,
        train_loss=train_loss,
        eval_metrics=last_eval,
        seconds=seconds,
        trainable_parameters=counts["trainable"],
        resumed_from=run["resumed_from"],
        id2label=s.id2label,
    )
    logger.info("done: %d steps in %.0fs; final eval: %s; adapter in %s", step, seconds, _fmt(last_eval), adapter_dir)
    return result


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "examples") or "no eval data"
