"""``peftc inspect``: what a run, an artifact, an ``.onnx`` file or an adapter holds, plans, pictures and diffs.

- :mod:`~peftc.inspect.describe`: :func:`inspect_path` (inputs, outputs, adapter sites, parameter
  counts, op histogram, a run's last eval, an artifact's manifest and report) and :func:`render`.
- :mod:`~peftc.inspect.plan`: :func:`plan_model`, the dry run of any method's insertion pipeline
  (which sites it would adapt, with the method's facts, and why it skips the others).
- :mod:`~peftc.inspect.sources`: :func:`describe`, the graph behind a path (a run's adapted program,
  an artifact's ONNX graph, a model's base program, a plan).
- :mod:`~peftc.inspect.graph`: block-level pictures (:func:`graph_of`, :func:`block_graph`, :func:`draw`,
  DOT and Graphviz output).
- :mod:`~peftc.inspect.diff`: facts of a graph (:func:`program_facts`, :func:`onnx_facts`) and
  :func:`diff` / :func:`diff_programs` of two, :func:`render_diff`.
- :mod:`~peftc.inspect.sites`: the one place adapter tensors become labelled sites, from the method
  registry (:func:`adapter_sites`).
"""

from __future__ import annotations

# ``describe`` and ``diff`` name both a submodule and a function: loading a submodule sets the package
# attribute of its name to the module, so the functions are bound here after their modules are loaded
# (``from .diff import diff`` after ``diff.py`` loads; ``describe`` from ``sources``, which loads
# ``describe.py``). ``peftc.inspect.describe`` and ``peftc.inspect.diff`` are the functions.
from .describe import inspect_path, onnx_summary, program_summary, render
from .diff import diff, diff_programs, graph_facts, onnx_facts, program_facts, render_diff
from .graph import block_graph, draw, graph_of
from .plan import plan_config, plan_model, plan_program
from .sites import adapter_sites
from .sources import describe

__all__ = [
    "adapter_sites",
    "block_graph",
    "describe",
    "diff",
    "diff_programs",
    "draw",
    "graph_facts",
    "graph_of",
    "inspect_path",
    "onnx_facts",
    "onnx_summary",
    "plan_config",
    "plan_model",
    "plan_program",
    "program_facts",
    "program_summary",
    "render",
    "render_diff",
]
