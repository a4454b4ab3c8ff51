"""What the training tests share: a tiny labelled corpus, JSON-lines writing, tiny bases saved as HF directories."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

#: Short texts with a sentiment each: learnable in a few steps by a tiny classifier or LM.
SENTENCES = [
    ("what a wonderful film", "pos"),
    ("a dull and boring story", "neg"),
    ("the food was lovely", "pos"),
    ("the room was dirty", "neg"),
    ("great phone, fast and light", "pos"),
    ("it broke after a week", "neg"),
    ("friendly staff and tasty food", "pos"),
    ("rude waiter, cold soup", "neg"),
    ("i loved every minute", "pos"),
    ("never again", "neg"),
    ("brilliant and funny", "pos"),
    ("a waste of money", "neg"),
    ("so comfortable", "pos"),
    ("terrible service", "neg"),
]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    """``rows`` as a JSON-lines file at ``path``; its path as a string."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def adapter_tensors(run_dir) -> dict[str, torch.Tensor]:
    """The tensors of the adapter a training run saved."""
    return load_file(str(Path(run_dir) / "adapter" / "adapter_model.safetensors"))


def run_records(run_dir) -> list[dict]:
    """The records a training run logged in ``metrics.jsonl``, in order."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir) -> list[float]:
    """The training loss of each logged step of a run, in order."""
    return [r["loss"] for r in run_records(run_dir) if r["type"] == "train"]


def save_tiny_bert(root: Path, tokenizer, dropout: float) -> str:
    """A 2-layer BERT sequence classifier (hidden 32) with ``tokenizer``'s vocabulary, saved at ``root``."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                     vocab_size=len(tokenizer), max_position_embeddings=128, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout)  # fmt: skip
    BertForSequenceClassification(cfg).save_pretrained(root, safe_serialization=True)
    tokenizer.save_pretrained(root)
    return str(root)


def save_tiny_gpt2(root: Path, tokenizer) -> str:
    """A 2-layer GPT-2 LM (hidden 32, dropout 0) with ``tokenizer``'s vocabulary, saved at ``root``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=128, vocab_size=len(tokenizer), resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0)  # fmt: skip
    GPT2LMHeadModel(cfg).save_pretrained(root, safe_serialization=True)
    tokenizer.save_pretrained(root)
    return str(root)
