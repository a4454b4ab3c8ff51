"""Pass infrastructure: Pass, PassResult, PassManager, and the checks run after every pass.

A pass is a class with one job. ``__call__(program) -> PassResult(program, modified)``, where
``modified`` is true exactly when the graph changed. A pass declares whether it mutates its input
(``InPlacePass``) or returns a new program and leaves the input alone (``FunctionalPass``); the
base class checks that promise. Cheap structural checks (``graph.lint()``, ``meta["val"]`` on new
nodes) run after every pass; numerical checks belong to stage boundaries.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from peftc.errors import PassError, PeftcError
from peftc.program import Program, get_tensor

__all__ = [
    "FunctionalPass",
    "add_call",
    "add_param",
    "finish",
    "remove_attr",
    "set_attr",
    "InPlacePass",
    "Pass",
    "PassManager",
    "PassResult",
    "SiteDecision",
    "fake_like",
    "fake_mode_of",
    "fake_value",
    "graph_fingerprint",
]

logger = logging.getLogger(__name__)


@dataclass
class PassResult:
    program: Program
    modified: bool


@dataclass
class SiteDecision:
    """What a pass would do at one candidate site, and why not when it would not."""

    name: str
    module_type: str
    action: str  # "rewrite" or "skip"
    reason: str = ""
    details: dict[str, Any] | None = None


class Pass(abc.ABC):
    """One graph rewrite. Subclasses implement :meth:`run`; call the pass itself."""

    in_place: bool = True

    @property
    def name(self) -> str:
        return type(self).__name__

    @abc.abstractmethod
    def run(self, program: Program) -> PassResult: ...

    def plan(self, program: Program) -> list[SiteDecision]:
        """The sites this pass would change, without changing anything. Default: none known."""
        return []

    def __call__(self, program: Program) -> PassResult:
        before = graph_fingerprint(program.graph) if not self.in_place else None
        result = self.run(program)
        if self.in_place and result.program is not program:
            raise AssertionError(f"{self.name} is an in-place pass but returned a new program")
        if not self.in_place:
            if result.program is program:
                raise AssertionError(f"{self.name} is a functional pass but returned its input")
            if graph_fingerprint(program.graph) != before:
                raise AssertionError(f"{self.name} is a functional pass but changed its input graph")
        if result.modified:
            verify_graph(result.program)
            result.program.history.append(self.name)
        return result


class InPlacePass(Pass):
    """A pass that rewrites the program it is given and returns it."""

    in_place = True


class FunctionalPass(Pass):
    """A pass that returns a new program and leaves its input untouched."""

    in_place = False


def graph_fingerprint(graph: fx.Graph) -> tuple:
    return tuple((n.op, str(n.target), str(n.args), str(n.kwargs)) for n in graph.nodes)


def verify_graph(program: Program) -> None:
    """Cheap checks: the graph lints, and every computing node carries ``meta["val"]``."""
    program.graph.lint()
    for node in program.graph.nodes:
        if node.op == "call_function" and "val" not in node.meta and node.meta.get("peftc_site"):
            raise AssertionError(f"node without meta['val']: {node.format_node()}")


def fake_mode_of(nodes: Iterable[fx.Node]) -> Any:
    """The fake-tensor mode of the ``meta["val"]`` of ``nodes`` (``None`` when none carries one)."""
    from torch._guards import detect_fake_mode

    vals = [n.meta.get("val") for n in nodes]
    return detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])


def fake_like(tensor: torch.Tensor, like: fx.Node) -> Any:
    """A fake tensor shaped like ``tensor`` in the fake mode of ``like``'s value (``None`` without one)."""
    mode = fake_mode_of([like])
    return None if mode is None else mode.from_tensor(tensor.detach(), static_shapes=True)


def fake_value(node: fx.Node, graph_module: fx.GraphModule) -> Any:
    """Compute ``meta["val"]`` for a new node from its inputs' fake values (no real compute)."""
    mode = fake_mode_of(node.all_input_nodes)
    if mode is None:
        return None

    def to_fake(arg: Any) -> Any:
        if not isinstance(arg, fx.Node):
            return arg
        if arg.op == "get_attr":
            return mode.from_tensor(get_tensor(graph_module, arg.target), static_shapes=True)
        return arg.meta["val"]

    args = fx.node.map_arg(node.args, to_fake)
    kwargs = fx.node.map_arg(node.kwargs, to_fake)
    with mode:
        return node.target(*args, **kwargs)


class PassManager:
    """Runs a named, straight-line pipeline of passes."""

    def __init__(self, name: str, passes: Sequence[Pass]):
        self.name = name
        self.passes = list(passes)

    def __call__(self, program: Program) -> PassResult:
        modified = False
        ran: list[str] = []
        for p in self.passes:
            try:
                result = p(program)
            except PeftcError:
                raise
            except Exception as e:
                node = getattr(e, "peftc_node", None)
                where = f" at node {node.format_node()}" if node is not None else ""
                raise PassError(
                    f"pipeline {self.name!r}: pass {p.name} failed after [{', '.join(ran) or 'nothing'}]{where}: "
                    f"{type(e).__name__}: {e}"
                ) from e
            program = result.program
            modified |= result.modified
            ran.append(p.name)
            logger.debug("%s: %s modified=%s", self.name, p.name, result.modified)
        return PassResult(program, modified)

    def plan(self, program: Program) -> dict[str, list[SiteDecision]]:
        return {p.name: p.plan(program) for p in self.passes}

    def __iter__(self) -> Iterable[Pass]:
        return iter(self.passes)


def add_call(
    program: Program, target: Any, args: tuple, like: fx.Node, site: str, role: str, kwargs: dict | None = None
) -> fx.Node:
    """Insert ``target(*args)`` at the graph's insertion point, tagged as part of adapter ``site``.

    The new node copies ``meta`` from ``like`` (module stack, stack trace), carries ``meta["val"]``,
    and is marked with ``peftc_site``/``peftc_role`` so later passes find adapter nodes by metadata.
    """
    node = program.graph.call_function(target, args, kwargs or {})
    node.meta.update({k: v for k, v in like.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")})
    node.meta["peftc_site"] = site
    node.meta["peftc_role"] = role
    val = fake_value(node, program.graph_module)
    if val is not None:
        node.meta["val"] = val
    return node


def add_param(
    program: Program, path: str, tensor: torch.nn.Parameter | torch.Tensor, site: str, like: fx.Node | None = None
) -> fx.Node:
    """Register ``tensor`` at ``path`` in the graph module and return a get_attr node for it.

    With ``like``, the node carries a fake ``meta["val"]`` in ``like``'s fake mode, so nodes built on it
    get one too.
    """
    set_attr(program.graph_module, path, tensor)
    node = program.graph.get_attr(path)
    node.meta["peftc_site"] = site
    node.meta["peftc_role"] = "param"
    if like is not None:
        val = fake_like(tensor, like)
        if val is not None:
            node.meta["val"] = val
    return node


def set_attr(gm: fx.GraphModule, path: str, tensor: torch.Tensor) -> None:
    """Bind ``tensor`` at dotted ``path``, creating holder modules on the way."""
    owner = gm
    *parents, attr = path.split(".")
    for part in parents:
        if not hasattr(owner, part):
            owner.add_module(part, torch.nn.Module())
        owner = getattr(owner, part)
    if attr in owner._parameters or attr in owner._buffers or hasattr(owner, attr):
        delattr(owner, attr)
    if isinstance(tensor, torch.nn.Parameter):
        owner.register_parameter(attr, tensor)
    else:
        owner.register_buffer(attr, tensor)


def remove_attr(gm: fx.GraphModule, path: str) -> None:
    owner_path, _, attr = path.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    if hasattr(owner, attr):
        delattr(owner, attr)


def finish(program: Program) -> None:
    """End of every rewrite: lint and recompile (passes erase the nodes they orphan themselves)."""
    program.graph.lint()
    program.graph_module.recompile()
