"""seq2seq generation time under optimum: peftc's KV-cache decoders (``use_cache=True``) vs no cache.

A T5 base (random init, seed 0) in one of two shapes — ``tiny`` (the tests' T5: d_model 64, 2 layers,
4 heads, vocab 128) or ``t5-small`` (d_model 512, 6+6 layers, 8 heads, d_ff 2048, vocab 32128) — gets an
HF PEFT LoRA adapter (r=8 on q/v, B perturbed), which ``peftc.export(..., merge=True)`` writes with its
seq2seq default: ``encoder_model.onnx``, ``decoder_model.onnx`` (returns the caches) and
``decoder_with_past_model.onnx``. optimum's ``ORTModelForSeq2SeqLM`` loads the one artifact twice, with
``use_cache=True`` and ``use_cache=False`` (the first-step graph alone, re-reading the decoder prefix every
step), and generates ``--new-tokens`` tokens greedily from the same ``--seq``-token source (batch
``--batch``). The two must give the same tokens (checked). Each is timed ``--runs`` times after a
warm-up, round-robin so machine load hits both alike; figures are medians. The last line is
``seq2seq_cache_speedup=<no-cache time / cache time>``.

    python bench/seq2seq_cache.py --shape tiny
    python bench/seq2seq_cache.py --shape t5-small --runs 3
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

SHAPES = {
    "tiny": {"vocab_size": 128, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4},
    "t5-small": {"vocab_size": 32128, "d_model": 512, "d_kv": 64, "d_ff": 2048, "num_layers": 6, "num_heads": 8},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--seq", type=int, default=32, help="source tokens")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="ONNX Runtime intra-op threads")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)

    import onnxruntime as ort
    import peft
    from optimum.onnxruntime import ORTModelForSeq2SeqLM
    from transformers import T5Config, T5ForConditionalGeneration

    import peftc

    root = Path(tempfile.mkdtemp(prefix="peftc-bench-s2skv-"))
    torch.manual_seed(0)
    config = T5Config(**SHAPES[args.shape], decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    T5ForConditionalGeneration(config).save_pretrained(root / "base")
    lora = peft.LoraConfig(r=8, lora_alpha=16, task_type="SEQ_2_SEQ_LM")
    peft_model = peft.get_peft_model(T5ForConditionalGeneration.from_pretrained(root / "base"), lora).eval()
    perturb_lora_b(peft_model)
    peft_model.save_pretrained(root / "adapter")

    tick = time.perf_counter()
    artifact = peftc.export(root / "adapter", model=str(root / "base"), merge=True, out=root / "artifact")
    print(f"export (3 graphs: capture, merge, ONNX, verification): {time.perf_counter() - tick:.1f} s")
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    models = {
        "use_cache=True": ORTModelForSeq2SeqLM.from_pretrained(
            artifact, use_cache=True, use_merged=False, session_options=options
        ),
        "use_cache=False": ORTModelForSeq2SeqLM.from_pretrained(artifact, use_cache=False, session_options=options),
    }
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(2, config.vocab_size, (args.batch, args.seq), generator=gen)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    median = greedy_medians(
        models, inputs, args.new_tokens, args.runs, "greedy tokens identical with and without the cache"
    )
    print(
        f"T5 {args.shape}, LoRA r=8 merged, source {args.seq}, {args.new_tokens} new tokens, batch {args.batch}, "
        f"{args.threads} threads, median of {args.runs}:"
    )
    for name, value in median.items():
        print(f"  {name:16s} {value * 1e3:8.1f} ms")
    print(f"seq2seq_cache_speedup={median['use_cache=False'] / median['use_cache=True']:.2f}")


if __name__ == "__main__":
    main()
