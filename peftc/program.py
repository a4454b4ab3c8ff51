"""Program: a captured ``torch.export`` graph plus what peftc needs to know about it.

``capture(model, task, mode)`` runs ``torch.export`` (non-strict) with dynamic batch and sequence
dims on a :class:`~peftc.tasks.TaskModule` around the model and unlifts the result into an
ATen-level ``torch.fx.GraphModule``. Parameters stay shared with the model (no copy) and are
frozen; passes add adapter parameters beside them. A train-mode capture bakes in dropout, so
export always starts from a separate eval-mode capture of the same model.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx.experimental._config as fx_config
from torch import fx, nn
from torch.export import Dim

from peftc.errors import CaptureError
from peftc.tasks import TaskModule, TaskSpec, get_task, graph_input_names

__all__ = [
    "LLM_RUNNER_INPUTS",
    "MAX_DIM",
    "MODEL_PREFIX",
    "PAST_DIM",
    "ModelRef",
    "Program",
    "Site",
    "capture",
    "default_dims",
    "dynamic_shapes",
    "example_inputs",
    "get_tensor",
    "image_shape",
    "is_llm_runner",
    "is_with_past",
    "past_names",
    "present_names",
]

logger = logging.getLogger(__name__)

#: Prefix of every base-model name inside a captured graph (the TaskModule attribute).
MODEL_PREFIX = "model."
#: Largest size of a dynamic dim that is not a sequence (batch, adapter rank) in every ``torch.export`` call.
MAX_DIM = 1 << 16
#: Name of the cache-length dim of a KV-cache ("with past") program's signature.
PAST_DIM = "past_sequence"
_MASK_IMPL = "sdpa_without_vmap"


def past_names(layers: int) -> list[str]:
    """``past_key_values.{i}.key``, ``past_key_values.{i}.value`` for each layer (optimum's names)."""
    return [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def present_names(layers: int) -> list[str]:
    """``present.{i}.key``, ``present.{i}.value`` for each layer (optimum's names)."""
    return [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def is_with_past(program: Program) -> bool:
    """Whether ``program`` takes a KV cache (its inputs include ``past_key_values.0.key``)."""
    return "past_key_values.0.key" in program.input_names


#: Inputs of the LLM-runner layout (the KV cache inside the program; :mod:`peftc.exporting.llm`).
LLM_RUNNER_INPUTS = ("tokens", "input_pos")


def is_llm_runner(program: Program) -> bool:
    """Whether ``program`` has the LLM-runner layout: ``tokens``, ``input_pos`` in, the cache in its buffers."""
    return tuple(program.input_names) == LLM_RUNNER_INPUTS


@dataclass
class Site:
    """One adapted module: where an adapter sits and what it looks like."""

    name: str  # HF module name, e.g. transformer.h.0.attn.c_attn
    method: str  # peft_type
    module_type: str  # class name of the base module
    in_features: int
    out_features: int
    rank: int | None = None
    scale: float | None = None
    fan_in_fan_out: bool = False
    #: A variant of the method's forward at this site, keeping its peft_type (LoRA's ``"dora"``); ``None``: plain.
    variant: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Program:
    """A captured model: the graph, its signature, and the adapter bound into it (if any)."""

    graph_module: fx.GraphModule
    task: TaskSpec
    mode: str
    model_config: Any  # transformers PretrainedConfig
    input_names: list[str]
    output_names: list[str]
    dynamic_dims: dict[str, dict[int, str]]
    module_types: dict[str, str]  # HF module name -> class name
    example_inputs: tuple[torch.Tensor, ...]
    adapter: Any = None  # peftc.adapters.AdapterState
    sites: dict[str, Site] = field(default_factory=dict)
    history: list[str] = field(default_factory=list)
    #: The eager model this program was captured from, for passes that re-capture it with an input
    #: transform (prompt methods); shared, never copied, by ``copy.deepcopy``.
    source: ModelRef | None = field(default=None, repr=False)
    #: Longest sequence the graph accepts when capture had to lower it below the model's table size.
    max_sequence: int | None = None
    #: Graph input name -> the value that makes the base model (lifted adapter inputs; see passes/lift.py).
    input_defaults: dict[str, torch.Tensor] = field(default_factory=dict)
    #: The class captured around the model (:class:`~peftc.tasks.TaskModule` or a ``transform``'s). A pass that
    #: re-captures with an input transform (prompt methods) asks it for its prompted variant (``prompted``).
    wrapper: type[nn.Module] | None = field(default=None, repr=False)
    #: Largest batch the graph takes when the model guards an upper bound (diffusers' upsampler: batch < 64).
    max_batch: int | None = None
    #: The ``torch.export`` program this one was captured as (without weights): what an exporter re-uses
    #: instead of tracing the graph again while the graph is still the captured one (:meth:`exported_program`).
    captured: CapturedGraph | None = field(default=None, repr=False)

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.graph_module(*inputs)

    def forward_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run on a dict holding at least the program's inputs (extra keys such as labels are ignored)."""
        return self.graph_module(*(batch[name] for name in self.input_names))

    def parameters(self, trainable: bool | None = None) -> list[nn.Parameter]:
        params = list(self.graph_module.parameters())
        if trainable is None:
            return params
        return [p for p in params if p.requires_grad == trainable]

    def parameter_counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.parameters(trainable=True))
        frozen = sum(p.numel() for p in self.parameters(trainable=False))
        return {"trainable": trainable, "frozen": frozen, "total": trainable + frozen}

    def op_histogram(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.graph.nodes:
            if node.op == "call_function":
                key = _op_name(node.target)
                counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def max_positions(self) -> int | None:
        """Longest sequence the graph takes: the model's position table size, or less when capture lowered it."""
        return self.max_sequence or _max_positions(self.model_config)

    def dynamic_shapes(self, min_size: int = 1) -> tuple[dict[int, Any] | None, ...]:
        """``torch.export`` dynamic shapes of the graph's inputs, to re-export its graph module."""
        return dynamic_shapes(self.input_names, self.dynamic_dims, min_size, self.max_positions(), self.max_batch)

    def exported_program(self) -> torch.export.ExportedProgram | None:
        """The capture's ``ExportedProgram`` holding this program's current weights, without tracing again.

        Only while the graph is op for op the one captured: a merge folds weights into new tensors bound
        at the same names and leaves the base graph (so a merged export is converted from its capture);
        any pass that changed an op, or a weight of another shape or dtype, gives ``None`` and the caller
        traces the graph module instead (``torch.export`` of :attr:`graph_module`).
        """
        if self.captured is None or _fingerprint(self.graph) != self.captured.fingerprint:
            return None
        return self.captured.with_weights(self.graph_module)


def get_tensor(module: nn.Module, path: str) -> Any:
    """The attribute at dotted ``path`` under ``module`` (a parameter, buffer or constant of a graph module)."""
    owner, _, attr = path.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, attr)


@dataclass(frozen=True)
class CapturedGraph:
    """What ``torch.export`` returned for a program, less its weights (they stay the graph module's).

    ``copy.deepcopy`` shares it (it is never changed); :meth:`with_weights` rebuilds the
    ``ExportedProgram`` around the tensors a graph module binds at the captured names.
    """

    graph_module: fx.GraphModule  # the lifted graph: weights are its inputs
    signature: Any  # ExportGraphSignature
    range_constraints: dict[Any, Any]
    module_call_graph: list[Any]
    example_inputs: Any
    verifiers: list[Any]
    #: :func:`_fingerprint` of the unlifted graph at capture.
    fingerprint: str

    @classmethod
    def of(cls, ep: torch.export.ExportedProgram, unlifted: fx.GraphModule) -> CapturedGraph:
        return cls(
            ep.graph_module, ep.graph_signature, dict(ep.range_constraints), list(ep.module_call_graph),
            ep.example_inputs, list(ep.verifiers), _fingerprint(unlifted.graph),
        )  # fmt: skip

    def with_weights(self, module: nn.Module) -> torch.export.ExportedProgram | None:
        """The ``ExportedProgram`` with the parameters, buffers and constants ``module`` binds at the
        captured names; ``None`` when one is missing or differs in shape or dtype from the captured one."""
        from torch.export.graph_signature import InputKind

        vals = {n.name: n.meta.get("val") for n in self.graph_module.graph.nodes if n.op == "placeholder"}
        state: dict[str, Any] = {}
        constants: dict[str, Any] = {}
        for spec in self.signature.input_specs:
            if spec.kind == InputKind.USER_INPUT:
                continue
            if spec.kind not in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                return None  # script objects, tokens: not re-bound here
            try:
                tensor = get_tensor(module, spec.target)
            except AttributeError:
                return None
            val = vals.get(spec.arg.name)
            if (
                not isinstance(tensor, torch.Tensor)
                or val is None
                or (tensor.shape, tensor.dtype) != (val.shape, val.dtype)
            ):
                return None
            if spec.kind == InputKind.PARAMETER:
                state[spec.target] = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, False)
            elif spec.kind == InputKind.BUFFER and spec.persistent:
                state[spec.target] = tensor
            else:
                constants[spec.target] = tensor
        return torch.export.ExportedProgram(
            root=self.graph_module,
            graph=copy.deepcopy(self.graph_module.graph),  # nodes copied, meta shared: the program owns its graph
            graph_signature=self.signature,
            state_dict=state,
            range_constraints=self.range_constraints,
            module_call_graph=self.module_call_graph,
            example_inputs=self.example_inputs,
            constants=constants,
            verifiers=self.verifiers,
        )

    def __deepcopy__(self, memo: dict) -> CapturedGraph:
        return self


def _fingerprint(graph: fx.Graph) -> str:
    """Every node of ``graph`` (name, op, target, arguments) as text, less the dropouts that do nothing.

    An eval capture holds ``dropout(x, p, train=False)`` (the identity), which the eval-mode pass of a
    merge removes; any other difference between two graphs shows.
    """
    if not any(_idle_dropout(n) for n in graph.nodes):
        return str(graph)
    graph = copy.deepcopy(graph)
    for node in list(graph.nodes):
        if _idle_dropout(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    return str(graph)


def _idle_dropout(node: fx.Node) -> bool:
    aten = torch.ops.aten
    dropouts = (aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default)
    return node.op == "call_function" and node.target in dropouts and len(node.args) > 2 and node.args[2] is False


class ModelRef:
    """A reference to the eager model of a program; ``copy.deepcopy`` shares it instead of copying."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __deepcopy__(self, memo: dict) -> ModelRef:
        return self


def _op_name(target: Any) -> str:
    name = getattr(target, "__name__", str(target))
    if isinstance(target, torch._ops.OpOverload):
        name = str(target).removeprefix("aten.")
    return name


def example_inputs(model: nn.Module, input_names: list[str], batch: int = 2, seq: int = 8) -> tuple[torch.Tensor, ...]:
    """Inputs for capture: batch ≥ 2 and sequence ≥ 2, or the dims specialise to constants.

    They are made on the CPU (the same values everywhere) and placed on the model's device.
    """
    gen = torch.Generator().manual_seed(0)
    vocab = int(getattr(model.config, "vocab_size", 100) or 100)
    device = next(model.parameters(), torch.empty(0)).device
    out = []
    for name in input_names:
        if name == "pixel_values":  # images: the model's channels and size (a vision graph's H and W are fixed)
            dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
            out.append(torch.randn(batch, *image_shape(model.config), generator=gen).to(dtype))
        elif name == "input_ids":
            out.append(torch.randint(1, max(vocab, 2), (batch, seq), generator=gen))
        elif name == "attention_mask":
            out.append(torch.ones(batch, seq, dtype=torch.long))
        elif name == "position_ids":
            out.append(torch.arange(seq).expand(batch, seq).contiguous())
        else:
            out.append(torch.zeros(batch, seq, dtype=torch.long))
    return tuple(t.to(device) for t in out)


def image_shape(cfg: Any) -> tuple[int, int, int]:
    """``(channels, height, width)`` of a vision model's ``pixel_values`` (``image_size``: an int or a pair)."""
    cfg = getattr(cfg, "vision_config", None) or cfg  # BLIP-2: the vision tower's config says
    size = getattr(cfg, "image_size", 224)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return int(getattr(cfg, "num_channels", 3)), int(height), int(width)


def default_dims(name: str) -> dict[int, str]:
    """Dynamic axes of a graph input: batch and sequence for tokens; only batch for ``pixel_values``.

    A vision graph takes images at the model's ``image_size``: patch grids, window partitions
    (Swin) and position tables are sized from it, so height and width are fixed.
    """
    return {0: "batch"} if name == "pixel_values" else {0: "batch", 1: "sequence"}


def _register_mask_without_vmap() -> None:
    """transformers builds masks with vmap by default; this variant exports to clean graphs."""
    from transformers.integrations.executorch import sdpa_mask_without_vmap
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if _MASK_IMPL not in ALL_MASK_ATTENTION_FUNCTIONS:
        ALL_MASK_ATTENTION_FUNCTIONS.register(_MASK_IMPL, sdpa_mask_without_vmap)
        ALL_ATTENTION_FUNCTIONS.register(_MASK_IMPL, ALL_ATTENTION_FUNCTIONS["sdpa"])


def _no_zero_layerdrop(model: nn.Module) -> None:
    """Stacks with LayerDrop at probability 0 (OPT, BART: ``layerdrop = 0.0``) in eval mode, their layers as they are.

    In training such a stack draws ``torch.rand([]) < layerdrop`` per layer, a data-dependent branch torch.export
    cannot capture, though with probability 0 it never skips a layer. Only the stack's own flag changes (it is
    read for LayerDrop and gradient checkpointing); its layers keep their dropout.
    """
    for module in model.modules():
        if module.training and getattr(module, "layerdrop", None) == 0:
            module.training = False


def _use_export_attention(model: nn.Module) -> None:
    _register_mask_without_vmap()
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and getattr(cfg, "_attn_implementation", None) == "sdpa":
            cfg._attn_implementation = _MASK_IMPL


#: Source folders whose frames are never "the model's line": torch itself and the peftc package.
_INTERNAL_DIRS = tuple(str(Path(f).resolve().parent) + os.sep for f in (torch.__file__, __file__))


def _failing_frame(exc: BaseException) -> str:
    """The innermost frame outside torch and peftc: the model source line that could not be captured.

    Code that torch generates at run time (``<string>``, ``<eval_with_key>``) is skipped too; files are
    matched by package folder, so a user model in a folder that merely contains ``peftc`` still counts.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        if frame.filename.startswith("<") or str(Path(frame.filename).resolve()).startswith(_INTERNAL_DIRS):
            continue
        return f"{frame.filename}:{frame.lineno} ({(frame.line or '').strip()})"
    return "unknown location"


def capture(
    model: nn.Module,
    task: str | TaskSpec,
    mode: str = "train",
    inputs: tuple[torch.Tensor, ...] | None = None,
    transform: Callable[[nn.Module, list[str]], TaskModule] | None = None,
) -> Program:
    """Capture ``model`` for ``task`` with ``torch.export``; dynamic batch and sequence dims.

    Args:
        model: a transformers model for the task (e.g. ``GPT2LMHeadModel``).
        task: ``"causal-lm"`` or ``"seq-cls"`` (or a :class:`TaskSpec`).
        mode: ``"train"`` (dropout captured) or ``"eval"``.
            Task ``seq2seq`` captures the whole encoder-decoder forward (``input_ids, attention_mask,
            decoder_input_ids -> logits``, :class:`peftc.exporting.seq2seq.Seq2SeqModule`) unless ``transform``
            is given (the export captures the encoder and the decoder separately).
        inputs: example inputs in graph-input order; made up when omitted.
        transform: builds the module that is captured around ``model`` from the model and the task's
            input names (default :class:`TaskModule`); its ``input_names`` become the graph inputs.
            Methods that change the model's inputs (prompt tuning, P-tuning) capture through one.
            A wrapper may also define ``dynamic_dims`` (input name -> {axis: dim name}; default
            ``{0: "batch", 1: "sequence"}``), ``output_names`` (default ``["logits"]``) and
            ``example_inputs()``: the KV-cache wrapper (:mod:`peftc.exporting.kv`) does.

    Returns:
        A :class:`Program`; its parameters are the model's own tensors, frozen.

    Raises:
        CaptureError: naming the model class, the task and the failing op or source line.
    """
    spec = task if isinstance(task, TaskSpec) else get_task(task)
    if mode not in ("train", "eval"):
        raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
    _use_export_attention(model)
    model.train(mode == "train")
    model.requires_grad_(False)
    names = graph_input_names(model, spec)
    if transform is None and spec.name == "seq2seq":  # the whole encoder-decoder forward (training, evaluation)
        from peftc.exporting.seq2seq import Seq2SeqModule

        transform = lambda m, _names: Seq2SeqModule(m)  # noqa: E731
    if transform is None and spec.name == "image-to-text":  # image tokens in the example ids (peftc.blip2)
        from peftc.blip2 import Blip2Module

        transform = Blip2Module
    if transform is None and spec.name == "text-to-image":  # a diffusers UNet, scalar timestep (optimum's layout)
        from peftc.diffusion import UNetModule

        transform = lambda m, _names: UNetModule(m)  # noqa: E731
    wrapper = TaskModule(model, names) if transform is None else transform(model, names)
    wrapper.train(mode == "train")
    _no_zero_layerdrop(model)
    names = list(wrapper.input_names)
    if inputs is None:
        make = getattr(wrapper, "example_inputs", None)
        inputs = make() if callable(make) else example_inputs(model, names)
    wanted_dims = getattr(wrapper, "dynamic_dims", None) or {name: default_dims(name) for name in names}
    table = max_seq = _max_positions(model.config)
    if max_seq and getattr(wrapper, "extra_positions", 0):  # positions the transform adds (virtual tokens)
        max_seq -= wrapper.extra_positions
    ep = None
    # a wrapper may know an upper bound the model guards on the batch (UNetModule.max_batch): no failed attempt first
    min_dim, max_dim, oblivious, max_batch = 1, max_seq, False, getattr(wrapper, "max_batch", None)
    while ep is None:
        shapes = dynamic_shapes(names, wanted_dims, min_dim, max_dim, max_batch)
        try:
            with fx_config.patch(backed_size_oblivious=oblivious):
                ep = torch.export.export(wrapper, inputs, dynamic_shapes=(shapes,), strict=False)
        except Exception as e:  # torch.export raises many unrelated types
            if max_dim and max_dim == max_seq and f"!= {table}" in str(e):
                # model code guards ``sequence != table size`` (GPT-Neo slices a [max, max] causal-mask
                # buffer by the length; with virtual tokens ``n + sequence != table size``): capture up to
                # one position less (Program.max_positions says so)
                max_dim = max_seq - 1
            elif not max_batch and (bound := re.search(r"Dim\('batch', max=(\d+)\)", str(e))):
                max_batch = int(bound.group(1))  # the model branches on a batch size (diffusers: batch >= 64)
            elif min_dim == 1:
                min_dim = 2
            elif getattr(wrapper, "extra_positions", 0) and not oblivious and "min(" in str(e):
                # a reshape's contiguity guard on ``n + sequence`` (Bloom's heads: min(n+s, h(n+s)) == n+s) that
                # the symbolic solver cannot prove with the offset n; size-oblivious reasoning (sizes ≥ 2) does
                oblivious = True
            else:
                raise CaptureError(
                    f"cannot capture {type(model).__name__} for task {spec.name!r}: {type(e).__name__}: "
                    f"{_first_line(e)} at {_failing_frame(e)}"
                ) from e
    gm = ep.module()
    module_types = {name: type(m).__name__ for name, m in model.named_modules() if name}
    program = Program(
        graph_module=gm,
        task=spec,
        mode=mode,
        model_config=model.config,
        input_names=names,
        output_names=list(getattr(wrapper, "output_names", None) or ["logits"]),
        dynamic_dims={name: dict(wanted_dims.get(name, {})) for name in names},
        module_types=module_types,
        example_inputs=inputs,
        source=ModelRef(model),
        max_sequence=max_dim if max_dim != _max_positions(model.config) else None,
        wrapper=getattr(wrapper, "base_wrapper", type(wrapper)),
        max_batch=max_batch,
        captured=CapturedGraph.of(ep, gm),
    )
    logger.debug("captured %s for %s (%s): %d nodes", type(model).__name__, spec.name, mode, len(gm.graph.nodes))
    return program


def dynamic_shapes(
    names: Sequence[str],
    dims_by_name: Mapping[str, Mapping[int, str]],
    min_size: int = 1,
    max_sequence: int | None = None,
    max_batch: int | None = None,
) -> tuple[dict[int, Any] | None, ...]:
    """``torch.export`` dynamic shapes for inputs ``names`` whose axes are named in ``dims_by_name``.

    One ``Dim`` per name, shared by every input that uses it, so torch.export sees one batch size
    and one sequence length: ``batch`` and ``sequence`` take sizes from ``min_size`` (1, or 2 when
    a model only exports with both ≥ 2); a name containing ``sequence`` (``sequence``,
    ``past_sequence``, ``encoder_sequence``) is bounded by ``max_sequence`` (the model's position
    table), ``batch`` by ``max_batch`` when given, any other (``lora_rank``) by :data:`MAX_DIM`.
    ``"NAME + k"`` with ``NAME`` a dim of an earlier input and ``k`` an integer is that dim plus ``k``
    (a seq2seq decoder's encoder states with ``k`` virtual tokens in front). Any other name that is not
    an identifier (``"past_sequence + sequence"``: the attention mask of a KV-cache graph) is a derived size:
    torch works out its relation to the others (``Dim.AUTO``) and the name is only what the
    artifact calls it. An input with no named axes is static (``None``).
    """
    dims: dict[str, Dim] = {}
    shapes: list[dict[int, Any] | None] = []
    for name in names:
        spec: dict[int, Any] = {}
        for axis, dim in dims_by_name.get(name, {}).items():
            base, plus, offset = dim.partition(" + ")
            if plus and base in dims and offset.isdigit():  # "encoder_sequence + 4": a dim declared before, plus k
                spec[axis] = dims[base] + int(offset)
                continue
            if not dim.isidentifier():
                spec[axis] = Dim.AUTO
                continue
            if dim not in dims:
                low = min_size if dim in ("batch", "sequence") else 1
                high = (max_sequence or MAX_DIM) if "sequence" in dim else MAX_DIM
                dims[dim] = Dim(dim, min=low, max=(max_batch or high) if dim == "batch" else high)
            spec[axis] = dims[dim]
        shapes.append(spec or None)
    return tuple(shapes)


def _first_line(e: BaseException) -> str:
    """The error's first line, plus the first ``- …`` detail line (torch.export's guard that failed)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    detail = next((line for line in lines[1:] if line.startswith("- ")), "")
    return f"{lines[0]} {detail[2:]}" if detail else lines[0]


def _max_positions(cfg: Any) -> int | None:
    cfg = getattr(cfg, "text_config", None) or cfg  # a vision-language model (BLIP-2): its language model's table
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
