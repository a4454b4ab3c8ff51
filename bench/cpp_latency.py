"""TorchScript and AOTInductor exports of a merged LoRA GPT-2: export/compile time and latency vs eager torch.

The model is a GPT-2 with ``--layers`` blocks of width ``--hidden`` (random init, seed 0; the
defaults are the test suite's tiny GPT-2). A LoRA adapter (r=4 on c_attn and c_proj, B perturbed so
it is not the identity) is made with HF PEFT, bound into a peftc eval program and merged, then
exported with :func:`peftc.exporters.torchscript.export_program_torchscript` (``model.pt``) and
:func:`peftc.exporters.aoti.export_program_aoti` (``model.pt2``). The eager reference is the HF model
with the same adapter merged by HF PEFT (``merge_and_unload``) under ``torch.inference_mode``.

Python latencies are medians of ``--runs`` runs after ``--warmup``, the runtimes interleaved so that
other load on a shared machine slows all alike; every runtime uses ``--threads`` intra-op threads.
With ``--binary`` (examples/cpp built), ``peftc_run --bench`` times the same files from C++.

    python bench/cpp_latency.py --runs 50 --binary build/cpp/peftc_run
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from _common import perturb_lora_b  # bench/ is on sys.path (the script's folder)
from timing import interleaved_medians  # bench/timing.py (the script's folder is on sys.path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--binary", type=Path, default=None, help="examples/cpp's peftc_run, for C++ timings")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import peft
    from peftc.exporters.aoti import export_program_aoti, load_aoti
    from peftc.exporters.torchscript import export_program_torchscript
    from peftc.passes import insertion_pipeline, merge_pipeline
    from transformers import GPT2Config, GPT2LMHeadModel

    from peftc.adapters import AdapterState
    from peftc.program import capture

    def gpt2() -> GPT2LMHeadModel:
        torch.manual_seed(0)
        heads = max(1, args.hidden // 64)
        cfg = GPT2Config(n_layer=args.layers, n_embd=args.hidden, n_head=heads, vocab_size=128, n_positions=256)
        return GPT2LMHeadModel(cfg).eval()

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(gpt2(), config).eval()
    perturb_lora_b(peft_model, scale=0.1)
    out = Path(tempfile.mkdtemp(prefix="peftc-cpp-bench-"))
    peft_model.save_pretrained(out / "adapter")
    eager = peft_model.merge_and_unload().eval()

    program = capture(gpt2(), "causal-lm", mode="eval")
    state = AdapterState.load(out / "adapter")
    insertion_pipeline(state.config, state)(program)
    merge_pipeline()(program)

    tick = time.perf_counter()
    pt = export_program_torchscript(program, out / "model.pt")
    ts_s = time.perf_counter() - tick
    tick = time.perf_counter()
    pt2 = export_program_aoti(program, out / "model.pt2")
    aoti_s = time.perf_counter() - tick
    print(f"model: GPT-2 layers={args.layers} hidden={args.hidden}; threads={args.threads}; seq={args.seq}")
    print(f"export_s torchscript={ts_s:.2f} aoti={aoti_s:.1f} (torch.export + Inductor codegen + g++)")

    scripted = torch.jit.load(str(pt)).eval()
    packaged = load_aoti(pt2)
    for batch in args.batches:
        gen = torch.Generator().manual_seed(batch)
        ids = torch.randint(1, 128, (batch, args.seq), generator=gen)
        mask = torch.ones_like(ids)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            want = eager(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            diffs = {
                "torchscript": (scripted(ids, mask, pos) - want).abs().max().item(),
                "aoti": (packaged(ids, mask, pos) - want).abs().max().item(),
            }
            medians = interleaved_medians(
                {
                    "eager": lambda: eager(input_ids=ids, attention_mask=mask, position_ids=pos),  # noqa: B023
                    "program": lambda: program(ids, mask, pos),  # noqa: B023
                    "torchscript": lambda: scripted(ids, mask, pos),  # noqa: B023
                    "aoti": lambda: packaged(ids, mask, pos),  # noqa: B023
                },
                args.warmup,
                args.runs,
            )
        line = " ".join(f"{k}={v:.3f}" for k, v in medians.items())
        ratios = " ".join(f"{k}/eager={v / medians['eager']:.2f}" for k, v in medians.items() if k != "eager")
        print(f"batch={batch} python_ms {line} | {ratios} | max_diff_vs_eager {diffs}")
        if args.binary:
            row = ",".join(str(t) for t in ids[0].tolist())
            rows = ";".join([row] * batch) if batch > 1 else row
            for label, path in (("torchscript", pt), ("aoti", pt2)):
                done = subprocess.run(
                    [str(args.binary), str(path), "--ids", rows, "--threads", str(args.threads), "--bench",
                     str(args.runs)],
                    capture_output=True, text=True, check=True,
                )  # fmt: skip
                print(f"batch={batch} cpp_{label} {done.stderr.strip().splitlines()[-1]}")


if __name__ == "__main__":
    main()
