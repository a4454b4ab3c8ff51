"""Peak memory and wall time of a merged KV-cache ONNX export, per model size, peftc vs optimum.

Each size is a GPT-2 or LLaMA shape built here from its config (random init, seed 0; nothing is
downloaded) and saved with ``save_pretrained`` (safetensors) in ``--dtype``, with an HF PEFT LoRA
adapter (r=8 on the attention projections, lora_B random and non-zero) saved beside it. Then, each
in its own subprocess, so that one's peak is not the other's:

- **peftc**: ``peftc export ADAPTER --model BASE --merge --dtype D`` (ONNX, KV-cache graph, verified
  with ONNX Runtime against the unmerged torch program);
- **optimum**: HF PEFT ``merge_and_unload`` of the same adapter, ``save_pretrained``, then
  ``optimum.exporters.onnx.main_export(task="text-generation-with-past")`` on the merged model
  (what ``optimum-cli export onnx`` runs), with optimum's own validation — timed from loading the
  base, the merge included.

Peak RSS is the child's ``ru_maxrss`` (``os.wait4``; models are built in children too, so that
this process stays small: a child's ``ru_maxrss`` starts at its parent's peak), wall time the
child's, CPU time its user + system seconds (``ru_utime + ru_stime``: the work done, which a loaded
machine stretches less than the wall time; both tools run single-threaded BLAS alike only if
``OMP_NUM_THREADS`` says so). "weights" is the artifact's model files (``model.onnx`` +
``model.onnx.data``): what a deployment loads. The table gives peak RSS, its ratio to the weights,
the excess over 2× the weights (the fixed overhead), the time, and the per-layer time (the slope
between sizes of the same width that differ only in depth).
"torch GB" is peftc's peak before its verification (the ``memory after <stage>`` lines that
``peftc --debug`` logs); with two sizes or more, a least-squares line ``peak = a x weights + b``
through peftc's peaks says what a bigger model would take. The last line is
``export_peak_rss_ratio_to_weights=<x>`` for the largest size (peftc).

    python bench/export_memory.py                              # gpt2-124m-l2, gpt2-124m, llama-270m
    python bench/export_memory.py --sizes gpt2-355m llama-1b --no-optimum
    python bench/export_memory.py --sizes llama-3b --no-optimum --dtype float16 --atol 0.05   # 6.9 GB of weights
    python bench/export_memory.py --list
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Size:
    family: str  # gpt2 | llama
    layers: int
    hidden: int
    heads: int
    kv_heads: int = 0  # llama: grouped-query heads
    intermediate: int = 0  # llama MLP width
    vocab: int = 50257

    def config(self, dtype: str):
        import torch

        torch_dtype = getattr(torch, dtype)
        if self.family == "gpt2":
            from transformers import GPT2Config

            return GPT2Config(
                n_layer=self.layers, n_embd=self.hidden, n_head=self.heads, vocab_size=self.vocab,
                n_positions=1024, torch_dtype=torch_dtype,
            )  # fmt: skip
        from transformers import LlamaConfig

        return LlamaConfig(
            num_hidden_layers=self.layers, hidden_size=self.hidden, num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads or self.heads, intermediate_size=self.intermediate,
            vocab_size=self.vocab, max_position_embeddings=2048, tie_word_embeddings=False, torch_dtype=torch_dtype,
        )  # fmt: skip

    @property
    def targets(self) -> list[str]:
        return ["c_attn"] if self.family == "gpt2" else ["q_proj", "v_proj"]


SIZES = {
    "gpt2-124m-l2": Size("gpt2", 2, 768, 12),  # GPT-2 small's width, 2 blocks: the per-layer slope's base
    "gpt2-124m": Size("gpt2", 12, 768, 12),
    "gpt2-355m": Size("gpt2", 24, 1024, 16),
    "gpt2-774m": Size("gpt2", 36, 1280, 20),
    "llama-270m-l2": Size("llama", 2, 1024, 16, 4, 2816, 32000),
    "llama-270m": Size("llama", 16, 1024, 16, 4, 2816, 32000),
    "llama-1b": Size("llama", 22, 2048, 32, 4, 5632, 32000),  # TinyLlama-1.1B's shape
    "llama-3b": Size("llama", 26, 3200, 32, 32, 8640, 32000),  # open_llama_3b's shape (3.4 B parameters)
    "llama-7b": Size("llama", 32, 4096, 32, 32, 11008, 32000),  # LLaMA-2-7B's shape: 13.5 GB in float16
}
DEFAULT_SIZES = ["gpt2-124m-l2", "gpt2-124m", "llama-270m"]


def build(name: str, dtype: str, root: Path) -> tuple[Path, Path]:
    """Base model and HF PEFT LoRA adapter directories for ``name`` (reused when already built).

    Built in a process of its own: a child's ``ru_maxrss`` starts at its parent's peak (Linux carries
    the replaced memory's high-water mark across ``exec``), so this process must never hold a model.
    """
    base, adapter = root / f"{name}-{dtype}" / "base", root / f"{name}-{dtype}" / "adapter"
    if not (adapter / "adapter_model.safetensors").is_file():
        cmd = [sys.executable, __file__, "--build", name, "--dtype", dtype, "--workdir", str(root)]
        subprocess.run(cmd, check=True)
    return base, adapter


def _build(name: str, size: Size, dtype: str, root: Path) -> None:
    import peft
    import torch
    from _common import perturb_lora_b  # bench/ is on sys.path (the script's folder)
    from transformers import AutoModelForCausalLM

    base, adapter = root / f"{name}-{dtype}" / "base", root / f"{name}-{dtype}" / "adapter"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(size.config(dtype), torch_dtype=getattr(torch, dtype))
    model.save_pretrained(base, safe_serialization=True)
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=size.targets, task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(model, lora)
    perturb_lora_b(peft_model)  # non-identity: the merge must change the weights
    peft_model.save_pretrained(adapter, safe_serialization=True)
    (adapter / "adapter_config.json").write_text(
        json.dumps({**json.loads((adapter / "adapter_config.json").read_text()), "base_model_name_or_path": str(base)})
    )


_OPTIMUM = """
import sys, torch, peft
from transformers import AutoModelForCausalLM
from optimum.exporters.onnx import main_export
base, adapter, merged, out, dtype = sys.argv[1:6]
model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=getattr(torch, dtype))
model = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(merged, safe_serialization=True)
del model
main_export(merged, out, task="text-generation-with-past", device="cpu",
            dtype="fp16" if dtype == "float16" else None, do_validation=True)
"""


def run(cmd: list[str], log: Path) -> tuple[float, float, int, int]:
    """``(wall seconds, CPU seconds, peak RSS bytes, exit code)`` of ``cmd`` run to completion, output to ``log``."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    with log.open("w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, proc.returncode


def weight_bytes(directory: Path) -> int:
    """Bytes of the ONNX model files (graph + external data) in an artifact directory."""
    return sum(p.stat().st_size for p in directory.iterdir() if p.name.startswith("model.onnx"))


def stage_memory(log: Path) -> dict[str, tuple[float, float]]:
    """Stage -> (RSS, peak RSS) in GB after it, from the ``memory after …`` lines ``peftc --debug`` logs."""
    found = re.findall(r"memory after (.+?): rss (\d+) MB, peak (\d+) MB", log.read_text(errors="replace"))
    return {stage: (int(rss) / 1e3, int(peak) / 1e3) for stage, rss, peak in found}


def fit(rows: list[dict]) -> tuple[float, float] | None:
    """Least-squares ``peak = a * weights + b`` (bytes) over rows of different weights; None with fewer than 2."""
    if len({r["weights"] for r in rows}) < 2:
        return None
    xs, ys = [r["weights"] for r in rows], [r["peak"] for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    a = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return a, my - a * mx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, choices=sorted(SIZES), metavar="SIZE")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--no-optimum", action="store_true", help="measure peftc only")
    parser.add_argument("--atol", type=float, default=None, help="peftc's --atol (its default for the dtype)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep models and artifacts here (reused)")
    parser.add_argument("--list", action="store_true", help="list the sizes and exit")
    parser.add_argument("--build", choices=sorted(SIZES), help=argparse.SUPPRESS)  # build() runs this in a child
    args = parser.parse_args()
    if args.build:
        return _build(args.build, SIZES[args.build], args.dtype, args.workdir)
    if args.list:
        for name, s in SIZES.items():
            print(f"{name:14s} {s}")
        return

    root = args.workdir or Path(tempfile.mkdtemp(prefix="peftc-export-memory-"))
    root.mkdir(parents=True, exist_ok=True)
    peftc = [str(Path(sys.executable).with_name("peftc"))]
    rows = []
    try:
        for name in args.sizes:
            size = SIZES[name]
            base, adapter = build(name, args.dtype, root)
            work = root / f"{name}-{args.dtype}"
            tools = [("peftc", None)] + ([] if args.no_optimum else [("optimum", None)])
            for tool, _ in tools:
                out = work / f"export-{tool}"
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(work / "merged", ignore_errors=True)
                if tool == "peftc":
                    cmd = [*peftc, "--debug", "export", str(adapter), "--model", str(base), "--merge", "--force"]
                    cmd += ["--dtype", args.dtype, "--out", str(out)]
                    cmd += [] if args.atol is None else ["--atol", str(args.atol)]
                else:
                    cmd = [sys.executable, "-c", _OPTIMUM, str(base), str(adapter), str(work / "merged"), str(out)]
                    cmd += [args.dtype]
                wall, cpu, peak, rc = run(cmd, work / f"{tool}.log")
                if rc != 0:
                    print(f"{name} {tool}: exit code {rc}; see {work / f'{tool}.log'}", file=sys.stderr)
                    continue
                weights = weight_bytes(out)
                stages, memory = {}, {}
                if tool == "peftc":
                    stages = json.loads((out / "report.json").read_text()).get("timings", {})
                    memory = stage_memory(work / f"{tool}.log")
                # the peak before verification: the torch stages' (the last stage logged before "verify")
                torch_peak = max((m[1] for k, m in memory.items() if k != "verify"), default=None)
                rows.append(dict(size=name, tool=tool, layers=size.layers, hidden=size.hidden, weights=weights,
                                 peak=peak, wall=wall, cpu=cpu, stages=stages, torch_peak=torch_peak))  # fmt: skip
                print(
                    f"{name} {tool}: {wall:.1f} s (CPU {cpu:.1f} s), peak {peak / 1e9:.2f} GB, "
                    f"weights {weights / 1e9:.2f} GB"
                    + (f", stages {json.dumps({k: round(v, 1) for k, v in stages.items()})}" if stages else "")
                    + (f", rss/peak GB after {json.dumps(memory)}" if memory else ""),
                    flush=True,
                )
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)

    print()
    print(f"{'size':14s} {'tool':8s} {'layers':>6s} {'weights GB':>10s} {'peak GB':>8s} {'ratio':>6s} "
          f"{'over 2x GB':>10s} {'torch GB':>8s} {'time s':>7s} {'s/layer':>8s} "
          f"{'CPU s':>7s} {'CPU s/layer':>11s}")  # fmt: skip
    for r in rows:
        same_width = [q for q in rows if q["tool"] == r["tool"] and q["hidden"] == r["hidden"]
                      and q["size"].split("-")[0] == r["size"].split("-")[0] and q["layers"] < r["layers"]]  # fmt: skip
        slope = cpu_slope = ""
        if same_width:
            q = max(same_width, key=lambda q: q["layers"])
            slope = f"{(r['wall'] - q['wall']) / (r['layers'] - q['layers']):.2f}"
            cpu_slope = f"{(r['cpu'] - q['cpu']) / (r['layers'] - q['layers']):.2f}"
        torch_peak = "" if r["torch_peak"] is None else f"{r['torch_peak']:.2f}"
        print(
            f"{r['size']:14s} {r['tool']:8s} {r['layers']:6d} {r['weights'] / 1e9:10.3f} {r['peak'] / 1e9:8.2f} "
            f"{r['peak'] / r['weights']:6.2f} {(r['peak'] - 2 * r['weights']) / 1e9:10.2f} "
            f"{torch_peak:>8s} {r['wall']:7.1f} {slope:>8s} {r['cpu']:7.1f} {cpu_slope:>11s}"
        )
    for size in dict.fromkeys(r["size"] for r in rows):
        pair = {r["tool"]: r for r in rows if r["size"] == size}
        if len(pair) == 2:
            print(f"{size}: peftc/optimum time {pair['peftc']['wall'] / pair['optimum']['wall']:.2f}x, "
                  f"CPU {pair['peftc']['cpu'] / pair['optimum']['cpu']:.2f}x, "
                  f"peak {pair['peftc']['peak'] / pair['optimum']['peak']:.2f}x")  # fmt: skip
    peftc_rows = [r for r in rows if r["tool"] == "peftc"]
    line = fit(peftc_rows)
    if line is not None:
        a, b = line
        print(f"peftc fit over {len(peftc_rows)} sizes: peak = {a:.2f} x weights + {b / 1e9:.2f} GB")
    if peftc_rows:
        largest = max(peftc_rows, key=lambda r: r["weights"])
        print(f"export_peak_rss_ratio_to_weights={largest['peak'] / largest['weights']:.2f}")
    else:
        sys.exit("no peftc export succeeded")


if __name__ == "__main__":
    main()
