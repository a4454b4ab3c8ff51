"""Graph plans: which graphs an export holds, how each is captured, bound and given held-out inputs.

A plan is the *capture* stage of the pipeline, in four kinds:

- :class:`SingleGraph` without a cache: one program of the task (``model.onnx``);
- :class:`SingleGraph` with ``with_past``: one KV-cache program (:mod:`peftc.exporting.kv`); the
  adapter of a prompt method enters it as a constant cache prefix at capture instead of being
  bound afterwards, since a decode step carries no prompt. For a format that keeps the cache in the
  program (ExecuTorch), the LLM-runner layout instead (:mod:`peftc.exporting.llm`);
- :class:`EncoderDecoder`: an encoder and a decoder program (:mod:`peftc.exporting.seq2seq`), each
  to bind its own part of the adapter;
- :class:`~peftc.exporting.multimodal.ImageToText`: BLIP-2's whole forward plus an image graph, an embedding
  graph and a KV-cache decoder over ``inputs_embeds`` (:mod:`peftc.exporting.multimodal`).
  to bind its own part of the adapter; :class:`EncoderDecoderWithPast` adds the KV-cache decoder of the
  later generation steps (and the first step's decoder returns the caches).

Every plan answers the same three questions — :meth:`~GraphPlan.capture` (eval-mode programs, each
with the part of the adapter the *bind* stage still has to insert), :meth:`~GraphPlan.reference`
(held-out cases and the torch outputs on them, before any mode pass), :meth:`~GraphPlan.base_module`
(the model without adapter, the reference of a swappable export's no-adapter run) — so the pipeline
walks every kind the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from torch import nn

from peftc.adapters import AdapterState
from peftc.errors import ConfigError
from peftc.program import Program

from .seq2seq import SEQ2SEQ_TASK

__all__ = [
    "EncoderDecoder",
    "EncoderDecoderWithPast",
    "Graph",
    "GraphPlan",
    "SingleGraph",
    "UNetGraph",
    "adapted_program",
    "bind",
    "graph_plan",
    "plan_kind",
]


@dataclass
class Graph:
    """One graph of an export, as it moves through the pipeline.

    Attributes:
        role: ``None`` for the only graph of an artifact; ``"encoder"`` / ``"decoder"`` for one of several.
        program: the eval-mode program (bound after the bind stage, merged or lifted after the mode passes).
        pending: the part of the adapter the bind stage inserts (``None``: nothing to bind, or bound at capture).
        cases: held-out inputs (reference stage).
        reference: the unmerged adapted program's outputs on ``cases`` (reference stage).
    """

    role: str | None
    program: Program
    pending: AdapterState | None = None
    cases: list[Any] = field(default_factory=list)
    reference: list[Any] = field(default_factory=list)


class GraphPlan(Protocol):
    """What an export captures: one graph, a KV-cache graph, or several graphs (see the module docstring)."""

    #: One role per graph, in export order (``(None,)`` for single-graph artifacts).
    roles: ClassVar[tuple[str | None, ...]]
    task: str
    with_past: bool

    def capture(self, model: nn.Module, state: AdapterState) -> list[Graph]:
        """Eval-mode programs of ``model``, each with the part of ``state`` the bind stage inserts."""
        ...

    def reference(self, graphs: list[Graph]) -> None:
        """Fill each graph's ``cases`` and ``reference`` (its program's outputs on them)."""
        ...

    def base_module(self, model: nn.Module) -> nn.Module:
        """The module a swappable export's no-adapter run must equal: ``model`` without an adapter."""
        ...


def bind(graphs: list[Graph]) -> list[Graph]:
    """The bind stage: insert each graph's pending adapter part (HF PEFT tensors) into its program."""
    from peftc.passes import insertion_pipeline

    for graph in graphs:
        if graph.pending is not None:
            insertion_pipeline(graph.pending.config, graph.pending)(graph.program)
            graph.pending = None
    return graphs


@dataclass
class SingleGraph:
    """One program of ``task``: plain, or a KV-cache graph (``with_past``; in the program with ``cache_in_program``)."""

    roles: ClassVar[tuple[str | None, ...]] = (None,)
    task: str
    with_past: bool = False
    cache_in_program: bool = False

    def capture(self, model: nn.Module, state: AdapterState) -> list[Graph]:
        from peftc.methods import get_method
        from peftc.program import capture

        from .kv import cache_prefix, with_past

        if not self.with_past:
            return [Graph(None, capture(model, self.task, mode="eval"), state)]
        if self.cache_in_program:
            return [Graph(None, _llm_runner_program(model, self.task, state), state)]
        if get_method(state).transforms_inputs:  # the adapter is the cache's constant prefix: bound by capture
            transform = with_past(cache_prefix(model, state), state.config.cache_positions)
            program = capture(model, self.task, mode="eval", transform=transform)
            program.adapter = state
            return [Graph(None, program)]
        return [Graph(None, capture(model, self.task, mode="eval", transform=with_past()), state)]

    def reference(self, graphs: list[Graph]) -> None:
        from peftc.exporters.verify import make_cases, run_torch

        for graph in graphs:
            graph.cases = make_cases(graph.program)
            graph.reference = run_torch(graph.program, graph.cases, graph.program.input_names)

    def base_module(self, model: nn.Module) -> nn.Module:
        from peftc.tasks import TaskModule, get_task, graph_input_names

        from .kv import WithPastModule

        if self.with_past and self.cache_in_program:
            raise NotImplementedError("an in-program cache takes no swappable adapters (the format refuses them)")
        names = graph_input_names(model, get_task(self.task))
        return (WithPastModule(model, names) if self.with_past else TaskModule(model, names)).eval()


def _llm_runner_program(model: nn.Module, task: str, state: AdapterState) -> Program:
    """The LLM-runner program of ``model`` (:mod:`peftc.exporting.llm`), its sequence bounded by the cache.

    Raises:
        ConfigError: a prompt method (its virtual tokens or prefix are not in this layout yet).
    """
    from peftc.methods import get_method
    from peftc.program import capture

    from .llm import default_max_seq_len, llm_runner

    method = get_method(state)
    if method.transforms_inputs:
        raise ConfigError(
            f"{method.label} adapters are not supported in the in-program KV-cache layout yet (their virtual tokens "
            "would have to enter the static cache); export without --with-past, or with --format onnx --with-past"
        )
    max_seq_len = default_max_seq_len(model.config)
    program = capture(model, task, mode="eval", transform=llm_runner(max_seq_len))
    program.max_sequence = max_seq_len  # inputs longer than the cache cannot be written into it
    return program


@dataclass
class UNetGraph(SingleGraph):
    """``text-to-image``: one graph, the pipeline's UNet, in optimum's diffusion layout (``unet/model.onnx``)."""

    roles: ClassVar[tuple[str | None, ...]] = ("unet",)

    def capture(self, model: nn.Module, state: AdapterState) -> list[Graph]:
        from peftc.program import capture

        return [Graph("unet", capture(model, self.task, mode="eval"), state)]

    def base_module(self, model: nn.Module) -> nn.Module:
        from peftc.diffusion import UNetModule

        return UNetModule(model).eval()


@dataclass
class EncoderDecoder:
    """An encoder-decoder LM (T5, BART): an encoder graph and a decoder graph without cache."""

    roles: ClassVar[tuple[str | None, ...]] = ("encoder", "decoder")
    task: str = SEQ2SEQ_TASK
    with_past: bool = False

    def wrappers(self) -> tuple[type[nn.Module], ...]:
        """The capture wrapper of each role (:mod:`peftc.exporting.seq2seq`)."""
        from .seq2seq import DecoderModule, EncoderModule

        return EncoderModule, DecoderModule

    def capture(self, model: nn.Module, state: AdapterState) -> list[Graph]:
        """Each graph gets its part of ``state`` (:func:`~peftc.exporting.seq2seq.split_state`: the encoder's
        keys to the encoder graph, the rest to every decoder graph); an empty part (an adapter of decoder
        modules only, say) leaves that graph the base model's.

        Raises:
            ConfigError: a model without an encoder.
        """
        from peftc.program import capture

        from .seq2seq import split_state

        encoder_part, decoder_part = split_state(state, model)
        graphs = []
        for role, wrapper in zip(self.roles, self.wrappers(), strict=True):
            part = encoder_part if role == "encoder" else decoder_part
            program = capture(model, self.task, mode="eval", transform=lambda m, _names, w=wrapper: w(m))
            graphs.append(Graph(role, program, part if part.tensors else None))
        return graphs

    def reference(self, graphs: list[Graph]) -> None:
        """The decoder's cases carry the torch encoder's states, so each figure measures one graph; a
        decoder-with-past graph's cases carry the torch decoder's caches (:func:`~.seq2seq.decode_step_cases`)."""
        from peftc.exporters.verify import make_cases, run_torch

        from .seq2seq import decode_step_cases, decoder_cases

        encoder, decoder, *later = graphs
        encoder.cases = make_cases(encoder.program)
        encoder.reference = run_torch(encoder.program, encoder.cases, encoder.program.input_names)
        decoder.cases = decoder_cases(decoder.program, encoder.cases, encoder.reference)
        decoder.reference = run_torch(decoder.program, decoder.cases, decoder.program.input_names)
        for step in later:
            step.cases = decode_step_cases(step.program, decoder.cases, decoder.reference)
            step.reference = run_torch(step.program, step.cases, step.program.input_names)

    def base_module(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError("seq2seq exports take no swappable adapters (graph_plan refuses them)")


@dataclass
class EncoderDecoderWithPast(EncoderDecoder):
    """An encoder-decoder LM with KV-cache decoders, the layout ``ORTModelForSeq2SeqLM(use_cache=True)`` runs:
    the encoder, the first decoder step (:class:`~.seq2seq.CacheDecoderModule`: presents out) and the later
    steps (:class:`~.seq2seq.DecoderWithPastModule`: the caches in, the grown self-attention cache out)."""

    roles: ClassVar[tuple[str | None, ...]] = ("encoder", "decoder", "decoder_with_past")
    with_past: bool = True

    def wrappers(self) -> tuple[type[nn.Module], ...]:
        from .seq2seq import CacheDecoderModule, DecoderWithPastModule, EncoderModule

        return EncoderModule, CacheDecoderModule, DecoderWithPastModule

    def capture(self, model: nn.Module, state: AdapterState) -> list[Graph]:
        """As :meth:`EncoderDecoder.capture`; the later steps' graph binds the decoder part less the modules it
        does not call: cross-attention's key and value projections run once, in the first step, and their
        adapter reaches the later steps through the cross-attention cache. The first step's binding still
        checks that every decoder key finds its module."""
        graphs = super().capture(model, state)
        first, later = graphs[1], graphs[2]
        if later.pending is not None:
            first_calls, later_calls = _called_modules(first.program), _called_modules(later.program)

            def called_later(key: str) -> bool:  # the key's module (the longest first-step module it is under)
                owners = [m for m in first_calls if key.startswith(f"base_model.model.{m}.")]
                return not owners or max(owners, key=len) in later_calls

            part = later.pending.subset(called_later)
            later.pending = part if part.tensors else None
        return graphs


def _called_modules(program: Program) -> set[str]:
    """HF names of the modules whose parameters ``program`` reads (parameters the graph holds but never uses
    do not count)."""
    from peftc.program import MODEL_PREFIX

    targets = (str(n.target) for n in program.graph.nodes if n.op == "get_attr" and n.users)
    return {t[len(MODEL_PREFIX) :].rsplit(".", 1)[0] for t in targets if t.startswith(MODEL_PREFIX)}


def plan_kind(task: str) -> type[SingleGraph] | type[EncoderDecoder] | type[Any]:
    """The plan class of a task: encoder-decoder LMs export two graphs, image-to-text four, a diffusion UNet its
    folder's graph, every other task one."""
    if task == "image-to-text":
        from .multimodal import ImageToText

        return ImageToText
    if task == "text-to-image":
        return UNetGraph
    return EncoderDecoder if task == SEQ2SEQ_TASK else SingleGraph


def graph_plan(
    task: str, with_past: bool | None, adapters_as_inputs: bool = False, cache_in_program: bool = False
) -> GraphPlan:
    """The graph plan of an export, refusing what the plan cannot hold.

    Args:
        task: the peftc task.
        with_past: ``None``: a KV-cache graph for causal LMs and KV-cache decoders for seq2seq LMs (optimum's
            default), none otherwise.
        adapters_as_inputs: a swappable export (one graph whose adapter tensors are inputs).
        cache_in_program: the format keeps a KV cache inside the program (the LLM-runner layout).

    Raises:
        ConfigError: ``with_past`` for a task without a cache; a seq2seq export with adapters as
            inputs (not supported yet).
    """
    if task == "image-to-text":  # the whole forward and the KV-cache generation graphs, whatever ``with_past`` says
        from .multimodal import ImageToText

        if adapters_as_inputs:
            raise ConfigError("--adapters-as-inputs is not supported for image-to-text models yet; export each adapter")
        return ImageToText(task)
    if plan_kind(task) is EncoderDecoder:
        if adapters_as_inputs:
            raise ConfigError("--adapters-as-inputs is not supported for seq2seq models yet; export each adapter alone")
        return EncoderDecoder(task) if with_past is False else EncoderDecoderWithPast(task)
    if plan_kind(task) is UNetGraph and not with_past:
        return UNetGraph(task)
    if with_past is None:
        return SingleGraph(task, task == "causal-lm", cache_in_program)
    if with_past and task != "causal-lm":
        raise ConfigError(f"--with-past is for causal-lm models (a KV cache for generation), not {task}; drop it")
    return SingleGraph(task, bool(with_past), cache_in_program)


def adapted_program(model: nn.Module, task: str, state: AdapterState, with_past: bool = False) -> Program:
    """The eval-mode program of ``model`` with ``state`` bound: the capture and bind stages of a one-graph export.

    With ``with_past``, a KV-cache graph (:mod:`peftc.exporting.kv`); prompt methods then enter as a
    constant cache prefix (prefix tuning's keys/values, or the virtual tokens' keys/values) instead
    of virtual tokens, since a decode step carries no prompt.
    """
    (graph,) = bind(SingleGraph(task, with_past).capture(model, state))
    return graph.program
