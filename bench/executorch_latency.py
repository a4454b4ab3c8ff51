"""ExecuTorch (.pte, XNNPACK) latency of a merged LoRA export vs eager torch and vs ONNX Runtime.

The model is the tests' tiny GPT-2 by default (2 layers, hidden 64, 4 heads, vocab 128, 64
positions; ``--layers`` / ``--hidden`` / ``--vocab`` / ``--positions`` make it larger) with a LoRA
adapter (r=8 on c_attn, B perturbed so it is not the identity) bound with peftc, merged, and
written by :func:`peftc.exporters.executorch.export_program_executorch` and
:func:`peftc.exporters.onnx.export_program_onnx`. The eager reference is the HF model with the same
adapter merged by HF PEFT (``merge_and_unload``) under ``torch.no_grad``. All three see the same
inputs (batch 1 and 4, sequence ``--seq``) with ``--threads`` intra-op threads (XNNPACK's thread
pool is reset to the same count); medians of ``--runs`` timed runs after ``--warmup`` untimed ones,
run round-robin so that other load on a shared machine slows all alike.

The last line printed is ``executorch_latency_ratio_vs_eager=<x>``: the geometric mean over the
batch sizes of ExecuTorch median / eager median (below 1: ExecuTorch is faster); the line before it
gives the same against ONNX Runtime. With ``--llm``, the LLM-runner layout (the KV cache in the
program) is timed too: a prefill of ``--seq`` tokens and one decode step, vs eager torch with
transformers' DynamicCache.

    python bench/executorch_latency.py --runs 50 --llm
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import geomean, load_line, merged_lora_gpt2, ort_session, token_inputs  # bench/ is on sys.path
from timing import interleaved_medians


def _llm_runner_steps(eager: torch.nn.Module, args: argparse.Namespace) -> None:
    """The LLM-runner layout (``--with-past``): a prefill of ``--seq`` tokens and a decode step vs eager + DynamicCache.

    The program is the HF-merged model captured in the layout (the cache in the program); eager runs
    the same model with transformers' DynamicCache, cropped back after each timed decode step.
    """
    import copy

    from peftc.exporters.executorch import export_program_executorch, load_executorch

    from peftc.exporting.llm import llm_runner
    from peftc.program import capture

    model = copy.deepcopy(eager)
    program = capture(model, "causal-lm", mode="eval", transform=llm_runner(args.positions))
    program.max_sequence = args.positions
    ids = torch.randint(1, args.vocab, (1, args.seq + 1), generator=torch.Generator().manual_seed(3))
    with tempfile.TemporaryDirectory() as tmp:
        tick = time.perf_counter()
        method = load_executorch(export_program_executorch(program, Path(tmp) / "llm.pte"))
        print(f"ExecuTorch LLM-runner export: {time.perf_counter() - tick:.1f} s")
        prompt, step = [ids[:, : args.seq], torch.arange(args.seq)], [ids[:, args.seq :], torch.tensor([args.seq])]
        with torch.no_grad():
            cache = eager(input_ids=ids[:, : args.seq], use_cache=True).past_key_values

        def eager_prefill():
            with torch.no_grad():
                return eager(input_ids=ids[:, : args.seq], use_cache=True).logits

        def eager_step():
            with torch.no_grad():
                out = eager(input_ids=ids[:, args.seq :], past_key_values=cache, use_cache=True).logits
            cache.crop(args.seq)
            return out

        method.execute(prompt)
        fns = {
            "eager_prefill": eager_prefill,
            "et_prefill": lambda: method.execute(prompt),
            "eager_step": eager_step,
            "et_step": lambda: method.execute(step),
        }
        m = interleaved_medians(fns, args.warmup, args.runs)
        diff = float((method.execute(step)[0] - eager_step()).abs().max())
        print(
            f"LLM-runner layout, prefill {args.seq}: eager {m['eager_prefill']:.3f} ms, ExecuTorch "
            f"{m['et_prefill']:.3f} ms ({m['et_prefill'] / m['eager_prefill']:.3f}); decode step: eager "
            f"{m['eager_step']:.3f} ms, ExecuTorch {m['et_step']:.3f} ms ({m['et_step'] / m['eager_step']:.3f}); "
            f"max |ExecuTorch - eager| at the step {diff:.2e}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--positions", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads, every runtime")
    parser.add_argument("--llm", action="store_true", help="also time the LLM-runner layout (--with-past)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    from importlib.metadata import version

    import onnxruntime as ort
    from executorch.extension.pybindings import portable_lib
    from peftc.exporters.executorch import export_program_executorch, load_executorch
    from peftc.exporters.onnx import export_program_onnx
    from transformers import GPT2Config

    cfg = GPT2Config(
        n_layer=args.layers,
        n_embd=args.hidden,
        n_head=args.heads,
        vocab_size=args.vocab,
        n_positions=args.positions,
        pad_token_id=0,
    )
    program, eager = merged_lora_gpt2(cfg, args.rank, b_scale=0.1)
    print(
        f"model: GPT-2, {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, "
        f"LoRA r={args.rank} on c_attn, merged"
    )
    print(
        f"threads: {args.threads} (torch {torch.__version__}, executorch {version('executorch')}, "
        f"onnxruntime {ort.__version__})"
    )
    if load_line():
        print(load_line())
    with tempfile.TemporaryDirectory() as tmp:
        tick = time.perf_counter()
        pte = export_program_executorch(program, Path(tmp) / "model.pte")
        print(f"ExecuTorch export (re-export + XNNPACK lowering): {time.perf_counter() - tick:.1f} s")
        onnx_path = Path(tmp) / "model.onnx"
        export_program_onnx(program, onnx_path)
        portable_lib._unsafe_reset_threadpool(args.threads)
        method = load_executorch(pte)
        session = ort_session(onnx_path, args.threads)
        vs_eager, vs_ort = [], []
        gen = torch.Generator().manual_seed(0)
        for batch in args.batches:
            inputs, feeds, run_eager = token_inputs(eager, batch, args.seq, args.vocab, gen, low=1)
            want = run_eager().numpy()
            fns = {
                "eager": run_eager,
                "executorch": lambda x=inputs: method.execute(x),
                "ort": lambda f=feeds: session.run(["logits"], f),
            }
            medians = interleaved_medians(fns, args.warmup, args.runs)
            diff = float(np.abs(method.execute(inputs)[0].numpy() - want).max())
            print(
                f"batch {batch} seq {args.seq}: eager {medians['eager']:.3f} ms, ExecuTorch "
                f"{medians['executorch']:.3f} ms, ORT {medians['ort']:.3f} ms; ExecuTorch/eager "
                f"{medians['executorch'] / medians['eager']:.3f}, ExecuTorch/ORT "
                f"{medians['executorch'] / medians['ort']:.3f}, max |ExecuTorch - eager| {diff:.2e}"
            )
            vs_eager.append(medians["executorch"] / medians["eager"])
            vs_ort.append(medians["executorch"] / medians["ort"])

    if args.llm:
        _llm_runner_steps(eager, args)
    print(f"executorch_latency_ratio_vs_ort={geomean(vs_ort):.3f}")
    print(f"executorch_latency_ratio_vs_eager={geomean(vs_eager):.3f}")


if __name__ == "__main__":
    main()
