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
from pathlib import Path
from typing import Any

from peftc.adapters import CONFIG_FILE, WEIGHTS_FILE, AdapterState
from peftc.errors import ConfigError, OutputExistsError
from peftc.files import atomic_dir, check_output_dir

__all__ = ["ADAPTER_SUBDIR", "SUPPORTED_FORMATS", "export", "default_out"]

logger = logging.getLogger(__name__)

SUPPORTED_FORMATS = ("onnx",)
#: Where the artifact keeps a byte-for-byte copy of the adapter it was built from.
ADAPTER_SUBDIR = "adapter"
_HEAD_SUFFIXES = (".classifier.weight", ".score.weight", ".classifier.out_proj.weight")


def default_out(src: str | Path, format: str = "onnx") -> Path:
    """``SRC/export-<format>``: where an export goes without ``out``."""
    return Path(src) / f"export-{format}"


def export(
    src: str | Path = "peftc-run",
    format: str = "onnx",
    merge: bool = False,
    model: str | Path | None = None,
    out: str | Path | None = None,
    force: bool = False,
    task: str | None = None,
    opset: int = 18,
    atol: float = 1e-4,
    external_data: bool | None = None,
) -> Path:
    """Export the adapted model of SRC to a verified artifact directory.

    Args:
        src: a peftc run directory, or an adapter directory saved by HF PEFT
            (``adapter_config.json`` + ``adapter_model.safetensors``).
        format: artifact format; only ``onnx`` so far.
        merge: fold the adapter into the base weights (the graph is then the base graph op for
            op); without it the adapter stays as ops in the graph.
        model: the base model directory or preset; overrides what SRC records (required for an
            HF PEFT adapter whose ``base_model_name_or_path`` is not a local directory).
        out: the artifact directory; default ``SRC/export-<format>``.
        force: replace a non-empty ``out``.
        task: ``causal-lm`` or ``seq-cls``; overrides what SRC records.
        opset: ONNX opset (18 or later).
        atol: absolute tolerance on fp32 logits for every verification (default 1e-4).
        external_data: weights in ``model.onnx.data`` (``True``), inline (``False``), or by size
            (``None``: external above ~1.8 GB).

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
    from peftc.exporters.onnx import MODEL_FILE, export_program_onnx
    from peftc.exporters.verify import compare_outputs, make_cases, run_torch, verify_onnx
    from peftc.models import load_model
    from peftc.passes import insertion_pipeline, merge_pipeline
    from peftc.program import capture
    from peftc.runs import resolve_source

    if format not in SUPPORTED_FORMATS:
        raise ConfigError(f"export format {format!r} is not supported; supported: {', '.join(SUPPORTED_FORMATS)}")
    if not isinstance(opset, int) or isinstance(opset, bool) or opset < 18:
        raise ConfigError(f"opset={opset!r} is not supported; use an ONNX opset >= 18")
    if not isinstance(atol, (int, float)) or isinstance(atol, bool) or not atol >= 0:
        raise ConfigError(f"atol={atol!r} must be a non-negative number (default 1e-4 for fp32 logits)")
    out = Path(out) if out is not None else default_out(src, format)
    check_output_dir(out, force)  # fail before minutes of work, not after

    timings: dict[str, float] = {}
    tick = time.perf_counter()
    source = resolve_source(src, model, task)
    _refuse_out_over_inputs(out, [Path(src), Path(source.adapter_dir), Path(source.base)])
    state = AdapterState.load(source.adapter_dir)
    num_labels = _head_classes(state) if source.task == "seq-cls" and not source.id2label else None
    loaded = load_model(source.base, source.task, num_labels=num_labels, id2label=source.id2label)
    timings["load_s"] = time.perf_counter() - tick

    tick = time.perf_counter()
    program = capture(loaded.model, source.task, mode="eval")
    insertion_pipeline(state.config, state)(program)
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

    adapter_name = source.run_dir.name if source.run_dir is not None else Path(source.adapter_dir).name
    with atomic_dir(out, force) as tmp:
        tick = time.perf_counter()
        export_program_onnx(
            program,
            tmp / MODEL_FILE,
            opset=opset,
            external_data=external_data,
            metadata={
                "peftc.task": source.task,
                "peftc.peft_type": state.config.peft_type,
                "peftc.adapter": adapter_name,
                "peftc.merged": str(bool(merge)).lower(),
            },
        )
        timings["export_s"] = time.perf_counter() - tick
        tick = time.perf_counter()
        report = verify_onnx(
            tmp / MODEL_FILE,
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

        _write_model_files(tmp, loaded)
        adapter_copy = tmp / ADAPTER_SUBDIR
        adapter_copy.mkdir()
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copyfile(Path(source.adapter_dir) / name, adapter_copy / name)

        write_json(
            tmp / REPORT_FILE,
            {
                "verified": True,
                "atol": float(atol),
                "max_abs_diff": report.max_abs_diff,  # ONNX Runtime vs the unmerged torch program, worst case
                "cases": [
                    {"name": c.name, "shape": c.shape, "padded": c.padded, "description": c.description} for c in cases
                ],
                "onnx_vs_torch": report.to_dict(),
                "merged_vs_unmerged": merged_report.to_dict() if merged_report else None,
                "timings": {k: round(v, 3) for k, v in timings.items()},
            },
        )
        import onnx

        inputs, outputs = onnx_io(onnx.load(str(tmp / MODEL_FILE), load_external_data=False))
        manifest = build_manifest(
            tmp,
            format=format,
            task=source.task,
            inputs=inputs,
            outputs=outputs,
            base_model=_base_info(source.base, loaded),
            adapter=adapter_info(source.adapter_dir, adapter_name, state.config.peft_type, state.config.to_dict()),
            merged=merge,
            opset=opset,
            extra={"optimum_task": program.task.optimum_task, "model_file": MODEL_FILE},
        )
        write_json(tmp / MANIFEST_FILE, manifest)
    logger.info("exported %s (%s, merged=%s) to %s: %s", src, format, merge, out, report.summary())
    return out


def _refuse_out_over_inputs(out: Path, inputs: list[Path]) -> None:
    """``force`` replaces ``out`` wholesale: never let that delete the run, adapter or base model."""
    target = out.resolve()
    for path in inputs:
        if path.exists() and (path.resolve() == target or target in path.resolve().parents):
            raise OutputExistsError(f"--out {out} would replace {path}, which this export reads; choose another --out")


def _head_classes(state: AdapterState) -> int | None:
    """Number of classes of a seq-cls head saved in the adapter (``modules_to_save``), if any."""
    for key, tensor in state.tensors.items():
        if key.endswith(_HEAD_SUFFIXES) and tensor.ndim == 2:
            return int(tensor.shape[0])
    return None


def _write_model_files(directory: Path, loaded: Any) -> None:
    """config.json (with the architecture and, for seq-cls, the label map), generation config, tokenizer."""
    model = loaded.model
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.save_pretrained(directory)
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        generation.save_pretrained(directory)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(directory)


def _base_info(spec: str, loaded: Any) -> dict[str, Any]:
    cfg = loaded.model.config
    info = {
        "source": str(spec),
        "resolved": loaded.source or None,
        "preset": loaded.preset,
        "model_type": getattr(cfg, "model_type", None),
        "architecture": type(loaded.model).__name__,
    }
    if "ForSequenceClassification" in type(loaded.model).__name__:
        info["id2label"] = {str(k): v for k, v in cfg.id2label.items()}
    return info
