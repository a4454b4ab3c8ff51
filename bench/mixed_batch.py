"""Many adapters in one batch (``--mixed-batch``) vs one run per adapter (swappable), and vs merged, under ONNX Runtime.

The model is GPT-2-small-shaped (hidden 768, 12 heads, vocab 50257, random init, seed 0) with
``--layers`` blocks. ``--adapters`` LoRA adapters (r=``--rank`` on c_attn, different B each, not
the identity) are bound with peftc and exported three ways:

- mixed: :class:`~peftc.passes.mixed_batch.MixedBatchPass`: every adapter stacked in the graph, the
  input ``adapter_index`` picks one per row;
- swappable: :class:`~peftc.passes.lift.LiftAdaptersToInputsPass`; one ``.onnx_adapter`` per adapter,
  activated per run with ``RunOptions.add_active_adapter``;
- merged: adapter 0 folded into the weights (the fastest a single adapter can be).

The workload: ``--batch`` rows (default 8), ``batch / adapters`` rows per adapter, sequence ``--seq``.
Mixed serves it in one run; swappable in one run per adapter (``batch / adapters`` rows each, the
adapter switched between runs). The single-adapter cost is the mixed model with every row on
adapter 0 vs the merged model on the same batch. Figures are medians of ``--runs`` timed runs after
``--warmup``, the variants alternating (bench/timing.py). Outputs are checked first: each mixed row
equals the swappable run of its adapter.

The last line printed is ``mixed_batch_throughput_ratio=<x>``: (swappable runs) / (one mixed run).

    python bench/mixed_batch.py --layers 4 --seq 16
    python bench/mixed_batch.py --layers 4 --seq 1 --past 128   # a decode step on a 128-token cache
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from _common import lora_program  # bench/ is on sys.path (the script's folder)
from timing import interleaved_medians  # bench/timing.py (the script's folder is on sys.path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks (GPT-2 small: 12)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=16, help="new tokens per row")
    parser.add_argument("--past", type=int, default=0, help="a KV-cache graph, run on a cache of this many tokens")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads")
    args = parser.parse_args()
    if args.batch % args.adapters:
        parser.error("--batch must be a multiple of --adapters")

    logging.disable(logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore")
    import onnxruntime as ort
    from peftc.exporters.onnx import export_program_onnx
    from peftc.exporters.swappable import write_adapter
    from peftc.passes import merge_pipeline
    from peftc.passes.lift import LiftAdaptersToInputsPass, lifted_tensors
    from peftc.passes.mixed_batch import MixedBatchPass
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(args.threads)
    n, per = args.adapters, args.batch // args.adapters
    print(
        f"model: GPT-2 shape, {args.layers} layers, hidden 768, vocab 50257, {n} LoRA adapters r={args.rank} on c_attn"
    )
    print(f"input: {args.batch} rows x {args.seq} new tokens on a cache of {args.past} ({per} rows per adapter); "
          f"threads {args.threads}; "
          f"onnxruntime {ort.__version__}")  # fmt: skip
    cfg = GPT2Config(n_layer=args.layers, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).eval()

    kv = args.past > 0
    tmp = Path(tempfile.mkdtemp(prefix="peftc-mixed-bench-"))
    tick = time.perf_counter()
    program = lora_program(model, args.rank, 1, kv)
    states = [program.adapter]
    for i in range(1, n):  # the other adapters: the same targets, other tensors
        gen = torch.Generator().manual_seed(100 + i)
        tensors = {k: v.detach() + torch.randn(v.shape, generator=gen) * 0.02 for k, v in states[0].tensors.items()}
        states.append(SimpleNamespace(tensors=tensors, config=states[0].config))
    files = [{k: v.float().numpy() for k, v in lifted_tensors(program, st).items()} for st in states]

    mixed_program = lora_program(model, args.rank, 1, kv)
    MixedBatchPass(states)(mixed_program)
    mixed_path = tmp / "mixed.onnx"
    export_program_onnx(mixed_program, mixed_path, external_data=True)

    swap_program = lora_program(model, args.rank, 1, kv)
    LiftAdaptersToInputsPass()(swap_program)
    defaults = {
        k: np.zeros((0, v.shape[1]) if k.endswith("lora_A") else (v.shape[0], 0), np.float32)
        for k, v in files[0].items()
    }
    swap_path = tmp / "swappable.onnx"
    export_program_onnx(swap_program, swap_path, external_data=True, input_defaults=defaults)
    adapter_paths = [write_adapter(tmp / f"a{i}.onnx_adapter", a) for i, a in enumerate(files)]

    merge_pipeline()(program)
    merged_path = tmp / "merged.onnx"
    export_program_onnx(program, merged_path, external_data=True)
    print(f"build + capture + 3 exports: {time.perf_counter() - tick:.1f} s")

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = args.threads
    options.log_severity_level = 3

    def session(path: Path) -> ort.InferenceSession:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    mixed, swappable, merged = session(mixed_path), session(swap_path), session(merged_path)
    run_opts = []
    for path in adapter_paths:
        adapter = ort.LoraAdapter()
        adapter.Load(str(path))
        ro = ort.RunOptions()
        ro.add_active_adapter(adapter)
        run_opts.append((ro, adapter))

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50257, (args.batch, args.seq), dtype=np.int64)
    mask = np.ones((args.batch, args.past + args.seq), np.int64)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": (np.cumsum(mask, -1) - 1)[:, -args.seq :]}
    if kv:  # a decode step on a filled cache (random keys and values: the timing does not depend on them)
        cache = rng.standard_normal((args.batch, 12, args.past, 64)).astype(np.float32)
        feeds.update({f"past_key_values.{i}.{kv_}": cache for i in range(args.layers) for kv_ in ("key", "value")})
    index = np.repeat(np.arange(n), per)  # rows 0..per-1: adapter 0, …
    rows = [slice(i * per, (i + 1) * per) for i in range(n)]
    part_feeds = [{k: v[r] for k, v in feeds.items()} for r in rows]

    got = mixed.run(["logits"], {**feeds, "adapter_index": index})[0]
    diffs = [
        np.abs(got[r] - swappable.run(["logits"], part_feeds[i], run_opts[i][0])[0]).max() for i, r in enumerate(rows)
    ]
    zero = np.zeros_like(index)
    single = mixed.run(["logits"], {**feeds, "adapter_index": zero})[0]
    print(f"max |mixed row - swappable run of its adapter| = {max(diffs):.2e}")
    print(
        f"max |mixed, all adapter 0 - merged adapter 0| = {np.abs(single - merged.run(['logits'], feeds)[0]).max():.2e}"
    )
    print(f"max |adapter 1 rows - adapter 0 on them| = {np.abs(got[rows[1]] - single[rows[1]]).max():.2e} (far from 0)")

    def swap_all() -> None:
        for i in range(n):
            swappable.run(["logits"], part_feeds[i], run_opts[i][0])

    medians = interleaved_medians(
        {
            "mixed, one run": lambda: mixed.run(["logits"], {**feeds, "adapter_index": index}),
            f"swappable, {n} runs": swap_all,
            "mixed, one adapter": lambda: mixed.run(["logits"], {**feeds, "adapter_index": zero}),
            "merged": lambda: merged.run(["logits"], feeds),
        },
        args.warmup,
        args.runs,
    )
    for name, ms in medians.items():
        print(f"latency {name}: {ms:.2f} ms")
    print(f"mixed_single_adapter_overhead={medians['mixed, one adapter'] / medians['merged']:.3f}")
    print(f"mixed_batch_throughput_ratio={medians[f'swappable, {n} runs'] / medians['mixed, one run']:.3f}")


if __name__ == "__main__":
    main()
