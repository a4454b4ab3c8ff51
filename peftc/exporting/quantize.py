"""The quantize stage of an export (``--quantize int4|int8``): quantized weights, measured against the float program.

It runs after the verification step, on files that have already verified in float32 at the usual
tight ``atol``: the format's quantizer (``exporter.quantizer``; ONNX: :mod:`peftc.exporters.onnx_quantize`)
rewrites each model file with quantized weights, then the quantized file runs on the same held-out
cases as the float verification and is compared with the same float torch references — each
swappable adapter activated in turn, and the base without adapter:

- ``max_abs_diff``: the largest ``|quantized − float|`` over compared logits (real positions);
- ``top1_agreement``: the share of compared rows (next-token positions of a causal LM, sequences of
  a classifier, tokens of a token classifier) whose arg-max is the float program's;
- ``mean_kl``: the mean over those rows of ``KL(p_float ‖ p_quantized)`` (nats) of the softmax of
  the logits — the next-token distributions of a causal LM, the label distribution of a classifier.

The export fails (``ExportVerificationError``, exit code 3, nothing written) when a comparison's
mean KL exceeds ``max_kl`` or, over at least :data:`TOP1_MIN_ROWS` rows, its top-1 agreement falls
below ``min_top1`` (:data:`DEFAULT_GATES`, overridable). Over fewer rows (a classifier's held-out
cases are 8 sequences) one flipped arg-max moves the agreement by more than the gate's margin, so
only the KL gates there. A graph whose first output is not logits (a seq2seq encoder's
hidden states) reports ``max_abs_diff`` only.

What each mode quantizes: ``merge`` — the merged weights (the adapter is folded first, so it is
quantized with the base it is part of); ``lift`` (``--adapters-as-inputs``) — the base weights only:
the adapter tensors are graph inputs and stay float, as do the ``.onnx_adapter`` files (one 4-bit
base, many float adapters); ``keep`` — base and adapter weights alike: the adapter's ops are
constants of the graph like the base's (the exporter folds their transposes into unnamed constants,
so nothing tells them apart without matching exporter-generated names); for a float adapter over a
quantized base, export with ``--adapters-as-inputs``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from peftc.errors import ConfigError, ExportVerificationError

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_GATES",
    "TOP1_MIN_ROWS",
    "Quantize",
    "check_quantize",
    "quantize_stage",
    "quality",
]

#: int4 block length along a weight's input dim (onnxruntime-genai's CPU default).
DEFAULT_BLOCK_SIZE = 32
#: Scheme -> (minimum top-1 agreement, maximum mean KL in nats), every comparison. Measured (README,
#: "Quantized weights"): a trained tiny GPT-2 int4 1.0 / 8e-4, int8 1.0 / 1.4e-5; the real MiniLM
#: classifier on random-token inputs int4 KL 8e-3, int8 1.1e-2 (dynamic per-tensor activations),
#: with its eval accuracy unchanged (91.4 %). A misplaced weight or a lost block scale gives
#: agreement near chance and a KL above 1 on a model with peaked outputs.
DEFAULT_GATES = {"int8": (0.9, 0.05), "int4": (0.9, 0.05)}
#: Below this many compared rows top-1 agreement is reported but not gated (one flip would be > 3 %).
TOP1_MIN_ROWS = 32
_REFERENCE = "the float torch program"


@dataclass(frozen=True)
class Quantize:
    """A checked ``--quantize`` request."""

    scheme: str
    bits: int
    method: str
    block_size: int | None
    min_top1: float
    max_kl: float

    def metadata(self) -> dict[str, str]:
        """``peftc.*`` metadata entries of a quantized model file."""
        out = {"peftc.quantize": self.scheme}
        if self.block_size is not None:
            out["peftc.quantize_block_size"] = str(self.block_size)
        return out


def check_quantize(
    quantize: str | None,
    exporter: Any,
    dtype: str,
    block_size: int | None = None,
    min_top1: float | None = None,
    max_kl: float | None = None,
    adapters_as_inputs: bool = False,
) -> Quantize | None:
    """Refuse a quantization the format or the options cannot take (the options stage); ``None``: no quantization.

    Raises:
        ConfigError: a format without a quantizer, an unknown scheme, float16, a bad block size or gate,
            adapters as inputs where the format's quantizer cannot keep them float.
    """
    if quantize is None:
        if block_size is not None or min_top1 is not None or max_kl is not None:
            raise ConfigError("--quantize-block-size, --quantize-min-top1 and --quantize-max-kl need --quantize")
        return None
    from peftc.exporters import exporters

    quantizer = getattr(exporter, "quantizer", None)
    if quantizer is None:
        able = [e.name for e in exporters() if getattr(e, "quantizer", None) is not None]
        raise ConfigError(
            f"--quantize is not supported for --format {exporter.name}; formats that quantize: {', '.join(able)}"
        )
    if quantize not in quantizer.schemes:
        raise ConfigError(f"--quantize {quantize!r} is not supported; choose one of: {', '.join(quantizer.schemes)}")
    if dtype != "float32":
        raise ConfigError(
            f"--quantize {quantize} quantizes float32 weights; drop --dtype {dtype} (activations stay float32)"
        )
    if adapters_as_inputs and not quantizer.lifted_adapters:
        raise ConfigError(
            f"--quantize with --adapters-as-inputs is not supported for --format {exporter.name} (its quantizer "
            "would fold the adapter into the program); use --merge, or --format onnx for a quantized base with "
            "float adapters"
        )
    scheme = quantizer.schemes[quantize]
    if scheme.blockwise:
        block_size = DEFAULT_BLOCK_SIZE if block_size is None else block_size
        if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
            raise ConfigError(f"--quantize-block-size {block_size!r} must be a power of two >= 16 (default 32)")
    elif block_size is not None:
        blockwise = (
            ", ".join(n for n, s in quantizer.schemes.items() if s.blockwise) or f"none in --format {exporter.name}"
        )
        raise ConfigError(f"--quantize-block-size is for block-wise schemes ({blockwise}), not {quantize}")
    top1, kl = DEFAULT_GATES[quantize]
    top1 = top1 if min_top1 is None else min_top1
    kl = kl if max_kl is None else max_kl
    if not isinstance(top1, (int, float)) or not 0 <= top1 <= 1:
        raise ConfigError(f"--quantize-min-top1 {top1!r} must be between 0 and 1")
    if not isinstance(kl, (int, float)) or not kl >= 0:
        raise ConfigError(f"--quantize-max-kl {kl!r} must be a non-negative number")
    return Quantize(scheme.name, scheme.bits, scheme.method, block_size, float(top1), float(kl))


def quantize_stage(
    request: Quantize,
    exporter: Any,
    directory: Path,
    graphs: list[Any],
    comparisons: list[Any],
    timings: dict[str, float],
) -> dict[str, Any]:
    """Quantize every verified model file in ``directory``, measure it, gate it; the ``report.json`` section.

    Raises:
        ExportVerificationError: the worst comparison is below ``min_top1`` or above ``max_kl``.
    """
    tick = time.perf_counter()
    files = {}
    for g in graphs:
        result = exporter.quantizer.quantize(
            directory / exporter.model_file(g.role),
            request.scheme,
            block_size=request.block_size or DEFAULT_BLOCK_SIZE,
            metadata=request.metadata(),
        )
        files[exporter.model_file(g.role)] = result
    timings["quantize_s"] = time.perf_counter() - tick

    tick = time.perf_counter()
    measured = []
    for c in comparisons:
        g = c.graph
        fed = [n for n in g.program.input_names if n not in g.program.input_defaults]
        adapter = directory / c.adapter if c.adapter is not None else None
        outputs = exporter.run(
            directory / exporter.model_file(g.role), g.cases, fed, list(g.program.output_names), adapter=adapter
        )
        figures = quality(outputs, c.reference, g.cases, g.program.task.name, list(g.program.output_names)[0])
        name = exporter.model_file(g.role) + (f" + {Path(c.adapter).name}" if c.adapter else "")
        measured.append({"candidate": name, "reference": c.reference_name, **figures})
    timings["quantize_verify_s"] = time.perf_counter() - tick

    size = sum(r.size_bytes for r in files.values())
    float_size = sum(r.float_size_bytes for r in files.values())
    logits = [m for m in measured if m["top1_agreement"] is not None]
    section = {
        "scheme": request.scheme,
        "bits": request.bits,
        "method": request.method,
        "block_size": request.block_size,
        "size_bytes": size,
        "float_size_bytes": float_size,
        "size_ratio": round(size / float_size, 4),
        "quantized_weights": sum(r.quantized_weights for r in files.values()),
        "float_weights": sum(r.float_weights for r in files.values()),
        "max_abs_diff": max(m["max_abs_diff"] for m in measured),
        "top1_agreement": min((m["top1_agreement"] for m in logits), default=None),
        "mean_kl": max((m["mean_kl"] for m in logits), default=None),
        "gate": {
            "min_top1": request.min_top1,
            "max_kl": request.max_kl if math.isfinite(request.max_kl) else None,
            "top1_min_rows": TOP1_MIN_ROWS,
        },
        "reference": _REFERENCE,
        "comparisons": measured,
    }
    bad = [
        m
        for m in logits
        if not m["mean_kl"] <= request.max_kl or (m["rows"] >= TOP1_MIN_ROWS and m["top1_agreement"] < request.min_top1)
    ]
    if bad:
        worst = bad[0]
        better = "int8 or a smaller --quantize-block-size, or " if request.scheme == "int4" else ""
        err = ExportVerificationError(
            f"the {request.scheme} model ({worst['candidate']}) is too far from {_REFERENCE}: top-1 agreement "
            f"{worst['top1_agreement']:.3f} over {worst['rows']} rows (min {request.min_top1:g}), mean KL "
            f"{worst['mean_kl']:.3g} (max {request.max_kl:g}); nothing was written. Try {better}relax "
            "--quantize-min-top1 / --quantize-max-kl if this loss is acceptable"
        )
        err.report = section  # type: ignore[attr-defined]
        raise err
    return section


def quality(actual: list[Any], expected: list[Any], cases: list[Any], task: str, output: str) -> dict[str, Any]:
    """Max abs diff, top-1 agreement and mean KL(float ‖ quantized) of the first output, over compared rows.

    Rows are what the float verification compares: real (unpadded) positions of a causal LM or token
    classifier (the new positions of a KV-cache step), every row of a sequence classifier.
    """
    diffs, agree, kls = [], [], []
    for case, a, e in zip(cases, actual, expected, strict=True):
        a = np.asarray(a[0] if isinstance(a, (list, tuple)) else a, np.float64)
        e = np.asarray(e[0] if isinstance(e, (list, tuple)) else e, np.float64)
        a, e = a[_rows(case, a, task)], e[_rows(case, e, task)]
        diffs.append(float(np.abs(a - e).max()) if a.size else math.nan)
        if output == "logits":
            agree.append(a.argmax(-1) == e.argmax(-1))
            log_p, log_q = _log_softmax(e), _log_softmax(a)
            kls.append((np.exp(log_p) * (log_p - log_q)).sum(-1))
    out: dict[str, Any] = {"max_abs_diff": max(diffs), "top1_agreement": None, "mean_kl": None, "rows": None}
    if agree:
        flat = np.concatenate([x.reshape(-1) for x in agree])
        out.update(
            top1_agreement=round(float(flat.mean()), 6),
            mean_kl=float(np.concatenate([k.reshape(-1) for k in kls]).mean()),
            rows=int(flat.size),
        )
    return out


def _rows(case: Any, logits: np.ndarray, task: str) -> Any:
    """The compared rows of one case (a boolean mask over the leading dims, or every row)."""
    if task not in ("causal-lm", "token-cls") or "attention_mask" not in case.inputs:
        return slice(None)
    rows = case.inputs["attention_mask"].bool().numpy()
    if logits.ndim >= 2 and logits.shape[1] < rows.shape[1]:  # KV-cache step: the mask covers past + new tokens
        rows = rows[:, rows.shape[1] - logits.shape[1] :]
    elif logits.ndim >= 2 and logits.shape[1] > rows.shape[1]:  # virtual tokens prepended: always real
        rows = np.concatenate([np.ones((rows.shape[0], logits.shape[1] - rows.shape[1]), bool), rows], axis=1)
    return rows


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
