"""Export options: what is checked before any file is read, and the defaults that depend on them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peftc.errors import ConfigError
from peftc.exporters.verify import Tolerance

__all__ = ["DTYPES", "check_options", "default_out", "requested_with_past", "source_list"]

#: Weight/activation dtypes an artifact can have, and the default verification tolerance of each
#: (``max |artifact − torch| <= atol + rtol × max |torch|`` per output). fp16 is compared with the fp16
#: torch program (the base is loaded in fp16): an 11-bit mantissa rounds every weight and activation by
#: up to 2^-11 relative, and the two runtimes round differently, so outputs differ by ~1e-3 on small
#: models and more on deep ones — in proportion to the values rounded (measured in the README): hence
#: a relative part, 1 % of each output's largest magnitude, over an absolute 2e-2. Both still catch a
#: wrong mask or a lost adapter (≥ 1e-1, and of the order of the outputs themselves).
DTYPES = {"float32": Tolerance(1e-4), "float16": Tolerance(2e-2, 1e-2)}


def default_out(src: str | Path, format: str = "onnx") -> Path:
    """``SRC/export-<format>``: where an export goes without ``out``."""
    return Path(src) / f"export-{format}"


def check_options(format: str, opset: Any, atol: Any, dtype: str = "float32", rtol: Any = None) -> Tolerance:
    """Refuse unusable options; returns the tolerance (the dtype's default for an ``atol`` or ``rtol`` of None).

    Raises:
        ConfigError: a format no exporter is registered for, an opset below 18, an unknown dtype, a bad
            atol or rtol.
    """
    from peftc.exporters import get_exporter

    get_exporter(format)
    if not isinstance(opset, int) or isinstance(opset, bool) or opset < 18:
        raise ConfigError(f"opset={opset!r} is not supported; use an ONNX opset >= 18")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; supported: {', '.join(DTYPES)}")
    default = DTYPES[dtype]
    for name, value in (("atol", atol), ("rtol", rtol)):
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0):
            raise ConfigError(
                f"{name}={value!r} must be a non-negative number (default for {dtype}: {getattr(default, name):g})"
            )
    return Tolerance(default.atol if atol is None else float(atol), default.rtol if rtol is None else float(rtol))


def source_list(src: str | Path | Sequence[str | Path], adapters_as_inputs: bool) -> list[str | Path]:
    """SRC as a list: exactly one source, or one or more with ``adapters_as_inputs`` (a swappable export)."""
    srcs = [src] if isinstance(src, (str, Path)) else list(src)
    if adapters_as_inputs and not srcs:
        raise ConfigError("no source to export; give one or more run or adapter directories")
    if not adapters_as_inputs and len(srcs) != 1:
        raise ConfigError(
            f"{len(srcs)} sources given; exporting several adapters over one base needs --adapters-as-inputs "
            "or --mixed-batch"
        )
    return srcs


def requested_with_past(with_past: bool | None, cache_by_default: bool) -> bool | None:
    """``with_past`` as the graph plan reads it: ``None`` (a KV-cache graph for causal LMs) only for formats
    that make one by default; the others (TorchScript, AOTInductor) make one only when asked."""
    return with_past if with_past is not None or cache_by_default else False
