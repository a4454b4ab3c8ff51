"""Greedy generation tokens/s: peftc's KV-cache ONNX export under optimum vs torch eager ``generate()``.

The model is GPT-2-small-shaped (hidden 768, 12 heads, vocab 50257, random init, seed 0) with
``--layers`` blocks (12 is GPT-2 small). An HF PEFT LoRA adapter (r=``--rank`` on c_attn, B
perturbed) is saved and exported by ``peftc.export(..., merge=True)`` — a with-past graph, the
default for causal LMs. Three generators then produce ``--new-tokens`` tokens greedily from the
same ``--seq``-token prompt (batch ``--batch``):

- ``ort``: ``optimum.onnxruntime.ORTModelForCausalLM`` on the artifact (CPU, ``--threads`` threads);
- ``torch_merged``: the merged model in torch eager (``merge_and_unload``), ``generate()``;
- ``torch_peft``: HF PEFT's unmerged ``PeftModel.generate()``.

Each is run ``--runs`` times after a warm-up, round-robin so machine load hits all alike; the
tokens of all three must agree (checked). Figures are median tokens/s (new tokens only, prefill
included). The last line is ``with_past_tokens_per_s_ratio_vs_torch=<x>``: ort / torch_merged.

    python bench/generate_with_past.py --layers 4 --runs 3
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
from _common import greedy_medians, perturb_lora_b  # bench/ is on sys.path (the script's folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks (GPT-2 small: 12)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads (both runtimes)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)

    import onnxruntime as ort
    import peft
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import GPT2Config, GPT2LMHeadModel

    import peftc

    root = Path(tempfile.mkdtemp(prefix="peftc-bench-gen-"))
    torch.manual_seed(0)
    config = GPT2Config(n_layer=args.layers, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    GPT2LMHeadModel(config).save_pretrained(root / "base")
    base = GPT2LMHeadModel.from_pretrained(root / "base").eval()
    lora = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(base, lora).eval()
    perturb_lora_b(peft_model)
    peft_model.save_pretrained(root / "adapter")

    tick = time.perf_counter()
    artifact = peftc.export(root / "adapter", model=str(root / "base"), merge=True, out=root / "artifact")
    print(f"export (capture, merge, ONNX, verification): {time.perf_counter() - tick:.1f} s")
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    ort_model = ORTModelForCausalLM.from_pretrained(artifact, session_options=options)
    merged = (
        peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(root / "base"), root / "adapter")
        .merge_and_unload()
        .eval()
    )

    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 50257, (args.batch, args.seq), generator=gen)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    generators = {"ort": ort_model, "torch_merged": merged, "torch_peft": peft_model}
    median = greedy_medians(generators, inputs, args.new_tokens, args.runs, "greedy tokens identical across runtimes")
    rate = {name: args.batch * args.new_tokens / seconds for name, seconds in median.items()}
    print(
        f"GPT-2-small-shaped, {args.layers} layers, LoRA r={args.rank} merged, prompt {args.seq}, "
        f"{args.new_tokens} new tokens, batch {args.batch}, {args.threads} threads, median of {args.runs}:"
    )
    for name, value in rate.items():
        print(f"  {name:13s} {value:8.1f} tokens/s")
    print(f"ort vs torch_peft (unmerged HF PEFT): {rate['ort'] / rate['torch_peft']:.2f}")
    print(f"with_past_tokens_per_s_ratio_vs_torch={rate['ort'] / rate['torch_merged']:.2f}")


if __name__ == "__main__":
    main()
