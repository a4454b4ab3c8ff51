"""The artifact writer: what an export directory holds beside its model file(s).

Written inside :func:`peftc.files.atomic_dir` once every file verified: the model's ``config.json``
(architecture, label map, ``use_cache``), generation config and tokenizer; for a KV-cache graph, the
format's generation-runtime config (ONNX: onnxruntime-genai's ``genai_config.json``, search defaults
read from the generation config); the adapter copies (the mode's); ``report.json`` (the verification
figures, the cases, the timings) and then ``manifest.json`` (the interface as the exporter describes
it, provenance, sha256 of every file — ``report.json`` included, which is why it is written first).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from peftc.exporters.verify import Tolerance

from .graphs import Graph, GraphPlan
from .modes import Mode, per_graph
from .sources import Adapters


def write_artifact(
    directory: Path,
    *,
    exporter: Any,
    options: Any,
    plan: GraphPlan,
    mode: Mode,
    graphs: list[Graph],
    adapters: Adapters,
    names: list[str],
    loaded: Any,
    checks: tuple[list[Any], list[Any], list[Any]],
    tolerance: Tolerance,
    dtype: str | None,
    timings: dict[str, float],
    quantization: dict[str, Any] | None = None,
) -> None:
    """Everything beside the verified model file(s): config and tokenizer, adapter copies, report, manifest.

    Args:
        checks: the verification step's comparisons, their reports, and the merge check's reports.
        dtype: recorded in the manifest where it can be chosen (``None``: not recorded).
        quantization: the quantize stage's figures (``report.json``'s ``quantization``; the manifest's
            ``quantize`` holds the scheme and the headline figures).
    """
    comparisons, reports, merged = checks
    components = write_model_files(directory, loaded, plan.with_past, exporter, options, tolerance, task=plan.task)
    runtime = write_runtime_config(directory, exporter, plan, graphs)
    mode.copy_adapters(directory, adapters, names)
    write_report(
        directory,
        tolerance=tolerance,
        graphs=graphs,
        reports=reports,
        entries={
            **mode.report_entries(exporter.name, graphs, comparisons, reports, merged),
            **({"quantization": quantization} if quantization is not None else {}),
            **components,
        },
        timings=timings,
    )
    adapter, mode_extra = mode.manifest_entries(exporter, directory, adapters, names, comparisons, reports)
    if len(graphs) == 1:
        files: dict[str, Any] = {"model_file": exporter.model_file(graphs[0].role)}
    else:
        files = {"model_files": {g.role: exporter.model_file(g.role) for g in graphs}}
    write_manifest(
        directory,
        exporter=exporter,
        options=options,
        task=plan.task,
        graphs=graphs,
        base_model=base_info(adapters.first.base, loaded),
        adapter=adapter,
        merged=mode.merged,
        extra={
            **files,
            "mode": mode.name,
            "with_past": plan.with_past,
            **({"runtime_config": runtime} if runtime is not None else {}),
            **({"dtype": dtype} if dtype is not None else {}),
            **({"quantize": _quantize_entry(quantization)} if quantization is not None else {}),
        },
        mode_extra=mode_extra,
    )


__all__ = [
    "base_info",
    "write_artifact",
    "write_manifest",
    "write_model_files",
    "write_report",
    "write_runtime_config",
]


def _quantize_entry(quantization: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``quantize``: the scheme and the headline figures of ``report.json``'s ``quantization``."""
    keys = (
        "scheme",
        "bits",
        "block_size",
        "size_bytes",
        "float_size_bytes",
        "top1_agreement",
        "mean_kl",
        "max_abs_diff",
    )
    return {k: quantization[k] for k in keys}


def write_model_files(
    directory: Path,
    loaded: Any,
    with_past: bool = False,
    exporter: Any = None,
    options: Any = None,
    tolerance: Tolerance | None = None,
    *,
    task: str | None = None,
) -> dict[str, Any]:
    """config.json (architecture, label map, ``use_cache``), generation config, tokenizer.

    A ``text-to-image`` artifact (a diffusers UNet) gets the UNet's config, and from a pipeline directory the
    rest of the pipeline (:func:`peftc.diffusion.write_pipeline_files`); the returned ``report.json`` entries
    say how its parts verified. ``task`` is the export's task (``GraphPlan.task``).
    """
    from peftc.diffusion import TASK as TEXT_TO_IMAGE

    model = loaded.model
    if task == TEXT_TO_IMAGE:
        from peftc.diffusion import write_pipeline_files

        return write_pipeline_files(directory, loaded, exporter, options, tolerance)
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
    if getattr(loaded, "image_processor", None) is not None:  # preprocessor_config.json: optimum's pipelines read it
        loaded.image_processor.save_pretrained(directory)
    if getattr(loaded, "processor", None) is not None:  # BLIP-2: processor_config.json (num_query_tokens)
        loaded.processor.save_pretrained(directory)
    return {}


def write_runtime_config(directory: Path, exporter: Any, plan: GraphPlan, graphs: list[Graph]) -> str | None:
    """The format's generation-runtime config beside a KV-cache model file; its name, or ``None`` when none.

    Written after the generation config it reads its search defaults from; only a one-graph
    KV-cache artifact (a causal LM) has one.
    """
    config = exporter.runtime_config
    if config is None or not plan.with_past or len(graphs) != 1:
        return None
    config.write(directory, exporter.model_file(graphs[0].role), graphs[0].program)
    return config.file


def base_info(spec: str, loaded: Any) -> dict[str, Any]:
    """Manifest entry of the base model: where it came from, its type and architecture (and label map)."""
    cfg = loaded.model.config
    info = {
        "source": str(spec),
        "resolved": loaded.source or None,
        "preset": loaded.preset,
        "model_type": getattr(cfg, "model_type", None),
        "architecture": type(loaded.model).__name__,
    }
    if type(loaded.model).__name__.endswith(
        ("ForSequenceClassification", "ForTokenClassification", "ForImageClassification", "ForSemanticSegmentation")
    ):
        info["id2label"] = {str(k): v for k, v in cfg.id2label.items()}
    return info


def write_report(
    directory: Path,
    *,
    tolerance: Tolerance,
    graphs: list[Graph],
    reports: list[Any],
    entries: dict[str, Any],
    timings: dict[str, float],
) -> Path:
    """``report.json``: verified, the tolerance, the worst figure, the cases per graph, the mode's sections, timings."""
    from peftc.exporters.manifest import REPORT_FILE, write_json

    cases = [
        [{"name": c.name, "shape": c.shape, "padded": c.padded, "description": c.description} for c in g.cases]
        for g in graphs
    ]
    return write_json(
        directory / REPORT_FILE,
        {
            "verified": True,
            **tolerance.to_dict(),
            "max_abs_diff": max(r.max_abs_diff for r in reports),  # the artifact vs its torch reference, worst case
            "cases": per_graph(graphs, cases),
            **entries,
            "timings": {k: round(v, 3) for k, v in timings.items()},
        },
    )


def write_manifest(
    directory: Path,
    *,
    exporter: Any,
    options: Any,
    task: str,
    graphs: list[Graph],
    base_model: dict[str, Any],
    adapter: dict[str, Any] | None,
    merged: bool,
    extra: dict[str, Any],
    mode_extra: dict[str, Any],
) -> Path:
    """``manifest.json`` of the files already in ``directory`` (hashed last, after every other write).

    Inputs and outputs are the exporter's description of each written file (tagged with ``graph``
    when there are several); ``extra`` (model files, ``with_past``…) comes first, then the format's
    own keys (``opset``, ``optimum_task``…), then the mode's (swappable adapters).
    """
    from peftc.exporters.manifest import MANIFEST_FILE, build_manifest, write_json

    inputs: list[dict[str, Any]] = []
    outputs: list[dict[str, Any]] = []
    for g in graphs:
        graph_inputs, graph_outputs = exporter.describe_io(directory / exporter.model_file(g.role), g.program)
        tag = {} if len(graphs) == 1 else {"graph": g.role}
        inputs += [{**i, **tag} for i in graph_inputs]
        outputs += [{**o, **tag} for o in graph_outputs]
    first = graphs[0]
    entries = dict(exporter.manifest_entries(directory / exporter.model_file(first.role), first.program, options))
    opset = entries.pop("opset", None)
    manifest = build_manifest(
        directory,
        format=exporter.name,
        task=task,
        inputs=inputs,
        outputs=outputs,
        base_model=base_model,
        adapter=adapter,
        merged=merged,
        opset=opset,
        extra={**extra, **entries, **mode_extra},
    )
    return write_json(directory / MANIFEST_FILE, manifest)
