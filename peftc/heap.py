"""The Python heap during a long stage: keep the cyclic garbage collector off what outlives it.

A peftc process holds millions of objects it does not create during an export or a training run:
torch, transformers, sympy and onnxscript's modules, their registries and caches. CPython's
collector scans all of them at every full (generation-2) collection, and capturing a model makes
enough objects to trigger a few dozen of those: on a 2-layer LLaMA export, 1.4 s of the 10 s went
to full collections that found nothing of the imports to free. :func:`frozen_heap` moves what exists
when a stage starts to the permanent generation (:func:`gc.freeze`, which exists for this) and back
when it ends (:func:`gc.unfreeze`), so the stage's collections scan only what the stage made.

An object that exists before the stage and becomes cyclic garbage during it is freed when the stage
ends, not during it; the weights are never in that set (an export frees them by emptying their
storages, :func:`peftc.exporting.pipeline.release_weights`, which does not wait for a collection).
:func:`freeze_for_exit` is for a process that is about to exit: the interpreter's shutdown runs
full collections over the whole heap (1.2–1.5 s after an export) to free memory the OS frees anyway.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["freeze_for_exit", "frozen_heap"]


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Collections inside the block skip the objects that existed when it was entered.

    Nested or inside a caller that froze the heap itself (``gc.get_freeze_count()`` not 0), the block
    changes nothing: :func:`gc.unfreeze` would also release what the caller froze.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def freeze_for_exit() -> None:
    """Spare the interpreter's shutdown its full collections: call once, when nothing else will run but exit."""
    gc.freeze()
