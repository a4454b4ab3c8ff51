"""Model building, inputs and helpers shared by the latency benchmarks (export_latency, executorch_latency,
swap_latency, mixed_batch, generate_with_past, seq2seq_cache).

Each benchmark times a merged LoRA GPT-2 export against eager torch: the program is built with
peftc (capture, LoRA r on ``c_attn`` with B perturbed so it is not the identity, merge) and the
eager reference is the HF model with the same adapter merged by HF PEFT (``merge_and_unload``).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = [
    "geomean",
    "greedy_medians",
    "load_line",
    "lora_program",
    "merged_lora_gpt2",
    "ort_session",
    "perturb_lora_b",
    "token_inputs",
]


def perturb_lora_b(peft_model: torch.nn.Module, scale: float = 0.02, seed: int = 1) -> None:
    """Draw every HF PEFT ``lora_B`` (zero at init) from N(0, scale²), seeded: the adapter is not the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_((torch.randn(param.shape, generator=gen) * scale).to(param.dtype))


def merged_lora_gpt2(cfg: Any, rank: int, b_scale: float) -> tuple[Any, torch.nn.Module]:
    """(peftc merged program, HF model with the same adapter merged by HF PEFT) for GPT-2 config ``cfg``."""
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
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * b_scale)
    adapter = program.adapter.state_dict()
    merge_pipeline()(program)

    eager = GPT2LMHeadModel(cfg)
    eager.load_state_dict(state)
    peft_model = peft.get_peft_model(
        eager, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["c_attn"], fan_in_fan_out=True)
    )
    set_peft_model_state_dict(peft_model, adapter)
    return program, peft_model.merge_and_unload().eval()


def token_inputs(
    eager: torch.nn.Module, batch: int, seq: int, vocab: int, gen: torch.Generator, low: int = 0
) -> tuple[list[torch.Tensor], dict[str, Any], Callable[[], torch.Tensor]]:
    """``[input_ids, attention_mask, position_ids]``, the same as ONNX Runtime feeds, and the eager run on them."""
    ids = torch.randint(low, vocab, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()}

    def run_eager() -> torch.Tensor:
        with torch.no_grad():
            return eager(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits

    return [ids, mask, pos], feeds, run_eager


def ort_session(path: Any, threads: int, level: str = "all") -> Any:
    """An ONNX Runtime CPU session: ``threads`` intra-op threads, sequential, graph optimisation ``level``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    }[level]
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def load_line() -> str | None:
    """``load average before timing: …``: other load on the machine skews absolute figures (ratios less so)."""
    if not hasattr(os, "getloadavg"):
        return None
    return f"load average before timing: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"


def geomean(xs: Sequence[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def lora_program(model: torch.nn.Module, rank: int, seed: int, past: bool = False) -> Any:
    """An eval program of a GPT-2 ``model`` (a KV-cache graph with ``past``) with a non-identity LoRA on c_attn.

    LoRA r=``rank``, alpha 2·rank; every B drawn from N(0, 0.02²) with ``seed`` so the adapter is not the identity.
    """
    from peftc.passes import insertion_pipeline

    from peftc.config import LoraConfig
    from peftc.exporting.kv import with_past
    from peftc.program import capture

    program = capture(model, "causal-lm", mode="eval", transform=with_past() if past else None)
    insertion_pipeline(LoraConfig(r=rank, lora_alpha=2 * rank, task_type="CAUSAL_LM"))(program)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in program.adapter.tensors.items():
            if "lora_B" in key:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.02)
    return program


def greedy_medians(
    generators: dict[str, Any], inputs: dict[str, torch.Tensor], new_tokens: int, runs: int, agree_line: str
) -> dict[str, float]:
    """Median seconds of ``generate()`` per generator: exactly ``new_tokens`` greedy tokens from ``inputs``.

    One warm-up call each gives the new tokens, which must be the same for every generator: prints
    ``<agree_line>: <True|False>`` and exits when they differ. Then ``runs`` timed calls each, round-robin
    so machine load hits all alike.
    """
    # pad id 0: GPT-2 has none (generate() would warn), and the benches' T5 configs say 0
    settings = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}
    tokens = []
    for model in generators.values():  # warm-up, and the tokens every generator must agree on
        with torch.no_grad():
            tokens.append(model.generate(**inputs, **settings)[:, -new_tokens:])
    agree = all(torch.equal(t, tokens[0]) for t in tokens)
    print(f"{agree_line}: {agree}")
    if not agree:
        raise SystemExit(f"{', '.join(generators)} generated different tokens")

    times: dict[str, list[float]] = {name: [] for name in generators}
    for _ in range(runs):
        for name, model in generators.items():
            start = time.perf_counter()
            with torch.no_grad():
                model.generate(**inputs, **settings)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
