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
from typing import Any

import click

from peftc import __version__
from peftc.errors import PeftcError

__all__ = ["main"]

_EXIT_INTERNAL = 2


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


@cli.command()
@click.option(
    "--model", default="minilm", show_default=True, help="Local HF model directory or preset (minilm, tiny-gpt2)."
)
@click.option(
    "--task",
    type=click.Choice(["causal-lm", "seq-cls", "token-cls"]),
    help="Task; default: the preset's task, else seq-cls.",
)
@click.option(
    "--method",
    help="PEFT method: lora, adalora, ia3, prompt-tuning, p-tuning, prefix-tuning, adaption-prompt "
    "(LLaMA-Adapter) (default: the --config file's method, else lora).",
)
@click.option(
    "--config", "config_file", type=click.Path(dir_okay=False), help="HF PEFT config JSON; flags override it."
)
@click.option(
    "--data", type=click.Path(dir_okay=False), help="Training data (JSON lines); default: the preset's embedded set."
)
@click.option("--eval-data", type=click.Path(dir_okay=False), help="Evaluation data (JSON lines).")
@click.option("--out", default="peftc-run", show_default=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--epochs", type=int, help="Training epochs.")
@click.option("--max-steps", type=int, help="Stop after this many optimizer steps.")
@click.option("--lr", type=float, help="Peak learning rate (AdamW).")
@click.option("--batch-size", type=int, help="Examples per micro-batch.")
@click.option("--grad-accum", type=int, help="Micro-batches per optimizer step.")
@click.option("--warmup-ratio", type=float, help="Fraction of steps with linear warm-up.")
@click.option("--max-grad-norm", type=float, help="Gradient clipping norm.")
@click.option("--weight-decay", type=float, help="AdamW weight decay.")
@click.option("--seed", type=int, help="Random seed.")
@click.option("--max-length", type=int, help="Truncate examples to this many tokens.")
@click.option("--r", type=int, help="LoRA rank.")
@click.option("--lora-alpha", type=float, help="LoRA alpha (scale = alpha / r).")
@click.option("--lora-dropout", type=float, help="Dropout on the LoRA branch.")
@click.option("--target-modules", help="Comma-separated module names, or a regex; default: HF PEFT's table.")
@click.option("--num-virtual-tokens", type=int, help="Virtual tokens (prompt tuning, P-tuning, prefix tuning).")
@click.option(
    "--set",
    "options",
    metavar="FIELD=VALUE",
    multiple=True,
    help="Any method-config field by its HF PEFT name (repeatable; VALUE parsed as JSON, else a string), "
    "e.g. --set init_r=12 --set prefix_projection=true.",
)
@click.option("--save-every", type=int, help="Checkpoint every N optimizer steps.")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in --out.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def train(**options: Any) -> None:
    """Fine-tune an adapter on the captured graph; writes adapter/ (HF PEFT format), metrics.jsonl, checkpoints/.

    With no options it fine-tunes the real pretrained MiniLM for sentiment classification on the
    embedded data set.
    """
    from peftc.training import TrainConfig
    from peftc.training import train as run_train

    options["progress"] = not options.pop("no_progress")
    targets = options.pop("target_modules")
    if targets is not None:
        options["target_modules"] = _parse_targets(targets)
    options["options"] = _parse_settings(options.pop("options")) or None
    cfg = TrainConfig(**{k: v for k, v in options.items() if v is not None})
    result = run_train(cfg)
    click.echo(f"run directory: {result.run_dir}")
    metrics = getattr(result, "metrics", None) or {}
    if metrics:
        click.echo("final eval: " + ", ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()))


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
    "adapters/<name>.onnx_adapter for RunOptions.add_active_adapter. SRCs share the base and targets.",
)
@click.option("--model", help="Base model directory (default: from the run, or the adapter's base_model_name_or_path).")
@click.option(
    "--task",
    type=click.Choice(["causal-lm", "seq-cls", "token-cls", "seq2seq"]),
    help="Task, when the adapter config has no task_type.",
)
@click.option("--out", type=click.Path(file_okay=False), help="Artifact directory (default: SRC/export-FORMAT).")
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
@click.option("--opset", default=18, show_default=True, type=int, help="ONNX opset.")
@click.option(
    "--atol", type=float, help="Verification tolerance (max abs diff of logits); default 1e-4, or 2e-2 with float16."
)
@click.option(
    "--dtype",
    default="float32",
    show_default=True,
    type=click.Choice(["float32", "float16"]),
    help="Weights and activations of the artifact; float16 is verified against the float32 torch program.",
)
@click.option(
    "--with-past/--no-past",
    "with_past",
    default=None,
    help="Causal LMs: a KV-cache graph (past_key_values.* in, present.* out; optimum's layout) — the default "
    "for causal-lm — or a plain graph.",
)
def export(
    srcs: tuple[str, ...],
    fmt: str,
    merge: bool,
    adapters_as_inputs: bool,
    with_past: bool | None,
    model: str | None,
    task: str | None,
    out: str | None,
    force: bool,
    opset: int,
    atol: float | None,
    dtype: str,
) -> None:
    """Export a run dir or an HF PEFT adapter dir (default: peftc-run) to a verified artifact directory.

    With --adapters-as-inputs, several SRCs made for the same base share one model.onnx.
    """
    from peftc.errors import ConfigError
    from peftc.exporting import export as run_export

    if merge and adapters_as_inputs:
        raise ConfigError(
            "--merge and --adapters-as-inputs exclude each other: merge folds one adapter into the weights, "
            "adapters-as-inputs keeps them swappable; choose one"
        )
    if len(srcs) > 1 and not adapters_as_inputs:
        raise ConfigError(
            f"{len(srcs)} sources given; exporting several adapters over one base needs --adapters-as-inputs"
        )
    src: str | list[str] = (list(srcs) if adapters_as_inputs else srcs[0]) if srcs else "peftc-run"
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
        adapters_as_inputs=adapters_as_inputs,
        with_past=with_past,
        dtype=dtype,
    )
    report_path = os.path.join(path, "report.json")
    if os.path.isfile(report_path):
        with open(report_path) as f:
            report = json.load(f)
        click.echo(f"verified: max abs diff {_fmt(report.get('max_abs_diff'))} (atol {_fmt(report.get('atol', atol))})")
    click.echo(f"artifact directory: {path}")


@cli.command()
@click.argument("paths", metavar="PATH [B]", nargs=-1, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--plan", is_flag=True, help="For a model dir or preset: list the sites a method would adapt, changing nothing."
)
@click.option("--task", type=click.Choice(["causal-lm", "seq-cls"]), help="Task for a model dir or preset.")
@click.option("--model", help="Base model of an adapter dir for --graph/--diff (default: base_model_name_or_path).")
@click.option("--target-modules", help="Targets for --plan (default: HF PEFT's table).")
@click.option("--r", type=int, default=8, show_default=True, help="Rank for --plan.")
@click.option(
    "--graph",
    "graph_out",
    metavar="FILE",
    help="Draw the graph at block level, adapter sites marked, to FILE: .dot/.gv (DOT text), or .svg/.png/.pdf "
    "with Graphviz's dot (without it, FILE's .dot is written instead).",
)
@click.option("--depth", type=int, help="With --graph: group ops by the first N module-name parts, not per block.")
@click.option(
    "--diff",
    is_flag=True,
    help="Compare two graphs, PATH and B (run, adapter, artifact dir, .onnx, model dir): ops by kind, "
    "parameters, inputs, outputs. With --plan, a model B gets the plan's LoRA sites.",
)
@click.option("--force", is_flag=True, help="With --graph: replace an existing FILE.")
def inspect(
    paths: tuple[str, ...],
    as_json: bool,
    plan: bool,
    task: str | None,
    model: str | None,
    target_modules: str | None,
    r: int,
    graph_out: str | None,
    depth: int | None,
    diff: bool,
    force: bool,
) -> None:
    """Show a run dir, an artifact dir, an .onnx file, or (with --plan) a model's adapter sites.

    With --graph FILE, also draw it; with --diff A B, tell what changed from A to B.
    """
    from peftc.errors import ConfigError
    from peftc.inspect import describe, inspect_path, plan_model, render

    targets = _parse_targets(target_modules) if target_modules else None
    plan_options = {"target_modules": targets, "r": r} if plan else None
    if depth is not None and (graph_out is None or depth < 1):
        raise ConfigError(f"--depth {depth}: needs --graph and a value of at least 1")
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
    if graph_out is None:
        info = plan_model(path, task=task, target_modules=targets, r=r) if plan else inspect_path(path)
        click.echo(json.dumps(info, indent=2, default=str) if as_json else render(info))
        return
    from peftc.graph import check_target, write_graph
    from peftc.inspect import block_graph

    check_target(graph_out, force)
    info, graph = describe(path, task=task, plan=plan_options, model=model)
    blocks = block_graph(info, graph, depth)
    outcome = write_graph(blocks, graph_out, force)
    info["graph"] = {
        "path": str(outcome.path),
        "rendered": outcome.rendered,
        "blocks": sum(b.kind == "block" for b in blocks.blocks.values()),
        "adapter_sites": blocks.adapter_sites,
    }
    click.echo(json.dumps(info, indent=2, default=str) if as_json else render(info) + "\n" + outcome.message)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning peftc errors into one line and an exit code."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
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
        click.echo(f"error: {e}", err=True)
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
