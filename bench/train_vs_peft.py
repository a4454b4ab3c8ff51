"""Training throughput and memory: peftc's captured program vs HF PEFT's ``get_peft_model``, in one run.

Workload: LoRA r=8 (alpha 16, dropout 0.05) on the attention projections of a randomly initialised
model (``--shape``: ``gpt2`` = GPT-2-124M, ``GPT2Config()`` defaults, LoRA on ``c_attn``; ``gpt2-small``
= 4 layers x 256 for a quick look; ``llama-1b`` = a ~1.1B LLaMA (TinyLlama's shape), LoRA on
``q_proj``/``v_proj``), batch ``--batch`` x ``--seq`` tokens, next-token cross-entropy (the same loss
function for both). One step = forward + backward + AdamW step + zero_grad. Every configuration runs in
its own fresh subprocess, so one's allocations do not inflate another's peak; after ``--warmup``
untimed steps (compilation happens there), ``--steps`` steps are timed. With ``--repeats N`` the runs
alternate N times and each keeps its best (noise on a shared CPU only ever slows a run down).

Configurations (each peftc one beside its HF PEFT counterpart, measured in the same invocation):

* eager float32: always;
* ``--compile``: ``torch.compile`` (Inductor) of peftc's captured training program, and of HF PEFT's model;
* ``--gradient-checkpointing``: peftc's per-block recompute, and HF's ``gradient_checkpointing_enable()``;
* ``--precision bf16``: the base stored in bfloat16 and run under bf16 autocast, the adapter float32,
  for both (HF PEFT: ``autocast_adapter_dtype=True``, its default);
* ``--unfused-head``: peftc with the LM head outside the loss (the logits held whole, as HF PEFT holds
  them): what :mod:`peftc.training.head_loss` saves;
* ``--nproc N``: peftc under ``torch.distributed.run`` with N processes (gloo on CPU, NCCL on CUDA),
  the same global batch split N ways, ``--threads / N`` threads each: the data-parallel scaling.

Memory: on CUDA the allocator's peak (``torch.cuda.max_memory_allocated``) over the steps; on the CPU
the training peak ``VmHWM after the steps - VmRSS before them`` (VmHWM reset through
/proc/self/clear_refs before the first step): what training adds (activations, gradients, AdamW
state) on top of the loaded model. tokens/s = batch x seq / median step time.

The last three lines: ``compiled_train_throughput_ratio_vs_peft=`` (peftc compiled / HF PEFT eager, both
float32; ``nan`` without ``--compile``), ``peak_memory_ratio_vs_peft=`` (peftc eager / HF PEFT eager
training peak) and ``train_throughput_ratio_vs_peft=`` (peftc eager / HF PEFT eager tokens/s).

    python bench/train_vs_peft.py                                  # eager only, ~2-3 minutes on 2 idle cores
    python bench/train_vs_peft.py --compile --gradient-checkpointing --precision bf16 --nproc 2
    python bench/train_vs_peft.py --shape gpt2-small --steps 5     # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

from timing import proc_status_mb  # bench/timing.py (the script's folder is on sys.path)

R, ALPHA, DROPOUT = 8, 16, 0.05
SHAPES = ("gpt2", "gpt2-small", "llama-1b")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _model(shape: str, dtype):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # a 1B base is built in its dtype: no float32 copy first
    try:
        if shape == "gpt2":
            return GPT2LMHeadModel(GPT2Config()), ["c_attn"]
        if shape == "gpt2-small":
            return GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=256, n_head=4)), ["c_attn"]
        cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                          num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)  # fmt: skip
        return LlamaForCausalLM(cfg), ["q_proj", "v_proj"]
    finally:
        torch.set_default_dtype(previous)


def _worker(args: argparse.Namespace) -> dict:
    import torch

    from peftc.tasks import get_task
    from peftc.training.distributed import setup
    from peftc.training.precision import precision

    torch.set_num_threads(args.threads)
    dist, device = setup("auto")
    amp = precision(args.precision, device)
    base_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model, targets = _model(args.shape, base_dtype)
    model.to(device)
    task = get_task("causal-lm")
    gen = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen)
    share = args.batch // dist.world_size  # this rank's slice of the global batch
    ids = ids[dist.rank * share : (dist.rank + 1) * share].to(device)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "position_ids": torch.arange(args.seq, device=device).expand(len(ids), args.seq).contiguous(),
        "labels": ids,
    }
    t0 = time.perf_counter()
    if args.worker == "peftc":
        from peftc.passes import insertion_pipeline

        from peftc.config import LoraConfig
        from peftc.program import capture
        from peftc.training.loop import training_loss
        from peftc.training.precision import adapter_to_float32

        prog = capture(model, "causal-lm", mode="train")
        cfg = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=targets, task_type="CAUSAL_LM")
        insertion_pipeline(cfg)(prog)
        prog.graph_module.to(device)
        params = prog.parameters(trainable=True)
        adapter_to_float32(params)
        loss_of = training_loss(prog, gradient_checkpointing=args.gradient_checkpointing, compile=args.compile,
                                fuse_head=not args.unfused_head)  # fmt: skip
    else:
        import peft

        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        pm = peft.get_peft_model(
            model,
            peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=targets, task_type="CAUSAL_LM"),
        )
        pm.train()
        pm.to(device)
        params = [p for p in pm.parameters() if p.requires_grad]
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
        call = torch.compile(pm) if args.compile else pm

        def loss_of(batch):
            return task.loss(call(**inputs, use_cache=False).logits, batch)

    setup_s = time.perf_counter() - t0
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> float:
        with amp.autocast():
            loss = loss_of(batch)
        loss.backward()
        dist.all_reduce_grads(params)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return float(loss)

    cuda = device.type == "cuda"
    rss_before = proc_status_mb("VmRSS")
    peak_reset = _reset_peak()
    t_warm = time.perf_counter()
    losses = [step() for _ in range(args.warmup)]
    warmup_s = time.perf_counter() - t_warm
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        dist.barrier()
        t = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t)
    if cuda:
        train_peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        train_peak = proc_status_mb("VmHWM") - rss_before if peak_reset else None
    out = {
        "trainable": sum(p.numel() for p in params),
        "setup_s": setup_s,
        "warmup_s": warmup_s,
        "tokens_per_s": args.batch * args.seq / statistics.median(times),
        "peak_rss_mb": proc_status_mb("VmHWM"),
        "train_peak_mb": train_peak,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "device": str(device) if not cuda else torch.cuda.get_device_name(device),
    }
    dist.close()
    return out if dist.is_main else {}


def _run(args: argparse.Namespace, impl: str, name: str, extra: list[str], nproc: int = 1) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    threads = max(1, args.threads // nproc)
    cmd = [__file__, "--worker", impl, "--shape", args.shape, "--batch", str(args.batch), "--seq", str(args.seq),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(threads), *extra]  # fmt: skip
    if nproc > 1:
        env["OMP_NUM_THREADS"] = str(threads)
        cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *cmd]
    proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT {") and x != "RESULT {}"]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{name} worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"name": name, "impl": impl, **json.loads(lines[-1][len("RESULT ") :])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="gpt2", help="model shape (random init)")
    parser.add_argument("--batch", type=int, default=4, help="global batch (examples per step)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per example")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (compilation happens there)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration, alternating; the best counts")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads in all")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile of both")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="also measure activation recompute")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: also measure bf16")
    parser.add_argument(
        "--unfused-head",
        action="store_true",
        help="also measure peftc with its LM head outside the loss (what the fused head saves)",
    )
    parser.add_argument("--nproc", type=int, default=1, help="N > 1: also measure peftc data parallel on N processes")
    parser.add_argument("--worker", choices=["peftc", "peft"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(_worker(args)), flush=True)
        return

    plan: list[tuple[str, str, list[str], int]] = []
    variants = [("eager fp32", [])]
    if args.compile:
        variants.append(("compiled fp32", ["--compile"]))
    if args.gradient_checkpointing:
        variants.append(("grad-ckpt fp32", ["--gradient-checkpointing"]))
    if args.precision == "bf16":
        variants.append(("eager bf16", ["--precision", "bf16"]))
        if args.compile:
            variants.append(("compiled bf16", ["--precision", "bf16", "--compile"]))
    for label, extra in variants:
        plan += [("peft", label, extra, 1), ("peftc", label, extra, 1)]
    if args.unfused_head:
        plan.append(("peftc", "unfused-head fp32", ["--unfused-head"], 1))
    if args.nproc > 1:
        plan.append(("peftc", f"DDP x{args.nproc} fp32", [], args.nproc))
    best: dict[tuple[str, str], dict] = {}
    for rep in range(args.repeats):
        for impl, label, extra, nproc in plan if rep % 2 == 0 else plan[::-1]:
            r = _run(args, impl, label, extra, nproc)
            key = (impl, label)
            if key not in best or r["tokens_per_s"] > best[key]["tokens_per_s"]:
                best[key] = r

    device = next(iter(best.values()))["device"]
    print(f"{args.shape} (random init), LoRA r={R}, global batch {args.batch} x {args.seq}, {device}, "
          f"{args.threads} threads, {args.warmup} warmup + {args.steps} timed steps, each configuration in a fresh "
          f"process, best of {args.repeats}")  # fmt: skip
    print(f"{'configuration':18} {'impl':6} {'setup s':>8} {'warmup s':>9} {'tokens/s':>9} {'vs peft':>8} "
          f"{'train peak MiB':>15} {'vs peft':>8} {'loss first->last':>18}")  # fmt: skip
    for (impl, label), r in best.items():
        ref = best.get(("peft", label), best[("peft", "eager fp32")])  # unfused head, DDP: vs HF PEFT eager
        speed = r["tokens_per_s"] / ref["tokens_per_s"]
        mem = r["train_peak_mb"] / ref["train_peak_mb"] if r["train_peak_mb"] and ref["train_peak_mb"] else math.nan
        peak = f"{r['train_peak_mb']:.0f}" if r["train_peak_mb"] is not None else "n/a"
        print(f"{label:18} {impl:6} {r['setup_s']:>8.1f} {r['warmup_s']:>9.1f} {r['tokens_per_s']:>9.1f} "
              f"{speed:>7.2f}x {peak:>15} {mem:>7.2f}x {r['loss_first']:>8.4f}->{r['loss_last']:.4f}")  # fmt: skip
    print(
        "vs peft = / HF PEFT in the same configuration (DDP: / HF PEFT eager fp32 on one process); train peak = "
        "CUDA allocator peak, or on the CPU VmHWM minus RSS before the first step (what training adds)"
    )
    eager_peft, eager = best[("peft", "eager fp32")], best[("peftc", "eager fp32")]
    if args.gradient_checkpointing:
        ckpt = best[("peftc", "grad-ckpt fp32")]
        print(f"grad_ckpt_peak_memory_ratio_vs_peft_without={ckpt['train_peak_mb'] / eager_peft['train_peak_mb']:.3f}")
    if args.nproc > 1:
        ddp = best[("peftc", f"DDP x{args.nproc} fp32")]
        print(f"ddp_scaling_vs_one_process={ddp['tokens_per_s'] / eager['tokens_per_s']:.3f}")
    compiled = best.get(("peftc", "compiled fp32"))
    ratio_c = compiled["tokens_per_s"] / eager_peft["tokens_per_s"] if compiled else math.nan
    print(f"compiled_train_throughput_ratio_vs_peft={ratio_c:.3f}")
    print(f"peak_memory_ratio_vs_peft={eager['train_peak_mb'] / eager_peft['train_peak_mb']:.3f}")
    print(f"train_throughput_ratio_vs_peft={eager['tokens_per_s'] / eager_peft['tokens_per_s']:.3f}")


if __name__ == "__main__":
    main()
