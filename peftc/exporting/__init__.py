"""Export: a trained adapter to a verified, deployable artifact directory — one pipeline, pluggable formats.

:func:`export` (``peftc export``) walks source → base → capture → bind → reference → mode passes →
exporter → verify → artifact (:mod:`.pipeline`). What varies is configuration, each in its module:

- :mod:`.graphs` — the graph plan: one graph, a KV-cache graph (:mod:`.kv`), an encoder and a
  decoder graph (:mod:`.seq2seq`), or BLIP-2's whole forward and generation graphs (:mod:`.multimodal`);
- :mod:`.modes` — ``keep``, ``merge``, or ``lift`` (swappable adapters over one base);
- the format — an exporter from the registry (:mod:`peftc.exporters.registry`), which writes, loads
  and runs, and describes the model file;
- :mod:`.sources` (SRC resolution, base loading), :mod:`.options` (checks before any work),
  :mod:`.artifact` (config, tokenizer, ``report.json``, ``manifest.json``).

No submodule is named ``export``: it would replace the function :func:`peftc.export` on the package
(see :mod:`peftc`).
"""

from .artifact import base_info, write_model_files
from .graphs import adapted_program
from .modes import ADAPTER_SUBDIR, ADAPTERS_SUBDIR, copy_adapter
from .options import DTYPES, check_options, default_out
from .pipeline import export
from .sources import refuse_out_over_inputs

__all__ = [
    "ADAPTERS_SUBDIR",
    "ADAPTER_SUBDIR",
    "DTYPES",
    "adapted_program",
    "base_info",
    "check_options",
    "copy_adapter",
    "default_out",
    "export",
    "refuse_out_over_inputs",
    "write_model_files",
]
