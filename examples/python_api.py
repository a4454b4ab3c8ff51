"""The whole peftc path from Python: capture, LoRA passes, train, save, merge, export, inspect, generate.

Runs in about a minute on 2 CPU cores with the tiny GPT-2 preset:

    python examples/python_api.py /tmp/peftc-example
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from peftc.passes import LoraPass, insertion_pipeline, merge_pipeline

import peftc
from peftc.config import LoraConfig
from peftc.inspect import render


def main(workdir: str) -> None:
    work = Path(workdir)

    # 1. Low level: capture a model and look at what a LoRA pass would change (dry run).
    loaded = peftc.load_model("tiny-gpt2", "causal-lm")
    program = peftc.capture(loaded.model, "causal-lm", mode="eval")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], task_type="CAUSAL_LM")
    for decision in LoraPass(config).plan(program):
        print(f"{decision.action:8s} {decision.name} {decision.reason}")

    # 2. Insert, run, merge: the merged program computes the same logits with the base graph's ops.
    insertion_pipeline(config)(program)
    with torch.no_grad():
        for b in program.adapter.tensors.values():
            b.add_(0.01)  # move away from the identity init so the comparison means something
        inputs = program.example_inputs
        adapted = program(*inputs)
        merge_pipeline()(program)
        merged = program(*inputs)
    print(f"merged vs adapted: max abs diff {(adapted - merged).abs().max().item():.2e}")

    # 3. High level: the same calls the CLI makes.
    run = peftc.train(
        peftc.TrainConfig(model="tiny-gpt2", max_steps=30, out=str(work / "run"), force=True, progress=False)
    )
    artifact = peftc.export(str(run.run_dir), format="onnx", merge=True, force=True)
    print(render(peftc.inspect_path(artifact)))

    # 4. Run the artifact with no peftc code: a causal LM's export is a KV-cache graph that
    #    optimum's ORTModelForCausalLM generates with (the tokenizer files are in the artifact too).
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    model = ORTModelForCausalLM.from_pretrained(artifact)
    tokenizer = AutoTokenizer.from_pretrained(artifact)
    prompt = tokenizer(["the movie was"], return_tensors="pt")  # a causal tokenizer: no token types, no [CLS]
    tokens = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    print("generated:", tokenizer.decode(tokens[0]))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "peftc-example")
