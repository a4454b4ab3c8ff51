"""What a run is asked to do: :class:`TrainConfig`, and what it resolves to (task, data files, method config).

``peftc train``'s flags are :class:`TrainConfig`'s fields (``max_steps`` → ``--max-steps``); the CLI reads
their help and defaults from here. Five method-config fields have a flag of their own
(:data:`METHOD_FLAGS`: ``--r``, ``--lora-alpha``, …); their help, type and default are the method config's
(:func:`method_flags`, through the method registry), and every other field is set with
``--set FIELD=VALUE``.

The method config is built in this order, each step overriding the ones before:

1. the ``--config`` file (an HF PEFT ``adapter_config.json``; every field it leaves out takes HF PEFT's
   default), if any;
2. what the ``--method`` name presets (``dora``: ``use_dora=True``);
3. without a ``--config`` file, :data:`TRAIN_PRESETS`: peftc's training presets that differ from HF PEFT's
   defaults;
4. the method flags;
5. ``--set FIELD=VALUE``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftc.config import TASK_NAMES, TASK_TYPES, MethodConfig, config_from_dict, load_config
from peftc.dataset import DEFAULT_DATA, default_data
from peftc.errors import ConfigError, DataError
from peftc.models import PRESETS
from peftc.tasks import HEAD_TASKS, IMAGE_TARGETS, VISION_TASKS, head_modules, vision_task

if TYPE_CHECKING:  # pragma: no cover
    from peftc.methods import Method

__all__ = [
    "METHOD_FLAGS",
    "TRAINABLE_TASKS",
    "TRAIN_PRESETS",
    "BASE_DTYPES",
    "DEVICES",
    "PRECISIONS",
    "TRAJECTORY_DEFAULTS",
    "TRAJECTORY_FIELDS",
    "MethodFlag",
    "TrainConfig",
    "infer_task",
    "method_config",
    "method_flags",
    "method_name",
    "resolve_data",
]

TRAINABLE_TASKS = TASK_NAMES

#: Method-config fields with a ``peftc train`` flag of their own (``--lora-alpha``); a flag given to a
#: method whose config lacks the field is an error. Every other field: ``--set FIELD=VALUE``.
METHOD_FLAGS = ("r", "lora_alpha", "lora_dropout", "target_modules", "num_virtual_tokens")

#: peftc train's presets for method-config fields, where they differ from HF PEFT's defaults (LoraConfig:
#: ``lora_alpha=8``, ``lora_dropout=0.0``). They fill a field of every method whose config has it (lora,
#: adalora, …) when no ``--config`` file is given and no flag or ``--set`` sets it: ``alpha = 2r`` trains
#: faster at the same learning rate, and a little dropout regularises the small data sets a run usually has.
#: A ``--config`` file is taken as written (what it leaves out is HF PEFT's default, as HF PEFT reads it).
TRAIN_PRESETS: dict[str, Any] = {"lora_alpha": 16, "lora_dropout": 0.05}

#: Options that decide the training trajectory: ``--resume`` refuses to continue a run with other values.
TRAJECTORY_FIELDS = (
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
    *METHOD_FLAGS,
    "options",
    "precision",
    "base_dtype",
    "world_size",
)

#: What a run saved before a trajectory field existed ran with (``--resume`` of an older run).
TRAJECTORY_DEFAULTS: dict[str, Any] = {"precision": "fp32", "base_dtype": "float32", "world_size": 1}

#: ``--device`` values besides ``cuda:N``.
DEVICES = ("auto", "cpu", "cuda")
#: ``--precision`` values: the autocast dtype of the frozen base (fp32: no autocast).
PRECISIONS = ("fp32", "bf16", "fp16")
#: ``--base-dtype`` values: the dtype the frozen base's weights are loaded in.
BASE_DTYPES = ("float32", "bfloat16", "float16")

#: Method-config fields that ``--set`` may not touch (peftc train decides them).
_NOT_SETTABLE = ("peft_type", "task_type", "inference_mode", "base_model_name_or_path")


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


def _method_field() -> Any:
    """A :class:`TrainConfig` field that sets the method-config field of the same name (help: the method's)."""
    return field(default=None, metadata={"method_field": True})


@dataclass
class TrainConfig:
    """Everything ``peftc train`` takes; each field is one CLI flag (``max_steps`` → ``--max-steps``).

    ``None`` means "the default for this model/method" (see each field's help). The method-config fields
    (:data:`METHOD_FLAGS`) are documented by the method configs: ``TrainConfig.field_help()`` shows them.
    """

    model: str = _help(f"Base model: a preset ({', '.join(PRESETS)}) or a local HF model directory.", default="minilm")
    task: str | None = _help(
        f"{', '.join(TRAINABLE_TASKS)}. Default: the preset's task; for a model directory, from the architectures "
        "in its config.json: a diffusers UNet2DConditionModel or Stable Diffusion pipeline directory -> text-to-image, "
        "*ForImageClassification -> image-cls, *ForSemanticSegmentation -> "
        "semantic-segmentation, Blip2ForConditionalGeneration -> image-to-text, *ForTokenClassification -> token-cls, "
        "an encoder-decoder's *ForConditionalGeneration "
        "(T5, BART) -> seq2seq, *CausalLM or *LMHeadModel -> causal-lm, "
        "anything else -> seq-cls.",
        default=None,
    )
    method: str | None = _help(
        "PEFT method, by its registered name (peftc.methods.cli_names()). Default: the method of the --config "
        "file, else lora.",
        default=None,
    )
    config_file: str | None = _help(
        "An HF PEFT adapter_config.json-style file with method options; method flags and --set override its "
        "fields, and it replaces peftc's training presets.",
        default=None,
    )
    data: str | None = _help(
        "Training data, JSON lines: {'text': ...} (causal-lm), {'text': ..., 'label': int|str} (seq-cls) or "
        "{'tokens': [...], 'labels': [...]} (token-cls), {'image': path, 'label': int|str} or a folder of one "
        "subfolder of images per class (image-cls), {'image': path, 'mask': path} (semantic-segmentation), "
        "{'image': path, 'prompt': ...} (text-to-image; image paths relative to the file). "
        f"Default: the data shipped for {' and '.join(f'--model {m} --task {t}' for m, t in DEFAULT_DATA)}.",
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
    r: int | None = _method_field()
    lora_alpha: float | None = _method_field()
    lora_dropout: float | None = _method_field()
    target_modules: list[str] | str | None = _method_field()
    num_virtual_tokens: int | None = _method_field()
    options: dict[str, Any] | None = _help(
        "Any other method-config field by its HF PEFT name, e.g. {'init_r': 12, 'adapter_len': 10}; "
        "overrides the config file (CLI: --set init_r=12, values parsed as JSON).",
        default=None,
    )
    save_every: int | None = _help("Write checkpoints/step-N every N optimizer steps.", default=None)
    resume: bool = _help(
        "Continue from the newest checkpoint in --out; with none yet, start the run there (afresh, if --out holds "
        "only an unfinished run of the same options): safe on a preemptible job's command line.",
        default=False,
    )
    force: bool = _help("Replace a non-empty --out (refused while it holds exports, export-*).", default=False)
    progress: bool = _help(
        "Show a progress bar (the eval metrics after each epoch are printed either way).", default=True
    )
    log_every: int = _help("Write the mean training loss to metrics.jsonl every N optimizer steps.", default=10)
    device: str = _help(
        "Where capture, data, adapter and optimizer live: auto (CUDA when available, else cpu), cpu, cuda or "
        "cuda:N. Under torchrun/accelerate, auto and cuda mean cuda:LOCAL_RANK. The saved adapter is on the CPU "
        "either way: a run trained on a GPU exports on a CPU-only machine.",
        default="auto",
    )
    precision: str = _help(
        "fp32, bf16 or fp16: the frozen base runs under torch.autocast in that dtype; the adapter weights and "
        "the optimizer state stay float32 (as HF PEFT's autocast_adapter_dtype) and the saved adapter is "
        "float32. fp16 scales the loss (torch.amp.GradScaler) and needs CUDA.",
        default="fp32",
    )
    base_dtype: str = _help(
        "float32, bfloat16 or float16: the dtype the frozen base's weights are loaded in (bfloat16: half the "
        "memory). A half dtype needs the matching --precision (bfloat16: bf16, float16: fp16).",
        default="float32",
    )
    gradient_checkpointing: bool = _help(
        "Recompute each transformer block's activations in the backward pass instead of keeping them (less "
        "memory, about one more forward of compute; the same gradients).",
        default=False,
    )
    compile: bool = _help(
        "Compile the captured training program with torch.compile (Inductor; needs a C++ compiler on CPU). "
        "The first steps are slow while it compiles; each new sequence-length pattern may recompile once.",
        default=False,
    )
    fsdp: bool = _help(
        "Shard the frozen base over the launcher's processes with FSDP2 (fully_shard per transformer block, then "
        "the rest): each process keeps 1/N of the base weights and gathers one block at a time. The adapter stays "
        "replicated and gets the same gradients and steps as without --fsdp. Needs torchrun/accelerate launch "
        "with 2 or more processes; not with --compile.",
        default=False,
    )
    report_to: str = _help(
        "Also send every metrics record to experiment trackers: a comma list of tensorboard, mlflow, wandb, "
        "or none (each tool's extra: pip install 'peftc[tensorboard]').",
        default="none",
    )

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
        for f in dataclasses.fields(self):  # nan/inf pass every range check below; no option means them
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
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
        if self.task is not None and self.task not in TRAINABLE_TASKS:
            raise ConfigError(f"task {self.task!r} cannot be trained; use {', '.join(TRAINABLE_TASKS)}")
        self._validate_scale()
        if self.method is not None:
            from peftc.methods import method_by_name

            method_by_name(self.method)  # an unknown name: ConfigError listing the known ones
        from peftc.reporting import check_installed, parse_report_to

        for spec in parse_report_to(self.report_to):  # before any model loads: one line, at once
            check_installed(spec)

    def _validate_scale(self) -> None:
        """``--device``, ``--precision``, ``--base-dtype``, ``--fsdp``: known values and combinations that can run."""
        import re

        if not (self.device in DEVICES or re.fullmatch(r"cuda:\d+", str(self.device))):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.base_dtype not in BASE_DTYPES:
            raise ConfigError(f"base_dtype must be one of {', '.join(BASE_DTYPES)}, got {self.base_dtype!r}")
        if self.fsdp and self.compile:
            raise ConfigError(
                "--fsdp does not combine with --compile (FSDP2's per-block gathers are hooks outside the compiled "
                "graph): drop one of them"
            )
        needs = {"bfloat16": "bf16", "float16": "fp16"}.get(self.base_dtype)
        if needs is not None and self.precision != needs:
            raise ConfigError(
                f"--base-dtype {self.base_dtype} needs --precision {needs} (the float32 adapter meets the "
                f"{self.base_dtype} base under autocast), got --precision {self.precision}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """Field name -> help text; a method-config field's is the method config's (:func:`method_flags`)."""
        flags = {flag.name: flag.help for flag in method_flags()}
        return {
            f.name: flags[f.name] if f.metadata.get("method_field") else f.metadata["help"]
            for f in dataclasses.fields(cls)
        }


@dataclass(frozen=True)
class MethodFlag:
    """A method-config field with a ``peftc train`` flag of its own, as the method configs declare it.

    Attributes:
        name: the field (``lora_alpha``); the flag is ``--lora-alpha``.
        help: the field's help text, from the first registered method config that has the field.
        hint: that field's type (``float``; ``list[str] | str | None``).
        default: that field's default (HF PEFT's).
        preset: peftc train's preset (:data:`TRAIN_PRESETS`), or ``None`` when it trains with ``default``.
        methods: the ``--method`` names whose config has the field.
    """

    name: str
    help: str
    hint: Any
    default: Any
    preset: Any
    methods: tuple[str, ...]

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def method_flags() -> list[MethodFlag]:
    """Each of :data:`METHOD_FLAGS` with the help, type and default of the method-config field it sets."""
    import typing

    from peftc.methods import methods

    out = []
    for name in METHOD_FLAGS:
        declared: tuple[dataclasses.Field, Any] | None = None
        names: list[str] = []
        for method in methods():
            found = {f.name: f for f in dataclasses.fields(method.config_class)}.get(name)
            if found is None:
                continue
            names.extend(method.cli_names)
            if declared is None:
                declared = (found, typing.get_type_hints(method.config_class)[name])
        if declared is None:  # pragma: no cover - a registry without LoRA or prompt methods
            continue
        f, hint = declared
        default = f.default if f.default is not dataclasses.MISSING else None
        out.append(MethodFlag(name, f.metadata.get("help", ""), hint, default, TRAIN_PRESETS.get(name), tuple(names)))
    return out


def infer_task(model: str) -> str:
    """The task of ``--model`` without ``--task`` (the rule :class:`TrainConfig`'s ``task`` help states)."""
    if model in PRESETS:
        return PRESETS[model][1]
    from peftc.diffusion import diffusion_task

    if diffusion_task(model):  # a diffusers UNet or pipeline directory
        return diffusion_task(model)
    try:
        cfg = json.loads((Path(model).expanduser() / "config.json").read_text())
        archs = cfg.get("architectures") or []
        encoder_decoder = cfg.get("is_encoder_decoder") is True
    except (OSError, ValueError, AttributeError):
        archs, encoder_decoder = [], False
    if not isinstance(archs, list):
        archs = []
    image = vision_task([a for a in archs if isinstance(a, str)])
    if image:
        return image
    if any(a.endswith("ForTokenClassification") for a in archs):
        return "token-cls"
    if encoder_decoder and any(a.endswith("ForConditionalGeneration") for a in archs):
        return "seq2seq"
    return "causal-lm" if any("CausalLM" in a or "LMHeadModel" in a for a in archs) else "seq-cls"


def resolve_data(cfg: TrainConfig, task: str) -> tuple[str, str | None]:
    """Absolute paths of the training and evaluation data (the shipped sets when ``--data`` is not given).

    Raises:
        DataError: no ``--data`` and no shipped set for this model and task.
    """
    if cfg.data is not None:
        return str(Path(cfg.data).expanduser().resolve()), (
            str(Path(cfg.eval_data).expanduser().resolve()) if cfg.eval_data else None
        )
    shipped = default_data(cfg.model, task)
    if shipped is None:
        raise DataError(
            f"no training data: pass --data FILE (JSON lines); built-in data exists only for "
            f"{', '.join(f'--model {m} --task {t}' for m, t in DEFAULT_DATA)}"
        )
    eval_path = str(Path(cfg.eval_data).expanduser().resolve()) if cfg.eval_data else str(shipped[1])
    return str(shipped[0]), eval_path


def method_config(cfg: TrainConfig, task: str) -> MethodConfig:
    """The method config of a run, from ``--config``, ``--method``, the presets, the flags and ``--set``.

    ``base_model_name_or_path`` is filled in once the model is loaded.

    Raises:
        ConfigError: an unknown method, a config file of another method, a flag or ``--set`` field the
            method's config does not have, or a value the config refuses.
    """
    from peftc.methods import cli_names, get_method, method_by_name

    data: dict[str, Any] = load_config(cfg.config_file).to_dict() if cfg.config_file else {}
    requested = cfg.method.lower() if cfg.method else None
    if requested:
        chosen = method_by_name(requested)
    else:
        chosen = get_method(data["peft_type"]) if data else method_by_name(cli_names()[0])
    peft_type = chosen.peft_type
    if data and data.get("peft_type") != peft_type:
        raise ConfigError(
            f"--config {cfg.config_file} holds peft_type={data.get('peft_type')!r} but --method is "
            f"{cfg.method!r}; pass the matching --method or another config file"
        )
    fields = {f.name for f in dataclasses.fields(chosen.config_class)}
    if requested:
        data.update(chosen.cli_names[requested])  # an explicit --method dora means use_dora=True, whatever the file
    if not cfg.config_file:
        data.update({k: v for k, v in TRAIN_PRESETS.items() if k in fields and k not in data})
    data["peft_type"] = peft_type
    for flag in METHOD_FLAGS:
        value = getattr(cfg, flag)
        if value is None:
            continue
        if flag not in fields:
            takers = next((f.methods for f in method_flags() if f.name == flag), ())
            raise ConfigError(
                f"--{flag.replace('_', '-')} does not apply to method {requested or peft_type!r}"
                + (f"; it applies to {', '.join(takers)}" if takers else "")
            )
        data[flag] = list(value) if isinstance(value, tuple) else value
    for name, value in (cfg.options or {}).items():
        if name not in fields or name in _NOT_SETTABLE:
            settable = sorted(f for f in fields if not f.startswith("_") and f not in ("peft_type", "task_type"))
            raise ConfigError(
                f"--set {name}: not a field of {peft_type} configs (or not settable); fields: {', '.join(settable)}"
            )
        data[name] = value
    data["task_type"] = TASK_TYPES[task]
    if task in VISION_TASKS and "target_modules" in fields and not data.get("target_modules"):
        data["target_modules"] = list(IMAGE_TARGETS)  # HF PEFT's image guides (its default table has no ViT)
    if task == "text-to-image" and "target_modules" in fields and not data.get("target_modules"):
        from peftc.diffusion import UNET_TARGETS

        data["target_modules"] = list(UNET_TARGETS)  # HF PEFT's Stable Diffusion recipe
    if task in HEAD_TASKS and "modules_to_save" in fields and not data.get("modules_to_save"):
        data["modules_to_save"] = head_modules(task)  # HF PEFT's convention for classification heads
    data["inference_mode"] = False
    return config_from_dict(data, source=cfg.config_file or "training options")


def method_name(config: MethodConfig, requested: str | None = None) -> str:
    """The ``--method`` name of ``config`` in the registry: the name whose presets ``config`` has, most specific first.

    ``requested`` (the name the user gave) wins among equally specific names (``llama-adapter`` and
    ``adaption-prompt``); a LoRA config with ``use_dora=True`` is ``dora`` whatever was requested.
    """
    from peftc.methods import get_method

    method: Method = get_method(config)
    matching = [
        (len(presets), name == requested, -i, name)
        for i, (name, presets) in enumerate(method.cli_names.items())
        if all(getattr(config, k, config.extra.get(k)) == v for k, v in presets.items())
    ]
    return max(matching)[3] if matching else next(iter(method.cli_names))
