"""Numerical verification of an exported artifact against the torch program.

An export is only as good as its agreement with the program it came from, on inputs the capture
never saw. :func:`make_cases` builds held-out inputs: a batch of one, a batch/sequence shape
different from the capture example (2 × 8), and a left-padded batch whose rows carry different
amounts of padding. :func:`verify_artifact` — the one verification step of every format — has the
format's exporter load and run the written file on each case (ONNX Runtime, ``torch.jit.load``,
``aoti_load_package``: :meth:`~peftc.exporters.registry.Exporter.run`) and compares its outputs with
the torch reference (:func:`compare_outputs`):

- causal-lm: only real (unpadded) positions are compared. A padded query position attends to
  nothing (its mask row is all −inf) and each runtime fills such rows differently; no caller ever
  reads them.
- token-cls: likewise real positions only (a padded position carries no label; its logits are
  read by no caller).
- seq-cls: every row is compared (each row's logits are pooled from real tokens).
- KV-cache (with-past) graphs: prefills from an empty cache and decode steps on the cache the
  torch program returned; the ``present.*`` outputs are compared whole, beside the logits.

Tolerance: ``max |artifact − torch| <= atol + rtol × max |torch|`` per case and output (the reference's
largest magnitude scales the relative part: a half-precision runtime's rounding grows with the values it
rounds), :data:`DEFAULT_ATOL` = 1e-4 and ``rtol`` 0 for fp32 (float16's defaults: ``peftc.exporting.options``). Measured
ONNX Runtime vs torch differences on fp32 models are ~1e-7…1e-6 (reordered float sums, fused
kernels); 1e-4 leaves room for larger hidden sizes while catching any real divergence (a wrong
mask, a dropped adapter branch or a stale weight moves logits by 1e-2 or more). A case that fails
raises :class:`~peftc.errors.ExportVerificationError` carrying the figures (``err.report``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from peftc.errors import ExportVerificationError
from peftc.program import Program, is_llm_runner, is_with_past

if TYPE_CHECKING:  # pragma: no cover
    from .registry import Exporter

__all__ = [
    "DEFAULT_ATOL",
    "CaseResult",
    "VerificationReport",
    "Tolerance",
    "VerifyCase",
    "compare_outputs",
    "make_cases",
    "numpy_outputs",
    "run_torch",
    "verify_artifact",
]

#: Default absolute tolerance on fp32 logits (see the module docstring for why).
DEFAULT_ATOL = 1e-4
#: Tasks with one logits row per position: only real (unpadded) positions are compared.
_PER_POSITION = ("causal-lm", "token-cls")


@dataclass
class VerifyCase:
    """One held-out input batch, keyed by graph input name."""

    name: str
    inputs: dict[str, torch.Tensor]
    description: str = ""

    @property
    def shape(self) -> list[int]:
        return list(self.inputs["input_ids" if "input_ids" in self.inputs else next(iter(self.inputs))].shape)

    @property
    def padded(self) -> bool:
        return "attention_mask" in self.inputs and bool((self.inputs["attention_mask"] == 0).any())

    def ordered(self, names: Sequence[str]) -> tuple[torch.Tensor, ...]:
        return tuple(self.inputs[n] for n in names)


@dataclass(frozen=True)
class Tolerance:
    """A verification's bound: ``max |artifact − reference| <= atol + rtol × max |reference|`` per output."""

    atol: float = DEFAULT_ATOL
    rtol: float = 0.0

    def __str__(self) -> str:
        """``atol 0.0001``, or ``atol 0.02 + rtol 0.01 × max |reference|``."""
        return f"atol {self.atol:g}" + (f" + rtol {self.rtol:g} × max |reference|" if self.rtol else "")

    def to_dict(self) -> dict[str, float]:
        """``report.json``'s fields: ``atol``, and ``rtol`` when it is not 0."""
        return {"atol": float(self.atol), **({"rtol": float(self.rtol)} if self.rtol else {})}


@dataclass
class CaseResult:
    """The figures of one case."""

    name: str
    shape: list[int]
    padded: bool
    compared: int  # number of logits rows compared (real positions / batch rows)
    max_abs_diff: float
    passed: bool
    note: str = ""
    #: the bound of the output that came closest to its own (``atol + rtol × its max |reference|``);
    #: ``None`` when ``rtol`` is 0 (the bound is ``atol``)
    limit: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["max_abs_diff"] = _json_float(self.max_abs_diff)
        for key, empty in (("note", ""), ("limit", None)):
            if out[key] == empty:
                out.pop(key)
        return out


@dataclass
class VerificationReport:
    """Per-case figures of one comparison (e.g. ONNX Runtime vs the unmerged torch program)."""

    candidate: str
    reference: str
    atol: float
    compared_at: str
    cases: list[CaseResult] = field(default_factory=list)
    rtol: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.cases) and all(c.passed for c in self.cases)

    @property
    def max_abs_diff(self) -> float:
        return max((c.max_abs_diff for c in self.cases), default=math.nan)

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate,
            "reference": self.reference,
            **self.tolerance.to_dict(),
            "compared_at": self.compared_at,
            "max_abs_diff": _json_float(self.max_abs_diff),
            "passed": self.passed,
            "cases": [c.to_dict() for c in self.cases],
        }

    def summary(self) -> str:
        figures = ", ".join(f"{c.name} {c.shape}: {c.max_abs_diff:.2e}" for c in self.cases)
        return f"{self.candidate} vs {self.reference}: {figures} ({self.tolerance})"

    @property
    def tolerance(self) -> Tolerance:
        return Tolerance(self.atol, self.rtol)

    def raise_if_failed(self, hint: str = "") -> VerificationReport:
        """Raise :class:`ExportVerificationError` (with ``.report``) when a case is off; ``hint`` ends the message."""
        if self.passed:
            return self
        bad = [c for c in self.cases if not c.passed]
        worst = bad[0]
        bound = f"{worst.limit:.3e} ({self.tolerance})" if worst.limit is not None else f"atol {self.atol:g}"
        reason = worst.note or f"max abs diff {worst.max_abs_diff:.3e} > {bound}"
        err = ExportVerificationError(
            f"{self.candidate} does not reproduce {self.reference}: case {worst.name!r} {worst.shape} {reason}; "
            f"all cases: {', '.join(f'{c.name}={c.max_abs_diff:.2e}' for c in self.cases)}"
            + (f"; {hint}" if hint else "")
        )
        err.report = self  # type: ignore[attr-defined]
        raise err


def _share_of_bound(figure: tuple[float, float]) -> float:
    """``diff / bound`` of a ``(max abs diff, bound)`` pair: how close an output came to failing."""
    diff, bound = figure
    return diff / bound if bound > 0 else (math.inf if diff > 0 else 0.0)


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def make_cases(program: Program, seed: int = 1234) -> list[VerifyCase]:
    """Held-out inputs for ``program``: batch of one, a new shape, and a left-padded batch.

    Shapes differ from the capture example (2 × 8); sequence lengths stay within the model's
    positions. Real tokens avoid the pad id (decoder seq-cls finds the last token by it).
    """
    cfg = program.model_config
    if program.input_names == ["pixel_values"]:
        return _image_cases(program, seed)
    if not {"input_ids", "inputs_embeds"} & set(program.input_names) and not is_llm_runner(program):
        return _tensor_cases(program, seed)
    vocab = int(getattr(cfg, "vocab_size", 128) or 128)
    pad_id = getattr(cfg, "pad_token_id", None)
    pad_id = int(pad_id) if isinstance(pad_id, int) and 0 <= pad_id < vocab else 0
    max_seq = program.max_positions() or 512
    gen = torch.Generator().manual_seed(seed)

    def batch(b: int, s: int, pads: Sequence[int]) -> dict[str, torch.Tensor]:
        s = min(s, max_seq)
        ids = torch.randint(0, vocab - 1, (b, s), generator=gen)
        ids = ids + (ids >= pad_id).long()  # every real token differs from pad_id
        mask = torch.ones(b, s, dtype=torch.long)
        for row, pad in enumerate(pads):
            pad = min(pad, s - 1)  # keep at least one real token per row
            mask[row, :pad] = 0
            ids[row, :pad] = pad_id
        tensors = {
            "input_ids": ids,
            "attention_mask": mask,
            "token_type_ids": torch.zeros_like(ids),
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
        }
        names = [n for n in program.input_names if not n.startswith("past_key_values.")]  # caches: _with_past_cases
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ValueError(f"no verification input for graph input(s) {missing}")
        return {n: tensors[n] for n in names}

    if is_llm_runner(program):  # the cache is in the program: the cases are one generation's calls, in order
        return llm_runner_cases(vocab, pad_id, max_seq, gen)
    if is_with_past(program):
        return _with_past_cases(program, batch)
    return [
        VerifyCase("batch1", batch(1, 7, [0]), "a single unpadded sequence"),
        VerifyCase("reshaped", batch(3, 5, [0, 0, 0]), "batch and sequence unlike the capture example"),
        VerifyCase("left-padded", batch(4, 12, [0, 3, 6, 11]), "rows left-padded by 0, 3, 6 and 11 tokens"),
    ]


def _tensor_cases(program: Program, seed: int) -> list[VerifyCase]:
    """Graphs of float tensors (a diffusion UNet's ``sample, timestep, encoder_hidden_states``): standard normal
    values shaped like the capture example, with the batch (and any other dynamic dim) resized: one row, then 3
    rows with dynamic dims one larger (within any bound). A scalar or integer input gets new values in the
    example's range.
    """
    gen = torch.Generator().manual_seed(seed)

    def case(batch: int, grow: int) -> dict[str, torch.Tensor]:
        out = {}
        for name, example in zip(program.input_names, program.example_inputs, strict=True):
            shape = list(example.shape)
            for axis, dim in program.dynamic_dims.get(name, {}).items():
                shape[axis] = batch if dim == "batch" else shape[axis] + grow
            if example.is_floating_point():
                if example.ndim == 0 or name == "timestep":  # a diffusion step: within the example's scale
                    high = max(float(example.abs().max()), 1.0)
                    out[name] = (torch.rand(shape, generator=gen) * high).to(example.dtype)
                else:
                    out[name] = torch.randn(shape, generator=gen).to(example.dtype)
            else:
                high = max(int(example.max()), 1)
                out[name] = torch.randint(0, high + 1, shape, generator=gen, dtype=example.dtype)
        return out

    return [
        VerifyCase("batch1", case(1, 0), "a batch of one"),
        VerifyCase("reshaped", case(3, 1), "batch 3 and every other dynamic dim one larger than the capture example"),
    ]


def _image_cases(program: Program, seed: int) -> list[VerifyCase]:
    """Image graphs (fixed height and width, dynamic batch): one image, then batches of 3 and 4 unlike the capture's 2.

    Pixels are normalised-image-like (standard normal), not the capture example's, in its dtype (a
    float16 program takes float16 images).
    """
    from peftc.program import image_shape

    gen = torch.Generator().manual_seed(seed)
    shape = image_shape(program.model_config)
    dtype = program.example_inputs[0].dtype

    def images(b: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.randn(b, *shape, generator=gen).to(dtype)}

    return [
        VerifyCase("batch1", images(1), "a single image"),
        VerifyCase("batch3", images(3), "a batch unlike the capture example"),
        VerifyCase("batch4", images(4), "a larger batch"),
    ]


def _with_past_cases(program: Program, batch: Callable[..., dict[str, torch.Tensor]]) -> list[VerifyCase]:
    """KV-cache graphs: prefills from an empty cache, then decode steps on the cache the torch program made.

    Each decode step feeds the reference's own presents as the past, so both runtimes see the
    same cache; the presents each returns are compared too (outputs after ``logits``).
    """
    layers = sum(1 for n in program.input_names if n.endswith(".key") and n.startswith("past_key_values."))
    geometry = program.example_inputs[program.input_names.index("past_key_values.0.key")].shape

    def prefill(name: str, b: int, s: int, pads: Sequence[int], description: str) -> VerifyCase:
        tokens = batch(b, s, pads)
        empty = torch.zeros(b, geometry[1], 0, geometry[3], dtype=program.example_inputs[-1].dtype)
        past = {n: empty for n in program.input_names if n.startswith("past_key_values.")}
        return VerifyCase(name, {n: {**tokens, **past}[n] for n in program.input_names}, description)

    def decode(name: str, before: VerifyCase, new: int, description: str) -> VerifyCase:
        with torch.no_grad(), _half_compute(program):
            out = program(*before.ordered(program.input_names))
        ids = before.inputs["input_ids"]
        b = ids.shape[0]
        mask = torch.cat([before.inputs["attention_mask"], torch.ones(b, new, dtype=torch.long)], dim=1)
        gen = torch.Generator().manual_seed(b * 31 + new)
        tokens = {
            "input_ids": torch.randint(1, int(ids.max()) + 1, (b, new), generator=gen),
            "attention_mask": mask,
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)[:, -new:],
        }
        tokens.update(zip([n for n in program.input_names if n.startswith("past_key_values.")], out[1:], strict=True))
        return VerifyCase(name, {n: tokens[n] for n in program.input_names}, description)

    assert layers == (len(program.output_names) - 1) // 2
    one = prefill("batch1", 1, 7, [0], "prefill: a single unpadded sequence, empty cache")
    padded = prefill("left-padded", 4, 12, [0, 3, 6, 11], "prefill: rows left-padded by 0, 3, 6 and 11 tokens")
    return [
        one,
        padded,
        decode("decode", padded, 1, "one new token on the left-padded batch's cache"),
        decode("decode-chunk", one, 3, "three new tokens on the single sequence's cache"),
    ]


def llm_runner_cases(
    vocab: int, pad_id: int, max_seq: int, gen: torch.Generator, prefill: int = 5, steps: int = 3
) -> list[VerifyCase]:
    """Cases of the LLM-runner layout, to run **in order** on one program (its KV cache is its state).

    A prefill of ``prefill`` tokens at positions ``0..prefill-1``, ``steps`` decode steps of one token,
    then a second generation from position 0 (a shorter prefill over the stale cache, and one step):
    every call reads what the calls before it wrote, and only that.
    """
    prefill = max(2, min(prefill, max_seq - steps))

    def call(name: str, start: int, n: int, what: str) -> VerifyCase:
        ids = torch.randint(0, vocab - 1, (1, n), generator=gen)
        ids = ids + (ids >= pad_id).long()
        return VerifyCase(name, {"tokens": ids, "input_pos": torch.arange(start, start + n)}, what)

    cases = [call("prefill", 0, prefill, f"a prompt of {prefill} tokens into the empty cache")]
    cases += [call(f"decode{i}", prefill + i, 1, "one token after the cache") for i in range(steps)]
    cases += [
        call("reprefill", 0, 2, "a new generation: a prompt over the previous one's cache"),
        call("redecode", 2, 1, "its first decode step"),
    ]
    return cases


def run_torch(fn: Callable[..., Any], cases: Sequence[VerifyCase], input_names: Sequence[str]) -> list:
    """Outputs of a torch callable (a program, or a wrapper of an HF model) on every case.

    One array per case, or a list of arrays per case when ``fn`` returns several outputs
    (KV-cache graphs: logits, then the presents). A float16 program's matrix products run in
    float32 (:class:`HalfMatmulsInFloat32`).
    """

    with torch.no_grad(), _half_compute(fn):
        return [numpy_outputs(fn(*c.ordered(input_names))) for c in cases]


class HalfMatmulsInFloat32(TorchDispatchMode):
    """Matrix products and attention of float16 CPU tensors computed in float32, rounded back to float16.

    PyTorch's float16 GEMM on CPUs without native half arithmetic is ~10x slower than float32; the
    products of float16 numbers are exact in float32 and accumulated there, as a half-precision
    GEMM with float32 accumulation does, so the reference of a float16 export costs float32 time
    and holds only one weight at a time in float32.
    """

    _OPS = frozenset(
        getattr(torch.ops.aten, name).default
        for name in ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention_for_cpu")
        if hasattr(torch.ops.aten, name)
    )

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self._OPS or not any(_is_half(a) for a in args):
            return func(*args, **kwargs)
        up = tree_map(lambda a: a.float() if _is_half(a) else a, (args, kwargs))
        out = func(*up[0], **up[1])
        return tree_map(lambda o: o.half() if isinstance(o, torch.Tensor) and o.dtype == torch.float32 else o, out)


def _is_half(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype == torch.float16 and x.device.type == "cpu"


def _half_compute(fn: Any) -> Any:
    """:class:`HalfMatmulsInFloat32` for a float16 program, nothing for any other callable."""
    import contextlib

    module = getattr(fn, "graph_module", fn)
    params = module.parameters() if isinstance(module, torch.nn.Module) else iter(())
    first = next(params, None)
    return HalfMatmulsInFloat32() if first is not None and first.dtype == torch.float16 else contextlib.nullcontext()


def numpy_outputs(out: Any) -> Any:
    """A tensor as a float numpy array; a tuple/list of tensors as a list of them (several outputs)."""
    if isinstance(out, (tuple, list)):
        return [o.detach().float().numpy() for o in out]
    return out.detach().float().numpy()


def compare_outputs(
    actual: Sequence[np.ndarray],
    expected: Sequence[np.ndarray],
    cases: Sequence[VerifyCase],
    task: str,
    atol: float = DEFAULT_ATOL,
    candidate: str = "candidate",
    reference: str = "reference",
    rtol: float = 0.0,
) -> VerificationReport:
    """Compare per case: real positions for ``causal-lm`` and ``token-cls``, every row otherwise (``seq-cls``).

    A case passes when every output's max abs diff is within ``atol + rtol × max |that output's reference|``
    (over the positions compared).
    """
    report = VerificationReport(
        candidate=candidate,
        reference=reference,
        atol=float(atol),
        rtol=float(rtol),
        compared_at="real (unpadded) positions" if task in _PER_POSITION else "every row",
    )
    for case, a, e in zip(cases, actual, expected, strict=True):
        extra: list[tuple[np.ndarray, np.ndarray]] = []
        if isinstance(a, (list, tuple)):  # several outputs: logits first, then the rest compared whole
            extra = [(np.asarray(x, np.float64), np.asarray(y, np.float64)) for x, y in zip(a[1:], e[1:], strict=True)]
            a, e = a[0], e[0]
        a, e = np.asarray(a, dtype=np.float64), np.asarray(e, dtype=np.float64)
        bad_shape = next(((x.shape, y.shape) for x, y in [(a, e), *extra] if x.shape != y.shape), None)
        if bad_shape:
            report.cases.append(
                CaseResult(
                    case.name, case.shape, case.padded, 0, math.inf, False, f"shape {bad_shape[0]} != {bad_shape[1]}"
                )
            )
            continue
        if task in _PER_POSITION and "attention_mask" in case.inputs:
            rows = case.inputs["attention_mask"].bool().numpy()
            if a.ndim >= 2 and a.shape[1] < rows.shape[1]:  # KV-cache step: the mask covers past + new tokens
                rows = rows[:, rows.shape[1] - a.shape[1] :]
            elif a.ndim >= 2 and a.shape[1] > rows.shape[1]:  # virtual tokens prepended (prompt methods): always real
                rows = np.concatenate([np.ones((rows.shape[0], a.shape[1] - rows.shape[1]), dtype=bool), rows], axis=1)
        else:  # no mask (the LLM-runner layout takes no padding): every row and position
            rows = np.ones(a.shape[0], dtype=bool)
        diff = np.abs(a[rows] - e[rows])
        worst = float(diff.max()) if diff.size else math.nan
        # (max abs diff, bound) per output: the logits first, then each extra output
        figures = [(worst, atol + rtol * float(np.abs(e[rows]).max()))] if diff.size else []
        for x, y in extra:  # presents [batch, heads, past + sequence, head_dim]: real positions (the mask's ones)
            mask = case.inputs.get("attention_mask")  # graphs without a mask (a text encoder's pooled output): whole
            keep = mask.bool().numpy() if mask is not None else None
            if keep is not None and x.ndim == 4 and keep.shape == (x.shape[0], x.shape[2]):
                x, y = x.transpose(0, 2, 1, 3)[keep], y.transpose(0, 2, 1, 3)[keep]
            if x.size:
                figures.append((float(np.abs(x - y).max()), atol + rtol * float(np.abs(y).max())))
                worst = max(worst, figures[-1][0])
        if np.isnan(diff).any() or any(np.isnan(x).any() for x, _ in extra):
            worst = math.nan
        passed = diff.size > 0 and math.isfinite(worst) and all(d <= bound for d, bound in figures)
        note = "" if diff.size else "nothing to compare"
        limit = max(figures, key=_share_of_bound)[1] if rtol and figures else None
        report.cases.append(CaseResult(case.name, case.shape, case.padded, int(rows.sum()), worst, passed, note, limit))
    return report


def verify_artifact(
    exporter: str | Exporter,
    path: str | Path,
    program: Program,
    cases: Sequence[VerifyCase] | None = None,
    reference: Sequence[Any] | None = None,
    atol: float = DEFAULT_ATOL,
    reference_name: str = "the torch program",
    raise_on_failure: bool = True,
    adapter: str | Path | None = None,
    rtol: float = 0.0,
) -> VerificationReport:
    """Run an exported file with its format's runtime and compare with the torch program on held-out inputs.

    The one verification of every format and every export: the exporter loads and runs the file
    (:meth:`~peftc.exporters.registry.Exporter.run`), :func:`compare_outputs` judges.

    Args:
        exporter: the format (``"onnx"``, ``"torchscript"``, ``"aoti"``) or its exporter.
        path: the model file.
        program: the program that was exported (gives input and output names, the task and,
            without ``reference``, the expected outputs).
        cases: inputs to run; :func:`make_cases` when omitted. Inputs with a default (lifted
            adapter tensors) are not fed.
        reference: expected outputs per case (e.g. of the unmerged program when ``program`` was
            merged); computed from ``program`` when omitted.
        atol: absolute tolerance on outputs (default 1e-4, fp32).
        reference_name: how the report names the reference.
        raise_on_failure: raise instead of returning a failed report.
        adapter: an adapter file activated for every run (swappable exports). Without it, a
            program with adapter inputs runs as the base model ("no adapter").
        rtol: tolerance relative to each output's largest reference magnitude, added to ``atol``
            (0 for fp32; half precision's rounding grows with the values).

    Returns:
        The per-case figures; the report names the candidate ``"<runtime> (<file>)"``.

    Raises:
        ExportVerificationError: a case differs by more than its tolerance (``err.report`` has the figures).
    """
    from .registry import get_exporter

    exporter = get_exporter(exporter)
    path = Path(path)
    cases = list(cases) if cases is not None else make_cases(program)
    if reference is None:
        reference = run_torch(program, cases, program.input_names)
    fed = [n for n in program.input_names if n not in program.input_defaults]
    adapter = Path(adapter) if adapter is not None else None
    outputs = exporter.run(path, cases, fed, list(program.output_names), adapter=adapter)
    name = path.name + (f" + {adapter.name}" if adapter else ", no adapter" if program.input_defaults else "")
    report = compare_outputs(
        outputs,
        reference,
        cases,
        program.task.name,
        atol=atol,
        candidate=f"{exporter.runtime} ({name})",
        reference=reference_name,
        rtol=rtol,
    )
    return report.raise_if_failed() if raise_on_failure else report
