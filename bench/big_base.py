"""A ~1.1B-parameter LLaMA-shaped base in bfloat16: peak RSS of loading, capturing and one training step.

The benchmark writes the base itself (random init, seed 0, TinyLlama's shape: 22 layers x 2048, GQA
32/4 heads, vocab 32000, saved as bf16 safetensors), then in a fresh process does what
``peftc train --base-dtype bfloat16 --precision bf16`` does before and during its first step: load the
base in bfloat16 (transformers maps the safetensors: no float32 copy), capture it twice (train and eval
programs share the weights), insert LoRA r=8 on q_proj/v_proj, and take one AdamW step on a batch of
``--batch`` x ``--seq`` tokens under bf16 autocast. Peak RSS (``VmHWM``) is compared with the weight
bytes; the issue's target is peak RSS <= 1.3 x weights + the step's activations.

The last line is ``big_base_peak_rss_ratio_vs_weights=<peak RSS / weight bytes>``.

    python bench/big_base.py                    # writes ~2.2 GB under --dir (default: a temp dir)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from timing import proc_status_mb  # bench/timing.py (the script's folder is on sys.path)


def _write(directory: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)  # fmt: skip
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    LlamaForCausalLM(cfg).save_pretrained(directory, safe_serialization=True)


def _measure(directory: str, batch: int, seq: int) -> dict:
    import torch
    from peftc.passes import insertion_pipeline

    from peftc.config import LoraConfig
    from peftc.models import load_model
    from peftc.program import capture
    from peftc.tasks import get_task
    from peftc.training.precision import adapter_to_float32, precision

    figures: dict[str, float] = {"start_mb": proc_status_mb("VmRSS")}
    t = time.perf_counter()
    loaded = load_model(directory, "causal-lm", dtype=torch.bfloat16)
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    figures.update(weight_mb=weights / 2**20, load_s=time.perf_counter() - t, after_load_mb=proc_status_mb("VmHWM"))
    t = time.perf_counter()
    train_prog = capture(loaded.model, "causal-lm", mode="train")
    eval_prog = capture(loaded.model, "causal-lm", mode="eval")
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    insertion_pipeline(cfg)(train_prog)
    insertion_pipeline(cfg, train_prog.adapter)(eval_prog)
    params = train_prog.parameters(trainable=True)
    adapter_to_float32(params)
    figures.update(capture_s=time.perf_counter() - t, after_capture_mb=proc_status_mb("VmHWM"))
    amp = precision("bf16", torch.device("cpu"))
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, 32000, (batch, seq), generator=torch.Generator().manual_seed(1))
    batch_d = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
               "position_ids": torch.arange(seq).expand(batch, seq).contiguous(), "labels": ids}  # fmt: skip
    t = time.perf_counter()
    with amp.autocast():
        loss = get_task("causal-lm").loss(train_prog.forward_batch(batch_d), batch_d)
    loss.backward()
    opt.step()
    figures.update(step_s=time.perf_counter() - t, loss=float(loss), peak_mb=proc_status_mb("VmHWM"))
    figures["parameters"] = sum(p.numel() for p in loaded.model.parameters())
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="where to write the base (default: a temp dir, removed after)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--worker", choices=["write", "measure"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        if args.worker == "write":
            _write(args.dir)
        else:
            print("RESULT " + json.dumps(_measure(args.dir, args.batch, args.seq)), flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.dir or os.path.join(tmp, "llama-1b")
        if not os.path.isfile(os.path.join(directory, "config.json")):
            subprocess.run([sys.executable, __file__, "--worker", "write", "--dir", directory], check=True)
        cmd = [sys.executable, __file__, "--worker", "measure", "--dir", directory, "--batch", str(args.batch),
               "--seq", str(args.seq), "--threads", str(args.threads)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"measure failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        r = json.loads(lines[-1][len("RESULT ") :])
    print(f"LLaMA {r['parameters'] / 1e9:.2f}B parameters, bf16 weights {r['weight_mb']:.0f} MiB; batch {args.batch} x "
          f"{args.seq}; {args.threads} threads")  # fmt: skip
    print(f"load {r['load_s']:.1f} s, peak RSS {r['after_load_mb']:.0f} MiB; capture x2 + LoRA {r['capture_s']:.1f} s, "
          f"peak {r['after_capture_mb']:.0f} MiB; one bf16 step {r['step_s']:.1f} s, peak {r['peak_mb']:.0f} MiB "
          f"(process start {r['start_mb']:.0f} MiB)")  # fmt: skip
    print(f"big_base_peak_rss_ratio_vs_weights={r['peak_mb'] / r['weight_mb']:.3f}")


if __name__ == "__main__":
    main()
