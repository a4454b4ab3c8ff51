"""``peftc export``: a trained adapter to a verified deployable artifact directory — one pipeline.

Every export walks the same stages, each entered once and in this order:

1. **options** — format (the exporter registry), opset, dtype, tolerance; the exporter refuses what
   it cannot do, the graph plan and the mode refuse what they cannot hold — before any file is read;
2. **source** — resolve SRC(s) (:func:`peftc.runs.resolve_source`) and load each adapter;
3. **base** — load the base model of the first source, in the export's dtype (a float16 export never
   holds float32 weights);
4. **capture** — the graph plan (:mod:`.graphs`): one graph, a KV-cache graph, or an encoder and
   decoder graphs (with a KV cache: a first-step decoder and a decoder with past), captured in eval mode;
5. **bind** — insert each source's saved adapter (its part, per graph);
6. **reference** — held-out cases and the unmerged adapted torch program's outputs on them;
7. **mode passes** (:mod:`.modes`) — ``merge`` (checked against the reference), ``lift`` (adapter
   tensors to graph inputs, several sources over one base) or ``keep``;
8. **exporter** — the registry's exporter for the format writes each graph (and the mode's side
   files: adapter files of a swappable export);
9. **verify** — one step: every comparison the mode asks for runs the written file with the
   format's runtime against its torch reference (:func:`peftc.exporters.verify.verify_artifact`),
   once the torch weights are freed (:func:`release_weights`): the runtime's copy of the weights
   never sits beside torch's; with ``quantize``, the verified float files are then quantized and
   measured against the same references, gated on top-1 agreement and KL (:mod:`.quantize`);
10. **artifact** — model config, tokenizer, adapter copies, ``report.json``, ``manifest.json``
    (:mod:`.artifact`).

Merged, swappable and seq2seq exports are configurations of this walk (a mode, a graph plan), not
copies of it. Everything is written inside :func:`peftc.files.atomic_dir`: a failed verification
(exit code 3) or any other error leaves no artifact directory behind, and a non-empty output is
replaced only with ``force``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from peftc.adapters import AdapterState
from peftc.errors import ConfigError
from peftc.files import atomic_dir, check_output_dir
from peftc.heap import frozen_heap

from .artifact import write_artifact
from .graphs import Graph, GraphPlan, bind, graph_plan, plan_kind
from .modes import Mode, select_mode
from .options import check_options, default_out, requested_with_past, source_list
from .quantize import check_quantize, quantize_stage
from .sources import Adapters, load_base, read_sources

__all__ = ["export"]

logger = logging.getLogger(__name__)


@frozen_heap()  # the imports' objects stay out of the capture's collections
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
    rtol: float | None = None,
    external_data: bool | None = None,
    adapters_as_inputs: bool = False,
    with_past: bool | None = None,
    dtype: str = "float32",
    quantize: str | None = None,
    quantize_block_size: int | None = None,
    quantize_min_top1: float | None = None,
    quantize_max_kl: float | None = None,
    mixed_batch: bool = False,
) -> Path:
    """Export the adapted model of SRC to a verified artifact directory.

    Args:
        src: a peftc run directory, or an adapter directory saved by HF PEFT
            (``adapter_config.json`` + ``adapter_model.safetensors``); with ``adapters_as_inputs``,
            a list of them.
        format: a registered format (:func:`peftc.exporters.formats`): ``onnx`` (ONNX Runtime),
            ``torchscript`` (``model.pt`` for ``torch::jit::load``) or ``aoti`` (``model.pt2``, an
            AOTInductor package of compiled kernels for ``AOTIModelPackageLoader``; needs a C++ compiler
            and takes a minute or more to compile). TorchScript and AOTInductor take one float32 graph:
            no ``adapters_as_inputs``, no ``dtype`` float16, no seq2seq, and ``with_past`` only when asked.
        merge: fold the adapter into the base weights (the graph is then the base graph op for
            op); without it the adapter stays as ops in the graph.
        model: the base model directory or preset; overrides what SRC records (required for an
            HF PEFT adapter whose ``base_model_name_or_path`` is not a local directory).
        out: the artifact directory; default ``SRC/export-<format>`` (the first SRC's).
        force: replace a non-empty ``out``.
        task: ``causal-lm``, ``seq-cls``, ``token-cls``, ``seq2seq`` (``encoder_model.onnx``,
            ``decoder_model.onnx`` and, with ``with_past``, ``decoder_with_past_model.onnx``: loadable with
            ``ORTModelForSeq2SeqLM.from_pretrained(out)``, ``use_cache=True`` or ``False``; without
            ``with_past``, two graphs and ``use_cache=False`` only), ``image-to-text`` (BLIP-2: ``model.onnx``
            and three generation graphs, :mod:`peftc.exporting.multimodal`; ``with_past`` does not apply) or
            ``text-to-image`` (a diffusers UNet: ``unet/model.onnx``, and from a pipeline directory the whole
            pipeline); overrides what SRC records.
        opset: ONNX opset (18 or later).
        atol: absolute tolerance on outputs for every verification; ``None``: 1e-4 for float32,
            2e-2 for float16 (:data:`~peftc.exporting.DTYPES`).
        rtol: tolerance relative to each output's largest reference magnitude, added to ``atol``
            (``max |artifact − torch| <= atol + rtol × max |torch|``); ``None``: 0 for float32, 1e-2
            for float16 (whose rounding grows with the values rounded).
        external_data: weights in ``model.onnx.data`` (``True``), inline (``False``), or by size
            (``None``: external above 256 MiB, where an
            inline file would cost several copies of the weights in memory).
        adapters_as_inputs: swappable export: ``src`` may be a list of sources made for the same
            base, method and target modules; one ``model.onnx`` takes the adapter tensors as inputs
            (LoRA: A and B pre-scaled by ``s``, rank-0 defaults; IA3: ones; a seq-cls head: the base
            head) so it runs as the base model without feeds, and each source becomes
            ``adapters/<name>.onnx_adapter`` (activate it with ``RunOptions.add_active_adapter``) beside
            a copy of its HF PEFT files. Each adapter activated is verified against its own adapted
            torch program, no adapter against the base model. Excludes ``merge``.
        with_past: causal LMs: a KV-cache graph (inputs ``past_key_values.{i}.key|value``,
            outputs ``present.{i}.key|value``, the layout optimum's ``ORTModelForCausalLM``
            generates with; see :mod:`peftc.exporting.kv`). seq2seq LMs: KV-cache decoders (the first
            step's ``decoder_model.onnx`` also returns ``present.{i}.decoder|encoder.key|value``;
            ``decoder_with_past_model.onnx`` takes them as ``past_key_values.*``; see
            :mod:`peftc.exporting.seq2seq`), as ``ORTModelForSeq2SeqLM(use_cache=True)`` runs them.
            ``None`` (default): on for causal-lm and seq2seq with ONNX, as in optimum.
        dtype: ``float32`` or ``float16`` (weights, activations and float inputs/outputs in half
            precision; the base is loaded in float16 and the artifact verified against the float16
            torch program with the float16 ``atol`` and ``rtol``).
            float16 is for one-graph exports without ``adapters_as_inputs``.
        quantize: ``int4`` or ``int8`` weights (ONNX and ExecuTorch, float32 only;
            :mod:`peftc.exporting.quantize`): the float file is verified at ``atol`` first, then
            replaced by the quantized one — ONNX Runtime's tools on the ONNX file (int4: ``MatMulNBits``,
            block-wise asymmetric; int8: dynamic, per-channel weights), torchao's PT2E flow with
            ExecuTorch's ``XNNPACKQuantizer`` before lowering (:mod:`peftc.exporters.executorch_quantize`:
            per-channel int8 or int4 weights, dynamic int8 activations) — and measured against the float
            torch program: ``report.json``'s ``quantization`` section. Merged adapters and adapters kept
            as ops are quantized with the base; with ``adapters_as_inputs`` (ONNX) only the base is, the
            adapter tensors and files stay float.
        quantize_block_size: int4 block length (power of two >= 16; default 32).
        quantize_min_top1: the gate: minimum top-1 agreement with the float program (default 0.9).
        quantize_max_kl: the gate: maximum mean KL(float ‖ quantized) in nats (default 0.05).
        mixed_batch: many adapters in one batch (ONNX, float32): ``src`` may be a list of LoRA or IA3
            sources over one base (same method, task and target modules; ranks and alphas may differ);
            one ``model.onnx`` holds all their tensors stacked and takes an ``adapter_index``
            ``int64[batch]`` input right after the text inputs (``-1``: the base model, ``i``: the
            ``i``-th source), so each row of one run gets its own adapter, with or without the KV
            cache (a row keeps its adapter by being fed the same index every step). Saved ``nn.Linear``
            heads (``modules_to_save``) are stacked too. Verified on batches mixing every adapter and
            the base, each row against its own adapted torch program. Excludes ``merge`` and
            ``adapters_as_inputs``.

    Returns:
        The artifact directory: the model file(s) (``model.onnx`` + ``model.onnx.data``, ``model.pt``,
        ``model.pt2``, or ``encoder_model.onnx`` + ``decoder_model.onnx`` (+ ``decoder_with_past_model.onnx``)),
        ``config.json``, tokenizer
        files, ``adapter/`` (``adapters/`` for a swappable export), ``report.json``, ``manifest.json``.

    Raises:
        ConfigError: an unsupported format, opset, dtype or tolerance, an option the format, the
            graphs or the mode cannot take, or ``merge`` with a method that cannot be merged.
        OutputExistsError: ``out`` is not empty and ``force`` is not set, or ``out`` would replace an input.
        AdapterFormatError, ModelLoadError, AdapterMismatchError: a SRC or the base cannot be used
            (swappable: sources with different methods, bases, tasks or target modules).
        ExportVerificationError: the merged program or the exported file does not reproduce the
            unmerged adapted program within the tolerance (exit code 3); nothing is written.
    """
    from peftc.exporters import ExportRequest, WriteOptions, get_exporter
    from peftc.runs import resolve_source

    # -- options: everything that can be refused before a file is read
    tolerance = check_options(format, opset, atol, dtype, rtol)
    exporter = get_exporter(format)
    if mixed_batch:  # refuse --mixed-batch with another mode or format before any source is read
        select_mode(merge, adapters_as_inputs, exporter, mixed_batch)
    quant = check_quantize(
        quantize, exporter, dtype, quantize_block_size, quantize_min_top1, quantize_max_kl, adapters_as_inputs
    )
    several = adapters_as_inputs or mixed_batch  # the modes that take several sources
    srcs = source_list(src, several)
    plan_task = task or resolve_source(srcs[0], str(model) if model is not None else None, None).task
    graphs_kind = plan_kind(plan_task)
    exporter.check(ExportRequest(adapters_as_inputs, dtype, len(graphs_kind.roles), with_past))
    one_adapter_graph = len(graphs_kind.roles) == 1 and not several  # what float16 rebuilds
    if dtype != "float32" and not one_adapter_graph:
        flag = "--mixed-batch" if mixed_batch else "--adapters-as-inputs"
        raise ConfigError(
            f"--dtype {dtype} is supported for single-graph exports without {flag}; export this one in float32"
        )
    if mixed_batch and len(graphs_kind.roles) > 1:
        raise ConfigError("--mixed-batch is not supported for seq2seq models yet; export each adapter alone")
    plan = graph_plan(
        plan_task, requested_with_past(with_past, exporter.cache_by_default), several, exporter.cache_in_program
    )
    mode = select_mode(merge, adapters_as_inputs, exporter, mixed_batch)
    out = Path(out) if out is not None else default_out(srcs[0], format)
    check_output_dir(out, force)  # fail before minutes of work, not after

    # -- source, base
    timings: dict[str, float] = {}
    tick = time.perf_counter()
    adapters = read_sources(srcs, model, task, out)  # each SRC's own task unless ``task`` overrides it
    mode.check_sources(adapters)
    names = mode.names(adapters)
    loaded = load_base(adapters, dtype)  # in the export's dtype: float16 weights never pass through float32
    timings["load_s"] = time.perf_counter() - tick
    _memory("base")

    # -- capture, bind (one set of graphs per source: a swappable export compares each adapter)
    tick = time.perf_counter()
    bound = [bind(plan.capture(loaded.model, _in_dtype(state, dtype))) for state in adapters.states]
    mode.after_bind(adapters, bound)
    timings["capture_s"] = time.perf_counter() - tick
    graphs = bound[0]
    _memory("capture")

    # -- reference, then the mode passes
    tick = time.perf_counter()
    plan.reference(graphs)
    comparisons = mode.comparisons(plan, loaded.model, adapters, names, bound)
    timings["reference_s"] = time.perf_counter() - tick
    _memory("reference")
    tick = time.perf_counter()
    merged = mode.apply(graphs, tolerance)
    timings["mode_s"] = time.perf_counter() - tick
    _memory("mode passes")

    recorded_dtype = dtype if one_adapter_graph else None  # the others are float32 only and do not say so
    # the largest rank of the sources: formats whose adapter files have one fixed shape pad every adapter to it
    rank = max((s.rank or 0 for gs in bound for g in gs for s in g.program.sites.values()), default=0)
    options = WriteOptions(
        opset=opset,
        external_data=external_data,
        adapter_rank=rank or None,
        quantize=quant.scheme if quant is not None else None,
    )
    with atomic_dir(out, force) as tmp:
        # -- exporter
        for g in graphs:
            tick = time.perf_counter()
            metadata = _metadata(plan, mode, adapters, names, g, recorded_dtype)
            (tmp / exporter.model_file(g.role)).parent.mkdir(parents=True, exist_ok=True)  # unet/model.onnx
            exporter.write(g.program, tmp / exporter.model_file(g.role), metadata, options)
            timings[_timing("export", g)] = time.perf_counter() - tick
            _memory(_timing("export", g)[:-2])
        mode.write_side_files(exporter, tmp, graphs, names)
        # every reference is computed and every file written: the runtime verifying them needs the memory
        release_weights([loaded.model] + [g.program.graph_module for gs in (*bound, graphs) for g in gs])
        _memory("release")

        # -- verify: one step for every comparison, failures raised once all are known
        reports = _verify(exporter, tmp, graphs, comparisons, tolerance, timings)
        _memory("verify")
        for report in reports:
            report.raise_if_failed(
                hint=f"nothing was written to {out}; if every figure is close to its bound, a larger --atol or "
                "--rtol may be justified"
            )
        quantization = None
        if quant is not None:  # the verified float files to quantized weights, measured against the same references
            quantization = quantize_stage(quant, exporter, tmp, graphs, comparisons, timings)

        # -- artifact
        tick = time.perf_counter()
        write_artifact(
            tmp,
            exporter=exporter,
            options=options,
            plan=plan,
            mode=mode,
            graphs=graphs,
            adapters=adapters,
            names=names,
            loaded=loaded,
            checks=(comparisons, reports, merged),
            tolerance=tolerance,
            dtype=recorded_dtype,
            timings=timings,
            quantization=quantization,
        )
        logger.debug("artifact files written in %.1f s", time.perf_counter() - tick)
    logger.info(
        "exported %s (%s, %s) to %s: %s", ", ".join(map(str, srcs)), exporter.name, mode.name, out,
        "; ".join(r.summary() for r in reports),
    )  # fmt: skip
    return out


def _in_dtype(state: AdapterState, dtype: str) -> AdapterState:
    """``state`` with its float tensors in the export's ``dtype`` (a float16 graph takes float16 adapter weights).

    Merges still fold in float32 (``MergeLowRankPass``) before rounding to the weight's dtype.
    """
    import torch
    from torch import nn

    if dtype == "float32":
        return state
    to = getattr(torch, dtype)
    tensors = {
        k: nn.Parameter(t.detach().to(to), requires_grad=False) if t.is_floating_point() else t
        for k, t in state.tensors.items()
    }
    return replace(state, tensors=tensors)


def _metadata(
    plan: GraphPlan, mode: Mode, adapters: Adapters, names: list[str], graph: Graph, dtype: str | None
) -> dict[str, str]:
    """``peftc.*`` entries stored in a model file (ONNX metadata_props, TorchScript's peftc.json…)."""
    metadata = {"peftc.task": plan.task}
    if graph.role is not None:  # which graph of several
        metadata["peftc.graph"] = graph.role
    metadata.update(
        {
            "peftc.peft_type": adapters.states[0].config.peft_type,
            **mode.metadata(names),
            "peftc.merged": str(mode.merged).lower(),
            "peftc.with_past": str(plan.with_past).lower(),
        }
    )
    if dtype is not None:
        metadata["peftc.dtype"] = dtype
    return metadata


def release_weights(modules: Sequence[Any]) -> None:
    """Free the weights of ``modules`` (and of the programs captured from them), keeping their structure.

    Every parameter and buffer becomes an empty tensor of its dtype, so that the verification
    step's runtime (ONNX Runtime loading the written file) does not hold its copy of the weights
    beside torch's: the export's peak memory stays near one copy of the weights, not two. The
    torch references are computed before this; the configs, names and example inputs stay.
    """
    import gc

    import torch

    stores = [store for module in modules for sub in module.modules() for store in (sub._parameters, sub._buffers)]
    for store in stores:
        for name, tensor in store.items():
            if tensor is None or not tensor.numel():
                continue
            if tensor.untyped_storage().resizable():  # freed even where something else still views it
                tensor.untyped_storage().resize_(0)
            empty = torch.empty(0, dtype=tensor.dtype)
            store[name] = torch.nn.Parameter(empty, False) if isinstance(tensor, torch.nn.Parameter) else empty
    gc.collect()


def _memory(stage: str) -> None:
    """Log (debug) the process's resident memory now and its peak so far, after ``stage``: where an export's peak is."""
    if not logger.isEnabledFor(logging.DEBUG):
        return
    from peftc.reporting.meter import peak_memory_mb, proc_status_mb

    mb = 2**20 / 1e6  # MiB -> MB
    now, peak = proc_status_mb("VmRSS") or 0.0, peak_memory_mb() or 0.0  # not Linux: the peak alone
    logger.debug("memory after %s: rss %.0f MB, peak %.0f MB", stage, now * mb, peak * mb)


def _timing(stage: str, graph: Graph) -> str:
    return f"{stage}_s" if graph.role is None else f"{stage}_{graph.role}_s"


def _verify(exporter, directory: Path, graphs: list[Graph], comparisons, tolerance, timings: dict[str, float]):
    """The verification step: each comparison's file run vs its torch reference (reports in comparison order)."""
    from peftc.exporters.verify import verify_artifact

    reports = {}
    for g in graphs:
        tick = time.perf_counter()
        for i, c in enumerate(comparisons):
            if c.graph is g:
                reports[i] = verify_artifact(
                    exporter,
                    directory / exporter.model_file(g.role),
                    g.program,
                    g.cases,
                    c.reference,
                    atol=tolerance.atol,
                    rtol=tolerance.rtol,
                    reference_name=c.reference_name,
                    raise_on_failure=False,
                    adapter=directory / c.adapter if c.adapter is not None else None,
                )
        timings[_timing("verify", g)] = time.perf_counter() - tick
    return [reports[i] for i in range(len(comparisons))]
