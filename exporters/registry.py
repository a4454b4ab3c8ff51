"""The exporter registry: one :class:`Exporter` per ``--format``, registered by the format's own module.

The export pipeline (:mod:`peftc.exporting`) and the CLI ask this registry what a format does — which
model file it writes, which options it refuses, how it writes a program, how it loads and runs the
file for verification, how it describes the file's inputs and outputs for ``manifest.json`` — and
none of them names a format. A format module (``peftc.exporters.onnx``, ``.torchscript``, ``.aoti``, ``.executorch``)
defines its exporter and calls :func:`register_exporter` when imported; ``peftc.exporters`` lists the
modules in ``EXPORTER_MODULES`` and the registry imports them on first use (the method registry,
:mod:`peftc.methods`, works the same way).

Exporters know the program and the files, nothing of orchestration: where the adapter came from,
how many sources there are, or how the graphs were captured is the pipeline's business.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from peftc.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from peftc.program import Program

    from .verify import VerifyCase

__all__ = [
    "AdapterFiles",
    "ExportRequest",
    "Exporter",
    "GraphlessFileExporter",
    "QuantizedFile",
    "Quantizer",
    "RuntimeConfig",
    "Scheme",
    "WriteOptions",
    "exporters",
    "formats",
    "get_exporter",
    "register_exporter",
    "role_file",
]

#: Roles whose graph optimum keeps in a folder of its own (its diffusion pipelines: ``unet/model.onnx``, …).
FOLDER_ROLES = ("unet", "text_encoder", "vae_encoder", "vae_decoder")


def role_file(role: str | None, file_name: str) -> str:
    """The file of the graph ``role`` in an artifact whose model file is ``file_name`` (``model.onnx``).

    optimum's layout, for every format: the only graph, or the whole forward beside others (image-to-text),
    is ``file_name``; a diffusion pipeline's component is ``<role>/file_name``; any other graph of several
    (encoder, decoder, …) is ``<role>_file_name``.
    """
    if role in FOLDER_ROLES:
        return f"{role}/{file_name}"
    if role in (None, "model"):
        return file_name
    return f"{role}_{file_name}"


@dataclass(frozen=True)
class ExportRequest:
    """What an export asks of a format, for :meth:`Exporter.check` (which refuses what it cannot do).

    Attributes:
        adapters_as_inputs: swappable export: adapter tensors as graph inputs, adapters as side files.
        dtype: ``float32`` or ``float16``.
        graphs: how many graphs the artifact holds (2 for an encoder-decoder model).
        with_past: a KV-cache graph: ``True`` asked for, ``False`` refused, ``None`` left to the format.
    """

    adapters_as_inputs: bool = False
    dtype: str = "float32"
    graphs: int = 1
    with_past: bool | None = None


@dataclass(frozen=True)
class WriteOptions:
    """Options of :meth:`Exporter.write` that only some formats use (the others ignore them).

    Attributes:
        opset: ONNX opset.
        external_data: ONNX weights in ``<file>.data`` (``True``), inline (``False``) or by size (``None``).
        adapter_rank: swappable export: the largest rank of the sources, for formats whose adapter
            tensors have one fixed shape (ExecuTorch's ``.ptd`` files: every adapter zero-padded to it).
        quantize: the ``--quantize`` scheme, for formats that quantize the graph before writing
            (ExecuTorch lowers a quantized program beside the float one); ONNX quantizes the written file.
    """

    opset: int = 18
    external_data: bool | None = None
    adapter_rank: int | None = None
    quantize: str | None = None


@dataclass(frozen=True)
class Scheme:
    """One ``--quantize`` scheme of a format: its name, weight bits, the tool, how it shows in the file."""

    name: str
    bits: int
    method: str
    ops: tuple[str, ...]  # the op types a quantized weight shows up in (ONNX); () where the file has no ops
    blockwise: bool  # takes --quantize-block-size


@dataclass
class QuantizedFile:
    """What quantizing one file did: sizes before and after, how many weights it quantized."""

    float_size_bytes: int
    size_bytes: int
    quantized_weights: int
    float_weights: int  # weights left float because they are graph inputs (swappable adapter tensors)


class Quantizer(Protocol):
    """A format's ``--quantize`` (``Exporter.quantizer``): puts quantized weights in a verified model file.

    ``quantize`` runs after the float file verified, on the file the exporter wrote (ONNX rewrites
    it; ExecuTorch, which quantizes before lowering, puts the quantized program it lowered beside it
    in its place).
    """

    #: ``--quantize`` value -> scheme.
    schemes: dict[str, Scheme]
    #: Whether adapter tensors lifted to inputs (``--adapters-as-inputs``) stay float.
    lifted_adapters: bool

    def quantize(
        self, path: Path, scheme: str, block_size: int | None = None, metadata: dict[str, str] | None = None
    ) -> QuantizedFile: ...


@runtime_checkable
class AdapterFiles(Protocol):
    """Swappable adapters of a format: files holding one adapter's tensors under the graph's input names."""

    #: File name suffix of an adapter file (``.onnx_adapter``).
    suffix: str

    def write(self, path: Path, tensors: dict[str, np.ndarray]) -> Path:
        """Write ``tensors`` (graph input name -> array) as one adapter file."""
        ...

    def check(self, model_path: Path, adapter_path: Path) -> Any:
        """Refuse an adapter file that does not fit the model (``AdapterMismatchError``)."""
        ...

    def inputs(self, model_path: Path) -> dict[str, dict[str, Any]]:
        """The model's swappable inputs: name -> ``shape``, ``dtype``, ``default_shape`` (for the manifest)."""
        ...


@runtime_checkable
class RuntimeConfig(Protocol):
    """A generation runtime's config beside a KV-cache model file (onnxruntime-genai's ``genai_config.json``)."""

    #: The config's file name in the artifact.
    file: str

    def write(self, directory: Path, model_file: str, program: Program) -> Path:
        """Write the config of ``program`` (written to ``directory/model_file``); returns its path."""
        ...


@runtime_checkable
class Exporter(Protocol):
    """What the pipeline needs to know about one artifact format.

    Attributes:
        name: the ``--format`` value (``"onnx"``).
        runtime: what loads and runs the file in verification, as reports name it (``"ONNX Runtime"``).
        summary: one line for ``peftc export --help`` (``"model.onnx for ONNX Runtime and optimum"``).
        cache_by_default: whether a causal LM gets a KV-cache graph when ``with_past`` is not given.
        adapter_files: how swappable adapters are stored, or ``None`` when the format takes no
            adapters as inputs (:meth:`check` then refuses ``adapters_as_inputs``).
        runtime_config: the generation runtime's config that a causal LM's KV-cache file gets beside it
            (ONNX: onnxruntime-genai's ``genai_config.json``), or ``None`` when the format has none.
        cache_in_program: whether a KV-cache export keeps the cache inside the program (ExecuTorch's
            LLM-runner layout, :mod:`peftc.exporting.llm`) instead of taking and returning it.

    Optional: ``quantizer``, the format's ``--quantize`` (:class:`Quantizer`); a format without it refuses
    ``--quantize``.
    """

    name: str
    runtime: str
    summary: str
    cache_by_default: bool
    adapter_files: AdapterFiles | None
    runtime_config: RuntimeConfig | None
    cache_in_program: bool

    def model_file(self, role: str | None = None) -> str:
        """The model file's name: ``model.onnx``, or for one of several graphs :func:`role_file` of it."""
        ...

    def check(self, request: ExportRequest) -> None:
        """Raise :class:`~peftc.errors.ConfigError` (what is refused and what to do) before any work."""
        ...

    def write(self, program: Program, path: Path, metadata: dict[str, str], options: WriteOptions) -> None:
        """Write ``program`` (eval mode) to ``path``; ``metadata`` (``peftc.*`` strings) goes into the file.

        The file must not depend on ``program`` once written: the pipeline frees the torch weights after
        the write step (:func:`peftc.exporting.pipeline.release_weights`), before :meth:`run` verifies it.
        """
        ...

    def run(
        self,
        path: Path,
        cases: Sequence[VerifyCase],
        input_names: Sequence[str],
        output_names: Sequence[str],
        adapter: Path | None = None,
    ) -> list[Any]:
        """Load ``path`` and run it on every case: per case one array, or a list of arrays with several outputs.

        ``input_names`` are the inputs the cases feed, in graph order (inputs with a default are not fed);
        ``adapter`` is an adapter file to activate (formats with :attr:`adapter_files`).
        """
        ...

    def describe_io(self, path: Path, program: Program) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Inputs and outputs of the written file as ``manifest.json`` lists them (name, dtype, shape, dims)."""
        ...

    def manifest_entries(self, path: Path, program: Program, options: WriteOptions) -> dict[str, Any]:
        """The format's own top-level ``manifest.json`` keys: ``opset`` (``None`` without one) and any others."""
        ...


class GraphlessFileExporter:
    """Base of the formats whose file has no graph peftc reads back (TorchScript, AOTInductor, ExecuTorch).

    Such a format takes no swappable adapters and no runtime config, describes its inputs and outputs
    from the program (:func:`~peftc.exporters.manifest.program_io`), and runs its file with one
    function: a subclass sets :attr:`model_file_name` and defines :meth:`run_file`, ``check``,
    ``write`` and ``manifest_entries``.
    """

    adapter_files: AdapterFiles | None = None
    runtime_config: RuntimeConfig | None = None
    cache_in_program = False
    quantizer: Quantizer | None = None
    #: The model file's name (``model.pt``); other graphs' files are named from it by :func:`role_file`.
    model_file_name = ""

    def model_file(self, role: str | None = None) -> str:
        return role_file(role, self.model_file_name)

    def run_file(self, path: Path, cases: Sequence[VerifyCase], input_names: Sequence[str]) -> list[Any]:
        """Outputs of the file on every case, inputs in ``input_names`` order (see :meth:`Exporter.run`)."""
        raise NotImplementedError

    def run(
        self,
        path: Path,
        cases: Sequence[VerifyCase],
        input_names: Sequence[str],
        output_names: Sequence[str],
        adapter: Path | None = None,
    ) -> list[Any]:
        return self.run_file(path, cases, input_names)

    def describe_io(self, path: Path, program: Program) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        from .manifest import program_io

        return program_io(program)


_REGISTRY: dict[str, Exporter] = {}
_loaded = False


def register_exporter(exporter: Exporter) -> Exporter:
    """Register ``exporter`` under its format name (called once by the format's own module); returns it."""
    if not isinstance(exporter, Exporter):
        raise TypeError(f"{type(exporter).__name__} does not implement the Exporter protocol")
    other = _REGISTRY.get(exporter.name)
    if other is not None and other is not exporter:
        raise ValueError(f"export format {exporter.name!r} is registered twice")
    _REGISTRY[exporter.name] = exporter
    return exporter


def _load() -> None:
    """Import every module in ``peftc.exporters.EXPORTER_MODULES`` (each registers its exporter)."""
    global _loaded
    if not _loaded:
        package = importlib.import_module("peftc.exporters")
        for module in package.EXPORTER_MODULES:
            importlib.import_module(f"peftc.exporters.{module}")
        _loaded = True


def exporters() -> list[Exporter]:
    """Every registered exporter: those of ``EXPORTER_MODULES`` in its order, then any other in registration order.

    Not plain registration order: a module that imports another format's module (ExecuTorch reuses
    TorchScript's checks) would otherwise register both before the formats listed between them.
    """
    _load()
    modules = importlib.import_module("peftc.exporters").EXPORTER_MODULES
    rank = {f"peftc.exporters.{module}": i for i, module in enumerate(modules)}
    return sorted(_REGISTRY.values(), key=lambda e: rank.get(type(e).__module__, len(rank)))


def formats() -> list[str]:
    """Every ``--format`` name, in the order of :func:`exporters`."""
    return [e.name for e in exporters()]


def get_exporter(format: str | Exporter) -> Exporter:
    """The exporter of a format name (an exporter is returned as is).

    Raises:
        ConfigError: an unknown format, listing the supported ones.
    """
    if not isinstance(format, str):
        return format
    _load()
    if format not in _REGISTRY:
        raise ConfigError(f"export format {format!r} is not supported; supported: {', '.join(formats())}")
    return _REGISTRY[format]
