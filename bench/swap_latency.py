"""Swappable LoRA (adapter tensors as graph inputs) vs merged LoRA under ONNX Runtime, and the cost of a switch.

The model is GPT-2-small-shaped (hidden 768, 12 heads, vocab 50257, random init, seed 0) with
``--layers`` blocks (12 is GPT-2 small; fewer keeps the run short). A LoRA adapter (r=``--rank`` on
c_attn, B perturbed so it is not the identity) is bound with peftc and exported twice:

- merged: :class:`~peftc.passes.merge.MergeLoraPass`, the base graph with folded weights;
- swappable: :class:`~peftc.passes.lift.LiftAdaptersToInputsPass`, A and s·B as graph inputs with rank-0
  defaults; the adapter is an ``.onnx_adapter`` activated with ``RunOptions.add_active_adapter``.

Both run under ONNX Runtime (CPU, graph optimisation ALL, ``--threads`` intra-op threads) on the
same input (batch ``--batch``, sequence ``--seq``); figures are medians of ``--runs`` timed runs
after ``--warmup``, the two sessions alternating so that load on a shared machine hits both alike.
Switching adapters is timed as (a) activating another loaded ``LoraAdapter`` in a live session
(+ loading it from disk), and (b) the merged alternative: building a new session for another merged
model. The first run after each switch is timed too.

The last line printed is ``swappable_latency_overhead=<x>``: swappable median / merged median.

    python bench/swap_latency.py --layers 4 --runs 10
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
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
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--switches", type=int, default=3, help="adapter loads / session rebuilds timed")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads")
    args = parser.parse_args()

    logging.disable(logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore")
    import onnxruntime as ort
    from peftc.exporters.onnx import export_program_onnx
    from peftc.exporters.swappable import write_adapter
    from peftc.passes import merge_pipeline
    from peftc.passes.lift import LiftAdaptersToInputsPass, lifted_tensors
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(args.threads)
    print(f"model: GPT-2 shape, {args.layers} layers, hidden 768, vocab 50257, LoRA r={args.rank} on c_attn")
    print(f"input: batch {args.batch} x seq {args.seq}; threads {args.threads}; onnxruntime {ort.__version__}")
    cfg = GPT2Config(n_layer=args.layers, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).eval()

    tmp = Path(tempfile.mkdtemp(prefix="peftc-swap-bench-"))
    tick = time.perf_counter()
    program = lora_program(model, args.rank, 1)
    gen = torch.Generator().manual_seed(2)  # a second adapter for the same targets: other tensors
    second = SimpleNamespace(
        tensors={k: v.detach() + torch.randn(v.shape, generator=gen) * 0.02 for k, v in program.adapter.tensors.items()}
    )
    adapters = [{k: v.float().numpy() for k, v in lifted_tensors(program, st).items()} for st in (None, second)]
    swap_program = lora_program(model, args.rank, 1)
    LiftAdaptersToInputsPass()(swap_program)
    merge_pipeline()(program)
    merged_path = tmp / "merged.onnx"
    export_program_onnx(program, merged_path, external_data=True)
    defaults = {
        n: np.zeros((0, v.shape[1]) if n.endswith("lora_A") else (v.shape[0], 0), np.float32)
        for n, v in adapters[0].items()
    }
    swap_path = tmp / "swappable.onnx"
    export_program_onnx(swap_program, swap_path, external_data=True, input_defaults=defaults)
    adapter_paths = [write_adapter(tmp / f"a{i}.onnx_adapter", a) for i, a in enumerate(adapters)]
    print(f"build + capture + 2 exports: {time.perf_counter() - tick:.1f} s")

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = args.threads
    options.log_severity_level = 3

    def session(path: Path) -> ort.InferenceSession:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    gen = np.random.default_rng(0)
    ids = gen.integers(0, 50257, (args.batch, args.seq), dtype=np.int64)
    mask = np.ones_like(ids)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": np.cumsum(mask, -1) - 1}
    merged = session(merged_path)
    swappable = session(swap_path)
    loaded = []
    for path in adapter_paths:
        adapter = ort.LoraAdapter()
        adapter.Load(str(path))
        loaded.append(adapter)
    run_opts = []
    for adapter in loaded:
        ro = ort.RunOptions()
        ro.add_active_adapter(adapter)
        run_opts.append(ro)

    want = merged.run(["logits"], feeds)[0]
    got = [swappable.run(["logits"], feeds, ro)[0] for ro in run_opts]
    base = swappable.run(["logits"], feeds)[0]
    print(f"max |swappable + adapter 0 - merged adapter 0| = {np.abs(got[0] - want).max():.2e}")
    print(
        f"max |adapter 1 - adapter 0| = {np.abs(got[1] - got[0]).max():.2e}; |no adapter - adapter 0| = "
        f"{np.abs(base - got[0]).max():.2e} (both must be far from 0)"
    )

    medians = interleaved_medians(
        {
            "merged": lambda: merged.run(["logits"], feeds),
            "swappable + adapter": lambda: swappable.run(["logits"], feeds, run_opts[0]),
            "swappable, no adapter": lambda: swappable.run(["logits"], feeds),
        },
        args.warmup,
        args.runs,
    )
    for name, ms in medians.items():
        print(f"latency {name}: {ms:.2f} ms")

    activate = []
    for k in range(1000):
        t = time.perf_counter()
        ro = ort.RunOptions()
        ro.add_active_adapter(loaded[k % 2])
        activate.append(time.perf_counter() - t)
    load, first_run = [], []
    for k in range(args.switches):
        t = time.perf_counter()
        fresh = ort.LoraAdapter()
        fresh.Load(str(adapter_paths[k % 2]))
        load.append(time.perf_counter() - t)
        ro = ort.RunOptions()
        ro.add_active_adapter(fresh)
        t = time.perf_counter()
        swappable.run(["logits"], feeds, ro)
        first_run.append(time.perf_counter() - t)
    rebuild, rebuild_run = [], []
    for _ in range(args.switches):  # the merged alternative: one model per adapter, a new session per switch
        t = time.perf_counter()
        fresh_session = session(merged_path)
        rebuild.append(time.perf_counter() - t)
        t = time.perf_counter()
        fresh_session.run(["logits"], feeds)
        rebuild_run.append(time.perf_counter() - t)
        del fresh_session
    med = statistics.median
    size_kb = adapter_paths[0].stat().st_size / 1e3
    print(f"switch in a live session (RunOptions + add_active_adapter): {med(activate) * 1e6:.1f} us")
    print(f"load an .onnx_adapter from disk: {med(load) * 1e3:.2f} ms ({size_kb:.0f} kB)")
    print(f"first run after a switch: {med(first_run) * 1e3:.2f} ms")
    print(f"switch by building a new merged session: {med(rebuild) * 1e3:.1f} ms")
    print(f"first run of a new merged session: {med(rebuild_run) * 1e3:.2f} ms")
    print(f"switch speed-up (new session / load + activate): {med(rebuild) / (med(load) + med(activate)):.0f}x")
    print(f"swappable_latency_overhead={medians['swappable + adapter'] / medians['merged']:.3f}")


if __name__ == "__main__":
    main()
