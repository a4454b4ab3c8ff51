"""Per-process memory of ``peftc train --fsdp`` against plain data parallel, 2 gloo processes on the CPU.

The benchmark writes a GPT-2-shaped base (random init, seed 0; ``--layers`` x ``--hidden``, MiniLM's
vocabulary, float32 safetensors) and a small JSON-lines text set, then runs the same ``peftc train`` (LoRA
on ``c_attn``, ``--steps`` steps, eval data) under ``torchrun --nproc-per-node 2``, once plain and once
with ``--fsdp``. Each rank reports from its own ``/proc/self/status``:

* ``setup_peak``: peak RSS up to the end of setup (load, capture twice, insert; for ``--fsdp`` also the
  sharding): every rank loads the whole base first, so this is the same for both;
* ``after_setup``: RSS once the step module is ready (``--fsdp``: the full tensors already released);
* ``train_peak``: peak RSS over the training steps and evaluations (``VmHWM`` reset after setup through
  ``/proc/self/clear_refs``);
* ``end``: RSS after the last step (every weight has been read by then: a plain run's mapped weight
  files count in full, an ``--fsdp`` run's shards in half).

Plain runs read the weights through transformers' memory-mapped safetensors (file-backed pages, touched as
the steps read them); ``--fsdp`` copies each process's shards into its own memory and releases the mapped
tensors. Without ``--eval`` there is no evaluation (with it, every ``--fsdp`` process evaluates, while a
plain run's rank 0 alone does).

The last lines are ``fsdp_end_rss_ratio_vs_ddp=`` and ``fsdp_train_peak_rss_ratio_vs_ddp=`` (means over the ranks).

    python bench/fsdp_memory.py                          # 8 layers x 512 (about 160 MiB of weights)
    python bench/fsdp_memory.py --layers 12 --hidden 768  # GPT-2-124M's shape
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from timing import proc_status_mb  # bench/timing.py (the script's folder is on sys.path)


def _child(out: str, argv: list[str]) -> None:
    """One rank: ``peftc train`` with the memory read after setup and at the end."""
    import peftc.training.loop as loop
    from peftc.cli import main

    figures: dict[str, float] = {}
    step_module = loop._step_module

    def measured(*args, **kwargs):
        result = step_module(*args, **kwargs)
        import gc

        gc.collect()
        figures["setup_peak"] = proc_status_mb("VmHWM")
        figures["after_setup"] = proc_status_mb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM: the peak of the training steps from here
            f.write("5")
        return result

    loop._step_module = measured
    try:
        main(argv)
    finally:
        figures["train_peak"] = proc_status_mb("VmHWM")
        figures["end"] = proc_status_mb("VmRSS")
        rank = os.environ.get("RANK", "0")
        Path(out, f"rank{rank}.json").write_text(json.dumps(figures))


def _write(directory: Path, layers: int, hidden: int) -> float:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from peftc.models import load_tokenizer, preset_path

    tokenizer = load_tokenizer(preset_path("minilm"))
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=layers, n_embd=hidden, n_head=8, n_positions=128, vocab_size=len(tokenizer),
                     pad_token_id=0)  # fmt: skip
    model = GPT2LMHeadModel(cfg)
    model.save_pretrained(directory / "base", safe_serialization=True)
    tokenizer.save_pretrained(directory / "base")
    words = "the model reads a short sentence about training adapters on a small machine today".split()
    with open(directory / "train.jsonl", "w") as f:
        for i in range(32):
            f.write(json.dumps({"text": " ".join(words[i % 5 :] + words[: i % 5 + 3])}) + "\n")
    return sum(p.numel() for p in model.parameters()) * 4 / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4, help="per process")
    parser.add_argument("--eval", action="store_true", help="evaluate too (the training data, after each epoch)")
    parser.add_argument("--dir", help="where to write the base and the runs (default: a temp dir)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        _child(args.child, rest[1:] if rest[:1] == ["--"] else rest)
        return
    root = Path(args.dir or tempfile.mkdtemp(prefix="peftc-fsdp-"))
    weights = _write(root, args.layers, args.hidden)
    print(f"base: GPT-2 {args.layers} layers x {args.hidden}, {weights:.0f} MiB of float32 weights in {root}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    peaks = {}
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp"])):
        out = root / f"mem-{name}"
        out.mkdir(exist_ok=True)
        train = ["train", "--model", str(root / "base"), "--data", str(root / "train.jsonl"), "--max-steps",
                 str(args.steps), "--batch-size", str(args.batch), "--target-modules", "c_attn", "--no-progress",
                 "--force", "--out", str(root / f"run-{name}"), *extra]  # fmt: skip
        if args.eval:
            train += ["--eval-data", str(root / "train.jsonl")]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
               "--child", str(out), "--", *train]  # fmt: skip
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{name} run failed:\n{done.stderr[-3000:]}")
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
        for r, fig in enumerate(ranks):
            print(f"{name} rank {r}: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in fig.items()))
        peaks[name] = sum(f["train_peak"] for f in ranks) / 2, sum(f["end"] for f in ranks) / 2
    print(f"fsdp_end_rss_ratio_vs_ddp={peaks['fsdp'][1] / peaks['ddp'][1]:.3f}")
    print(f"fsdp_train_peak_rss_ratio_vs_ddp={peaks['fsdp'][0] / peaks['ddp'][0]:.3f}")


if __name__ == "__main__":
    main()
