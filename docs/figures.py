"""Make the README's pictures.

    peftc train --model tiny-gpt2 --max-steps 60 --out /tmp/r
    python docs/figures.py /tmp/r

writes ``docs/curves.png`` (the run's training curves, :func:`peftc.plot.plot_curves`) and
``docs/gpt2-lora-graph.svg`` (the block graph of GPT-2 small's 12-layer structure with LoRA r=8 on
``c_attn``, HF PEFT's default target for GPT-2, drawn by :func:`peftc.inspect.svg.render_svg`; the
hidden size is cut to 64 because the picture does not depend on it and capture is faster).
"""

from __future__ import annotations

import argparse
from pathlib import Path

DOCS = Path(__file__).resolve().parent


def curves(run_dir: Path, out: Path) -> Path:
    from peftc.plot import plot_curves

    return plot_curves(run_dir, out, title="tiny-gpt2 · LoRA · 60 steps", force=True)


def gpt2_graph(out: Path) -> Path:
    import torch
    from peftc.passes import insertion_pipeline
    from transformers import GPT2Config, GPT2LMHeadModel

    from peftc.config import LoraConfig
    from peftc.inspect import graph_of
    from peftc.inspect.svg import write_svg
    from peftc.program import capture

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_head=4, n_embd=64, vocab_size=128, n_positions=64)).eval()
    program = capture(model, "causal-lm", mode="eval")
    insertion_pipeline(LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM"))(program)
    graph = graph_of(program)
    graph.title = "GPT-2 (12 layers) with LoRA r=8 on c_attn"
    return write_svg(graph, out, force=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory written by peftc train")
    args = parser.parse_args()
    for path in (curves(args.run_dir, DOCS / "curves.png"), gpt2_graph(DOCS / "gpt2-lora-graph.svg")):
        print(f"{path} ({path.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
