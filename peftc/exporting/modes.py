"""Export modes: what happens to the adapter between the reference and the exporter, and what it adds to the artifact.

- ``keep`` (:class:`OneAdapter`): the adapter stays in the graph as ops;
- ``merge`` (:class:`OneAdapter` with ``merge``): each method's merge pass folds it into the weights
  (the graph is then the base graph op for op); the merged torch program is checked against the
  unmerged one before anything is written;
- ``lift`` (:class:`SwappableAdapters`, ``--adapters-as-inputs``): one or more sources over one base;
  each site's tensors become graph inputs whose defaults make the base model
  (:class:`~peftc.passes.lift.LiftAdaptersToInputsPass`), and each source is written as an adapter
  file of the format (``adapters/<name>.onnx_adapter``);
- ``mixed-batch`` (:class:`MixedAdapters`, ``--mixed-batch``): one or more sources over one base, all
  stacked inside one graph with an ``adapter_index`` ``int64[batch]`` input (``-1``: the base model,
  ``i``: the ``i``-th source) so each row of one run gets its own adapter
  (:class:`~peftc.passes.mixed_batch.MixedBatchPass`); verified on batches whose rows mix every
  adapter and the base, each row against its own adapted torch program.

A mode is the part of the pipeline that differs between these configurations, one hook per stage:
which sources it accepts (:meth:`~Mode.check_sources`), what the artifact calls the adapters, the
comparisons the verification step makes (one per graph; or one per adapter plus the base), the mode
passes, the side files it writes, its report sections and manifest keys. The stages themselves are
walked once, by :func:`peftc.exporting.export`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from peftc.adapters import CONFIG_FILE, WEIGHTS_FILE
from peftc.errors import ConfigError

from .graphs import Graph, GraphPlan
from .sources import Adapters, adapted_modules, adapter_name, adapter_names, refuse_other_targets, same_base

if TYPE_CHECKING:  # pragma: no cover
    from peftc.exporters.registry import AdapterFiles, Exporter
    from peftc.exporters.verify import Tolerance

__all__ = [
    "ADAPTERS_SUBDIR",
    "ADAPTER_SUBDIR",
    "Comparison",
    "MixedAdapters",
    "Mode",
    "OneAdapter",
    "SwappableAdapters",
    "copy_adapter",
    "per_graph",
    "select_mode",
]

#: Where the artifact keeps a byte-for-byte copy of the adapter it was built from.
ADAPTER_SUBDIR = "adapter"
#: Where a swappable artifact keeps ``<name>.onnx_adapter`` and a copy of each source adapter (``<name>/``).
ADAPTERS_SUBDIR = "adapters"
#: How reports name the torch reference of every graph.
REFERENCE = "the unmerged adapted torch program"


@dataclass
class Comparison:
    """One check of the verification step: a graph's file run (with an adapter file, maybe) vs torch outputs.

    Attributes:
        graph: the graph whose file runs (its cases are the inputs).
        reference: the expected outputs per case.
        reference_name: how the report names them.
        adapter: an adapter file (relative to the artifact directory) activated for the run.
        adapter_name: the swappable adapter it checks (``None``: the graph's own adapter, or the base).
    """

    graph: Graph
    reference: list[Any]
    reference_name: str
    adapter: str | None = None
    adapter_name: str | None = None


def per_graph(graphs: list[Graph], values: list[Any]) -> Any:
    """The value of a one-graph artifact, or ``{role: value}`` for an artifact of several graphs."""
    return values[0] if len(graphs) == 1 else {g.role: v for g, v in zip(graphs, values, strict=True)}


def _role(graph: Graph, text: str) -> str:
    return text if graph.role is None else f"{text} ({graph.role})"


class Mode(Protocol):
    """The hooks of one export mode (see the module docstring); the pipeline calls each once, in stage order."""

    name: str  # keep | merge | lift | mixed-batch
    merged: bool

    def check_sources(self, adapters: Adapters) -> None:
        """Source stage: refuse sources the mode cannot take (before the base loads)."""
        ...

    def names(self, adapters: Adapters) -> list[str]:
        """What the artifact calls each source's adapter."""
        ...

    def after_bind(self, adapters: Adapters, bound: list[list[Graph]]) -> None:
        """Bind stage, after every source's graphs are bound (lift: the tensors that become inputs)."""
        ...

    def comparisons(
        self, plan: GraphPlan, model: Any, adapters: Adapters, names: list[str], bound: list[list[Graph]]
    ) -> list[Comparison]:
        """Reference stage: what the verification step compares, with the torch outputs to compare with."""
        ...

    def apply(self, graphs: list[Graph], tolerance: Tolerance) -> list[Any]:
        """Mode passes on the exported graphs; returns the reports of any torch-level check (merge)."""
        ...

    def reapply(self, graphs: list[Graph]) -> None:
        """The mode passes, unchecked (``apply`` runs them, then checks the result)."""
        ...

    def metadata(self, names: list[str]) -> dict[str, str]:
        """``peftc.*`` entries naming the adapter(s) in each model file."""
        ...

    def write_side_files(self, exporter: Exporter, directory: Path, graphs: list[Graph], names: list[str]) -> None:
        """Exporter stage, after the model files: files the mode adds (lift: one adapter file per source)."""
        ...

    def copy_adapters(self, directory: Path, adapters: Adapters, names: list[str]) -> None:
        """Artifact stage: byte-for-byte copies of the source adapters."""
        ...

    def report_entries(
        self, format: str, graphs: list[Graph], comparisons: list[Comparison], reports: list[Any], merged: list[Any]
    ) -> dict[str, Any]:
        """Artifact stage: the ``report.json`` sections of the verification figures."""
        ...

    def manifest_entries(
        self,
        exporter: Exporter,
        directory: Path,
        adapters: Adapters,
        names: list[str],
        comparisons: list[Comparison],
        reports: list[Any],
    ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """Artifact stage: the manifest's ``adapter`` entry and the mode's own keys."""
        ...


class OneAdapter:
    """``keep`` and ``merge``: one source, its adapter in the graph as ops or folded into the weights."""

    def __init__(self, merge: bool = False):
        self.merged = bool(merge)
        self.name = "merge" if merge else "keep"

    def check_sources(self, adapters: Adapters) -> None:
        from peftc.methods import get_method

        method = get_method(adapters.states[0])
        if self.merged and method.merge_refusal:
            raise ConfigError(
                f"--merge cannot fold {method.label} adapters into the weights ({method.merge_refusal}); "
                "export without --merge"
            )

    def names(self, adapters: Adapters) -> list[str]:
        return [adapter_name(adapters.first)]

    def after_bind(self, adapters: Adapters, bound: list[list[Graph]]) -> None:
        return None

    def comparisons(
        self, plan: GraphPlan, model: Any, adapters: Adapters, names: list[str], bound: list[list[Graph]]
    ) -> list[Comparison]:
        return [Comparison(g, g.reference, _role(g, REFERENCE)) for g in bound[0]]

    def apply(self, graphs: list[Graph], tolerance: Tolerance) -> list[Any]:
        """Merge: fold every graph's sites and check the merged torch program against the reference."""
        from peftc.exporters.verify import compare_outputs, run_torch

        if not self.merged:
            return []
        self.reapply(graphs)
        reports = []
        for g in graphs:
            reports.append(
                compare_outputs(
                    run_torch(g.program, g.cases, g.program.input_names),
                    g.reference,
                    g.cases,
                    g.program.task.name,
                    atol=tolerance.atol,
                    rtol=tolerance.rtol,
                    candidate="the merged torch program" if g.role is None else f"the merged torch {g.role}",
                    reference=REFERENCE,
                ).raise_if_failed(hint="the merge pass changed the model's outputs; nothing was written")
            )
        return reports

    def reapply(self, graphs: list[Graph]) -> None:
        from peftc.passes import merge_pipeline

        if not self.merged:
            return
        for g in graphs:
            merge_pipeline()(g.program)
            left = sorted({s.method for s in g.program.sites.values()})
            if left:
                raise ConfigError(
                    f"--merge cannot fold {', '.join(left)} adapters into the weights; export without --merge"
                )

    def metadata(self, names: list[str]) -> dict[str, str]:
        return {"peftc.adapter": names[0]}

    def write_side_files(self, exporter: Exporter, directory: Path, graphs: list[Graph], names: list[str]) -> None:
        return None

    def copy_adapters(self, directory: Path, adapters: Adapters, names: list[str]) -> None:
        copy_adapter(adapters.first.adapter_dir, directory / ADAPTER_SUBDIR)

    def report_entries(
        self, format: str, graphs: list[Graph], comparisons: list[Comparison], reports: list[Any], merged: list[Any]
    ) -> dict[str, Any]:
        return {
            f"{format}_vs_torch": per_graph(graphs, [r.to_dict() for r in reports]),
            "merged_vs_unmerged": per_graph(graphs, [r.to_dict() for r in merged]) if merged else None,
        }

    def manifest_entries(
        self,
        exporter: Exporter,
        directory: Path,
        adapters: Adapters,
        names: list[str],
        comparisons: list[Comparison],
        reports: list[Any],
    ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        from peftc.exporters.manifest import adapter_info

        first, state = adapters.first, adapters.states[0]
        return adapter_info(first.adapter_dir, names[0], state.config.peft_type, state.config.to_dict()), {}


@dataclass
class SwappableAdapters:
    """``lift``: one graph, every source's adapter as a file of the format's adapter inputs (``files``)."""

    files: AdapterFiles
    name: str = "lift"
    merged: bool = False
    #: Per source: graph input name -> the array its adapter file holds (after the bind stage).
    lifted: list[dict[str, Any]] = field(default_factory=list)
    #: Per source: the ranks of its lifted tensors (the sizes along their rank dims).
    ranks: list[list[int]] = field(default_factory=list)

    def check_sources(self, adapters: Adapters) -> None:
        """Every source: a liftable method, the same method, base, task and target modules (cheap: before loading)."""
        from peftc.methods import get_method

        srcs, states, first = adapters.srcs, adapters.states, adapters.first
        method = states[0].config.peft_type
        for s, source, state in zip(srcs, adapters.sources, states, strict=True):
            if get_method(state).lift is None:
                raise ConfigError(
                    f"{s} is a {get_method(state).label} adapter, which cannot be a graph input "
                    f"({get_method(state).lift_refusal}); export it without --adapters-as-inputs"
                )
            if state.config.peft_type != method:
                raise ConfigError(
                    f"{s} is a {state.config.peft_type} adapter but {srcs[0]} is {method}; one model serving "
                    "several adapters takes adapters of one method"
                )
            if same_base(source.base) != same_base(first.base):
                raise ConfigError(
                    f"{s} was made for base {source.base!r} but {srcs[0]} for {first.base!r}; the adapters of one "
                    "model share one base model (export them separately, or pass --model if both bases are the same)"
                )
            if source.task != first.task:
                raise ConfigError(
                    f"{s} is a {source.task} adapter but {srcs[0]} is {first.task}; export them separately"
                )
        for s, state in zip(srcs[1:], states[1:], strict=True):
            refuse_other_targets(str(srcs[0]), adapted_modules(states[0]), str(s), adapted_modules(state))

    def names(self, adapters: Adapters) -> list[str]:
        return adapter_names(adapters.sources)

    def after_bind(self, adapters: Adapters, bound: list[list[Graph]]) -> None:
        """Each source's lifted tensors (scales folded in); their shapes must agree where ranks do not vary."""
        from peftc.passes.lift import lifted_inputs

        tensors = [{t.input_name: t for _, t in lifted_inputs(g[0].program)} for g in bound]
        for s, values in zip(adapters.srcs[1:], tensors[1:], strict=True):
            refuse_other_targets(str(adapters.srcs[0]), tensors[0], str(s), values)
        self.lifted = [{k: t.value.float().numpy() for k, t in values.items()} for values in tensors]
        self.ranks = [
            sorted({int(t.value.shape[t.rank_dim]) for t in values.values() if t.rank_dim is not None})
            for values in tensors
        ]

    def comparisons(
        self, plan: GraphPlan, model: Any, adapters: Adapters, names: list[str], bound: list[list[Graph]]
    ) -> list[Comparison]:
        """Each adapter file activated vs its own adapted program; no adapter vs the base model."""
        from peftc.exporters.verify import run_torch

        graph = bound[0][0]
        inputs = graph.program.input_names  # the token inputs: the adapter tensors are not inputs yet
        out = []
        for name, source, graphs in zip(names, adapters.sources, bound, strict=True):
            reference = graphs[0].reference if graphs[0] is graph else run_torch(graphs[0].program, graph.cases, inputs)
            out.append(
                Comparison(
                    graph,
                    reference,
                    f"{REFERENCE} of {source.adapter_dir}",
                    adapter=f"{ADAPTERS_SUBDIR}/{name}{self.files.suffix}",
                    adapter_name=name,
                )
            )
        out.append(Comparison(graph, run_torch(plan.base_module(model), graph.cases, inputs), "the base model"))
        return out

    def apply(self, graphs: list[Graph], tolerance: Tolerance) -> list[Any]:
        from peftc.passes.lift import LiftAdaptersToInputsPass

        LiftAdaptersToInputsPass()(graphs[0].program)
        return []

    def reapply(self, graphs: list[Graph]) -> None:
        raise NotImplementedError("swappable exports are float32 (the pipeline's dtype check refuses others)")

    def metadata(self, names: list[str]) -> dict[str, str]:
        return {"peftc.adapters_as_inputs": "true", "peftc.adapters": ",".join(names)}

    def write_side_files(self, exporter: Exporter, directory: Path, graphs: list[Graph], names: list[str]) -> None:
        """``adapters/<name><suffix>`` per source, each checked against the written model."""
        model = directory / exporter.model_file(graphs[0].role)
        (directory / ADAPTERS_SUBDIR).mkdir()
        for name, values in zip(names, self.lifted, strict=True):
            path = directory / ADAPTERS_SUBDIR / f"{name}{self.files.suffix}"
            self.files.write(path, values)
            self.files.check(model, path)

    def copy_adapters(self, directory: Path, adapters: Adapters, names: list[str]) -> None:
        for name, source in zip(names, adapters.sources, strict=True):
            copy_adapter(source.adapter_dir, directory / ADAPTERS_SUBDIR / name)

    def report_entries(
        self, format: str, graphs: list[Graph], comparisons: list[Comparison], reports: list[Any], merged: list[Any]
    ) -> dict[str, Any]:
        pairs = list(zip(comparisons, reports, strict=True))
        return {
            "adapters_vs_torch": {c.adapter_name: r.to_dict() for c, r in pairs if c.adapter_name is not None},
            "base_vs_torch": next(r.to_dict() for c, r in pairs if c.adapter_name is None),
        }

    def adapter_entries(
        self, adapters: Adapters, names: list[str], extra: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """The manifest's ``adapters`` list: per source ``adapter_info``, the ``extra`` keys, HF PEFT copy, rank(s)."""
        from peftc.exporters.manifest import adapter_info

        method = adapters.states[0].config.peft_type
        entries = []
        for name, source, state, ranks, keys in zip(
            names, adapters.sources, adapters.states, self.ranks, extra, strict=True
        ):
            info = adapter_info(source.adapter_dir, name, method, state.config.to_dict())
            info.update(
                keys,
                hf_peft_copy=f"{ADAPTERS_SUBDIR}/{name}",
                rank=(ranks[0] if len(ranks) == 1 else ranks) if ranks else None,
            )
            entries.append(info)
        return entries

    def manifest_entries(
        self,
        exporter: Exporter,
        directory: Path,
        adapters: Adapters,
        names: list[str],
        comparisons: list[Comparison],
        reports: list[Any],
    ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        from peftc.passes.lift import RANK_DIM

        method = adapters.states[0].config.peft_type
        figures = {c.adapter_name: r.max_abs_diff for c, r in zip(comparisons, reports, strict=True)}
        entries = self.adapter_entries(
            adapters,
            names,
            [{"file": f"{ADAPTERS_SUBDIR}/{name}{self.files.suffix}", "max_abs_diff": figures[name]} for name in names],
        )
        swappable = self.files.inputs(directory / exporter.model_file(comparisons[0].graph.role))
        return None, {
            "method": method,
            "adapters_as_inputs": True,
            "rank_dim": RANK_DIM,
            "adapter_inputs": [{"name": k, **v} for k, v in swappable.items()],
            "adapters": entries,
        }


class MixedAdapters(SwappableAdapters):
    """``mixed-batch``: one graph, every source's adapter stacked in it, picked per row by ``adapter_index``.

    Sources are checked as for ``lift`` (one method, base, task, the same target modules) and must have a
    stack rule (:attr:`peftc.methods.Method.stack`); ranks and scales may differ.
    """

    def __init__(self) -> None:
        super().__init__(files=None)  # type: ignore[arg-type]
        self.name = "mixed-batch"
        self.states: list[Any] = []
        self.rows: list[list[int]] = []

    def check_sources(self, adapters: Adapters) -> None:
        from peftc.methods import get_method

        for s, state in zip(adapters.srcs, adapters.states, strict=True):
            method = get_method(state)
            if method.stack is None:
                raise ConfigError(
                    f"{s} is a {method.label} adapter, which cannot share one batch with others "
                    f"({method.stack_refusal or 'it has no stack rule; LoRA and IA3 have one'}); "
                    "export it without --mixed-batch"
                )
        for s, state in zip(adapters.srcs, adapters.states, strict=True):
            if getattr(state.config, "use_dora", False):
                raise ConfigError(
                    f"{s} is a DoRA adapter, which cannot share one batch yet; export it without --mixed-batch"
                )
        super().check_sources(adapters)

    def after_bind(self, adapters: Adapters, bound: list[list[Graph]]) -> None:
        """The sources' tensors must agree as for ``lift`` (only ranks differ); the states are stacked by ``apply``."""
        super().after_bind(adapters, bound)
        self.lifted = []  # what lift writes as adapter files: mixed-batch keeps the tensors in the graph
        self.states = list(adapters.states)

    def comparisons(
        self, plan: GraphPlan, model: Any, adapters: Adapters, names: list[str], bound: list[list[Graph]]
    ) -> list[Comparison]:
        """Cases whose rows mix the base and every adapter; reference row ``b``: its own program's row ``b``."""
        import torch

        from peftc.exporters.verify import run_torch
        from peftc.passes.mixed_batch import ADAPTER_INDEX

        graph = bound[0][0]
        inputs = graph.program.input_names
        per_source = [graph.reference] + [run_torch(g[0].program, graph.cases, inputs) for g in bound[1:]]
        base = run_torch(plan.base_module(model), graph.cases, inputs)
        n = len(adapters.states)
        reference = []
        for k, case in enumerate(graph.cases):
            batch = int(case.inputs[inputs[0]].shape[0])
            rows = [((b + k) % (n + 1)) - 1 for b in range(batch)]
            self.rows.append(rows)
            case.inputs[ADAPTER_INDEX] = torch.tensor(rows, dtype=torch.long)
            reference.append(_pick_rows([base[k] if r < 0 else per_source[r][k] for r in rows]))
        graph.reference = reference
        return [Comparison(graph, reference, f"{REFERENCE} of each row's adapter (the base model for -1)")]

    def apply(self, graphs: list[Graph], tolerance: Tolerance) -> list[Any]:
        """The mixed-batch pass, then its torch program checked row by row against each adapter's own."""
        from peftc.exporters.verify import compare_outputs, run_torch
        from peftc.passes.mixed_batch import MixedBatchPass

        g = graphs[0]
        MixedBatchPass(self.states)(g.program)
        report = compare_outputs(
            run_torch(g.program, g.cases, g.program.input_names),
            g.reference,
            g.cases,
            g.program.task.name,
            atol=tolerance.atol,
            rtol=tolerance.rtol,
            candidate="the mixed-batch torch program",
            reference=f"{REFERENCE} of each row's adapter",
        ).raise_if_failed(hint="the mixed-batch pass changed a row's outputs; nothing was written")
        return [report]

    def metadata(self, names: list[str]) -> dict[str, str]:
        return {"peftc.mixed_batch": "true", "peftc.adapters": ",".join(names)}

    def write_side_files(self, exporter: Exporter, directory: Path, graphs: list[Graph], names: list[str]) -> None:
        """No adapter files (the tensors are in the graph); ``adapters/`` holds the HF PEFT copies."""
        (directory / ADAPTERS_SUBDIR).mkdir()

    def report_entries(
        self, format: str, graphs: list[Graph], comparisons: list[Comparison], reports: list[Any], merged: list[Any]
    ) -> dict[str, Any]:
        return {
            f"{format}_vs_torch": reports[0].to_dict(),
            "mixed_torch_vs_per_adapter": merged[0].to_dict() if merged else None,
            "adapter_index_rows": {c.name: rows for c, rows in zip(graphs[0].cases, self.rows, strict=True)},
        }

    def manifest_entries(
        self,
        exporter: Exporter,
        directory: Path,
        adapters: Adapters,
        names: list[str],
        comparisons: list[Comparison],
        reports: list[Any],
    ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        from peftc.passes.mixed_batch import ADAPTER_INDEX

        method = adapters.states[0].config.peft_type
        entries = self.adapter_entries(adapters, names, [{"index": i} for i in range(len(names))])
        return None, {
            "method": method,
            "mixed_batch": True,
            "adapter_index": {
                "input": ADAPTER_INDEX,
                "dtype": "int64",
                "shape": ["batch"],
                "base": -1,
                "range": [-1, len(names) - 1],
                "out_of_range": "the run fails (ONNX Gather: index out of bounds); "
                "peftc.passes.mixed_batch.check_adapter_index refuses such values first",
            },
            "adapters": entries,
        }


def _pick_rows(outputs: list[Any]) -> Any:
    """Row ``b`` of ``outputs[b]`` for every row (each output: an array, or a list of arrays, batch first)."""
    import numpy as np

    first = outputs[0]
    if isinstance(first, (list, tuple)):
        return [np.stack([o[j][b] for b, o in enumerate(outputs)]) for j in range(len(first))]
    return np.stack([o[b] for b, o in enumerate(outputs)])


def select_mode(merge: bool, adapters_as_inputs: bool, exporter: Exporter, mixed_batch: bool = False) -> Mode:
    """The mode of an export: ``merge``, ``lift`` (adapters as inputs), ``mixed-batch`` or ``keep``; they exclude
    each other.

    Raises:
        ConfigError: two modes at once, or adapters as inputs (mixed batch) for a format without adapter files
            (other than ONNX).
    """
    if mixed_batch:
        if merge or adapters_as_inputs:
            other = "--merge" if merge else "--adapters-as-inputs"
            raise ConfigError(
                f"--mixed-batch and {other} exclude each other: mixed-batch keeps every adapter inside one graph, "
                "picked per row by adapter_index; choose one"
            )
        if exporter.name != "onnx":
            raise ConfigError(f"--format {exporter.name} takes no --mixed-batch yet; use --format onnx")
        return MixedAdapters()
    if adapters_as_inputs:
        if merge:
            raise ConfigError(
                "--merge and --adapters-as-inputs exclude each other: merge folds one adapter into the weights, "
                "adapters-as-inputs keeps them swappable; choose one"
            )
        if exporter.adapter_files is None:
            raise ConfigError(f"--format {exporter.name} takes no adapters as inputs; use --format onnx")
        return SwappableAdapters(exporter.adapter_files)
    return OneAdapter(merge)


def copy_adapter(adapter_dir: str | Path, dest: Path) -> None:
    """A byte-for-byte copy of the HF PEFT files the artifact was built from."""
    dest.mkdir()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copyfile(Path(adapter_dir) / name, dest / name)
