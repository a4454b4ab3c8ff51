"""The ``peftc`` command line: a thin layer over the Python API.

Each command maps its options 1:1 onto an API call (``peftc.training.train``, ``peftc.exporting.export``,
``peftc.inspect.inspect_path``). Errors a user can cause are printed as one line on stderr with a
non-zero exit; the traceback only with ``--debug``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from peftc import __version__
from peftc.config import TASK_NAMES
from peftc.errors import PeftcError
from peftc.heap import freeze_for_exit

if TYPE_CHECKING:  # pragma: no cover
    from peftc.training.options import MethodFlag

__all__ = ["main"]

_EXIT_INTERNAL = 1  # an internal error is an error (exit 1); 2 is click's for usage errors


def _quiet_libraries() -> None:
    """transformers/torch.export/onnx print pages of warnings that are not the user's business."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name in ("torch", "torch.export", "torch.onnx", "torch._dynamo", "transformers", "onnxscript", "optimum"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - a dependency of peftc
        pass


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="peftc")
@click.option("--debug", is_flag=True, help="Show tracebacks and library warnings.")
@click.option("-v", "--verbose", is_flag=True, help="Log what each stage does.")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: bool) -> None:
    """peftc: capture a Hugging Face model, train PEFT adapters on the graph, export verified artifacts."""
    ctx.obj = {"debug": debug}
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING, format="%(message)s"
    )
    if not debug:
        _quiet_libraries()


class _TrainCommand(click.Command):
    """``peftc train``: its options are built on first use from :class:`~peftc.training.TrainConfig`'s fields and
    the method registry (importing the registry loads torch; ``peftc --help`` and the other commands stay fast).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._built = False

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if not self._built:
            self.params[:0] = _train_options()
            self._built = True
        return super().get_params(ctx)

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self.epilog = _train_epilog()
        super().format_epilog(ctx, formatter)


class _TrainOption(click.Option):
    """An option that passes ``None`` when not given (the API decides) but shows the API's default in ``--help``."""

    def __init__(self, *args: Any, shown_default: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.shown_default = shown_default

    def get_help_extra(self, ctx: click.Context) -> Any:
        extra = super().get_help_extra(ctx)
        if self.shown_default is not None:
            extra["default"] = self.shown_default
        return extra


#: TrainConfig fields whose flag is not ``--<field-name>``, or whose help on the command line differs.
_TRAIN_FLAG_NAMES = {"config_file": "--config", "options": "--set", "progress": "--no-progress"}
_TRAIN_CLI_HELP = {
    "options": "Any other method-config field by its HF PEFT name (repeatable; VALUE parsed as JSON, else a "
    "string), e.g. --set init_r=12 --set prefix_projection=true.",
    "progress": "No progress bar (the eval line after each epoch is still printed).",
}


def _train_options() -> list[click.Option]:
    """One option per TrainConfig field: help and default from the field (a method-config field's from the method)."""
    import dataclasses
    import typing

    from peftc.methods import cli_names
    from peftc.training import TrainConfig
    from peftc.training.options import BASE_DTYPES, PRECISIONS, TRAINABLE_TASKS, method_flags

    hints = typing.get_type_hints(TrainConfig)
    flags = {flag.name: flag for flag in method_flags()}
    names = cli_names()
    options = []
    for f in dataclasses.fields(TrainConfig):
        decl = [_TRAIN_FLAG_NAMES.get(f.name, "--" + f.name.replace("_", "-")), f.name]
        if f.name in flags:
            options.append(_method_flag_option(flags[f.name]))
            continue
        help_text = _TRAIN_CLI_HELP.get(f.name, f.metadata["help"])
        kwargs: dict[str, Any] = {"help": help_text}
        if f.default is not None and not isinstance(f.default, bool):
            kwargs["shown_default"] = str(f.default)
        if f.name == "progress":
            decl, kwargs = ["--no-progress", "no_progress"], {"is_flag": True, "help": help_text}
        elif hints[f.name] is bool:
            kwargs = {"is_flag": True, "help": help_text}
        elif f.name == "options":
            kwargs = {"metavar": "FIELD=VALUE", "multiple": True, "help": help_text}
        elif f.name == "task":
            kwargs.update(type=click.Choice(TRAINABLE_TASKS), metavar="TASK")
        elif f.name in ("precision", "base_dtype"):
            kwargs["type"] = click.Choice(PRECISIONS if f.name == "precision" else BASE_DTYPES)
        elif f.name == "device":
            kwargs.update(type=click.STRING, metavar="auto|cpu|cuda|cuda:N")
        elif f.name == "method":
            kwargs.update(type=click.Choice(names, case_sensitive=False), metavar="METHOD")
            kwargs["help"] = f"{help_text} One of: {', '.join(names)}."
        elif f.name == "config_file":
            kwargs["type"] = click.Path(dir_okay=False)
        elif f.name in ("data", "eval_data"):  # a JSON-lines file, or an image-cls folder of class subfolders
            kwargs["type"] = click.Path()
        elif f.name == "out":
            kwargs["type"] = click.Path(file_okay=False)
        else:
            kwargs["type"] = _click_type(hints[f.name])
        options.append(_TrainOption(decl, **kwargs))
    return options


def _method_flag_option(flag: MethodFlag) -> click.Option:
    """``--r``, ``--lora-alpha``…: help, type and default of the method-config field (``MethodFlag``)."""
    if flag.preset is not None:
        shown = f"{flag.preset}, a peftc training preset (HF PEFT: {flag.default})"
    else:
        shown = None if flag.default is None else str(flag.default)
    kwargs: dict[str, Any] = {"help": flag.help, "shown_default": shown}
    if _admits_list(flag.hint):  # target_modules: a list of names or one regex
        kwargs.update(
            metavar="NAMES|REGEX", callback=lambda ctx, param, value: _parse_targets(value) if value else None
        )
    else:
        kwargs["type"] = _click_type(flag.hint)
    return _TrainOption([flag.flag, flag.name], **kwargs)


def _click_type(hint: Any) -> click.ParamType:
    """The click type of a field's type hint (``int | None`` -> ``click.INT``)."""
    import types
    import typing

    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    args = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
    simple = {int: click.INT, float: click.FLOAT, str: click.STRING, bool: click.BOOL}
    if len(args) == 1 and args[0] in simple:
        return simple[args[0]]
    return click.STRING


def _admits_list(hint: Any) -> bool:
    import typing

    return any(typing.get_origin(a) is list for a in (typing.get_args(hint) or (hint,)))


def _train_epilog() -> str:
    from peftc.training.options import TRAIN_PRESETS, method_flags

    flags = method_flags()
    applies = "; ".join(f"{flag.flag}: {', '.join(flag.methods)}" for flag in flags)
    presets = ", ".join(f"{name}={value}" for name, value in TRAIN_PRESETS.items())
    hf = ", ".join(f"{flag.name}={flag.default}" for flag in flags if flag.name in TRAIN_PRESETS)
    return (
        f"Method flags set the method-config field of the same name and apply to the methods whose config has "
        f"it ({applies}); set any other field with --set FIELD=VALUE.\n\n"
        f"Training presets: without --config, peftc trains with {presets} wherever the method's config has these "
        f"fields; they differ from HF PEFT's defaults ({hf}). A --config file is taken as written; a method "
        f"flag or --set overrides both.\n\n"
        "Exit codes: 0 done; 1 error; 2 usage (a bad option or value); 75 stopped by SIGTERM after writing a "
        "checkpoint at the next step (rerun with --resume); 130 interrupted (Ctrl-C). Both 75 and 130 print the "
        "command that resumes the run."
    )


@cli.command(cls=_TrainCommand)
def train(**options: Any) -> None:
    """Fine-tune an adapter on the captured graph; writes adapter/ (HF PEFT format), metrics.jsonl, checkpoints/.

    With no options it fine-tunes the real pretrained MiniLM for sentiment classification on the
    embedded data set.
    """
    from peftc.errors import TrainingInterrupted, TrainingStopped
    from peftc.training import TrainConfig
    from peftc.training import train as run_train

    options["progress"] = not options.pop("no_progress")
    options["options"] = _parse_settings(options.pop("options")) or None
    cfg = TrainConfig(**{k: v for k, v in options.items() if v is not None})
    try:
        result = run_train(cfg)
    except KeyboardInterrupt:  # click would print only "aborted"
        raise TrainingInterrupted(_interrupted_message(Path(cfg.out).expanduser())) from None
    except TrainingStopped as e:  # SIGTERM: the checkpoint is written; say how to continue, exactly
        if e.step is None:
            raise TrainingStopped(
                f"SIGTERM during setup, before the first training step (nothing new written); rerun with: "
                f"{_resume_command()}",
                e.run_dir,
            ) from None
        raise TrainingStopped(
            f"SIGTERM at step {e.step}: wrote checkpoint {Path(cfg.out).expanduser() / 'checkpoints'}/step-{e.step}; "
            f"resume with: {_resume_command()}",
            e.run_dir,
            e.step,
        ) from None
    from peftc.reporting import process_rank

    if process_rank() != 0:  # torchrun: rank 0 speaks for the run
        return
    click.echo(f"run directory: {result.run_dir}")
    if result.metrics:
        click.echo("final eval: " + ", ".join(f"{k}={_fmt(v)}" for k, v in result.metrics.items()))


#: The command line ``main`` was called with (for the exact command ``peftc train`` suggests to resume).
_ARGV: list[str] = []


def _resume_command() -> str:
    """This command line with ``--resume`` (and without ``--force``, which would delete the checkpoints)."""
    import shlex

    args = [a for a in _ARGV if a != "--force"]
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join(["peftc", *args])


def _interrupted_message(run_dir: Path) -> str:
    """Ctrl-C during ``peftc train``: what the run directory holds now and how to continue."""
    from peftc.training.checkpoints import checkpoint_step, latest_checkpoint
    from peftc.training.rundir import unfinished_leftovers

    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        return (
            f"{run_dir} holds checkpoints up to step {checkpoint_step(ckpt)} ({ckpt.relative_to(run_dir)}); "
            f"resume with: {_resume_command()}"
        )
    if unfinished_leftovers(run_dir):
        return (
            f"{run_dir} holds no checkpoint yet (--save-every N writes them); rerunning with --resume starts "
            f"afresh: {_resume_command()}"
        )
    return f"before the first training step; nothing was written to {run_dir}"


def _parse_settings(items: tuple[str, ...]) -> dict[str, Any]:
    """``("init_r=12", "prefix_projection=true")`` -> ``{"init_r": 12, "prefix_projection": True}``."""
    from peftc.errors import ConfigError

    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set init_r=12")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text  # a bare string: --set init_text=Classify the review
        out[name.strip()] = value
    return out


def _parse_targets(text: str) -> list[str] | str:
    """``a,b`` is a list of names; anything with regex characters is a full regex."""
    if any(c in text for c in "*()[]|^$\\?+"):
        return text
    return [t.strip() for t in text.split(",") if t.strip()]


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class _FormatChoice(click.Choice):
    """``--format`` values: the exporter registry's formats, read when first needed (the exporters import torch)."""

    def __init__(self) -> None:
        super().__init__(())

    @property  # type: ignore[override]
    def choices(self) -> tuple[str, ...]:
        from peftc.exporters import formats

        return tuple(formats())

    @choices.setter
    def choices(self, value: Any) -> None:  # click.Choice.__init__ assigns; the registry is the source
        pass


class _FormatOption(click.Option):
    """``--format``: the help lists each registered exporter's summary."""

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        from peftc.exporters import exporters

        self.help = "Artifact: " + "; ".join(f"{e.name}: {e.summary}" for e in exporters()) + "."
        return super().get_help_record(ctx)


@cli.command()
@click.argument("srcs", metavar="SRC [SRC2 ...]", nargs=-1, type=click.Path())
@click.option(
    "--format",
    "fmt",
    cls=_FormatOption,
    default="onnx",
    show_default=True,
    type=_FormatChoice(),
    help="Artifact format (an exporter of peftc.exporters).",
)
@click.option("--merge", is_flag=True, help="Fold the adapter into the base weights (graph = base graph, op for op).")
@click.option(
    "--adapters-as-inputs",
    is_flag=True,
    help="Swappable: LoRA tensors become graph inputs (default: the base); each SRC is written as "
    "adapters/<name>.onnx_adapter for RunOptions.add_active_adapter (executorch: one model.pte, the base "
    "weights in model.ptd, adapters/<name>.ptd each). SRCs share the base and targets.",
)
@click.option(
    "--mixed-batch",
    is_flag=True,
    help="Many adapters in one batch (ONNX; LoRA or IA3): every SRC's tensors stacked in one model.onnx with an "
    "input adapter_index int64[batch] (-1: the base model, i: the i-th SRC), so each row gets its own adapter.",
)
@click.option("--model", help="Base model directory (default: from the run, or the adapter's base_model_name_or_path).")
@click.option(
    "--task",
    type=click.Choice(TASK_NAMES),
    help="Task, when neither the adapter config's task_type nor the base's architecture says it.",
)
@click.option("--out", type=click.Path(file_okay=False), help="Artifact directory (default: SRC/export-FORMAT).")
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
@click.option("--opset", default=18, show_default=True, type=int, help="ONNX opset.")
@click.option(
    "--atol", type=float, help="Verification tolerance (max abs diff of logits); default 1e-4, or 2e-2 with float16."
)
@click.option(
    "--rtol",
    type=float,
    help="Verification tolerance relative to each output's largest magnitude, added to --atol; default 0, "
    "or 1e-2 with float16.",
)
@click.option(
    "--dtype",
    default="float32",
    show_default=True,
    type=click.Choice(["float32", "float16"]),
    help="Weights and activations of the artifact; float16 loads the base in float16, verified in float16.",
)
@click.option(
    "--with-past/--no-past",
    "with_past",
    default=None,
    help="Causal LMs: a KV-cache graph (past_key_values.* in, present.* out; optimum's layout); seq2seq LMs: "
    "KV-cache decoders (decoder_with_past_model.onnx beside decoder_model.onnx) — the default for both with "
    "ONNX — or plain graphs. executorch: the LLM-runner layout (tokens + input_pos in, the cache inside the "
    "program), only when asked.",
)
@click.option(
    "--quantize",
    type=click.Choice(["int4", "int8"]),
    help="ONNX: quantize the verified float32 weights with ONNX Runtime's tools — int4: MatMulNBits "
    "(block-wise, asymmetric), int8: dynamic (per-channel weights, int8 activations); measured against the "
    "float program (top-1 agreement, KL) in report.json. The base and a merged or kept adapter are quantized; "
    "with --adapters-as-inputs the adapters stay float. ExecuTorch: torchao's PT2E flow with XNNPACKQuantizer "
    "before lowering (per-channel int8 or int4 weights, dynamic int8 activations; no --adapters-as-inputs).",
)
@click.option("--quantize-block-size", type=int, help="int4 block length (power of two >= 16; default 32).")
@click.option(
    "--quantize-min-top1",
    type=float,
    help="Quality gate: min top-1 agreement with float (default 0.9).",
)
@click.option(
    "--quantize-max-kl",
    type=float,
    help="Quality gate: max mean KL(float||quantized), nats (default 0.05).",
)
def export(
    srcs: tuple[str, ...],
    fmt: str,
    merge: bool,
    adapters_as_inputs: bool,
    mixed_batch: bool,
    with_past: bool | None,
    model: str | None,
    task: str | None,
    out: str | None,
    force: bool,
    opset: int,
    atol: float | None,
    rtol: float | None,
    dtype: str,
    quantize: str | None,
    quantize_block_size: int | None,
    quantize_min_top1: float | None,
    quantize_max_kl: float | None,
) -> None:
    """Export a run dir or an HF PEFT adapter dir (default: peftc-run) to a verified artifact directory.

    With --adapters-as-inputs or --mixed-batch, several SRCs made for the same base share one model.onnx.
    """
    from peftc.errors import ConfigError
    from peftc.exporters.verify import Tolerance
    from peftc.exporting import export as run_export

    if merge and adapters_as_inputs:
        raise ConfigError(
            "--merge and --adapters-as-inputs exclude each other: merge folds one adapter into the weights, "
            "adapters-as-inputs keeps them swappable; choose one"
        )
    several = adapters_as_inputs or mixed_batch
    if len(srcs) > 1 and not several:
        raise ConfigError(
            f"{len(srcs)} sources given; exporting several adapters over one base needs --adapters-as-inputs "
            "or --mixed-batch"
        )
    src: str | list[str] = (list(srcs) if several else srcs[0]) if srcs else "peftc-run"
    path = run_export(
        src,
        format=fmt,
        merge=merge,
        model=model,
        out=out,
        force=force,
        task=task,
        opset=opset,
        atol=atol,
        rtol=rtol,
        adapters_as_inputs=adapters_as_inputs,
        with_past=with_past,
        dtype=dtype,
        quantize=quantize,
        quantize_block_size=quantize_block_size,
        quantize_min_top1=quantize_min_top1,
        quantize_max_kl=quantize_max_kl,
        mixed_batch=mixed_batch,
    )
    report_path = os.path.join(path, "report.json")
    if os.path.isfile(report_path):
        with open(report_path) as f:
            report = json.load(f)
        bound = Tolerance(report.get("atol", atol), report.get("rtol", 0.0))
        click.echo(f"verified: max abs diff {_fmt(report.get('max_abs_diff'))} ({bound})")
        q = report.get("quantization")
        if q:
            click.echo(
                f"{q['scheme']}: {q['size_bytes'] / 1e6:.1f} MB ({q['size_ratio']:.2f}x float), top-1 agreement "
                f"{_fmt(q['top1_agreement'])}, mean KL {_fmt(q['mean_kl'])}, max abs diff {_fmt(q['max_abs_diff'])}"
            )
    click.echo(f"artifact directory: {path}")


@cli.command()
@click.argument("paths", metavar="PATH [B]", nargs=-1, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--plan", is_flag=True, help="For a model dir or preset: list the sites a method would adapt, changing nothing."
)
@click.option(
    "--method",
    help="Method to --plan: lora, adalora, ia3, prompt-tuning, p-tuning, prefix-tuning, adaption-prompt "
    "(LLaMA-Adapter): any peftc train --method name (default lora).",
)
@click.option(
    "--task",
    type=click.Choice(["causal-lm", "seq-cls", "token-cls", "image-cls", "semantic-segmentation", "text-to-image"]),
    help="Task for a model dir or preset (default: from its architecture; a diffusers UNet dir: text-to-image).",
)
@click.option("--model", help="Base model of an adapter dir for --graph/--diff (default: base_model_name_or_path).")
@click.option("--target-modules", help="Targets for --plan (default: the method's HF PEFT table).")
@click.option("--r", type=int, help="Rank for --plan of a LoRA-family method (a shortcut for --set r=N; default 8).")
@click.option(
    "--set",
    "settings",
    metavar="FIELD=VALUE",
    multiple=True,
    help="With --plan: any method-config field by its HF PEFT name, as in peftc train (repeatable; VALUE parsed "
    "as JSON, else a string), e.g. --set init_r=4 --set adapter_layers=1.",
)
@click.option(
    "--graph",
    "graph_out",
    metavar="FILE",
    help="Draw the graph at block level, adapter sites marked, to FILE: .svg (drawn by peftc, nothing to install), "
    ".dot/.gv (DOT text), or .png/.pdf with Graphviz's dot (without it, FILE's .dot is written instead, and "
    "replaced by the next such run).",
)
@click.option("--depth", type=int, help="With --graph: group ops by the first N module-name parts, not per block.")
@click.option(
    "--collapse",
    type=int,
    default=3,
    show_default=True,
    help="With --graph FILE.svg: draw runs of at least N identical layers once, as a ×N frame (0: every layer).",
)
@click.option(
    "--plot",
    "plot_out",
    metavar="FILE",
    help="For a run dir: draw its training and eval curves (metrics.jsonl) to FILE, .png or .svg "
    "(pip install 'peftc[plot]').",
)
@click.option(
    "--diff",
    is_flag=True,
    help="Compare two graphs, PATH and B (run, adapter, artifact dir, .onnx, model dir): ops by kind, "
    "parameters, inputs, outputs. With --plan, a model B gets the plan's sites.",
)
@click.option("--force", is_flag=True, help="With --graph: replace an existing FILE.")
def inspect(
    paths: tuple[str, ...],
    as_json: bool,
    plan: bool,
    method: str | None,
    task: str | None,
    model: str | None,
    target_modules: str | None,
    r: int | None,
    settings: tuple[str, ...],
    graph_out: str | None,
    depth: int | None,
    collapse: int,
    plot_out: str | None,
    diff: bool,
    force: bool,
) -> None:
    """Show a run dir, an artifact dir, an .onnx file, or (with --plan) the sites a method would adapt in a model.

    With --graph FILE, also draw it; with --diff A B, tell what changed from A to B.
    """
    from peftc.errors import ConfigError
    from peftc.inspect import describe, inspect_path, plan_model, render

    targets = _parse_targets(target_modules) if target_modules else None
    options = _parse_settings(settings)
    plan_options = {"method": method, "target_modules": targets, "r": r, "options": options} if plan else None
    if not plan:
        given = [f for f, v in (("--method", method), ("--target-modules", targets), ("--r", r)) if v is not None]
        if given or settings:
            given += ["--set"] if settings else []
            raise ConfigError(f"{', '.join(given)} configure a plan: add --plan, or leave them out")
    if depth is not None and (graph_out is None or depth < 1):
        raise ConfigError(f"--depth {depth}: needs --graph and a value of at least 1")
    if collapse < 0:
        raise ConfigError(f"--collapse {collapse}: use 0 (draw every layer) or a run length of at least 2")
    if plot_out is not None and (diff or plan or len(paths) != 1):
        raise ConfigError("--plot draws one run's curves: give one run dir, without --diff or --plan")
    if diff:
        if len(paths) != 2:
            raise ConfigError(f"--diff compares two graphs: pass A and B (got {len(paths)} path(s): {' '.join(paths)})")
        if graph_out is not None:
            raise ConfigError("--diff and --graph exclude each other: draw each graph on its own")
        from peftc.inspect import diff as run_diff
        from peftc.inspect import render_diff

        result = run_diff(paths[0], paths[1], task=task, plan=plan_options, model=model)
        click.echo(json.dumps(result, indent=2, default=str) if as_json else render_diff(result))
        return
    if len(paths) != 1:
        raise ConfigError(
            f"inspect takes one PATH (two with --diff), got {len(paths)}" + (f": {' '.join(paths)}" if paths else "")
        )
    path = paths[0]
    plotted = None
    if plot_out is not None:
        from peftc.plot import plot_curves

        plotted = plot_curves(path, plot_out, force=force)
    if graph_out is None:
        if plan:
            info = plan_model(path, task=task, target_modules=targets, r=r, method=method or "lora", options=options)
        else:
            info = inspect_path(path)
        if plotted is not None:
            info["plot"] = str(plotted)
        click.echo(json.dumps(info, indent=2, default=str) if as_json else render(info))
        if plotted is not None and not as_json:
            click.echo(f"curves: {plotted}")
        return
    from peftc.inspect.graph import block_graph, check_target, write_graph

    check_target(graph_out, force)
    info, graph = describe(path, task=task, plan=plan_options, model=model)
    blocks = block_graph(info, graph, depth)
    outcome = write_graph(blocks, graph_out, force, collapse=collapse)
    info["graph"] = {
        "path": str(outcome.path),
        "rendered": outcome.rendered,
        "blocks": sum(b.kind == "block" for b in blocks.blocks.values()),
        "adapter_sites": blocks.adapter_sites,
    }
    click.echo(json.dumps(info, indent=2, default=str) if as_json else render(info) + "\n" + outcome.message)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning peftc errors into one line and an exit code (raised as ``SystemExit``).

    Without ``argv`` this is the ``peftc`` command, whose process exits next: the heap is frozen for
    that (:func:`peftc.heap.freeze_for_exit`, 1.2–1.5 s of collections saved after an export).
    """
    try:
        _run(argv)
    finally:
        if argv is None:
            freeze_for_exit()


def _run(argv: list[str] | None) -> None:
    args = list(argv if argv is not None else sys.argv[1:])
    debug = "--debug" in args
    _ARGV[:] = args
    try:
        cli.main(args=argv, prog_name="peftc", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except PeftcError as e:
        if debug:
            raise
        message = str(e).replace("\r", "\\r").replace("\n", "\\n")  # one line, whatever a value held
        click.echo(f"{e.label}: {message}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:
        if debug:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        click.echo(f"internal error: {type(e).__name__}: {first} (rerun with --debug for the traceback)", err=True)
        sys.exit(_EXIT_INTERNAL)
    sys.exit(0)


if __name__ == "__main__":  # pragma: no cover
    main()
