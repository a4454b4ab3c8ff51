"""Encoder-decoder LMs (T5, BART…): two verified graphs in the layout optimum's ``ORTModelForSeq2SeqLM`` loads.

An encoder-decoder model is not one function of the token inputs: generation runs the encoder
once and the decoder once per new token. The export therefore holds two graphs, each captured
with :func:`peftc.program.capture` through its own wrapper (``transform=``)::

    encoder_model.onnx   input_ids [batch, sequence], attention_mask [batch, sequence]
                         -> last_hidden_state [batch, sequence, hidden]
    decoder_model.onnx   input_ids [batch, sequence] (decoder tokens),
                         encoder_attention_mask [batch, encoder_sequence],
                         encoder_hidden_states [batch, encoder_sequence, hidden]
                         -> logits [batch, sequence, vocab]

These are optimum's input and output names (``ORTEncoder`` / ``ORTDecoderForSeq2Seq`` feed the
session by name). The decoder takes no KV cache: every step re-runs the whole decoder prefix, so
``config.json`` says ``use_cache: false`` and optimum is loaded with ``use_cache=False``.

The adapter is one HF PEFT state with keys for encoder and decoder modules
(``base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight`` and
``…decoder…``). Each graph binds the subset it holds (:meth:`AdapterState.subset`): keys under
the encoder module's name go to the encoder graph, the rest (decoder, LM head) to the decoder
graph. The split is a partition and each binding checks that every key it was given found its
module, so together they prove the whole adapter is used. Merging folds each graph's sites.

Each graph is verified with ONNX Runtime against its unmerged adapted torch program on held-out
inputs (a batch of one, a new shape, a left-padded batch); the decoder is fed the torch encoder's
hidden states, so each figure measures one graph.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftc.adapters import AdapterState
from peftc.errors import ConfigError

__all__ = [
    "DECODER_FILE",
    "ENCODER_FILE",
    "SEQ2SEQ_TASK",
    "DecoderModule",
    "EncoderModule",
    "adapted_programs",
    "decoder_cases",
    "encoder_prefix",
    "export_seq2seq",
    "split_state",
]

logger = logging.getLogger(__name__)

SEQ2SEQ_TASK = "seq2seq"
ENCODER_FILE = "encoder_model.onnx"
DECODER_FILE = "decoder_model.onnx"
_ENCODER_SEQ = "encoder_sequence"


class EncoderModule(nn.Module):
    """Captured around a seq2seq LM: ``input_ids, attention_mask -> last_hidden_state`` of its encoder.

    The whole model is the attribute ``model`` (parameter names stay ``model.<HF name>``, so HF PEFT
    keys map as for every other program); only the encoder runs.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.input_names = ["input_ids", "attention_mask"]
        self.output_names = ["last_hidden_state"]

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        input_ids, attention_mask = inputs
        encoder = self.model.get_encoder()
        return encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state


class DecoderModule(nn.Module):
    """Captured around a seq2seq LM: decoder tokens + encoder states -> ``logits`` (no KV cache).

    The decoder's own positions are causal (no decoder mask, as optimum runs it); the encoder's
    padding enters through ``encoder_attention_mask``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.input_names = ["input_ids", "encoder_attention_mask", "encoder_hidden_states"]
        self.output_names = ["logits"]
        self.dynamic_dims = {
            "input_ids": {0: "batch", 1: "sequence"},
            "encoder_attention_mask": {0: "batch", 1: _ENCODER_SEQ},
            "encoder_hidden_states": {0: "batch", 1: _ENCODER_SEQ},
        }

    def example_inputs(self, batch: int = 2, seq: int = 3, encoder_seq: int = 5) -> tuple[torch.Tensor, ...]:
        """Capture example: every dynamic size ≥ 2 and distinct, so none is specialised or confused."""
        gen = torch.Generator().manual_seed(0)
        cfg = self.model.config
        vocab = int(getattr(cfg, "vocab_size", 100) or 100)
        dtype = next(self.model.parameters()).dtype
        return (
            torch.randint(1, max(vocab, 2), (batch, seq), generator=gen),
            torch.ones(batch, encoder_seq, dtype=torch.long),
            torch.randn(batch, encoder_seq, _hidden_size(cfg), generator=gen).to(dtype),
        )

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        input_ids, encoder_attention_mask, encoder_hidden_states = inputs
        out = self.model(
            attention_mask=encoder_attention_mask,
            decoder_input_ids=input_ids,
            encoder_outputs=(encoder_hidden_states,),
            use_cache=False,
            return_dict=True,
        )
        return out.logits


def _hidden_size(cfg: Any) -> int:
    for key in ("d_model", "hidden_size", "n_embd"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ConfigError(f"cannot tell the hidden size of a {type(cfg).__name__}; seq2seq export needs d_model")


def encoder_prefix(model: nn.Module) -> str:
    """The HF module name of ``model``'s encoder (``encoder`` for T5, ``model.encoder`` for BART)."""
    get = getattr(model, "get_encoder", None)
    encoder = get() if callable(get) else None
    for name, module in model.named_modules():
        if module is encoder and name:
            return name
    raise ConfigError(
        f"{type(model).__name__} has no encoder submodule (get_encoder()); task seq2seq is for encoder-decoder "
        "models such as T5 and BART"
    )


def split_state(state: AdapterState, model: nn.Module) -> tuple[AdapterState, AdapterState]:
    """(encoder part, decoder part) of ``state``: keys under the encoder module, and every other key."""
    prefix = f"base_model.model.{encoder_prefix(model)}."
    return state.subset(lambda k: k.startswith(prefix)), state.subset(lambda k: not k.startswith(prefix))


def adapted_programs(model: nn.Module, state: AdapterState) -> tuple[Any, Any]:
    """Eval-mode encoder and decoder programs of ``model``, each with its part of ``state`` bound.

    A part with no tensors (an adapter that targets only decoder modules, say) leaves that graph
    the base model's.

    Raises:
        ConfigError: a method that changes the inputs (prompt methods), or a model without an encoder.
        AdapterMismatchError, TargetNotFoundError: the adapter does not fit the model.
    """
    from peftc.methods import get_method, methods
    from peftc.passes import insertion_pipeline
    from peftc.program import capture

    if get_method(state).transforms_inputs:
        layer_methods = [m.label for m in methods() if not m.transforms_inputs]
        raise ConfigError(
            f"seq2seq export takes adapters of methods that rewrite layers ({', '.join(layer_methods)}), not "
            f"{get_method(state).label}; export an adapter of one of those methods"
        )
    parts = split_state(state, model)
    programs = []
    for wrapper, part in zip((EncoderModule, DecoderModule), parts, strict=True):
        program = capture(model, SEQ2SEQ_TASK, mode="eval", transform=lambda m, _names, w=wrapper: w(m))
        if part.tensors:
            insertion_pipeline(state.config, part)(program)
        programs.append(program)
    return programs[0], programs[1]


def decoder_cases(
    decoder: Any, encoder_cases: Sequence[Any], encoder_states: Sequence[Any], seed: int = 4321
) -> list[Any]:
    """Decoder inputs paired with each encoder case: the encoder's states and mask, new decoder tokens.

    Decoder lengths (1, 4, 6) start with ``decoder_start_token_id``; the encoder's
    ``attention_mask`` rides along as an extra key (reports use it to mark padded cases).
    """
    from peftc.exporters.verify import VerifyCase

    cfg = decoder.model_config
    vocab = int(getattr(cfg, "vocab_size", 128) or 128)
    start = getattr(cfg, "decoder_start_token_id", None)
    start = int(start) if isinstance(start, int) else 0
    gen = torch.Generator().manual_seed(seed)
    cases = []
    for case, states, length in zip(encoder_cases, encoder_states, (1, 4, 6), strict=False):
        mask = case.inputs["attention_mask"]
        ids = torch.randint(3, vocab, (mask.shape[0], length), generator=gen)
        ids[:, 0] = start
        inputs = {
            "input_ids": ids,
            "encoder_attention_mask": mask,
            "encoder_hidden_states": torch.as_tensor(states),
            "attention_mask": mask,
        }
        cases.append(VerifyCase(case.name, inputs, f"{length} decoder tokens over: {case.description}"))
    return cases


def export_seq2seq(
    src: str | Path,
    merge: bool = False,
    model: str | Path | None = None,
    out: str | Path | None = None,
    force: bool = False,
    opset: int = 18,
    atol: float | None = None,
    external_data: bool | None = None,
    adapters_as_inputs: bool = False,
    with_past: bool | None = None,
) -> Path:
    """Export the seq2seq adapter of SRC: ``encoder_model.onnx`` + ``decoder_model.onnx``, verified.

    What :func:`peftc.exporting.export` does for task ``seq2seq`` (it calls this). Loadable with
    ``ORTModelForSeq2SeqLM.from_pretrained(out, use_cache=False)``.

    Args:
        src: a peftc run directory or an HF PEFT adapter directory (``task_type`` ``SEQ_2_SEQ_LM``).
        merge: fold the adapter into both graphs' weights.
        model: the base model directory; overrides what SRC records.
        out: the artifact directory; default ``SRC/export-onnx``.
        force: replace a non-empty ``out``.
        opset: ONNX opset (18 or later).
        atol: absolute tolerance on fp32 outputs (encoder states and decoder logits); default 1e-4.
        external_data: as for :func:`peftc.exporting.export`.
        adapters_as_inputs: not supported for seq2seq (refused).
        with_past: a decoder KV cache is not supported yet: ``True`` is refused.

    Returns:
        The artifact directory: ``encoder_model.onnx``, ``decoder_model.onnx``, ``config.json``
        (``use_cache: false``), ``generation_config.json``, tokenizer files, ``adapter/``,
        ``report.json``, ``manifest.json``.

    Raises:
        ConfigError: an unsupported option or method.
        OutputExistsError: ``out`` is not empty and ``force`` is not set.
        ExportVerificationError: a graph does not reproduce its torch program within ``atol``.
    """
    import onnx

    from peftc.exporters.manifest import MANIFEST_FILE, REPORT_FILE, adapter_info, build_manifest, onnx_io, write_json
    from peftc.exporters.onnx import export_program_onnx
    from peftc.exporters.verify import compare_outputs, make_cases, run_onnx, run_torch
    from peftc.exporting import (
        ADAPTER_SUBDIR,
        base_info,
        check_options,
        copy_adapter,
        default_out,
        refuse_out_over_inputs,
        write_model_files,
    )
    from peftc.files import atomic_dir, check_output_dir
    from peftc.models import load_model
    from peftc.passes import merge_pipeline
    from peftc.runs import resolve_source

    atol = check_options("onnx", opset, atol)  # None: the float32 default (1e-4)
    if adapters_as_inputs:
        raise ConfigError("--adapters-as-inputs is not supported for seq2seq models yet; export each adapter alone")
    if with_past:
        raise ConfigError(
            "--with-past is not supported for seq2seq models yet (the decoder re-reads its prefix each step); drop it"
        )
    out = Path(out) if out is not None else default_out(src, "onnx")
    check_output_dir(out, force)

    timings: dict[str, float] = {}
    tick = time.perf_counter()
    source = resolve_source(src, model, SEQ2SEQ_TASK)
    refuse_out_over_inputs(out, [Path(src), Path(source.adapter_dir), Path(source.base)])
    state = AdapterState.load(source.adapter_dir)
    loaded = load_model(source.base, SEQ2SEQ_TASK)
    timings["load_s"] = time.perf_counter() - tick

    tick = time.perf_counter()
    encoder, decoder = adapted_programs(loaded.model, state)
    timings["capture_s"] = time.perf_counter() - tick
    enc_cases = make_cases(encoder)
    enc_reference = run_torch(encoder, enc_cases, encoder.input_names)
    dec_cases = decoder_cases(decoder, enc_cases, enc_reference)
    dec_reference = run_torch(decoder, dec_cases, decoder.input_names)
    graphs = {
        "encoder": (ENCODER_FILE, encoder, enc_cases, enc_reference),
        "decoder": (DECODER_FILE, decoder, dec_cases, dec_reference),
    }
    reference_name = "the unmerged adapted torch program"

    merged_reports = {}
    if merge:
        for role, (_, program, cases, reference) in graphs.items():
            merge_pipeline()(program)
            left = sorted({s.method for s in program.sites.values()})
            if left:
                raise ConfigError(
                    f"--merge cannot fold {', '.join(left)} adapters into the weights; export without --merge"
                )
            merged_reports[role] = compare_outputs(
                run_torch(program, cases, program.input_names),
                reference,
                cases,
                SEQ2SEQ_TASK,
                atol=atol,
                candidate=f"the merged torch {role}",
                reference=reference_name,
            ).raise_if_failed(hint="the merge pass changed the model's outputs; nothing was written")

    adapter_name = source.run_dir.name if source.run_dir is not None else Path(source.adapter_dir).name
    with atomic_dir(out, force) as tmp:
        reports = {}
        for role, (file, program, cases, reference) in graphs.items():
            tick = time.perf_counter()
            export_program_onnx(
                program,
                tmp / file,
                opset=opset,
                external_data=external_data,
                metadata={
                    "peftc.task": SEQ2SEQ_TASK,
                    "peftc.graph": role,
                    "peftc.peft_type": state.config.peft_type,
                    "peftc.adapter": adapter_name,
                    "peftc.merged": str(bool(merge)).lower(),
                    "peftc.with_past": "false",
                },
            )
            timings[f"export_{role}_s"] = time.perf_counter() - tick
            tick = time.perf_counter()
            reports[role] = compare_outputs(
                run_onnx(tmp / file, cases, output=program.output_names[0]),
                reference,
                cases,
                SEQ2SEQ_TASK,
                atol=atol,
                candidate=f"ONNX Runtime ({file})",
                reference=f"{reference_name} ({role})",
            )
            timings[f"verify_{role}_s"] = time.perf_counter() - tick
        for report in reports.values():
            report.raise_if_failed(
                hint=f"nothing was written to {out}; if every figure is close to atol, a larger --atol may be justified"
            )

        write_model_files(tmp, loaded, with_past=False)
        copy_adapter(source.adapter_dir, tmp / ADAPTER_SUBDIR)
        write_json(
            tmp / REPORT_FILE,
            {
                "verified": True,
                "atol": float(atol),
                "max_abs_diff": max(r.max_abs_diff for r in reports.values()),
                "cases": {
                    role: [
                        {"name": c.name, "shape": c.shape, "padded": c.padded, "description": c.description}
                        for c in cases
                    ]
                    for role, (_, _, cases, _) in graphs.items()
                },
                "onnx_vs_torch": {role: r.to_dict() for role, r in reports.items()},
                "merged_vs_unmerged": {role: r.to_dict() for role, r in merged_reports.items()} or None,
                "timings": {k: round(v, 3) for k, v in timings.items()},
            },
        )
        inputs, outputs = [], []
        for role, (file, *_) in graphs.items():
            graph_inputs, graph_outputs = onnx_io(onnx.load(str(tmp / file), load_external_data=False))
            inputs += [{**i, "graph": role} for i in graph_inputs]
            outputs += [{**o, "graph": role} for o in graph_outputs]
        manifest = build_manifest(
            tmp,
            format="onnx",
            task=SEQ2SEQ_TASK,
            inputs=inputs,
            outputs=outputs,
            base_model=base_info(source.base, loaded),
            adapter=adapter_info(source.adapter_dir, adapter_name, state.config.peft_type, state.config.to_dict()),
            merged=merge,
            opset=opset,
            extra={
                "optimum_task": encoder.task.optimum_task,
                "model_files": {role: file for role, (file, *_) in graphs.items()},
                "with_past": False,
            },
        )
        write_json(tmp / MANIFEST_FILE, manifest)
    summary = "; ".join(r.summary() for r in reports.values())
    logger.info("exported %s (seq2seq, merged=%s) to %s: %s", src, merge, out, summary)
    return out
