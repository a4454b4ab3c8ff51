"""ONNX exporter: a captured program to ``model.onnx`` with named dynamic batch and sequence dims.

The program goes to PyTorch's dynamo-based ONNX exporter (``torch.onnx.export(..., dynamo=True)``),
which decomposes it to the ops onnxscript's torch library implements and translates it. A program
whose graph is still op for op its capture (a merged one: the merge folds weights, not ops) goes as
the capture's own ``ExportedProgram`` holding the program's weights
(:meth:`~peftc.program.Program.exported_program`); any other (adapter ops, lifted inputs) has its
graph module traced by ``torch.export`` once more (one more trace of the model before the
decomposition trace). Every graph input shares the same two symbolic dims, named ``batch`` and
``sequence`` in the ONNX file, so ONNX Runtime (and optimum) see one batch size and one sequence
length for ``input_ids``, ``attention_mask`` and the rest, whichever way the program went.

What is exported is exactly the program: an unmerged LoRA program keeps its branch as ops
(``MatMul`` beside the base ``Gemm``/``MatMul``), a merged one is the base graph op for op with
folded weights. Weights go to ``model.onnx.data`` (external data) when they exceed
:data:`EXTERNAL_DATA_THRESHOLD`, or when asked. External data is what keeps a big export's memory
near its weights: the tensors are written to the file one by one straight from the torch weights,
while an inline file is built as a protobuf holding every weight, then serialized (a second
copy), then read back by the checker (a third) — and protobuf cannot hold a file over 2 GiB
anyway. Large tensors are aligned to 64 KiB in the data file, so ONNX Runtime memory-maps them
instead of reading them into buffers of its own.

The format's exporter (:data:`ONNX`, registered as ``--format onnx``) takes every configuration of
the pipeline: float16, KV-cache graphs (on by default for causal LMs, as optimum exports them),
several graphs (``encoder_model.onnx`` + ``decoder_model.onnx``: optimum's file names) and swappable
adapters (graph inputs backed by defaults, adapters as ``.onnx_adapter`` files: :mod:`.swappable`).
Verification runs the file with ONNX Runtime (:func:`run_onnx`; a file of float16 weights with
:func:`lean_half_options`, one copy of its weights). A causal LM's KV-cache file also
gets onnxruntime-genai's ``genai_config.json`` (:mod:`.genai`).
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from peftc.errors import CaptureError, ConfigError, ExportVerificationError
from peftc.program import Program, is_with_past

from .genai import GenaiConfig
from .onnx_optimize import optimize
from .onnx_quantize import OnnxQuantizer
from .registry import ExportRequest, WriteOptions, register_exporter, role_file
from .swappable import OnnxAdapterFiles
from .verify import VerifyCase

__all__ = [
    "DEFAULT_OPSET",
    "EXTERNAL_DATA_THRESHOLD",
    "MODEL_FILE",
    "ONNX",
    "export_program_onnx",
    "lean_half_options",
    "run_onnx",
]

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
DEFAULT_OPSET = 18
#: Initializer bytes above which weights are written to ``<model>.data``: an inline file costs about three
#: copies of its weights in memory while it is written and checked (module docstring); protobuf's limit is 2 GiB.
EXTERNAL_DATA_THRESHOLD = 256 * 2**20
#: Offset alignment of tensors above ``_ALIGN_ABOVE`` bytes in external data: ONNX Runtime maps aligned
#: tensors instead of copying them.
_EXTERNAL_DATA_ALIGNMENT = 65536
_ALIGN_ABOVE = 2**20
_MIN_OPSET = 18  # the dynamo exporter emits opset 18 ops (LayerNormalization, Split with inputs…)


def export_program_onnx(
    program: Program,
    path: str | Path,
    opset: int = DEFAULT_OPSET,
    external_data: bool | None = None,
    metadata: dict[str, str] | None = None,
    input_defaults: dict | None = None,
) -> onnx.ModelProto:
    """Export ``program`` to an ONNX file with dynamic ``batch`` and ``sequence`` dims.

    Args:
        program: an eval-mode :class:`~peftc.program.Program` (merged or not).
        path: the ``.onnx`` file to write; its parent directory must exist.
        opset: ONNX opset (18 or later).
        external_data: ``True`` writes weights to ``<path>.data``; ``False`` keeps them inline
            (refused above 2 GiB); ``None`` decides by size (:data:`EXTERNAL_DATA_THRESHOLD`, 256 MiB).
        metadata: extra ``metadata_props`` stored in the model (``peftc.*`` keys by convention).
        input_defaults: graph input name -> numpy array: stored as an initializer under the input's
            name, so the input may be left out of a run's feeds (ONNX IR ≥ 4: an initializer that is
            also a graph input is an overridable default). Used for swappable adapter tensors.

    Returns:
        The model as written (without loading external data).

    Raises:
        ConfigError: a train-mode program, or an opset below 18.
        CaptureError: the exporter could not trace or translate the graph.
    """
    path = Path(path)
    if program.mode != "eval":
        raise ConfigError(
            f"cannot export a {program.mode}-mode program (it bakes in dropout); capture the model with mode='eval'"
        )
    if not isinstance(opset, int) or opset < _MIN_OPSET:
        raise ConfigError(f"opset={opset!r} is not supported; use an ONNX opset >= {_MIN_OPSET}")

    onnx_program = _run_exporter(program, opset)
    optimize(onnx_program)  # onnxscript's optimizer less its quadratic rule (onnx_optimize)
    model = onnx_program.model
    _name_dims(model, program)
    model.metadata_props.update({str(k): str(v) for k, v in (metadata or {}).items()})
    _set_input_defaults(model, input_defaults or {})

    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if external_data is None:
        external_data = size > EXTERNAL_DATA_THRESHOLD
    elif not external_data and size >= 2**31:
        raise ConfigError(f"the model's weights take {size / 2**30:.2f} GiB; ONNX needs external data above 2 GiB")
    import onnx_ir as ir

    try:
        if external_data:
            ir.save(
                model,
                path,
                external_data=f"{path.name}.data",
                alignment=_EXTERNAL_DATA_ALIGNMENT,
                align_threshold=_ALIGN_ABOVE,
            )
        else:
            ir.save(model, path)
    finally:
        _drop_weights(model)
    onnx.checker.check_model(str(path))  # a path, so files with external data are checked too
    logger.info("wrote %s (%.1f MB of weights%s)", path, size / 1e6, ", external data" if external_data else "")
    return onnx.load(str(path), load_external_data=False)


def _run_exporter(program: Program, opset: int):
    """``torch.onnx.export`` of the capture's ``ExportedProgram`` when the graph is still the captured one
    (a merged program: :meth:`~peftc.program.Program.exported_program`), else of the graph module, traced
    again with named dims (min size 1 first, then 2 as capture does)."""
    names = program.input_names
    errors: list[BaseException] = []
    exported = program.exported_program()
    if exported is not None:  # one trace fewer: torch.onnx decomposes the capture itself
        try:
            with _exporter_quiet():
                return torch.onnx.export(
                    exported,
                    dynamo=True,
                    input_names=list(names),
                    output_names=list(program.output_names),
                    opset_version=opset,
                    verbose=False,
                    optimize=False,  # onnx_optimize.optimize below
                )
        except Exception as e:  # the graph module's own trace below is the reference path
            logger.debug("ONNX export of the captured program failed, tracing its graph module: %s", e)
        finally:
            del exported
    for min_dim in (1, 2):
        # GraphModule.forward(*inputs) takes flat positional tensors: one spec per input. Inputs
        # other than token inputs (lifted adapter tensors) name their own dims (``lora_rank``).
        shapes = program.dynamic_shapes(min_dim)
        try:
            with _exporter_quiet():
                return torch.onnx.export(
                    program.graph_module,
                    tuple(program.example_inputs),
                    dynamic_shapes=shapes,
                    dynamo=True,
                    input_names=list(names),
                    output_names=list(program.output_names),
                    opset_version=opset,
                    verbose=False,
                    optimize=False,  # onnx_optimize.optimize below
                )
        except Exception as e:  # the exporter raises torch, onnxscript and plain errors alike
            errors.append(e)
            logger.debug("ONNX export with min dim %d failed: %s", min_dim, e)
    e = errors[-1]
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise CaptureError(
        f"torch.onnx.export failed for the {program.task.name} program: {type(e).__name__}: {first}"
    ) from e


def _drop_weights(model) -> None:
    """Detach the written model's values from the torch weights they view.

    onnxscript's rewrite rules (module globals) keep the last graph they matched; that graph keeps
    its initializers and, in the graph inputs' reference counter, the values the exporter first
    made of the weights (inputs, then initializers): each holds a view of a torch weight, which
    would outlive the export and hold one more copy of the weights through the verification step.
    """
    for graph in model.graphs():
        stale = getattr(graph.inputs, "_ref_counter", {})  # onnx_ir keeps removed inputs' values there
        for value in [*graph.initializers.values(), *stale]:
            if getattr(value, "const_value", None) is not None:
                value.const_value = None


def _set_input_defaults(model, defaults: dict) -> None:
    """Back the named graph inputs by initializers (their default values)."""
    import numpy as np
    import onnx_ir as ir

    inputs = {v.name: v for v in model.graph.inputs}
    missing = sorted(set(defaults) - set(inputs))
    if missing:
        raise ValueError(f"input defaults for {missing} but the graph has no such inputs")
    for name, array in defaults.items():
        value = inputs[name]
        value.const_value = ir.tensor(np.ascontiguousarray(array), name=name)
        model.graph.register_initializer(value)


@contextlib.contextmanager
def _exporter_quiet() -> Iterator[None]:
    """``torch.onnx.export``'s warnings that say nothing about a peftc program."""
    with warnings.catch_warnings(), _quiet_logger("torch.onnx._internal.exporter._registration"):
        # The unlifted graph module reports training=True and refuses .eval(); the graph
        # itself is an eval capture (checked by the caller), so the exporter's warning is noise.
        warnings.filterwarnings("ignore", message="Exporting a model while it is in training mode")
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        yield


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Silence a chatty logger (the exporter warns that torchvision's ops are not registered)."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _name_dims(model, program: Program) -> None:
    """Give the dynamic dims of inputs and outputs the program's names (``batch``, ``sequence``).

    The exporter names them after the ``Dim`` objects already when it traces the graph module; a
    program converted from its capture (or a renamed exporter) has symbols (``s0``…): this maps them
    through the inputs, in expressions too (a present cache's ``s24 + s36`` becomes
    ``past_sequence + sequence``), so the ONNX interface never depends on the path taken.
    """
    import onnx_ir as ir

    mapping: dict[str, str] = {}
    for value in model.graph.inputs:
        wanted = program.dynamic_dims.get(value.name, {})
        if value.shape is None:
            continue
        for axis, name in wanted.items():
            dim = value.shape[axis]
            if isinstance(dim, ir.SymbolicDim) and dim.value is not None and dim.value != name:
                mapping.setdefault(dim.value, name)
    if not mapping:
        return
    symbols = {k: v for k, v in mapping.items() if k.isidentifier()}

    def rename(dim: str | None) -> str | None:  # a whole dim, or the symbols of an expression ("s24 + s36")
        if dim is None or dim in mapping:
            return mapping.get(dim, dim)
        return _rename_symbols(dim, symbols)

    for value in [*model.graph.inputs, *model.graph.outputs]:
        if value.shape is None:
            continue
        dims = [ir.SymbolicDim(rename(d.value)) if isinstance(d, ir.SymbolicDim) else d for d in value.shape]
        value.shape = ir.Shape(dims)


def _rename_symbols(expression: str, names: dict[str, str]) -> str:
    """``expression`` (a dim such as ``s24 + s36``) with its symbols renamed, printed as sympy orders it (as
    torch.onnx prints the dims it names itself: ``past_sequence + sequence``)."""
    import sympy

    tokens = set(re.findall(r"[A-Za-z_]\w*", expression))
    if not tokens & names.keys():
        return expression
    try:
        parsed = sympy.parse_expr(expression, local_dict={t: sympy.Symbol(t) for t in tokens}, evaluate=True)
        return str(parsed.subs({sympy.Symbol(k): sympy.Symbol(v) for k, v in names.items() if k in tokens}))
    except Exception:  # not an expression sympy reads: rename the tokens as they stand
        return re.sub(r"[A-Za-z_]\w*", lambda m: names.get(m.group(0), m.group(0)), expression)


def run_onnx(
    path: str | Path,
    cases: Sequence[VerifyCase],
    output: str | Sequence[str] = "logits",
    adapter_path: str | Path | None = None,
) -> list:
    """Outputs of an ``.onnx`` file under ONNX Runtime (CPUExecutionProvider) on every case.

    Args:
        path: the model file.
        cases: inputs (every graph input the file needs must be in each case).
        output: one output name (one array per case) or several (a list per case).
        adapter_path: an ``.onnx_adapter`` activated for every run (swappable exports).
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), verification_options(path), providers=["CPUExecutionProvider"])
    run_options = ort.RunOptions()
    if adapter_path is not None:
        adapter = ort.LoraAdapter()
        adapter.Load(str(adapter_path))
        run_options.add_active_adapter(adapter)
    feeds_names = [i.name for i in session.get_inputs()]  # overridable initializers (adapter defaults) not listed
    types = {i.name: i.type for i in session.get_inputs()}
    names = [output] if isinstance(output, str) else list(output)
    mixed = session.get_modelmeta().custom_metadata_map.get("peftc.mixed_batch") == "true"
    n_adapters = len(session.get_modelmeta().custom_metadata_map.get("peftc.adapters", "").split(","))
    outs = []
    for case in cases:
        missing = [n for n in feeds_names if n not in case.inputs]
        if missing:
            raise ExportVerificationError(f"{path} takes input(s) {missing} that the program does not have")
        feeds = {n: _as(case.inputs[n].numpy(), types[n]) for n in feeds_names}
        if mixed:  # the graph cannot say that an index is out of range (its Gather fails): refuse it here
            from peftc.passes.mixed_batch import ADAPTER_INDEX, check_adapter_index

            feeds[ADAPTER_INDEX] = check_adapter_index(feeds[ADAPTER_INDEX], n_adapters, len(feeds[ADAPTER_INDEX]))
        result = session.run(names, feeds, run_options)
        outs.append(result[0] if isinstance(output, str) else result)
    return outs


def verification_options(path: str | Path):
    """The ``onnxruntime.SessionOptions`` of peftc's verification session for the file at ``path``.

    A float32 file gets ONNX Runtime's defaults; a file with half-precision weights (float16,
    bfloat16) gets :func:`lean_half_options`: the half weights, not a float32 copy of them (twice the file).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return lean_half_options(options) if _has_half_weights(path) else options


def lean_half_options(options=None):
    """``SessionOptions`` (``options``, changed, or new ones) that run a half-precision model on ONNX
    Runtime's CPU provider with one copy of its weights.

    ONNX Runtime's CPU kernels are float32: its session puts a ``Cast`` to float32 before every half
    op, and its default graph optimizations fold each cast weight into a float32 initializer: a
    float32 copy of every weight, held for the session's life (measured: 1.95x the file's weights in
    anonymous memory on a 3B LLaMA shape, 2.4x on GPT-2 355M). Here the casts stay in the graph and
    run op by op, so the session holds the memory-mapped half weights plus the float32 weights of the
    ops running:

    - ``ORT_ENABLE_BASIC``: its constant folding runs before the casts are inserted (the extended and
      all levels fold them, even with ``ConstantFolding`` disabled by name);
    - ``PRIORITY_BASED`` execution order: the default topological order runs every weight's cast
      first (they depend on nothing), so all the float32 copies would be alive at once;
    - no CPU memory arena: a float32 weight is returned when its op is done, not kept for reuse.

    The outputs are those of the default options within a float16 rounding (the same float32
    kernels on the same values, without the fusions of the higher levels); the session opens faster
    and each run is slower (every run casts the weights again).
    """
    import onnxruntime as ort

    options = options if options is not None else ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    options.enable_cpu_mem_arena = False
    return options


def _has_half_weights(path: str | Path) -> bool:
    """Whether the ONNX file's initializers include float16 or bfloat16 ones (external data is not read)."""
    model = onnx.load(str(path), load_external_data=False)
    half = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    return any(t.data_type in half for t in model.graph.initializer)


def _as(array: np.ndarray, onnx_type: str) -> np.ndarray:
    """A float feed in the graph's float type (float32 cases into a float16 graph's cache inputs)."""
    if onnx_type == "tensor(float16)" and array.dtype != np.float16:
        return array.astype(np.float16)
    return array


class OnnxExporter:
    """``--format onnx``: ``model.onnx`` for ONNX Runtime and optimum; takes every export configuration."""

    name = "onnx"
    runtime = "ONNX Runtime"
    summary = "model.onnx (ONNX Runtime, optimum)"
    cache_by_default = True  # optimum's causal-lm exports are KV-cache graphs
    cache_in_program = False  # past_key_values.* in, present.* out
    adapter_files = OnnxAdapterFiles()
    runtime_config = GenaiConfig()  # onnxruntime-genai: og.Model(artifact_dir)
    quantizer = OnnxQuantizer()  # --quantize int4|int8: ONNX Runtime's quantizers on the verified file

    def model_file(self, role: str | None = None) -> str:
        return role_file(role, MODEL_FILE)  # model.onnx, encoder_model.onnx, unet/model.onnx, …

    def check(self, request: ExportRequest) -> None:
        return None

    def write(self, program: Program, path: Path, metadata: dict[str, str], options: WriteOptions) -> None:
        defaults = {name: t.detach().float().numpy().copy() for name, t in program.input_defaults.items()}
        export_program_onnx(
            program,
            path,
            opset=options.opset,
            external_data=options.external_data,
            metadata=metadata,
            input_defaults=defaults or None,
        )

    def run(
        self,
        path: Path,
        cases: Sequence[VerifyCase],
        input_names: Sequence[str],
        output_names: Sequence[str],
        adapter: Path | None = None,
    ) -> list[Any]:
        # ONNX Runtime feeds by name (the session's inputs); one output name gives one array per case
        output: str | list[str] = output_names[0] if len(output_names) == 1 else list(output_names)
        if adapter is None:
            return run_onnx(path, cases, output=output)
        return run_onnx(path, cases, output=output, adapter_path=adapter)

    def describe_io(self, path: Path, program: Program) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        from .manifest import onnx_io

        return onnx_io(onnx.load(str(path), load_external_data=False))

    def manifest_entries(self, path: Path, program: Program, options: WriteOptions) -> dict[str, Any]:
        task = program.task.optimum_task
        return {"opset": options.opset, "optimum_task": f"{task}-with-past" if is_with_past(program) else task}


#: The ONNX exporter, as registered.
ONNX = register_exporter(OnnxExporter())
