"""peftc: a compiler for parameter-efficient fine-tuning.

Capture a Hugging Face model with ``torch.export``, insert and train PEFT adapters on the captured
graph, save them in the HF PEFT format, and export verified ONNX artifacts with the adapter merged.

    >>> import peftc
    >>> result = peftc.train(peftc.TrainConfig(model="tiny-gpt2", max_steps=20, out="run"))  # doctest: +SKIP
    >>> peftc.export("run", format="onnx", merge=True)  # doctest: +SKIP

Names are imported lazily so ``import peftc`` stays cheap. The modules behind ``peftc.train`` and
``peftc.export`` are ``peftc.training`` and ``peftc.exporting``: a submodule named like a function
of its package would replace that function on the package as soon as it is imported.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "AdapterState": "peftc.adapters",
    "LoraConfig": "peftc.config",
    "load_config": "peftc.config",
    "Program": "peftc.program",
    "capture": "peftc.program",
    "load_model": "peftc.models",
    "TrainConfig": "peftc.training",
    "train": "peftc.training",
    "export": "peftc.exporting",
    "inspect_path": "peftc.inspect",
    "plan_model": "peftc.inspect",
    "insertion_pipeline": "peftc.passes",
    "merge_pipeline": "peftc.passes",
}

__all__ = ["__version__", *sorted(_API)]


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'peftc' has no attribute {name!r}")
