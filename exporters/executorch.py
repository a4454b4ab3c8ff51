"""ExecuTorch exporter: a captured program to a ``model.pte`` for ExecuTorch's on-device runtime.

The program's graph module is re-exported with ``torch.export`` with the capture's named dims
(``batch``, ``sequence``), lowered to the Edge dialect with the XNNPACK partitioner
(``to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])``: linears, matmuls, softmax
and elementwise ops run as XNNPACK delegates, the rest as ExecuTorch's portable kernels) and
serialised with ``to_executorch()``. Python runs it with ``executorch.runtime.Runtime``; C++ with
``executorch::extension::Module`` (inputs in the program's input order).

**Bounded dims.** ExecuTorch plans every activation buffer ahead of time for the largest shape a
dynamic dim can take, so each dim needs a small upper bound: ``sequence`` is bounded by
:meth:`Program.max_positions` (the model's position table, as for AOTInductor), ``batch`` by
:data:`MAX_BATCH` (the program's own bound, 2**16, would plan gigabytes). Both bounds go into
``manifest.json`` (``executorch.dim_bounds``) and the embedded metadata. ExecuTorch itself does not
check an input against its planned buffers (a larger one is written past them), so
:func:`run_executorch` refuses it first (:func:`check_bounds`); a C++ caller must do the same.

A ``.pte`` has no key/value metadata, so the interface (input and output names, task, dims, bounds,
backend) and the ``peftc.*`` entries are a constant method ``peftc_json`` of the program
(``constant_methods``): JSON as a list of its UTF-8 byte values (ExecuTorch has no string values),
read by :func:`read_info` or in C++ with ``module.execute("peftc_json")``.

**What the lowering needs from the graph.** ``scaled_dot_product_attention`` is written out as
matmuls and a softmax before the re-export (ExecuTorch's decomposition of it breaks the ``view``
HF applies after it; :func:`_attention_as_matmuls`), and the Edge IR validator is off (it pins the
batch dim to the example's size; :func:`_check_dims` checks instead that every named dim stayed
dynamic). The written file is run once in a child process: where the XNNPACK-delegated program
crashes the runtime (measured: unmerged DoRA, a segfault on every input) or XNNPACK's passes refuse
the graph (measured: LLaMA-Adapter, ``ConvertToLinearPass``), it is lowered again with ExecuTorch's
portable kernels only and the manifest says ``backend: portable``. The numerical
verification then runs the file here as for every format.

Measured on the tiny GPT-2 / BERT LoRA programs (merged and unmerged): max |.pte − program| ~2e-7
on batch 1, a new batch/sequence shape and a left-padded batch.

**The LLM-runner layout** (``--with-past``): a causal LM as ExecuTorch's LLM runners drive it,
``forward(tokens int64[1, seq], input_pos int64[seq]) -> logits`` with the KV cache as mutable
buffers inside the program (transformers' static cache, :mod:`peftc.exporting.llm`), ``seq`` bounded
by the cache length, and the runner's constant methods (``get_max_seq_len``, ``get_vocab_size``,
``get_bos_id``, ``get_eos_ids``, ``use_kv_cache``, ``enable_dynamic_shape``, ``get_n_layers``…).
Verification runs its cases in order on one loaded method, as a generation does: a prefill, decode
steps, then a new prefill from position 0 (:func:`peftc.exporters.verify.make_cases`).

Refused up front (:meth:`ExecuTorchExporter.check`): adapters as inputs, float16 and several graphs
(seq2seq); at capture, prompt methods in the LLM-runner layout.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import subprocess
import sys
import tempfile
import time
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import fx

from peftc.errors import CaptureError, ConfigError
from peftc.program import Program, dynamic_shapes, is_llm_runner

from .executorch_data import ExecuTorchAdapterFiles
from .executorch_quantize import ExecuTorchQuantizer
from .manifest import program_io
from .registry import ExportRequest, GraphlessFileExporter, WriteOptions, register_exporter
from .torchscript import check_one_float32_graph
from .verify import VerifyCase, numpy_outputs

__all__ = [
    "EXECUTORCH",
    "MAX_BATCH",
    "MODEL_FILE",
    "dim_bounds",
    "check_bounds",
    "executorch_available",
    "export_program_executorch",
    "load_executorch",
    "read_info",
    "run_executorch",
    "runner_metadata",
]

logger = logging.getLogger(__name__)

MODEL_FILE = "model.pte"
#: Upper bound of the ``batch`` dim: ExecuTorch plans activation memory for the largest batch.
MAX_BATCH = 8
#: Name of the constant method holding the interface and metadata (JSON as UTF-8 bytes).
INFO_METHOD = "peftc_json"
_INSTALL = "pip install 'peftc[edge]'"


def executorch_available() -> bool:
    """Whether the ``executorch`` package (the ``edge`` extra) is installed."""
    return importlib.util.find_spec("executorch") is not None


def _require_executorch() -> None:
    if not executorch_available():
        raise ConfigError(f"--format executorch needs the executorch package, which is not installed: {_INSTALL}")


def dim_bounds(program: Program, max_batch: int = MAX_BATCH) -> dict[str, dict[str, int]]:
    """Each named dim of the program -> its ``min`` and ``max`` in the ``.pte`` (``batch`` capped at ``max_batch``)."""
    bounds: dict[str, dict[str, int]] = {}
    for shape in program.dynamic_shapes(1):
        for dim in (shape or {}).values():
            name = getattr(dim, "__name__", None)
            if name is None:  # Dim.AUTO: a derived size, bounded by the others
                continue
            high = min(dim.max, max_batch) if name == "batch" else dim.max
            bounds[name] = {"min": int(dim.min), "max": int(high)}
    return bounds


def export_program_executorch(
    program: Program,
    path: str | Path,
    metadata: dict[str, Any] | None = None,
    max_batch: int = MAX_BATCH,
    adapter_rank: int | None = None,
    quantize: str | None = None,
) -> Path:
    """Re-export ``program`` with bounded dims, lower it to XNNPACK and write an ExecuTorch ``.pte``.

    Args:
        program: an eval-mode :class:`~peftc.program.Program`, merged or with its adapter branch as ops,
            or with its adapter lifted to inputs (:mod:`peftc.passes.lift`): then the adapter becomes
            named constants in data files (:mod:`.executorch_data`): ``model.ptd`` (base weights) and
            ``adapter.ptd`` (the no-op adapter) beside ``path``.
        path: the ``.pte`` file to write; its parent directory must exist.
        metadata: extra string entries for the embedded ``peftc_json`` (``peftc.*`` keys).
        max_batch: upper bound of the ``batch`` dim (see the module docstring).
        adapter_rank: a lifted program's rank, every adapter padded to it (default: the program's example).
        quantize: also lower the program with ``int8`` or ``int4`` linear weights
            (:mod:`.executorch_quantize`) to :func:`~.executorch_quantize.staged_path`, which the quantize
            stage puts at ``path`` once the float file has verified.

    Returns:
        ``path``.

    Raises:
        ConfigError: executorch not installed, or a train-mode program.
        CaptureError: ``torch.export`` or the ExecuTorch lowering could not handle the graph.
    """
    _require_executorch()
    path = Path(path)
    if program.mode != "eval":
        raise ConfigError(
            f"cannot export a {program.mode}-mode program (it bakes in dropout); capture the model with mode='eval'"
        )
    target = _Target.of(program, adapter_rank)
    bounds = dim_bounds(program, max_batch)
    tick = time.perf_counter()
    exported, bounds = _reexport(program, bounds, target)
    runner = runner_metadata(program) if is_llm_runner(program) else None
    info = {
        "input_names": list(target.names),
        "output_names": list(program.output_names),
        "task": program.task.name,
        "dynamic_dims": {name: {str(k): v for k, v in program.dynamic_dims[name].items()} for name in target.names},
        "dim_bounds": bounds,
        "backend": "XNNPACK",
        **({"llm_runner": runner} if runner else {}),
        **({"adapter_constants": target.layout, "data_files": target.data_files} if target.layout else {}),
        **{str(k): str(v) for k, v in (metadata or {}).items()},
    }
    try:
        _write(path, _lower(exported, program, info, target), target)
        problem = _crash_of(path, program, target)
    except CaptureError as e:  # XNNPACK's passes refuse some graphs (LLaMA-Adapter's prompt projections)
        problem = str(e)
    if problem:  # lowering may change the program: lower a fresh re-export with portable kernels only
        logger.warning("the XNNPACK-delegated %s failed (%s); writing it with portable kernels", path.name, problem)
        info["backend"] = "portable"
        target = _Target.of(program, adapter_rank)
        _write(path, _lower(_reexport(program, bounds, target)[0], program, info, target), target)
    logger.info(
        "wrote %s (ExecuTorch/%s, %.1f s, bounds %s)", path, info["backend"], time.perf_counter() - tick, bounds
    )
    if quantize is not None:
        _write_quantized(program, path, info, bounds, adapter_rank, quantize)
    return path


def _write_quantized(
    program: Program, path: Path, info: dict[str, Any], bounds: dict[str, dict[str, int]], rank: int | None, scheme: str
) -> None:
    """Lower ``program`` with quantized linears (same bounds, same backend) to the staged path beside ``path``."""
    from .executorch_quantize import QUANTIZED_WEIGHTS, quantize_module, staged_path

    tick = time.perf_counter()
    target = _Target.of(program, rank)
    if target.layout:  # pragma: no cover - refused with the options (ExecuTorchQuantizer.lifted_adapters)
        raise ConfigError("--quantize with --adapters-as-inputs is not supported by --format executorch")
    exported, _ = _reexport(program, bounds, target)
    module, linears = quantize_module(exported, target.inputs, scheme)
    quantized = replace(target, module=module)
    info = {**info, "peftc.quantize": scheme, QUANTIZED_WEIGHTS: linears}
    staged = staged_path(path, scheme)
    _write(staged, _lower(_reexport(program, bounds, quantized)[0], program, info, quantized), quantized)
    problem = _crash_of(staged, program, quantized)
    if problem:
        staged.unlink()
        raise CaptureError(
            f"the {scheme} ExecuTorch program ({info['backend']}) crashes the runtime ({problem}); "
            "export without --quantize"
        )
    logger.info("wrote %s (%s, %d linear weights, %.1f s)", staged.name, scheme, linears, time.perf_counter() - tick)


@dataclass
class _Target:
    """What is re-exported and lowered: the graph module, its inputs, and where the adapter's tensors go.

    For a program with lifted adapter inputs, ``module`` holds them as buffers of the submodule
    :data:`~.executorch_data.ADAPTER_MODULE` (the no-op adapter, its rank padded to ``adapter_rank``)
    and ``layout`` says, per lifted input, its key in the data files, its shape and its rank axis.
    """

    module: fx.GraphModule
    names: list[str]
    inputs: tuple[torch.Tensor, ...]
    layout: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def data_files(self) -> list[str]:
        from .executorch_data import ADAPTER_TAG, DATA_SUFFIX, MODEL_TAG

        return [f"{MODEL_TAG}{DATA_SUFFIX}", f"{ADAPTER_TAG}{DATA_SUFFIX}"] if self.layout else []

    @classmethod
    def of(cls, program: Program, adapter_rank: int | None) -> _Target:
        module = _attention_as_matmuls(program)
        lifted = [n for n in module.graph.nodes if n.op == "placeholder" and n.meta.get("peftc_role") == "lifted_input"]
        if not lifted:
            return cls(module, list(program.input_names), tuple(program.example_inputs))
        from .executorch_data import ADAPTER_MODULE, constant_attr

        holder = torch.nn.Module()
        module.add_module(ADAPTER_MODULE, holder)
        layout: dict[str, dict[str, Any]] = {}
        examples = dict(zip(program.input_names, program.example_inputs, strict=True))
        for node in lifted:
            name = node.meta["peftc_input"]
            rank_axes = [a for a, d in program.dynamic_dims.get(name, {}).items() if d.startswith("lora_rank")]
            rank_dim = rank_axes[0] if rank_axes else None
            shape = list(examples[name].shape)
            if rank_dim is not None:
                shape[rank_dim] = max(int(adapter_rank or 0), shape[rank_dim])
            from .executorch_data import _pad

            value = _pad(program.input_defaults[name].detach().float(), shape, rank_dim, name)
            attr = constant_attr(name)
            holder.register_buffer(attr, value)
            with module.graph.inserting_before(node):
                const = module.graph.get_attr(f"{ADAPTER_MODULE}.{attr}")
            const.meta["val"] = node.meta.get("val")
            node.replace_all_uses_with(const)
            module.graph.erase_node(node)
            layout[name] = {"key": f"{ADAPTER_MODULE}.{attr}", "shape": shape, "rank_dim": rank_dim}
        names = [n for n in program.input_names if n not in layout]
        _reset_signature(module)
        # the XNNPACK delegate's constants (the base weights) to model.ptd too, as ExecuTorch's export_llama does
        from executorch.exir.passes.external_constants_pass import delegate_external_constants_pass_unlifted

        from .executorch_data import ADAPTER_TAG, MODEL_TAG

        delegate_external_constants_pass_unlifted(
            module, lambda node: ADAPTER_TAG if str(node.target).startswith(f"{ADAPTER_MODULE}.") else MODEL_TAG
        )
        inputs = tuple(examples[n] for n in names)
        return cls(module, names, inputs, layout)


def _reset_signature(module: fx.GraphModule) -> None:
    """Keep the unlifted module's pytree input spec in step with its placeholders (some were removed)."""
    from torch.utils import _pytree as pytree

    graph = module.graph
    codegen = graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is not None:
        names = [p.name for p in graph.nodes if p.op == "placeholder"]
        in_spec = pytree.tree_structure((tuple(range(len(names))), {}))
        codegen.pytree_info = info._replace(orig_args=names, in_spec=in_spec)
        if hasattr(module, "_in_spec"):
            module._in_spec = in_spec
    graph.lint()
    module.recompile()


def _write(path: Path, lowered: Any, target: _Target) -> None:
    """The ``.pte`` and, for separated data, its ``.ptd`` files beside it."""
    path.write_bytes(lowered.buffer)
    if target.layout:
        lowered.write_tensor_data_to_file(str(path.parent))


def runner_metadata(program: Program) -> dict[str, Any]:
    """The constant methods ExecuTorch's LLM runner reads (the names ``export_llama`` writes).

    ``get_max_seq_len`` is the cache length (the program's longest sequence), ``get_n_layers`` the
    cache buffers' layers; the token ids and vocabulary come from the model config.
    """
    config = program.model_config
    text = getattr(config, "text_config", None) or config
    max_seq_len = int(program.max_positions())
    layers = sum(1 for name, _ in program.graph_module.named_buffers() if name.startswith("key_cache_"))
    eos = getattr(text, "eos_token_id", None)
    eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
    bos = getattr(text, "bos_token_id", None)
    meta: dict[str, Any] = {
        "get_max_seq_len": max_seq_len,
        "get_max_context_len": max_seq_len,
        "get_vocab_size": int(text.vocab_size),
        "get_n_layers": layers,
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": False,
        "enable_dynamic_shape": True,
    }
    if bos is not None:
        meta["get_bos_id"] = int(bos)
    if eos_ids:
        meta["get_eos_ids"] = eos_ids
    return meta


def _lower(exported: torch.export.ExportedProgram, program: Program, info: dict[str, Any], target: _Target) -> Any:
    """``exported`` lowered (Edge dialect, XNNPACK delegate when ``info["backend"]`` says so) to ExecuTorch.

    Returns the ``ExecutorchProgramManager`` (``.buffer``: the ``.pte``; its data files for separated data).
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower

    from .executorch_data import ADAPTER_TAG, MODEL_TAG, is_adapter_constant, keep_adapters_out

    partitioner = None
    config = ExecutorchBackendConfig()
    if info["backend"] == "XNNPACK":
        partitioner = [keep_adapters_out(XnnpackPartitioner)() if target.layout else XnnpackPartitioner()]
    if target.layout:  # every constant in a data file: the adapter's by name, the rest in model.ptd
        config = ExecutorchBackendConfig(
            external_constants=lambda node: ADAPTER_TAG if is_adapter_constant(node.name) else MODEL_TAG
        )
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            edge = to_edge_transform_and_lower(
                exported,
                partitioner=partitioner,
                constant_methods={INFO_METHOD: list(json.dumps(info).encode()), **info.get("llm_runner", {})},
                # ExecuTorch 1.5's IR dtype validator takes len() of a tensor returned where its schema
                # says Tensor[], which guards the batch size to the example's (2): the .pte would plan
                # memory for batch 2 and overrun it on larger batches. The numerical verification
                # checks the program instead; _check_dims below checks that no dim was specialised.
                compile_config=EdgeCompileConfig(_check_ir_validity=False),
            )
            _check_dims(edge.exported_program(), program, target.names)
            return edge.to_executorch(config)
    except CaptureError:
        raise
    except Exception as e:  # the lowering raises many unrelated types
        first = str(e).strip().splitlines()
        raise CaptureError(
            f"ExecuTorch could not lower the {program.task.name} program: {type(e).__name__}: "
            f"{first[0] if first else ''}; export with --format onnx or torchscript instead"
        ) from e


_SMOKE = """
import sys
from safetensors.torch import load_file
from executorch.runtime import Runtime
data = sys.argv[3] if len(sys.argv) > 3 else None
method = Runtime.get().load_program(sys.argv[1], data_path=data).load_method("forward")
saved = load_file(sys.argv[2])
inputs = [saved[str(i)] for i in range(len(saved))]
method.execute(inputs)
if len(inputs[0]) > 1:  # the first row alone (the LLM-runner layout has one row)
    method.execute([t[:1] for t in inputs])
"""


def _crash_of(path: Path, program: Program, target: _Target | None = None) -> str | None:
    """How running the ``.pte`` on the capture example (and its first row) kills a process, or ``None``.

    Measured with ExecuTorch 1.5.1: the XNNPACK-delegated unmerged DoRA program segfaults on every
    input (the same program with portable kernels runs and verifies). A crash cannot be caught in
    this process, so the file is tried once in a child process before verification runs it here.
    """
    inputs_of = target.inputs if target is not None else tuple(program.example_inputs)
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "inputs.safetensors"  # safetensors, never a pickle
        save_file({str(i): t.contiguous() for i, t in enumerate(inputs_of)}, str(inputs))
        args = [sys.executable, "-c", _SMOKE, str(path), str(inputs)]
        if target is not None and target.layout:
            from .executorch_data import merged_data

            args.append(str(merged_data([path.parent / f for f in target.data_files], Path(tmp) / "data.ptd")))
        done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    if done.returncode >= 0:
        if done.returncode:
            logger.debug("ExecuTorch smoke run failed: %s", done.stderr[-2000:])
        return None  # a Python error is verification's to report, with its figures
    return f"signal {-done.returncode}"


def _reexport(
    program: Program, bounds: dict[str, dict[str, int]], target: _Target
) -> tuple[torch.export.ExportedProgram, dict[str, dict[str, int]]]:
    """``torch.export`` of ``target``'s module with its named dims, ``batch`` bounded (min 1, else 2).

    Returns:
        The exported program and the bounds it has (``batch`` and ``sequence`` from 2 when 1 failed).
    """
    errors: list[BaseException] = []
    for min_dim in (1, 2):
        shapes = dynamic_shapes(target.names, program.dynamic_dims, min_dim, program.max_positions())
        if "batch" in bounds:  # the LLM-runner layout has none (one sequence, batch 1)
            batch = torch.export.Dim("batch", min=min_dim, max=max(bounds["batch"]["max"], min_dim))
            shapes = tuple(_cap_batch(s, batch) for s in shapes)
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                exported = torch.export.export(target.module, target.inputs, dynamic_shapes=shapes, strict=False)
            got = {k: ({**v, "min": min_dim} if k in ("batch", "sequence") else v) for k, v in bounds.items()}
            return exported, got
        except Exception as e:  # torch.export raises many unrelated types
            errors.append(e)
            logger.debug("re-export with min dim %d failed: %s", min_dim, e)
    e = errors[-1]
    first = str(e).strip().splitlines()
    raise CaptureError(
        f"torch.export of the {program.task.name} program failed: {type(e).__name__}: {first[0] if first else ''}"
    ) from e


def _check_dims(edge: torch.export.ExportedProgram, program: Program, input_names: Sequence[str]) -> None:
    """Raise :class:`CaptureError` when lowering made a named dim of an input static (memory planned too small)."""
    names = edge.graph_signature.user_inputs
    values = {n.name: n.meta.get("val") for n in edge.graph.nodes if n.op == "placeholder"}
    for graph_name, name in zip(names, input_names, strict=False):
        val = values.get(graph_name)
        for axis, dim in program.dynamic_dims.get(name, {}).items():
            if isinstance(val, torch.Tensor) and axis < val.dim() and not isinstance(val.shape[axis], torch.SymInt):
                raise CaptureError(
                    f"ExecuTorch lowering fixed the {dim!r} dim of input {name!r} to {int(val.shape[axis])} "
                    "(the .pte would only take that size); export with --format onnx or torchscript instead"
                )


def _attention_as_matmuls(program: Program) -> fx.GraphModule:
    """A copy of the program's graph module with ``scaled_dot_product_attention`` spelled out (weights shared).

    ExecuTorch's lowering decomposes the fused attention op into ops whose output strides differ from
    the kernel's, and the ``view`` that HF's attention output projection applies then fails to trace
    (``Cannot view a tensor with shape [s1, s19, 64] and strides (64, 64*s1, 1)``). Written as
    ``softmax(q·kᵀ·scale + mask)·v`` before the re-export, every later reshape sees the strides it
    will run with, and XNNPACK takes the matmuls and the softmax.
    """
    graph = copy.deepcopy(program.graph)
    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.scaled_dot_product_attention.default:
            node.target = _attention
    graph.lint()
    return fx.GraphModule(program.graph_module, graph)


def _attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``aten.scaled_dot_product_attention`` (eval: no dropout) as matmuls and a softmax."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    # the dtype's lowest finite value, not -inf: a fully masked row (a left-padded query position)
    # must come out finite, as the fused kernel makes it, or 0 * NaN spreads it to the real rows
    lowest = torch.finfo(scores.dtype).min
    if is_causal:
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, lowest)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, lowest)
        else:
            scores = scores + attn_mask
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def _cap_batch(shape: dict[int, Any] | None, batch: Any) -> dict[int, Any] | None:
    """The same dims with the ``batch`` axis replaced by ``batch`` (one ``Dim`` shared by every input)."""
    if shape is None:
        return None
    return {axis: batch if getattr(dim, "__name__", None) == "batch" else dim for axis, dim in shape.items()}


def load_executorch(path: str | Path, adapter: str | Path | None = None) -> Any:
    """Load a ``.pte`` in ExecuTorch's runtime: its ``forward`` method (``.execute(inputs)``).

    A program with separated data (:mod:`.executorch_data`) runs with ``model.ptd`` and ``adapter``
    (an ``adapters/<name>.ptd``; default the no-op ``adapter.ptd``): ExecuTorch's Python runtime takes
    one data file, so the pair is written as one temporary ``.ptd``, removed when the method is.
    """
    _require_executorch()
    from executorch.runtime import Runtime

    path = Path(path)
    files = read_info(path).get("data_files") or []
    if not files:
        if adapter is not None:
            raise ConfigError(f"{path.name} keeps its adapter inside (no data files); it takes no adapter file")
        return Runtime.get().load_program(path).load_method("forward")
    from .executorch_data import merged_data

    data = [path.parent / files[0], Path(adapter) if adapter is not None else path.parent / files[1]]
    tmp = tempfile.TemporaryDirectory()
    merged = merged_data(data, Path(tmp.name) / "data.ptd")
    program = Runtime.get().load_program(path, data_path=merged)
    method = program.load_method("forward")
    _keep_alive[id(method)] = (tmp, program)
    weakref.finalize(method, _keep_alive.pop, id(method), None)
    return method


#: The temporary merged data file (and program) of each loaded method, kept while the method lives.
_keep_alive: dict[int, Any] = {}


def read_info(path: str | Path) -> dict[str, Any]:
    """The ``peftc_json`` constant of a ``.pte``: input/output names, task, dims, bounds, ``peftc.*`` metadata."""
    _require_executorch()
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(Path(path))
    if INFO_METHOD not in program.method_names:
        return {}
    values = program.load_method(INFO_METHOD).execute([])
    return json.loads(bytes(int(v) for v in values).decode())


def run_executorch(
    path: str | Path, cases: Sequence[VerifyCase], input_names: Sequence[str], adapter: str | Path | None = None
) -> list[Any]:
    """Outputs of a ``.pte`` on every case in ExecuTorch's runtime, inputs in ``input_names`` order.

    One array per case, or a list of arrays per case for a graph with several outputs, as
    :func:`~peftc.exporters.verify.run_torch` returns them. ``adapter``: an adapter data file of a
    program with separated data (:func:`load_executorch`).
    """
    method = load_executorch(path, adapter)
    meta = method.metadata
    planned = [tuple(meta.input_tensor_meta(i).sizes()) for i in range(meta.num_inputs())]
    outs = []
    for case in cases:
        inputs = [t.contiguous() for t in case.ordered(input_names)]
        check_bounds(inputs, input_names, planned, path)
        out = method.execute(inputs)
        outs.append(numpy_outputs(out[0] if len(out) == 1 else list(out)))
    return outs


def check_bounds(
    inputs: Sequence[torch.Tensor], names: Sequence[str], planned: Sequence[tuple[int, ...]], path: str | Path
) -> None:
    """Refuse inputs larger than the ``.pte`` planned memory for (the runtime would write past its buffers).

    Raises:
        ConfigError: naming the input, its shape and the bounds.
    """
    if len(inputs) != len(planned):
        raise ConfigError(f"{Path(path).name} takes {len(planned)} inputs, got {len(inputs)} ({', '.join(names)})")
    for tensor, name, bound in zip(inputs, names, planned, strict=True):
        if tensor.dim() != len(bound) or any(s > b for s, b in zip(tensor.shape, bound, strict=True)):
            raise ConfigError(
                f"input {name!r} of shape {list(tensor.shape)} exceeds the bounds {list(bound)} that "
                f"{Path(path).name} was planned for (manifest.json: executorch.dim_bounds); "
                "split the batch, or export with a larger max_batch"
            )


class ExecuTorchExporter(GraphlessFileExporter):
    """``--format executorch``: ``model.pte`` lowered to XNNPACK, for ExecuTorch's on-device runtime."""

    name = "executorch"
    runtime = "ExecuTorch"
    summary = f"model.pte (ExecuTorch, XNNPACK delegate) for on-device runtimes; needs {_INSTALL}"
    cache_by_default = False  # the in-program cache (LLM-runner layout) only when asked: --with-past
    cache_in_program = True
    model_file_name = MODEL_FILE

    adapter_files = ExecuTorchAdapterFiles()  # --adapters-as-inputs: adapters/<name>.ptd over one program

    def check(self, request: ExportRequest) -> None:
        _require_executorch()  # before minutes of work
        check_one_float32_graph(replace(request, adapters_as_inputs=False), self.runtime, self.name)
        if request.adapters_as_inputs and request.with_past:
            raise ConfigError(
                "--adapters-as-inputs with --with-past is not supported by --format executorch yet (the LLM-runner "
                "layout keeps its adapter inside); export the adapters without --with-past, or one adapter with it"
            )

    quantizer = ExecuTorchQuantizer()  # --quantize int8|int4: torchao's PT2E flow before lowering

    def write(self, program: Program, path: Path, metadata: dict[str, str], options: WriteOptions) -> None:
        export_program_executorch(
            program, path, metadata=metadata, adapter_rank=options.adapter_rank, quantize=options.quantize
        )

    def run(
        self,
        path: Path,
        cases: Sequence[VerifyCase],
        input_names: Sequence[str],
        output_names: Sequence[str],
        adapter: Path | None = None,
    ) -> list[Any]:
        return run_executorch(path, cases, input_names, adapter)

    def describe_io(self, path: Path, program: Program) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The program's inputs less the lifted adapter tensors (constants in data files here)."""
        inputs, outputs = program_io(program)
        return [i for i in inputs if i["name"] not in program.input_defaults], outputs

    def manifest_entries(self, path: Path, program: Program, options: WriteOptions) -> dict[str, Any]:
        info = read_info(path)
        entries = {
            "backend": info.get("backend", "XNNPACK"),
            "dim_bounds": info.get("dim_bounds", dim_bounds(program)),
        }
        if "llm_runner" in info:  # the constant methods ExecuTorch's LLM runner reads
            entries["llm_runner"] = info["llm_runner"]
        if info.get("data_files"):  # program–data separation: base weights, the no-op adapter
            entries["data_files"] = info["data_files"]
        return {"opset": None, "executorch": entries}


#: The ExecuTorch exporter, as registered.
EXECUTORCH = register_exporter(ExecuTorchExporter())
