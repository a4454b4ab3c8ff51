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
gives the same against ONNX Runtime.

    python bench/executorch_latency.py --runs 50
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
from timing import interleaved_medians  # bench/timing.py (the script's folder is on sys.path)


def _models(cfg, rank: int):
    """(peftc merged program, HF model with the same adapter merged by HF PEFT)."""
    import peft
    from peft import set_peft_model_state_dict
    from peftc.passes import insertion_pipeline, merge_pipeline
    from transformers import GPT2LMHeadModel

    from peftc.config import LoraConfig
    from peftc.program import capture

    torch.manual_seed(0)
    base = GPT2LMHeadModel(cfg).eval()
    state = base.state_dict()
    program = capture(base, "causal-lm", mode="eval")
    insertion_pipeline(LoraConfig(r=rank, lora_alpha=2 * rank, task_type="CAUSAL_LM"))(program)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, tensor in program.adapter.tensors.items():
            if "lora_B" in key:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.1)
    adapter = program.adapter.state_dict()
    merge_pipeline()(program)

    eager = GPT2LMHeadModel(cfg)
    eager.load_state_dict(state)
    peft_model = peft.get_peft_model(
        eager, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["c_attn"], fan_in_fan_out=True)
    )
    set_peft_model_state_dict(peft_model, adapter)
    return program, peft_model.merge_and_unload().eval()


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
    program, eager = _models(cfg, args.rank)
    print(
        f"model: GPT-2, {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, "
        f"LoRA r={args.rank} on c_attn, merged"
    )
    print(
        f"threads: {args.threads} (torch {torch.__version__}, executorch {version('executorch')}, "
        f"onnxruntime {ort.__version__})"
    )
    if hasattr(os, "getloadavg"):  # other load on the machine skews absolute figures (ratios less so)
        print(f"load average before timing: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        tick = time.perf_counter()
        pte = export_program_executorch(program, Path(tmp) / "model.pte")
        print(f"ExecuTorch export (re-export + XNNPACK lowering): {time.perf_counter() - tick:.1f} s")
        onnx_path = Path(tmp) / "model.onnx"
        export_program_onnx(program, onnx_path)
        portable_lib._unsafe_reset_threadpool(args.threads)
        method = load_executorch(pte)
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        vs_eager, vs_ort = [], []
        gen = torch.Generator().manual_seed(0)
        for batch in args.batches:
            ids = torch.randint(1, args.vocab, (batch, args.seq), generator=gen)
            mask = torch.ones_like(ids)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()}

            def run_eager(ids=ids, mask=mask, pos=pos):
                with torch.no_grad():
                    return eager(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits

            want = run_eager().numpy()
            fns = {
                "eager": run_eager,
                "executorch": lambda ids=ids, mask=mask, pos=pos: method.execute([ids, mask, pos]),
                "ort": lambda f=feeds: session.run(["logits"], f),
            }
            medians = interleaved_medians(fns, args.warmup, args.runs)
            diff = float(np.abs(method.execute([ids, mask, pos])[0].numpy() - want).max())
            print(
                f"batch {batch} seq {args.seq}: eager {medians['eager']:.3f} ms, ExecuTorch "
                f"{medians['executorch']:.3f} ms, ORT {medians['ort']:.3f} ms; ExecuTorch/eager "
                f"{medians['executorch'] / medians['eager']:.3f}, ExecuTorch/ORT "
                f"{medians['executorch'] / medians['ort']:.3f}, max |ExecuTorch - eager| {diff:.2e}"
            )
            vs_eager.append(medians["executorch"] / medians["eager"])
            vs_ort.append(medians["executorch"] / medians["ort"])

    def geomean(xs: list[float]) -> float:
        return math.exp(sum(math.log(x) for x in xs) / len(xs))

    print(f"executorch_latency_ratio_vs_ort={geomean(vs_ort):.3f}")
    print(f"executorch_latency_ratio_vs_eager={geomean(vs_eager):.3f}")


if __name__ == "__main__":
    main()
