"""AOTInductor exporter: a captured program to a ``model.pt2`` package of compiled C++ kernels.

AOTInductor is PyTorch's maintained successor of TorchScript for C++ deployment: the program's
graph module is re-exported with ``torch.export`` (the same dynamic ``batch`` and ``sequence`` dims
as the capture, ``sequence`` bounded by :meth:`Program.max_positions`), then
``torch._inductor.aoti_compile_and_package`` generates C++ for the whole graph, compiles it with the
host compiler (g++ on Linux) into a shared library and zips it with the weights into a ``.pt2``.
Python loads it with ``torch._inductor.aoti_load_package``; C++ with
``torch::inductor::AOTIModelPackageLoader`` (examples/cpp). No Python runs at inference.

The package's metadata (``aot_inductor.metadata``, readable in C++ with ``get_metadata()``) holds
``peftc.input_names`` (comma-separated, graph-input order), ``peftc.output_names``, ``peftc.task``
and any extra ``peftc.*`` entries, so a runtime learns the interface from the file.

Cost and precision: compiling is the slow part — measured on 2 shared cores, a 2-layer GPT-2
(n_embd 64) takes roughly 1–2 minutes, most of it in g++; loading takes ~25 ms. Kernels are
generated code, so sums may be reordered: measured max |package − program| ~2e-7 on fp32 logits,
well inside the 1e-4 verification tolerance. A package is specific to the CPU ISA and platform it
was compiled on (``AOTI_CPU_ISA``, ``AOTI_PLATFORM`` in its metadata) and to the torch version that
loads it.

Known limit: a KV-cache (with-past) program compiles but its decode steps come out wrong (measured
on torch 2.13: max diff 1.2 on a batch-4 one-token step over a 12-token cache, while the re-exported
graph itself is exact and prefill matches to 2e-7); verification catches it, and the format's exporter
(:data:`AOTI`, registered as ``--format aoti``) refuses ``with_past`` up front. Export KV-cache graphs
with TorchScript or ONNX. Otherwise it takes what TorchScript takes: one float32 graph with one adapter
in it, merged or as ops.
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from peftc.errors import CaptureError, ConfigError
from peftc.program import Program

from .registry import ExportRequest, GraphlessFileExporter, WriteOptions, register_exporter
from .torchscript import check_one_float32_graph
from .verify import VerifyCase, numpy_outputs

__all__ = [
    "AOTI",
    "MODEL_FILE",
    "compiler_available",
    "export_program_aoti",
    "load_aoti",
    "run_aoti",
]

logger = logging.getLogger(__name__)

MODEL_FILE = "model.pt2"


def compiler_available() -> str | None:
    """The C++ compiler AOTInductor will call (``$CXX``, else ``g++``/``c++``/``clang++`` on PATH), or ``None``."""
    import os

    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def export_program_aoti(
    program: Program,
    path: str | Path,
    metadata: dict[str, Any] | None = None,
    inductor_configs: dict[str, Any] | None = None,
) -> Path:
    """Compile ``program`` ahead of time with AOTInductor into a ``.pt2`` package.

    Args:
        program: an eval-mode :class:`~peftc.program.Program`, merged or with its adapter branch
            as ops (both compile; merged is the base graph op for op, so it runs as fast as the base).
        path: the package to write; must end in ``.pt2``; its parent directory must exist.
        metadata: extra entries for the package metadata (stringified; ``peftc.*`` keys by convention).
        inductor_configs: extra ``torch._inductor`` options (e.g. ``{"aot_inductor.compile_wrapper_opt_level": "O0"}``).

    Returns:
        ``path``.

    Raises:
        ConfigError: a train-mode program, a path not ending in ``.pt2``, or no C++ compiler.
        CaptureError: ``torch.export`` or Inductor could not handle the graph.
    """
    path = Path(path)
    if program.mode != "eval":
        raise ConfigError(
            f"cannot export a {program.mode}-mode program (it bakes in dropout); capture the model with mode='eval'"
        )
    if path.suffix != ".pt2":
        raise ConfigError(f"an AOTInductor package must be a .pt2 file, got {path.name!r}; use {MODEL_FILE}")
    if compiler_available() is None:
        raise ConfigError(
            "AOTInductor needs a C++ compiler to build the package and none was found (g++, c++, clang++ or $CXX); "
            "install g++ or export with --format torchscript / onnx"
        )
    tick = time.perf_counter()
    exported = _reexport(program)
    export_s = time.perf_counter() - tick
    info = {
        "peftc.input_names": ",".join(program.input_names),
        "peftc.output_names": ",".join(program.output_names),
        "peftc.task": program.task.name,
        **{str(k): str(v) for k, v in (metadata or {}).items()},
    }
    configs = {"aot_inductor.metadata": info, **(inductor_configs or {})}
    tick = time.perf_counter()
    try:
        import torch._inductor

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            written = torch._inductor.aoti_compile_and_package(
                exported, package_path=str(path), inductor_configs=configs
            )
    except Exception as e:  # Inductor raises its own types, CalledProcessError from the compiler, …
        first = str(e).strip().splitlines()
        raise CaptureError(
            f"AOTInductor could not compile the {program.task.name} program: {type(e).__name__}: "
            f"{first[0] if first else ''}; export with --format torchscript or onnx instead"
        ) from e
    compile_s = time.perf_counter() - tick
    logger.info("wrote %s (AOTInductor: re-export %.1f s, compile %.1f s)", written, export_s, compile_s)
    return Path(written)


def _reexport(program: Program) -> torch.export.ExportedProgram:
    """``torch.export`` of the program's graph module with its named dims (min size 1, else 2 as capture does)."""
    errors: list[BaseException] = []
    for min_dim in (1, 2):
        shapes = program.dynamic_shapes(min_dim)
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.export.export(
                    program.graph_module, tuple(program.example_inputs), dynamic_shapes=shapes, strict=False
                )
        except Exception as e:  # torch.export raises many unrelated types
            errors.append(e)
            logger.debug("re-export with min dim %d failed: %s", min_dim, e)
    e = errors[-1]
    first = str(e).strip().splitlines()
    raise CaptureError(
        f"torch.export of the {program.task.name} program failed: {type(e).__name__}: {first[0] if first else ''}"
    ) from e


def load_aoti(path: str | Path) -> Any:
    """Load a ``.pt2`` package (``torch._inductor.aoti_load_package``): a callable taking the inputs in order.

    ``.get_metadata()`` on the result gives the package metadata (``peftc.input_names``…).
    """
    import torch._inductor

    return torch._inductor.aoti_load_package(str(path))


def run_aoti(path: str | Path, cases: Sequence[VerifyCase], input_names: Sequence[str]) -> list[Any]:
    """Outputs of a ``.pt2`` package on every case, inputs in ``input_names`` order.

    One array per case, or a list of arrays per case for a graph with several outputs, as
    :func:`~peftc.exporters.verify.run_torch` returns them.
    """
    runner = load_aoti(path)
    outs = []
    with torch.inference_mode():
        for case in cases:
            out = runner(*case.ordered(input_names))
            if isinstance(out, (list, tuple)) and len(out) == 1:
                out = out[0]
            outs.append(numpy_outputs(out))
    return outs


class AotiExporter(GraphlessFileExporter):
    """``--format aoti``: ``model.pt2``, AOTInductor kernels for LibTorch's ``AOTIModelPackageLoader`` (C++)."""

    name = "aoti"
    runtime = "AOTInductor"
    summary = "model.pt2 (AOTInductor: compiled kernels, needs a C++ compiler) for LibTorch/C++"
    cache_by_default = False  # and a KV-cache graph is refused (see the module docstring)
    model_file_name = MODEL_FILE

    def check(self, request: ExportRequest) -> None:
        check_one_float32_graph(request, self.runtime, self.name)
        if request.with_past:
            raise ConfigError(
                "--with-past with --format aoti does not verify (AOTInductor's compiled KV-cache graph gets decode "
                "steps wrong, measured with torch 2.13); use --format torchscript or onnx for a KV-cache graph"
            )
        if compiler_available() is None:  # fail before minutes of work, not after
            raise ConfigError(
                "--format aoti compiles C++ and no compiler was found (g++, c++, clang++ or $CXX); "
                "install g++ or use --format torchscript"
            )

    def write(self, program: Program, path: Path, metadata: dict[str, str], options: WriteOptions) -> None:
        export_program_aoti(program, path, metadata=metadata)

    def run_file(self, path: Path, cases: Sequence[VerifyCase], input_names: Sequence[str]) -> list[Any]:
        return run_aoti(path, cases, input_names)

    def manifest_entries(self, path: Path, program: Program, options: WriteOptions) -> dict[str, Any]:
        # the package runs only where its kernels were compiled for: AOTI_PLATFORM, AOTI_CPU_ISA…
        package = load_aoti(path).get_metadata()
        return {"opset": None, "aoti": {k[5:].lower(): v for k, v in package.items() if k.startswith("AOTI_")}}


#: The AOTInductor exporter, as registered.
AOTI = register_exporter(AotiExporter())
