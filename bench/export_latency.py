"""ONNX Runtime latency of a merged LoRA export vs eager torch, on the same model and inputs.

The model is GPT-2-small-shaped (hidden 768, 12 heads, vocab 50257, random init, seed 0) with
``--layers`` blocks (12 is GPT-2 small; fewer keeps the run short). A LoRA adapter (r=8 on
c_attn, B perturbed so it is not the identity) is bound with peftc, merged, exported with
:func:`peftc.exporters.onnx.export_program_onnx` and timed under ONNX Runtime (CPU, graph
optimisation level ALL, intra-op threads = ``--threads``). The eager reference is the HF model
with the same adapter merged by HF PEFT (``merge_and_unload``), run under ``torch.no_grad`` in eval
mode with the same thread count. Both see the same inputs (batch 1 and 4, sequence 128); the
figure is the median of ``--runs`` timed runs after ``--warmup`` untimed ones; eager and ORT runs
alternate, so that other load on a shared machine slows both alike.

The last line printed is ``ort_latency_ratio_vs_eager=<x>``: the geometric mean over the batch
sizes of ORT median / eager median (below 1: ONNX Runtime is faster).

    python bench/export_latency.py --layers 4 --runs 10 --levels basic all
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import geomean, load_line, merged_lora_gpt2, ort_session, token_inputs  # bench/ is on sys.path
from timing import interleaved_medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks (GPT-2 small: 12)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads, both runtimes")
    parser.add_argument("--levels", nargs="+", default=["all"], choices=["basic", "extended", "all"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    import onnxruntime as ort
    from peftc.exporters.onnx import export_program_onnx
    from transformers import GPT2Config

    tick = time.perf_counter()
    cfg = GPT2Config(n_layer=args.layers, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257)
    program, eager = merged_lora_gpt2(cfg, args.rank, b_scale=0.02)
    print(f"model: GPT-2 shape, {args.layers} layers, hidden 768, vocab 50257, LoRA r={args.rank} on c_attn, merged")
    print(f"threads: {args.threads} (torch {torch.__version__}, onnxruntime {ort.__version__})")
    if load_line():
        print(load_line())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_program_onnx(program, path)
        print(f"build + capture + merge + export: {time.perf_counter() - tick:.1f} s")
        sessions = {level: ort_session(path, args.threads, level) for level in args.levels}
        ratios = []
        gen = torch.Generator().manual_seed(0)
        for batch in args.batches:
            _, feeds, run_eager = token_inputs(eager, batch, args.seq, 50257, gen)
            want = run_eager().numpy()
            fns = {"eager": run_eager}
            for level, session in sessions.items():
                fns[level] = lambda s=session, f=feeds: s.run(["logits"], f)
            medians = interleaved_medians(fns, args.warmup, args.runs)
            eager_ms = medians["eager"]
            best = math.inf
            for level, session in sessions.items():
                ort_ms = medians[level]
                diff = float(np.abs(session.run(["logits"], feeds)[0] - want).max())
                print(
                    f"batch {batch} seq {args.seq}: eager {eager_ms:.1f} ms, ORT[{level}] {ort_ms:.1f} ms, "
                    f"ratio {ort_ms / eager_ms:.3f}, max |ORT - eager| {diff:.2e}"
                )
                best = min(best, ort_ms)
            ratios.append(best / eager_ms)
    print(f"ort_latency_ratio_vs_eager={geomean(ratios):.3f}")


if __name__ == "__main__":
    main()
