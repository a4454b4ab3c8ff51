"""token-cls data: JSON lines of words and word labels, aligned to sub-words as HF's NER examples do."""

from __future__ import annotations

import json

import pytest
import torch

from peftc.dataset import collate, count_targets, encode, read_jsonl
from peftc.errors import DataError

WORDS = ["john", "lives", "in", "paris", "cat", "##s", "dog"]


def _tokenizer(tmp_path):
    from transformers import BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab))


def _write(tmp_path, rows) -> str:
    path = tmp_path / "ner.jsonl"
    path.write_text("\n".join(json.dumps(r) if not isinstance(r, str) else r for r in rows) + "\n")
    return str(path)


ROWS = [
    {"tokens": ["john", "lives", "in", "paris"], "labels": ["B-PER", "O", "O", "B-LOC"]},
    {"tokens": ["cats", "dog"], "labels": ["B-ANI", "B-ANI"]},
]


def test_words_align_to_first_subword(tmp_path):
    """A word's label sits on its first sub-word; later sub-words, [CLS]/[SEP] and padding are -100."""
    data = read_jsonl(_write(tmp_path, ROWS), "token-cls")
    assert data.id2label == {0: "B-ANI", 1: "B-LOC", 2: "B-PER", 3: "O"}
    assert data.labels == [[2, 3, 3, 1], [0, 0]]
    enc = encode(data, _tokenizer(tmp_path), "token-cls")
    # [CLS] cat ##s dog [SEP]: "cats" is two sub-words, only the first carries B-ANI
    assert enc.labels[1] == [-100, 0, -100, 0, -100]
    batch = collate(enc, [0, 1], ["input_ids", "attention_mask", "token_type_ids"])
    assert batch["labels"].shape == batch["input_ids"].shape == (2, 6)
    assert batch["labels"][1].tolist() == [-100, 0, -100, 0, -100, -100]  # padded position
    assert batch["labels"][0].tolist() == [-100, 2, 3, 3, 1, -100]
    assert count_targets(batch, "token-cls") == 6


def test_token_cls_loss_through_a_program(tmp_path):
    """A collated batch runs through a captured token-cls program; the loss is HF's."""
    from conftest import tiny_bert_token

    from peftc.program import capture

    data = read_jsonl(_write(tmp_path, ROWS), "token-cls")
    enc = encode(data, _tokenizer(tmp_path), "token-cls")
    model = tiny_bert_token(num_labels=4)
    program = capture(model, "token-cls", mode="eval")
    batch = collate(enc, [0, 1], program.input_names)
    with torch.no_grad():
        logits = program.forward_batch(batch)
        expected = model(**{n: batch[n] for n in program.input_names}, labels=batch["labels"]).loss
    assert logits.shape == (2, 6, 4)
    assert abs(float(program.task.loss(logits, batch)) - float(expected)) < 1e-6


def test_eval_labels_checked_against_training_labels(tmp_path):
    train = read_jsonl(_write(tmp_path, ROWS), "token-cls")
    other = tmp_path / "eval.jsonl"
    other.write_text(json.dumps({"tokens": ["dog"], "labels": ["B-CAR"]}) + "\n")
    with pytest.raises(DataError, match="B-CAR"):
        read_jsonl(other, "token-cls", **train.eval_kwargs())


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ({"tokens": ["a", "b"], "labels": ["O"]}, "2 tokens but 1 labels"),
        ({"text": "a b", "labels": ["O", "O"]}, "missing field 'tokens'"),
        ({"tokens": [], "labels": []}, "non-empty list"),
        ({"tokens": ["a", 3], "labels": ["O", "O"]}, "non-empty string"),
        ({"tokens": ["a", "b"], "labels": ["O", 1]}, "integer labels or string labels"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, row, match):
    path = _write(tmp_path, [ROWS[0], row])
    with pytest.raises(DataError, match=match) as err:
        read_jsonl(path, "token-cls")
    assert ":2:" in str(err.value)
