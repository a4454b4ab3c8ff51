"""Training: fit an adapter on a captured program and write a run directory.

``train(TrainConfig(...))`` is the whole of ``peftc train``: the CLI maps its flags 1:1 onto
:class:`TrainConfig`. Without arguments, ``train(TrainConfig())`` fine-tunes the real pretrained MiniLM
(preset ``minilm``) with LoRA for binary sentiment classification on the data shipped in ``peftc.data``.

The package's modules, each with one job:

* :mod:`~peftc.training.options`: :class:`TrainConfig` and its checks; what a run resolves to (task,
  data files) and the method config it builds from ``--config``, ``--method``, peftc's training presets,
  the method flags and ``--set``, through the method registry;
* :mod:`~peftc.training.loop`: setting a run up (load, capture, insert), the step loop with the method's
  training hooks, :func:`evaluate`, :func:`train`;
* :mod:`~peftc.training.checkpoints`: ``checkpoints/step-N`` (adapter, optimizer moments, scheduler, RNG
  states, the method's own state) and what ``--resume`` reads back and checks;
* :mod:`~peftc.training.rundir`: the run directory, created lazily after the first optimizer step;
  ``metrics.jsonl``, ``run.json``, and what ``--resume`` / ``--force`` may do with a directory's contents;
* :mod:`~peftc.training.lock`: ``--out/.peftc.lock``, one ``peftc train`` per run directory;
* :mod:`~peftc.training.distributed`: ``--device``, and data parallelism under ``torchrun`` /
  ``accelerate launch`` (rank shards of the one-process global batch, one all-reduce of the trainable
  gradients per step, rank 0 writes);
* :mod:`~peftc.training.precision`: ``--precision`` / ``--base-dtype`` (autocast for the frozen base,
  float32 adapter and optimizer state, a loss scaler for fp16);
* :mod:`~peftc.training.checkpointing`: ``--gradient-checkpointing``, per transformer block of the captured
  graph;
* :mod:`~peftc.training.fsdp`: ``--fsdp``, the frozen base sharded per transformer block with FSDP2 (the
  blocks of that split own their weights; the adapter stays replicated).

SIGTERM stops a run at the next step boundary after a checkpoint (:class:`~peftc.errors.TrainingStopped`).
"""

from __future__ import annotations

from peftc.training.loop import TrainResult, evaluate, train
from peftc.training.options import TrainConfig

__all__ = ["TrainConfig", "TrainResult", "evaluate", "train"]
