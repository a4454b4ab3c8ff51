"""Quantized exports (``--quantize int8|int4``) vs float32: file size, prefill/decode latency, quality.

GPT-2 part: a GPT-2-small-shaped model (hidden 768, 12 heads, vocab 50257, random init, seed 0) with
``--layers`` blocks and a LoRA adapter (r=8 on ``c_attn``, B perturbed) saved by HF PEFT, exported by
``peftc.export`` merged as a KV-cache graph three times: float32, int8 and int4 (block 32). Each file
runs under ONNX Runtime (CPU, graph optimisation ALL, ``--threads`` intra-op threads): a prefill
(batch 1, ``--seq`` tokens, empty cache) and a decode step (batch 1, one token on a ``--seq``-token
cache), medians of ``--runs`` interleaved runs. Sizes are the model files' bytes; quality figures
are the export's own (``report.json``: top-1 agreement and mean KL of next-token distributions vs
the float torch program on the held-out cases) — on a *random* model, whose distributions are near
uniform, so read them as an upper bound of the damage, not as a language model's.

ExecuTorch part (``--executorch``, needs the ``edge`` extra): the same adapter exported with
``--format executorch --with-past`` (the LLM-runner layout: the KV cache in the program) in float32,
int8 and int4 (torchao's PT2E flow with ExecuTorch's XNNPACKQuantizer, per-channel weights, dynamic
int8 activations); sizes, the export's quality figures, and a prefill of ``--seq`` tokens and a
decode step in ExecuTorch's runtime (XNNPACK), medians of ``--runs`` interleaved runs.

MiniLM part (``--minilm RUN_DIR``, a ``peftc train`` run of the default preset): the same three
exports of the trained classifier, and their accuracy on ``examples/data/sentiment_eval.jsonl``
under ONNX Runtime, with label agreement vs float32.

The last line printed is ``int4_decode_latency_ratio_vs_fp32=<x>`` (below 1: int4 is faster).

    python bench/quantize.py --layers 4 --runs 10 [--minilm peftc-run] [--executorch]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from _common import perturb_lora_b  # bench/ is on sys.path (the script's folder)
from timing import interleaved_medians  # bench/timing.py (the script's folder is on sys.path)

SCHEMES = ("fp32", "int8", "int4")


def _gpt2(root: Path, layers: int) -> tuple[Path, Path]:
    """Base model directory and an HF PEFT adapter directory (saved by HF PEFT)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=layers, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257)
    GPT2LMHeadModel(cfg).save_pretrained(root / "base")
    model = get_peft_model(
        GPT2LMHeadModel.from_pretrained(root / "base"),
        LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM"),
    )
    perturb_lora_b(model)
    model.save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


def _exports(src: Path, model: Path | None, root: Path, **options) -> dict[str, Path]:
    from peftc.exporting import export

    gate = {"quantize_min_top1": 0.0, "quantize_max_kl": float("inf")}  # measure, do not gate
    return {
        s: export(
            src,
            model=model,
            merge=True,
            out=root / s,
            force=True,
            **options,
            **({"quantize": s, **gate} if s != "fp32" else {}),
        )  # fmt: skip
        for s in SCHEMES
    }


def _size(artifact: Path) -> int:
    return sum(f.stat().st_size for f in artifact.glob("model.onnx*")) + sum(
        f.stat().st_size for f in artifact.glob("model.pt[ed]")
    )


def _quality(artifact: Path) -> str:
    q = json.loads((artifact / "report.json").read_text()).get("quantization")
    return "" if q is None else f"; top-1 {q['top1_agreement']:.3f}, mean KL {q['mean_kl']:.2e}"


def _session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _kv_feeds(session, seq: int, past: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = rng.standard_normal((1, i.shape[1], past, i.shape[3])).astype(np.float32)
        elif i.name == "input_ids":
            feeds[i.name] = rng.integers(0, 50257, (1, seq))
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((1, past + seq), np.int64)
        elif i.name == "position_ids":
            feeds[i.name] = np.arange(past, past + seq)[None]
    return feeds


def gpt2_part(args, root: Path) -> float:
    base, adapter = _gpt2(root, args.layers)
    arts = _exports(adapter, base, root)
    sizes = {s: _size(a) for s, a in arts.items()}
    print(f"GPT-2-small shape, {args.layers} layers, LoRA r=8 merged, KV-cache graph")
    for s in SCHEMES:
        print(f"  {s}: {sizes[s] / 1e6:.1f} MB ({sizes[s] / sizes['fp32']:.3f}x fp32){_quality(arts[s])}")
    sessions = {s: _session(arts[s] / "model.onnx", args.threads) for s in SCHEMES}
    ratios = {}
    for phase, seq, past in (("prefill", args.seq, 0), ("decode", 1, args.seq)):
        feeds = _kv_feeds(sessions["fp32"], seq, past)
        medians = interleaved_medians(
            {s: (lambda sess=sessions[s], f=feeds: sess.run(["logits"], f)) for s in SCHEMES}, args.warmup, args.runs
        )
        line = ", ".join(f"{s} {medians[s]:.1f} ms" for s in SCHEMES)
        ratio = {s: medians[s] / medians["fp32"] for s in SCHEMES[1:]}
        print(
            f"  {phase} (batch 1, {seq} new tokens, past {past}): {line}; "
            f"ratio int8 {ratio['int8']:.3f}, int4 {ratio['int4']:.3f}"
        )
        ratios[phase] = ratio
    print(f"int4_size_ratio_vs_fp32={sizes['int4'] / sizes['fp32']:.3f}")
    print(f"int8_size_ratio_vs_fp32={sizes['int8'] / sizes['fp32']:.3f}")
    print(f"int4_prefill_latency_ratio_vs_fp32={ratios['prefill']['int4']:.3f}")
    return ratios["decode"]["int4"]


def executorch_part(args, root: Path) -> None:
    from executorch.runtime import Runtime

    base, adapter = _gpt2(root, args.layers)
    arts = _exports(adapter, base, root / "executorch", format="executorch", with_past=True)
    sizes = {s: _size(a) for s, a in arts.items()}
    print(f"ExecuTorch (XNNPACK), LLM-runner layout, GPT-2-small shape, {args.layers} layers, LoRA r=8 merged")
    for s in SCHEMES:
        print(f"  {s}: {sizes[s] / 1e6:.1f} MB ({sizes[s] / sizes['fp32']:.3f}x fp32){_quality(arts[s])}")
    methods = {s: Runtime.get().load_program(a / "model.pte").load_method("forward") for s, a in arts.items()}
    tokens = torch.randint(0, 50257, (1, args.seq + 1), generator=torch.Generator().manual_seed(0))
    prefill = [tokens[:, : args.seq], torch.arange(args.seq)]
    decode = [tokens[:, args.seq :], torch.tensor([args.seq])]
    for phase, inputs in (("prefill", prefill), ("decode", decode)):
        medians = interleaved_medians(
            {s: (lambda m=methods[s], x=inputs: m.execute(x)) for s in SCHEMES}, args.warmup, args.runs
        )
        line = ", ".join(f"{s} {medians[s]:.1f} ms" for s in SCHEMES)
        ratio = {s: medians[s] / medians["fp32"] for s in SCHEMES[1:]}
        print(
            f"  {phase} ({inputs[0].shape[1]} tokens): {line}; ratio int8 {ratio['int8']:.3f}, int4 {ratio['int4']:.3f}"
        )
    print(f"executorch_int4_size_ratio_vs_fp32={sizes['int4'] / sizes['fp32']:.3f}")


def minilm_part(run: Path, root: Path) -> None:
    from transformers import AutoTokenizer

    arts = _exports(run, None, root / "minilm")
    rows = [json.loads(line) for line in Path("examples/data/sentiment_eval.jsonl").read_text().splitlines() if line]
    tokenizer = AutoTokenizer.from_pretrained(arts["fp32"])
    config = json.loads((arts["fp32"] / "config.json").read_text())
    label2id = {v: int(k) for k, v in config["id2label"].items()}
    gold = np.array([label2id[r["label"]] for r in rows])
    enc = tokenizer([r["text"] for r in rows], padding=True, truncation=True, max_length=128, return_tensors="np")
    predictions = {}
    print(f"MiniLM ({run}), {len(rows)} eval texts")
    for s in SCHEMES:
        session = _session(arts[s] / "model.onnx", 1)
        feeds = {i.name: enc[i.name].astype(np.int64) for i in session.get_inputs()}
        predictions[s] = session.run(["logits"], feeds)[0].argmax(-1)
        q = json.loads((arts[s] / "report.json").read_text()).get("quantization")
        extra = "" if q is None else f", held-out label agreement {q['top1_agreement']:.3f}, mean KL {q['mean_kl']:.2e}"
        print(
            f"  {s}: {_size(arts[s]) / 1e6:.1f} MB, accuracy {(predictions[s] == gold).mean():.4f}, "
            f"agreement with fp32 {(predictions[s] == predictions['fp32']).mean():.4f}{extra}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--minilm", type=Path, help="a peftc train run of the MiniLM default: eval accuracy too")
    parser.add_argument("--executorch", action="store_true", help="ExecuTorch int8/int4 too (the edge extra)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        if args.minilm is not None:
            minilm_part(args.minilm, Path(tmp))
        if args.executorch:
            executorch_part(args, Path(tmp))
        decode = gpt2_part(args, Path(tmp))
    print(f"int4_decode_latency_ratio_vs_fp32={decode:.3f}")


if __name__ == "__main__":
    main()
