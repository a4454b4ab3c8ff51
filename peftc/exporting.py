"""``peftc export``: a trained adapter to a verified deployable artifact directory.

The stage, in order (each boundary is checked numerically):

1. resolve SRC — a peftc run directory or an adapter directory saved by HF PEFT — to the
   adapter, the base model and the task (:func:`peftc.runs.resolve_source`);
2. load the base and capture it in eval mode; bind the saved adapter into the program;
3. keep the unmerged adapted program's logits on held-out inputs as the reference;
4. with ``merge``: fold the adapter into the weights and check merged vs unmerged torch;
5. export, then run the file with ONNX Runtime and compare with the reference
   (:mod:`peftc.exporters.verify`);
6. write the model config (with the label map for seq-cls), the tokenizer, a copy of the adapter,
   ``report.json`` and ``manifest.json``.

Everything is written inside :func:`peftc.files.atomic_dir`: a failed verification (exit code 3)
or any other error leaves no artifact directory behind, and a non-empty output is replaced only
with ``force``.
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peftc.adapters import CONFIG_FILE, WEIGHTS_FILE, AdapterState
from peftc.errors import AdapterMismatchError, ConfigError, OutputExistsError
from peftc.files import atomic_dir, check_output_dir
from peftc.tasks import HEAD_TASKS

__all__ = ["ADAPTER_SUBDIR", "ADAPTERS_SUBDIR", "SUPPORTED_FORMATS", "export", "export_swappable", "default_out"]

logger = logging.getLogger(__name__)

SUPPORTED_FORMATS = ("onnx", "torchscript", "aoti")
#: The model file of each format; ``torchscript`` and ``aoti`` load in LibTorch (C++, see examples/cpp).
MODEL_FILES = {"onnx": "model.onnx", "torchscript": "model.pt", "aoti": "model.pt2"}
#: Weight/activation dtypes an artifact can have, and the default verification tolerance of each.
#: fp16 is compared with the fp32 torch program: its 11-bit mantissa rounds every weight and
#: activation by up to 2^-11 relative, so logits move by ~1e-3 on small models and more on deep
#: ones (measured in the README); 2e-2 still catches a wrong mask or a lost adapter (≥ 1e-1).
DTYPES = {"float32": 1e-4, "float16": 2e-2}
#: Where the artifact keeps a byte-for-byte copy of the adapter it was built from.
ADAPTER_SUBDIR = "adapter"
#: Where a swappable artifact keeps ``<name>.onnx_adapter`` and a copy of each source adapter (``<name>/``).
ADAPTERS_SUBDIR = "adapters"
_HEAD_SUFFIXES = (".classifier.weight", ".score.weight", ".classifier.out_proj.weight")


def default_out(src: str | Path, format: str = "onnx") -> Path:
    """``SRC/export-<format>``: where an export goes without ``out``."""
    return Path(src) / f"export-{format}"


def export(
    src: str | Path | Sequence[str | Path] = "peftc-run",
    format: str = "onnx",
    merge: bool = False,
    model: str | Path | None = None,
    out: str | Path | None = None,
    force: bool = False,
    task: str | None = None,
    opset: int = 18,
    atol: float | None = None,
    external_data: bool | None = None,
    adapters_as_inputs: bool = False,
    with_past: bool | None = None,
    dtype: str = "float32",
) -> Path:
    """Export the adapted model of SRC to a verified artifact directory.

    Args:
        src: a peftc run directory, or an adapter directory saved by HF PEFT
            (``adapter_config.json`` + ``adapter_model.safetensors``).
        format: ``onnx`` (ONNX Runtime), ``torchscript`` (``model.pt`` for ``torch::jit::load``) or ``aoti``
            (``model.pt2``, an AOTInductor package of compiled kernels for ``AOTIModelPackageLoader``; needs a
            C++ compiler and takes a minute or more to compile). TorchScript and AOTInductor take one float32
            graph: no ``adapters_as_inputs``, no ``dtype`` float16, no seq2seq, and ``with_past`` only when asked.
        merge: fold the adapter into the base weights (the graph is then the base graph op for
            op); without it the adapter stays as ops in the graph.
        model: the base model directory or preset; overrides what SRC records (required for an
            HF PEFT adapter whose ``base_model_name_or_path`` is not a local directory).
        out: the artifact directory; default ``SRC/export-<format>``.
        force: replace a non-empty ``out``.
        task: ``causal-lm``, ``seq-cls``, ``token-cls`` or ``seq2seq`` (two graphs,
            ``encoder_model.onnx`` + ``decoder_model.onnx``: :func:`peftc.seq2seq.export_seq2seq`);
            overrides what SRC records.
        opset: ONNX opset (18 or later).
        atol: absolute tolerance on logits for every verification; ``None``: 1e-4 for float32,
            2e-2 for float16 (:data:`DTYPES`).
        external_data: weights in ``model.onnx.data`` (``True``), inline (``False``), or by size
            (``None``: external above ~1.8 GB).
        adapters_as_inputs: swappable export: ``src`` may be a list of sources made for the same
            base and target modules; one ``model.onnx`` takes the LoRA tensors as inputs (rank-0
            defaults: the base model) and each source becomes ``adapters/<name>.onnx_adapter``
            (see :func:`export_swappable`). Excludes ``merge``.
        with_past: causal LMs only: a KV-cache graph (inputs ``past_key_values.{i}.key|value``,
            outputs ``present.{i}.key|value``, the layout optimum's ``ORTModelForCausalLM``
            generates with; see :mod:`peftc.kv`). ``None`` (default): on for causal-lm, as in optimum.
        dtype: ``float32`` or ``float16`` (weights, activations and float inputs/outputs in half
            precision; verified against the float32 torch program with the float16 ``atol``).

    Returns:
        The artifact directory: ``model.onnx`` (+ ``model.onnx.data``), ``config.json``, tokenizer
        files, ``adapter/``, ``report.json``, ``manifest.json``.

    Raises:
        ConfigError: an unsupported format, opset or tolerance, or ``merge`` with a method that
            cannot be merged.
        OutputExistsError: ``out`` is not empty and ``force`` is not set.
        AdapterFormatError, ModelLoadError, AdapterMismatchError: SRC or the base cannot be used.
        ExportVerificationError: the merged program or the exported file does not reproduce the
            unmerged adapted program within ``atol`` (exit code 3); nothing is written.
    """
    from peftc.exporters.manifest import MANIFEST_FILE, REPORT_FILE, adapter_info, build_manifest, onnx_io, write_json
    from peftc.exporters.onnx import export_program_onnx
    from peftc.exporters.verify import compare_outputs, make_cases, run_torch, verify_onnx
    from peftc.methods import get_method
    from peftc.models import load_model
    from peftc.passes import merge_pipeline
    from peftc.runs import resolve_source

    atol = check_options(format, opset, atol, dtype)
    if format != "onnx":
        _check_libtorch_options(format, adapters_as_inputs, dtype, _is_seq2seq(src, model, task), with_past)
    if dtype != "float32" and (adapters_as_inputs or _is_seq2seq(src, model, task)):
        raise ConfigError(
            f"--dtype {dtype} is supported for single-graph exports without --adapters-as-inputs; "
            "export this one in float32"
        )
    if _is_seq2seq(src, model, task):  # two graphs (encoder, decoder): peftc.seq2seq
        from peftc.seq2seq import export_seq2seq

        return export_seq2seq(
            src if isinstance(src, (str, Path)) else next(iter(src)), merge=merge, model=model, out=out, force=force,
            opset=opset, atol=atol, external_data=external_data, adapters_as_inputs=adapters_as_inputs,
            with_past=with_past,
        )  # fmt: skip
    if adapters_as_inputs:
        if merge:
            raise ConfigError(
                "--merge and --adapters-as-inputs exclude each other: merge folds one adapter into the weights, "
                "adapters-as-inputs keeps them swappable; choose one"
            )
        return export_swappable(
            src, format=format, model=model, out=out, force=force, task=task, opset=opset, atol=atol,
            external_data=external_data, with_past=with_past,
        )  # fmt: skip
    if not isinstance(src, (str, Path)):
        srcs = list(src)
        if len(srcs) != 1:
            raise ConfigError(
                f"{len(srcs)} sources given; exporting several adapters over one base needs --adapters-as-inputs"
            )
        src = srcs[0]
    out = Path(out) if out is not None else default_out(src, format)
    check_output_dir(out, force)  # fail before minutes of work, not after

    timings: dict[str, float] = {}
    tick = time.perf_counter()
    source = resolve_source(src, model, task)
    refuse_out_over_inputs(out, [Path(src), Path(source.adapter_dir), Path(source.base)])
    state = AdapterState.load(source.adapter_dir)
    method = get_method(state)
    if merge and method.merge_refusal:
        raise ConfigError(
            f"--merge cannot fold {method.label} adapters into the weights ({method.merge_refusal}); "
            "export without --merge"
        )
    # TorchScript / AOTInductor: a KV-cache graph only when asked (the C++ example feeds no cache)
    past = _with_past(with_past if format == "onnx" else bool(with_past), source.task)
    num_labels = _head_classes(state) if source.task in HEAD_TASKS and not source.id2label else None
    loaded = load_model(source.base, source.task, num_labels=num_labels, id2label=source.id2label)
    timings["load_s"] = time.perf_counter() - tick

    tick = time.perf_counter()
    program = adapted_program(loaded.model, source.task, state, with_past=past)
    timings["capture_s"] = time.perf_counter() - tick
    cases = make_cases(program)
    reference = run_torch(program, cases, program.input_names)
    reference_name = "the unmerged adapted torch program"

    merged_report = None
    if merge:
        merge_pipeline()(program)
        left = sorted({s.method for s in program.sites.values()})
        if left:
            raise ConfigError(
                f"--merge cannot fold {', '.join(left)} adapters into the weights; export without --merge"
            )
        merged_report = compare_outputs(
            run_torch(program, cases, program.input_names),
            reference,
            cases,
            source.task,
            atol=atol,
            candidate="the merged torch program",
            reference=reference_name,
        ).raise_if_failed(hint="the merge pass changed the model's outputs; nothing was written")
    if dtype == "float16":  # the float32 reference is computed; now the half-precision program itself
        program = _half_program(loaded.model, source.task, state, past, merge)

    adapter_name = source.run_dir.name if source.run_dir is not None else Path(source.adapter_dir).name
    model_file = MODEL_FILES[format]
    metadata = {
        "peftc.task": source.task,
        "peftc.peft_type": state.config.peft_type,
        "peftc.adapter": adapter_name,
        "peftc.merged": str(bool(merge)).lower(),
        "peftc.with_past": str(past).lower(),
        "peftc.dtype": dtype,
    }
    with atomic_dir(out, force) as tmp:
        tick = time.perf_counter()
        if format == "onnx":
            export_program_onnx(program, tmp / model_file, opset=opset, external_data=external_data, metadata=metadata)
        else:
            _libtorch_exporter(format)[0](program, tmp / model_file, metadata=metadata)
        timings["export_s"] = time.perf_counter() - tick
        tick = time.perf_counter()
        verify = verify_onnx if format == "onnx" else _libtorch_exporter(format)[1]
        report = verify(
            tmp / model_file,
            program,
            cases,
            reference,
            atol=atol,
            reference_name=reference_name,
            raise_on_failure=False,
        )
        timings["verify_s"] = time.perf_counter() - tick
        report.raise_if_failed(
            hint=f"nothing was written to {out}; if every figure is close to atol, a larger --atol may be justified"
        )

        write_model_files(tmp, loaded, with_past=past)
        copy_adapter(source.adapter_dir, tmp / ADAPTER_SUBDIR)

        write_json(
            tmp / REPORT_FILE,
            {
                "verified": True,
                "atol": float(atol),
                "max_abs_diff": report.max_abs_diff,  # the artifact vs the unmerged torch program, worst case
                "cases": [
                    {"name": c.name, "shape": c.shape, "padded": c.padded, "description": c.description} for c in cases
                ],
                f"{format}_vs_torch": report.to_dict(),
                "merged_vs_unmerged": merged_report.to_dict() if merged_report else None,
                "timings": {k: round(v, 3) for k, v in timings.items()},
            },
        )
        extra: dict[str, Any] = {"model_file": model_file, "with_past": past, "dtype": dtype}
        if format == "onnx":
            import onnx

            inputs, outputs = onnx_io(onnx.load(str(tmp / model_file), load_external_data=False))
            extra["optimum_task"] = _optimum_task(program.task.optimum_task, past)
        else:
            from peftc.exporters.torchscript import argument_name, program_io

            inputs, outputs = program_io(program)
            if format == "torchscript":  # forward() argument names: the input names as identifiers
                extra["argument_names"] = [argument_name(i["name"]) for i in inputs]
            else:  # the package runs only where its kernels were compiled for
                from peftc.exporters.aoti import load_aoti

                package = load_aoti(tmp / model_file).get_metadata()
                extra["aoti"] = {k[5:].lower(): v for k, v in package.items() if k.startswith("AOTI_")}
        manifest = build_manifest(
            tmp,
            format=format,
            task=source.task,
            inputs=inputs,
            outputs=outputs,
            base_model=base_info(source.base, loaded),
            adapter=adapter_info(source.adapter_dir, adapter_name, state.config.peft_type, state.config.to_dict()),
            merged=merge,
            opset=opset if format == "onnx" else None,
            extra=extra,
        )
        write_json(tmp / MANIFEST_FILE, manifest)
    logger.info("exported %s (%s, merged=%s) to %s: %s", src, format, merge, out, report.summary())
    return out


def export_swappable(
    srcs: str | Path | Sequence[str | Path],
    format: str = "onnx",
    model: str | Path | None = None,
    out: str | Path | None = None,
    force: bool = False,
    task: str | None = None,
    opset: int = 18,
    atol: float = 1e-4,
    external_data: bool | None = None,
    with_past: bool | None = None,
) -> Path:
    """Export one base with swappable LoRA adapters: ``model.onnx`` + one ``.onnx_adapter`` per source.

    The graph takes every LoRA site's A and B (pre-scaled by ``s``) as inputs named
    ``<module>.lora_A`` / ``<module>.lora_B`` with a symbolic ``lora_rank`` dim, backed by rank-0
    initializers, so it runs as the base model without adapter feeds. A seq-cls head
    (``modules_to_save``) is an input too (``classifier.weight``…, default: the base head). Each
    source is written as ``adapters/<name>.onnx_adapter`` (activate it with
    ``RunOptions.add_active_adapter``) beside a copy of its HF PEFT files (``adapters/<name>/``).

    Verified with ONNX Runtime on held-out and padded inputs: each adapter activated equals its
    unmerged adapted torch program, and no adapter equals the base model (``atol``).

    IA3 sources work the same way: each ``<module>.ia3_l`` is an input of static shape whose
    default is ones (the base model).

    Args:
        srcs: one or more peftc run directories or HF PEFT adapter directories, all LoRA (or all IA3), all made
            for the same base model, task and target modules (ranks may differ).
        format: only ``onnx``.
        model: the base model directory or preset; overrides what the sources record.
        out: the artifact directory; default ``<first SRC>/export-<format>``.
        force: replace a non-empty ``out``.
        task: ``causal-lm`` or ``seq-cls``; overrides what the sources record.
        opset: ONNX opset (18 or later).
        atol: absolute tolerance on fp32 logits.
        external_data: as for :func:`export`.

    Returns:
        The artifact directory: ``model.onnx``, ``adapters/``, ``config.json``, tokenizer files,
        ``report.json``, ``manifest.json`` (``adapter_inputs``: names, shapes, defaults;
        ``adapters``: name, file, rank per adapter).

    Raises:
        ConfigError: no source, a method other than LoRA, sources for different bases or tasks.
        AdapterMismatchError: sources with different target modules (naming the first difference).
        OutputExistsError: ``out`` is not empty and ``force`` is not set.
        ExportVerificationError: an adapter or the base does not reproduce its torch reference.
    """
    import onnx

    from peftc.exporters.manifest import MANIFEST_FILE, REPORT_FILE, adapter_info, build_manifest, onnx_io, write_json
    from peftc.exporters.onnx import MODEL_FILE, export_program_onnx
    from peftc.exporters.swappable import ADAPTER_SUFFIX, adapter_inputs, check_adapter, run_onnx_adapter, write_adapter
    from peftc.exporters.verify import compare_outputs, make_cases, run_torch
    from peftc.kv import WithPastModule
    from peftc.methods import get_method
    from peftc.models import load_model
    from peftc.passes.lift import RANK_DIM, LiftAdaptersToInputsPass, lifted_tensors
    from peftc.runs import resolve_source
    from peftc.tasks import TaskModule, graph_input_names

    srcs = [srcs] if isinstance(srcs, (str, Path)) else list(srcs)
    if not srcs:
        raise ConfigError("no source to export; give one or more run or adapter directories")
    atol = check_options(format, opset, atol)
    out = Path(out) if out is not None else default_out(srcs[0], format)
    check_output_dir(out, force)

    timings: dict[str, float] = {}
    tick = time.perf_counter()
    sources = [resolve_source(s, model, task) for s in srcs]
    for s, source in zip(srcs, sources, strict=True):
        refuse_out_over_inputs(out, [Path(s), Path(source.adapter_dir), Path(source.base)])
    states = [AdapterState.load(source.adapter_dir) for source in sources]
    first = sources[0]
    method = states[0].config.peft_type
    for s, source, state in zip(srcs, sources, states, strict=True):
        if get_method(state).lift is None:
            raise ConfigError(
                f"{s} is a {get_method(state).label} adapter, which cannot be a graph input "
                f"({get_method(state).lift_refusal}); export it without --adapters-as-inputs"
            )
        if state.config.peft_type != method:
            raise ConfigError(
                f"{s} is a {state.config.peft_type} adapter but {srcs[0]} is {method}; one swappable model "
                "takes adapters of one method"
            )
        if _same_base(source.base) != _same_base(first.base):
            raise ConfigError(
                f"{s} was made for base {source.base!r} but {srcs[0]} for {first.base!r}; swappable adapters "
                "share one base model (export them separately, or pass --model if both bases are the same)"
            )
        if source.task != first.task:
            raise ConfigError(f"{s} is a {source.task} adapter but {srcs[0]} is {first.task}; export them separately")
    for s, state in zip(srcs[1:], states[1:], strict=True):  # cheap check before any model is loaded
        _refuse_other_targets(str(srcs[0]), _lora_modules(states[0]), str(s), _lora_modules(state))
    names = _adapter_names(sources)
    past = _with_past(with_past, first.task)
    num_labels = _head_classes(states[0]) if first.task in HEAD_TASKS and not first.id2label else None
    loaded = load_model(first.base, first.task, num_labels=num_labels, id2label=first.id2label)
    timings["load_s"] = time.perf_counter() - tick

    tick = time.perf_counter()
    programs = []
    for state in states:
        programs.append(adapted_program(loaded.model, first.task, state, with_past=past))
    lifted = [{k: v.float().numpy() for k, v in lifted_tensors(p).items()} for p in programs]
    for s, values in zip(srcs[1:], lifted[1:], strict=True):
        _refuse_other_targets(str(srcs[0]), lifted[0], str(s), values)
    timings["capture_s"] = time.perf_counter() - tick

    program = programs[0]
    cases = make_cases(program)
    token_inputs = list(program.input_names)
    references = [run_torch(p, cases, token_inputs) for p in programs]
    base_names = graph_input_names(loaded.model, program.task)
    base = WithPastModule(loaded.model, base_names) if past else TaskModule(loaded.model, base_names)
    base_reference = run_torch(base.eval(), cases, token_inputs)
    LiftAdaptersToInputsPass()(program)
    defaults = {name: t.detach().float().numpy().copy() for name, t in program.input_defaults.items()}

    with atomic_dir(out, force) as tmp:
        tick = time.perf_counter()
        export_program_onnx(
            program,
            tmp / MODEL_FILE,
            opset=opset,
            external_data=external_data,
            metadata={
                "peftc.task": first.task,
                "peftc.peft_type": method,
                "peftc.adapters_as_inputs": "true",
                "peftc.adapters": ",".join(names),
                "peftc.merged": "false",
                "peftc.with_past": str(past).lower(),
            },
            input_defaults=defaults,
        )
        timings["export_s"] = time.perf_counter() - tick
        (tmp / ADAPTERS_SUBDIR).mkdir()
        outputs_compared = program.output_names if past else program.output_names[0]
        tick = time.perf_counter()
        reports = {}
        for name, source, values, reference in zip(names, sources, lifted, references, strict=True):
            path = tmp / ADAPTERS_SUBDIR / f"{name}{ADAPTER_SUFFIX}"
            write_adapter(path, values)
            check_adapter(tmp / MODEL_FILE, path)
            reports[name] = compare_outputs(
                run_onnx_adapter(tmp / MODEL_FILE, cases, path, output=outputs_compared),
                reference,
                cases,
                first.task,
                atol=atol,
                candidate=f"ONNX Runtime ({MODEL_FILE} + {path.name})",
                reference=f"the unmerged adapted torch program of {source.adapter_dir}",
            )
        base_report = compare_outputs(
            run_onnx_adapter(tmp / MODEL_FILE, cases, None, output=outputs_compared),
            base_reference,
            cases,
            first.task,
            atol=atol,
            candidate=f"ONNX Runtime ({MODEL_FILE}, no adapter)",
            reference="the base model",
        )
        timings["verify_s"] = time.perf_counter() - tick
        hint = f"nothing was written to {out}"
        for report in [*reports.values(), base_report]:
            report.raise_if_failed(hint=hint)

        write_model_files(tmp, loaded, with_past=past)
        for name, source in zip(names, sources, strict=True):
            copy_adapter(source.adapter_dir, tmp / ADAPTERS_SUBDIR / name)

        worst = max(r.max_abs_diff for r in [*reports.values(), base_report])
        write_json(
            tmp / REPORT_FILE,
            {
                "verified": True,
                "atol": float(atol),
                "max_abs_diff": worst,
                "cases": [
                    {"name": c.name, "shape": c.shape, "padded": c.padded, "description": c.description} for c in cases
                ],
                "adapters_vs_torch": {name: r.to_dict() for name, r in reports.items()},
                "base_vs_torch": base_report.to_dict(),
                "timings": {k: round(v, 3) for k, v in timings.items()},
            },
        )
        swappable = adapter_inputs(tmp / MODEL_FILE)
        inputs, outputs = onnx_io(onnx.load(str(tmp / MODEL_FILE), load_external_data=False))
        adapters = []
        for name, source, state, values in zip(names, sources, states, lifted, strict=True):
            info = adapter_info(source.adapter_dir, name, method, state.config.to_dict())
            ranks = sorted({int(v.shape[0]) for k, v in values.items() if k.endswith(".lora_A")})
            info.update(
                file=f"{ADAPTERS_SUBDIR}/{name}{ADAPTER_SUFFIX}",
                hf_peft_copy=f"{ADAPTERS_SUBDIR}/{name}",
                rank=(ranks[0] if len(ranks) == 1 else ranks) if ranks else None,
                max_abs_diff=reports[name].max_abs_diff,
            )
            adapters.append(info)
        manifest = build_manifest(
            tmp,
            format=format,
            task=first.task,
            inputs=inputs,
            outputs=outputs,
            base_model=base_info(first.base, loaded),
            adapter=None,
            merged=False,
            opset=opset,
            extra={
                "optimum_task": _optimum_task(program.task.optimum_task, past),
                "model_file": MODEL_FILE,
                "with_past": past,
                "method": method,
                "adapters_as_inputs": True,
                "rank_dim": RANK_DIM,
                "adapter_inputs": [{"name": k, **v} for k, v in swappable.items()],
                "adapters": adapters,
            },
        )
        write_json(tmp / MANIFEST_FILE, manifest)
    logger.info("exported %d swappable adapters over %s to %s (max diff %.2e)", len(names), first.base, out, worst)
    return out


def _lora_modules(state: AdapterState) -> dict[str, Any]:
    """The adapted modules of a LoRA/IA3 state, as lifted input names (shapes unknown before capture)."""
    out: dict[str, Any] = {}
    for key in state.tensors:
        if key.endswith(".ia3_l"):
            out[key.removeprefix("base_model.model.")] = None
        for part in ("lora_A", "lora_B"):
            if f".{part}." in key:
                out[f"{key.split(f'.{part}.')[0].removeprefix('base_model.model.')}.{part}"] = None
    return out


def _same_base(spec: str) -> str:
    path = Path(spec)
    return str(path.resolve()) if path.exists() else str(spec)


def _adapter_names(sources: list[Any]) -> list[str]:
    """One file-safe, unique name per source: the run directory's or adapter directory's name."""
    names: list[str] = []
    for source in sources:
        raw = source.run_dir.name if source.run_dir is not None else Path(source.adapter_dir).name
        if raw in ("adapter", "export-onnx") and source.run_dir is None:
            raw = Path(source.adapter_dir).resolve().parent.name or raw
        base = "".join(c if c.isalnum() or c in "-_." else "_" for c in raw) or "adapter"
        name, i = base, 2
        while name in names:
            name, i = f"{base}-{i}", i + 1
        names.append(name)
    return names


def _refuse_other_targets(first: str, want: dict[str, Any], src: str, have: dict[str, Any]) -> None:
    """Sources must adapt the same modules (ranks may differ): refuse naming the first difference."""
    for name in want:
        if name not in have:
            raise AdapterMismatchError(
                f"{src} does not adapt {name.rsplit('.', 1)[0]} but {first} does; swappable adapters must have the "
                "same target modules (and modules_to_save): retrain with the same targets or export separately"
            )
    for name in have:
        if name not in want:
            raise AdapterMismatchError(
                f"{src} adapts {name.rsplit('.', 1)[0]} but {first} does not; swappable adapters must have the "
                "same target modules (and modules_to_save): retrain with the same targets or export separately"
            )
        if (
            not name.endswith((".lora_A", ".lora_B"))
            and have[name] is not None
            and have[name].shape != want[name].shape
        ):
            raise AdapterMismatchError(
                f"{src} tensor {name} has shape {list(have[name].shape)} but {first}'s is {list(want[name].shape)}"
            )


def check_options(format: str, opset: Any, atol: Any, dtype: str = "float32") -> float:
    """Refuse unusable options; returns the tolerance (the dtype's default when ``atol`` is None)."""
    if format not in SUPPORTED_FORMATS:
        raise ConfigError(f"export format {format!r} is not supported; supported: {', '.join(SUPPORTED_FORMATS)}")
    if not isinstance(opset, int) or isinstance(opset, bool) or opset < 18:
        raise ConfigError(f"opset={opset!r} is not supported; use an ONNX opset >= 18")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; supported: {', '.join(DTYPES)}")
    if atol is None:
        return DTYPES[dtype]
    if not isinstance(atol, (int, float)) or isinstance(atol, bool) or not atol >= 0:
        raise ConfigError(f"atol={atol!r} must be a non-negative number (default 1e-4 for fp32 logits)")
    return float(atol)


def _check_libtorch_options(
    format: str, adapters_as_inputs: bool, dtype: str, seq2seq: bool, with_past: bool | None
) -> None:
    """TorchScript and AOTInductor take one float32 graph with one adapter in it (merged or as ops)."""
    what = {"torchscript": "TorchScript", "aoti": "AOTInductor"}[format]
    if adapters_as_inputs:
        raise ConfigError(
            f"--adapters-as-inputs makes ONNX Runtime adapter files; {what} takes one adapter: "
            "export each adapter on its own, or use --format onnx"
        )
    if dtype != "float32":
        raise ConfigError(f"--dtype {dtype} is supported for --format onnx only; export {what} in float32")
    if seq2seq:
        raise ConfigError(
            f"seq2seq models export as two ONNX graphs (encoder, decoder); --format {format} takes causal-lm, "
            "seq-cls and token-cls models"
        )
    if format == "aoti" and with_past:
        raise ConfigError(
            "--with-past with --format aoti does not verify (AOTInductor's compiled KV-cache graph gets decode steps "
            "wrong, measured with torch 2.13); use --format torchscript or onnx for a KV-cache graph"
        )
    if format == "aoti":
        from peftc.exporters.aoti import compiler_available

        if compiler_available() is None:  # fail before minutes of work, not after
            raise ConfigError(
                "--format aoti compiles C++ and no compiler was found (g++, c++, clang++ or $CXX); "
                "install g++ or use --format torchscript"
            )


def _libtorch_exporter(format: str) -> tuple[Any, Any]:
    """(export function, verify function) of ``torchscript`` or ``aoti``."""
    if format == "torchscript":
        from peftc.exporters.torchscript import export_program_torchscript, verify_torchscript

        return export_program_torchscript, verify_torchscript
    from peftc.exporters.aoti import export_program_aoti, verify_aoti

    return export_program_aoti, verify_aoti


def _half_program(model: Any, task: str, state: AdapterState, with_past: bool, merge: bool) -> Any:
    """The same adapted (and merged) program in float16, built from ``model`` converted in place.

    Called once the float32 reference is computed: the float32 program shares ``model``'s tensors
    and is not used again. Merges fold in float32 (``MergeLoraPass``) before rounding to float16.
    """
    from dataclasses import replace

    import torch
    from torch import nn

    from peftc.passes import merge_pipeline

    model.half()
    tensors = {k: nn.Parameter(t.detach().to(torch.float16), requires_grad=False) for k, t in state.tensors.items()}
    program = adapted_program(model, task, replace(state, tensors=tensors), with_past=with_past)
    if merge:
        merge_pipeline()(program)
    return program


def refuse_out_over_inputs(out: Path, inputs: list[Path]) -> None:
    """``force`` replaces ``out`` wholesale: never let that delete the run, adapter or base model."""
    target = out.resolve()
    for path in inputs:
        if path.exists() and (path.resolve() == target or target in path.resolve().parents):
            raise OutputExistsError(f"--out {out} would replace {path}, which this export reads; choose another --out")


def adapted_program(model: Any, task: str, state: AdapterState, with_past: bool = False) -> Any:
    """The eval-mode program of ``model`` with ``state`` bound: what every export starts from.

    With ``with_past``, a KV-cache graph (:mod:`peftc.kv`); prompt methods then enter as a constant
    cache prefix (prefix tuning's keys/values, or the virtual tokens' keys/values) instead of
    virtual tokens, since a decode step carries no prompt.
    """
    from peftc.kv import cache_prefix
    from peftc.kv import with_past as past_transform
    from peftc.methods import get_method
    from peftc.passes import insertion_pipeline
    from peftc.program import capture

    if not with_past:
        program = capture(model, task, mode="eval")
    elif get_method(state).transforms_inputs:
        transform = past_transform(cache_prefix(model, state), state.config.cache_positions)
        program = capture(model, task, mode="eval", transform=transform)
        program.adapter = state
        return program
    else:
        program = capture(model, task, mode="eval", transform=past_transform())
    insertion_pipeline(state.config, state)(program)
    return program


def _is_seq2seq(src: Any, model: Any, task: str | None) -> bool:
    """Whether SRC (one source) is an encoder-decoder adapter: ``task`` says so, or else what SRC records."""
    from peftc.runs import resolve_source

    if task is not None:
        return task == "seq2seq"
    srcs = [src] if isinstance(src, (str, Path)) else list(src)
    return len(srcs) == 1 and resolve_source(srcs[0], model, None).task == "seq2seq"


def _with_past(with_past: bool | None, task: str) -> bool:
    """``None`` means: a KV-cache graph for causal LMs (optimum's default), none otherwise."""
    if with_past is None:
        return task == "causal-lm"
    if with_past and task != "causal-lm":
        raise ConfigError(f"--with-past is for causal-lm models (a KV cache for generation), not {task}; drop it")
    return bool(with_past)


def _optimum_task(task: str, with_past: bool) -> str:
    return f"{task}-with-past" if with_past else task


def _head_classes(state: AdapterState) -> int | None:
    """Number of classes of a seq-cls head saved in the adapter (``modules_to_save``), if any."""
    for key, tensor in state.tensors.items():
        if key.endswith(_HEAD_SUFFIXES) and tensor.ndim == 2:
            return int(tensor.shape[0])
    return None


def write_model_files(directory: Path, loaded: Any, with_past: bool = False) -> None:
    """config.json (architecture, label map, ``use_cache``), generation config, tokenizer."""
    model = loaded.model
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    if hasattr(config, "use_cache"):
        config.use_cache = bool(with_past)  # optimum's ORTModelForCausalLM feeds a cache only when this is set
    config.save_pretrained(directory)
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        generation.save_pretrained(directory)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(directory)


def base_info(spec: str, loaded: Any) -> dict[str, Any]:
    cfg = loaded.model.config
    info = {
        "source": str(spec),
        "resolved": loaded.source or None,
        "preset": loaded.preset,
        "model_type": getattr(cfg, "model_type", None),
        "architecture": type(loaded.model).__name__,
    }
    if type(loaded.model).__name__.endswith(("ForSequenceClassification", "ForTokenClassification")):
        info["id2label"] = {str(k): v for k, v in cfg.id2label.items()}
    return info


def copy_adapter(adapter_dir: str | Path, dest: Path) -> None:
    """A byte-for-byte copy of the HF PEFT files the artifact was built from."""
    dest.mkdir()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copyfile(Path(adapter_dir) / name, dest / name)
