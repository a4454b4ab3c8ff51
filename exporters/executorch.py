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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import fx

from peftc.errors import CaptureError, ConfigError
from peftc.program import Program, dynamic_shapes, is_llm_runner

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
    program: Program, path: str | Path, metadata: dict[str, Any] | None = None, max_batch: int = MAX_BATCH
) -> Path:
    """Re-export ``program`` with bounded dims, lower it to XNNPACK and write an ExecuTorch ``.pte``.

    Args:
        program: an eval-mode :class:`~peftc.program.Program`, merged or with its adapter branch as ops.
        path: the ``.pte`` file to write; its parent directory must exist.
        metadata: extra string entries for the embedded ``peftc_json`` (``peftc.*`` keys).
        max_batch: upper bound of the ``batch`` dim (see the module docstring).

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
    bounds = dim_bounds(program, max_batch)
    tick = time.perf_counter()
    exported, bounds = _reexport(program, bounds)
    runner = runner_metadata(program) if is_llm_runner(program) else None
    info = {
        "input_names": list(program.input_names),
        "output_names": list(program.output_names),
        "task": program.task.name,
        "dynamic_dims": {name: {str(k): v for k, v in dims.items()} for name, dims in program.dynamic_dims.items()},
        "dim_bounds": bounds,
        "backend": "XNNPACK",
        **({"llm_runner": runner} if runner else {}),
        **{str(k): str(v) for k, v in (metadata or {}).items()},
    }
    try:
        path.write_bytes(_lower(exported, program, info))
        problem = _crash_of(path, program)
    except CaptureError as e:  # XNNPACK's passes refuse some graphs (LLaMA-Adapter's prompt projections)
        problem = str(e)
    if problem:  # lowering may change the program: lower a fresh re-export with portable kernels only
        logger.warning("the XNNPACK-delegated %s failed (%s); writing it with portable kernels", path.name, problem)
        info["backend"] = "portable"
        path.write_bytes(_lower(_reexport(program, bounds)[0], program, info))
    logger.info(
        "wrote %s (ExecuTorch/%s, %.1f s, bounds %s)", path, info["backend"], time.perf_counter() - tick, bounds
    )
    return path


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


def _lower(exported: torch.export.ExportedProgram, program: Program, info: dict[str, Any]) -> bytes:
    """The ``.pte`` bytes of ``exported``: Edge dialect, XNNPACK delegate when ``info["backend"]`` says so."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            edge = to_edge_transform_and_lower(
                exported,
                partitioner=[XnnpackPartitioner()] if info["backend"] == "XNNPACK" else None,
                constant_methods={INFO_METHOD: list(json.dumps(info).encode()), **info.get("llm_runner", {})},
                # ExecuTorch 1.5's IR dtype validator takes len() of a tensor returned where its schema
                # says Tensor[], which guards the batch size to the example's (2): the .pte would plan
                # memory for batch 2 and overrun it on larger batches. The numerical verification
                # checks the program instead; _check_dims below checks that no dim was specialised.
                compile_config=EdgeCompileConfig(_check_ir_validity=False),
            )
            _check_dims(edge.exported_program(), program)
            return edge.to_executorch().buffer
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
method = Runtime.get().load_program(sys.argv[1]).load_method("forward")
saved = load_file(sys.argv[2])
inputs = [saved[str(i)] for i in range(len(saved))]
method.execute(inputs)
if len(inputs[0]) > 1:  # the first row alone (the LLM-runner layout has one row)
    method.execute([t[:1] for t in inputs])
"""


def _crash_of(path: Path, program: Program) -> str | None:
    """How running the ``.pte`` on the capture example (and its first row) kills a process, or ``None``.

    Measured with ExecuTorch 1.5.1: the XNNPACK-delegated unmerged DoRA program segfaults on every
    input (the same program with portable kernels runs and verifies). A crash cannot be caught in
    this process, so the file is tried once in a child process before verification runs it here.
    """
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "inputs.safetensors"  # safetensors, never a pickle
        save_file({str(i): t.contiguous() for i, t in enumerate(program.example_inputs)}, str(inputs))
        done = subprocess.run(
            [sys.executable, "-c", _SMOKE, str(path), str(inputs)], capture_output=True, text=True, timeout=600
        )
    if done.returncode >= 0:
        if done.returncode:
            logger.debug("ExecuTorch smoke run failed: %s", done.stderr[-2000:])
        return None  # a Python error is verification's to report, with its figures
    return f"signal {-done.returncode}"


def _reexport(
    program: Program, bounds: dict[str, dict[str, int]]
) -> tuple[torch.export.ExportedProgram, dict[str, dict[str, int]]]:
    """``torch.export`` of the program's graph module with its named dims, ``batch`` bounded (min 1, else 2).

    Returns:
        The exported program and the bounds it has (``batch`` and ``sequence`` from 2 when 1 failed).
    """
    errors: list[BaseException] = []
    module = _attention_as_matmuls(program)
    for min_dim in (1, 2):
        shapes = dynamic_shapes(program.input_names, program.dynamic_dims, min_dim, program.max_positions())
        if "batch" in bounds:  # the LLM-runner layout has none (one sequence, batch 1)
            batch = torch.export.Dim("batch", min=min_dim, max=max(bounds["batch"]["max"], min_dim))
            shapes = tuple(_cap_batch(s, batch) for s in shapes)
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                exported = torch.export.export(
                    module, tuple(program.example_inputs), dynamic_shapes=shapes, strict=False
                )
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


def _check_dims(edge: torch.export.ExportedProgram, program: Program) -> None:
    """Raise :class:`CaptureError` when lowering made a named dim of an input static (memory planned too small)."""
    names = edge.graph_signature.user_inputs
    values = {n.name: n.meta.get("val") for n in edge.graph.nodes if n.op == "placeholder"}
    for graph_name, name in zip(names, program.input_names, strict=False):
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


def load_executorch(path: str | Path) -> Any:
    """Load a ``.pte`` in ExecuTorch's runtime: its ``forward`` method (``.execute(inputs)``)."""
    _require_executorch()
    from executorch.runtime import Runtime

    return Runtime.get().load_program(Path(path)).load_method("forward")


def read_info(path: str | Path) -> dict[str, Any]:
    """The ``peftc_json`` constant of a ``.pte``: input/output names, task, dims, bounds, ``peftc.*`` metadata."""
    _require_executorch()
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(Path(path))
    if INFO_METHOD not in program.method_names:
        return {}
    values = program.load_method(INFO_METHOD).execute([])
    return json.loads(bytes(int(v) for v in values).decode())


def run_executorch(path: str | Path, cases: Sequence[VerifyCase], input_names: Sequence[str]) -> list[Any]:
    """Outputs of a ``.pte`` on every case in ExecuTorch's runtime, inputs in ``input_names`` order.

    One array per case, or a list of arrays per case for a graph with several outputs, as
    :func:`~peftc.exporters.verify.run_torch` returns them.
    """
    method = load_executorch(path)
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

    def check(self, request: ExportRequest) -> None:
        _require_executorch()  # before minutes of work
        check_one_float32_graph(request, self.runtime, self.name)

    def write(self, program: Program, path: Path, metadata: dict[str, str], options: WriteOptions) -> None:
        export_program_executorch(program, path, metadata=metadata)

    def run_file(self, path: Path, cases: Sequence[VerifyCase], input_names: Sequence[str]) -> list[Any]:
        return run_executorch(path, cases, input_names)

    def manifest_entries(self, path: Path, program: Program, options: WriteOptions) -> dict[str, Any]:
        info = read_info(path)
        entries = {
            "backend": info.get("backend", "XNNPACK"),
            "dim_bounds": info.get("dim_bounds", dim_bounds(program)),
        }
        if "llm_runner" in info:  # the constant methods ExecuTorch's LLM runner reads
            entries["llm_runner"] = info["llm_runner"]
        return {"opset": None, "executorch": entries}


#: The ExecuTorch exporter, as registered.
EXECUTORCH = register_exporter(ExecuTorchExporter())
