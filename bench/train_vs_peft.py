"""Training throughput and memory: peftc's captured program vs HF PEFT's ``get_peft_model``.

Workload: LoRA r=8 (alpha 16, dropout 0.05) on ``c_attn`` of a GPT-2-124M-shaped model
(``GPT2Config()`` defaults, random init, seed 0, dropout on as in training), batch 4 x 128 tokens,
next-token cross-entropy (the same loss function for both). One step = forward + backward + AdamW
step + zero_grad. Each implementation runs in its own fresh subprocess, so one's allocations do
not inflate the other's peak; after ``--warmup`` untimed steps, ``--steps`` steps are timed.
With ``--repeats N`` the two alternate N times and each keeps its best run (noise on a shared
CPU only ever slows a run down).

Reported per implementation:
  * steps/s = 1 / median step time (the median resists other processes sharing the CPU);
  * peak RSS (``VmHWM`` from /proc/self/status) over the whole process, and the training peak:
    the peak is reset with /proc/self/clear_refs right before the first step, so
    ``train_peak_mb = VmHWM after the steps - VmRSS before them`` is what training itself adds
    (activations, gradients, AdamW state) on top of the loaded model.

The last line is ``train_throughput_ratio_vs_peft=<peftc steps/s / peft steps/s>``.

    python bench/train_vs_peft.py                        # ~2-3 minutes on 2 idle cores
    python bench/train_vs_peft.py --steps 10 --repeats 3    # less noise where the CPU is shared
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

R, ALPHA, DROPOUT, BATCH, SEQ = 8, 16, 0.05, 4, 128


def _proc_status(key: str) -> float:
    """A memory figure from /proc/self/status in MiB (0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _worker(impl: str, steps: int, warmup: int, threads: int) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from peftc.tasks import get_task

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config())
    task = get_task("causal-lm")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=gen)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "position_ids": torch.arange(SEQ).expand(BATCH, SEQ).contiguous(),
        "labels": ids,
    }
    t0 = time.perf_counter()
    if impl == "peftc":
        from peftc.passes import insertion_pipeline

        from peftc.config import LoraConfig
        from peftc.program import capture

        prog = capture(model, "causal-lm", mode="train")
        insertion_pipeline(
            LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=["c_attn"], task_type="CAUSAL_LM")
        )(prog)
        params = prog.parameters(trainable=True)

        def forward():
            return prog.forward_batch(batch)
    else:
        import peft

        pm = peft.get_peft_model(
            model,
            peft.LoraConfig(
                r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=["c_attn"], task_type="CAUSAL_LM"
            ),
        )
        pm.train()
        params = [p for p in pm.parameters() if p.requires_grad]
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}

        def forward():
            return pm(**inputs, use_cache=False).logits

    setup_s = time.perf_counter() - t0
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> float:
        loss = task.loss(forward(), batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    rss_before = _proc_status("VmRSS")
    peak_reset = _reset_peak()
    losses = [step() for _ in range(warmup)]
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t)
    return {
        "impl": impl,
        "trainable": sum(p.numel() for p in params),
        "setup_s": setup_s,
        "step_s": times,
        "steps_per_s": 1.0 / statistics.median(times),
        "mean_steps_per_s": len(times) / sum(times),
        "peak_rss_mb": _proc_status("VmHWM"),
        "train_peak_mb": _proc_status("VmHWM") - rss_before if peak_reset else None,
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per implementation")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per implementation, alternating order; the best steps/s counts"
    )
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads")
    parser.add_argument("--worker", choices=["peftc", "peft"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(_worker(args.worker, args.steps, args.warmup, args.threads)), flush=True)
        return

    results: dict[str, dict] = {}
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    for rep in range(args.repeats):
        for impl in ("peft", "peftc") if rep % 2 == 0 else ("peftc", "peft"):
            cmd = [sys.executable, __file__, "--worker", impl, "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--threads", str(args.threads)]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                sys.exit(f"{impl} worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            result = json.loads(lines[-1][len("RESULT ") :])
            if impl not in results or result["steps_per_s"] > results[impl]["steps_per_s"]:
                results[impl] = result

    print(f"GPT-2 124M (random init), LoRA r={R} on c_attn, batch {BATCH} x {SEQ}, {args.threads} threads, "
          f"{args.warmup} warmup + {args.steps} timed steps, each implementation in a fresh process, best of "
          f"{args.repeats}")  # fmt: skip
    print(f"{'impl':6} {'trainable':>9} {'setup s':>8} {'steps/s':>8} {'mean':>8} {'peak RSS MiB':>13} "
          f"{'train peak MiB':>15} {'loss first->last':>18}")  # fmt: skip
    for impl, r in results.items():
        growth = f"{r['train_peak_mb']:.0f}" if r["train_peak_mb"] is not None else "n/a"
        speed = f"{r['steps_per_s']:>8.3f} {r['mean_steps_per_s']:>8.3f}"
        print(f"{impl:6} {r['trainable']:>9} {r['setup_s']:>8.1f} {speed} {r['peak_rss_mb']:>13.0f} {growth:>15} "
              f"{r['loss_first']:>8.4f}->{r['loss_last']:.4f}")  # fmt: skip
    print("steps/s = 1/median step time; peak RSS = VmHWM of the process; train peak = VmHWM reset before the "
          "first step minus RSS then (what training adds)")  # fmt: skip
    ratio = results["peftc"]["steps_per_s"] / results["peft"]["steps_per_s"]
    print(f"train_throughput_ratio_vs_peft={ratio:.3f}")


if __name__ == "__main__":
    main()
