"""peftc.dataset: strict JSON-lines reading (file:line errors), label maps, padding and batch order."""

from __future__ import annotations

import json
import re

import pytest
import torch

from peftc.dataset import batch_order, collate, default_data, encode, iter_batches, read_jsonl
from peftc.errors import DataError


def _write(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


@pytest.mark.parametrize(
    ("task", "bad", "message"),
    [
        ("seq-cls", "{not json", r"not valid JSON"),
        ("seq-cls", "[1, 2]", r"expected a JSON object, got list"),
        ("seq-cls", '"just a string"', r"expected a JSON object, got str"),
        ("seq-cls", {"label": 1}, r"missing field 'text'"),
        ("seq-cls", {"text": "ok"}, r"missing field 'label'"),
        ("seq-cls", {"text": 5, "label": 1}, r"field 'text' must be a string, got int"),
        ("seq-cls", {"text": "  ", "label": 1}, r"field 'text' is empty"),
        ("seq-cls", {"text": "ok", "label": 1.5}, r"field 'label' must be an integer or a string"),
        ("seq-cls", {"text": "ok", "label": True}, r"field 'label' must be an integer or a string"),
        ("seq-cls", {"text": "ok", "label": None}, r"field 'label' must be an integer or a string"),
        ("seq-cls", {"text": "ok", "label": "x"}, r"label 'x' is a str but line 1 has 0"),
        ("seq-cls", {"text": "ok", "label": -1}, r"label -1 is out of range"),
        ("causal-lm", {"txt": "hello"}, r"missing field 'text' \(fields: txt\)"),
        ("causal-lm", {"text": ["a"]}, r"field 'text' must be a string, got list"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, task, bad, message):
    good = [{"text": "fine", "label": 0}, {"text": "also fine", "label": 1}]
    path = _write(tmp_path, [good[0], "", good[1], bad])  # the blank line still counts: bad is line 4
    with pytest.raises(DataError, match=re.escape(f"{path}:4: ") + message) as info:
        read_jsonl(path, task)
    assert "\n" not in str(info.value)


def test_every_message_says_what_a_line_must_look_like(tmp_path):
    path = _write(tmp_path, ["{bad"])
    with pytest.raises(DataError, match=r'each line must be a JSON object like \{"text": "Great film!", "label"'):
        read_jsonl(path, "seq-cls")


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:2: not UTF-8"):
        read_jsonl(path, "causal-lm")


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match="holds no examples"):
        read_jsonl(path, "causal-lm")


def test_unreadable_paths(tmp_path):
    with pytest.raises(DataError, match="cannot read data file .*missing.jsonl.*pass an existing"):
        read_jsonl(tmp_path / "missing.jsonl", "causal-lm")
    with pytest.raises(DataError, match="is a directory"):
        read_jsonl(tmp_path, "causal-lm")


def test_string_labels_get_a_sorted_map(tmp_path):
    path = _write(
        tmp_path,
        [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}, {"text": "c", "label": "neutral"}],
    )
    data = read_jsonl(path, "seq-cls")
    assert data.id2label == {0: "neg", 1: "neutral", 2: "pos"}
    assert data.labels == [2, 0, 1]
    assert data.string_labels
    # eval data is checked against the training map
    ok = _write(tmp_path, [{"text": "d", "label": "pos"}], "eval.jsonl")
    assert read_jsonl(ok, "seq-cls", **data.eval_kwargs()).labels == [2]
    unknown = _write(tmp_path, [{"text": "d", "label": "pos"}, {"text": "e", "label": "meh"}], "eval2.jsonl")
    with pytest.raises(DataError, match=rf"{re.escape(str(unknown))}:2: label 'meh' does not occur in the training"):
        read_jsonl(unknown, "seq-cls", **data.eval_kwargs())
    ints = _write(tmp_path, [{"text": "d", "label": 1}], "eval3.jsonl")
    with pytest.raises(DataError, match=r":1: label 1 is an integer but the training data has string labels"):
        read_jsonl(ints, "seq-cls", **data.eval_kwargs())


def test_integer_labels_must_be_contiguous(tmp_path):
    data = read_jsonl(_write(tmp_path, [{"text": "a", "label": 1}, {"text": "b", "label": 0}]), "seq-cls")
    assert data.labels == [1, 0] and data.id2label == {0: "LABEL_0", 1: "LABEL_1"} and not data.string_labels
    gap = _write(tmp_path, [{"text": "a", "label": 0}, {"text": "b", "label": 2}], "gap.jsonl")
    with pytest.raises(DataError, match="label 1 never occurs"):
        read_jsonl(gap, "seq-cls")
    one = _write(tmp_path, [{"text": "a", "label": 0}], "one.jsonl")
    with pytest.raises(DataError, match="needs two classes"):
        read_jsonl(one, "seq-cls")
    high = _write(tmp_path, [{"text": "a", "label": 0}, {"text": "b", "label": 2}], "high.jsonl")
    with pytest.raises(DataError, match=rf"{re.escape(str(high))}:2: label 2 is out of range; .* 0\.\.1"):
        read_jsonl(high, "seq-cls", num_labels=2)
    strings = _write(tmp_path, [{"text": "a", "label": "x"}], "strings.jsonl")
    with pytest.raises(DataError, match=":1: label 'x' is a string but the training data has integer labels"):
        read_jsonl(strings, "seq-cls", num_labels=2)


def test_collate_pads_right_and_builds_inputs(tmp_path, tokenizer):
    path = _write(tmp_path, [{"text": "one two three four five"}, {"text": "hi"}])
    enc = encode(read_jsonl(path, "causal-lm"), tokenizer, "causal-lm", max_length=128)
    batch = collate(enc, [0, 1], ["input_ids", "attention_mask", "token_type_ids", "position_ids"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    n0, n1 = len(enc.input_ids[0]), len(enc.input_ids[1])
    assert ids.shape == (2, n0) and n1 < n0
    assert mask[0].tolist() == [1] * n0 and mask[1].tolist() == [1] * n1 + [0] * (n0 - n1)
    assert ids[1, n1:].eq(tokenizer.pad_token_id).all()
    assert batch["position_ids"][1].tolist() == list(range(n1)) + [n1 - 1] * (n0 - n1)
    assert batch["labels"][1, n1:].eq(-100).all() and batch["labels"][1, :n1].equal(ids[1, :n1])
    assert batch["token_type_ids"].eq(0).all()
    assert all(t.dtype == torch.long for t in batch.values())


def test_truncation_and_seq_cls_labels(tmp_path, tokenizer):
    path = _write(tmp_path, [{"text": "word " * 50, "label": "b"}, {"text": "short", "label": "a"}])
    enc = encode(read_jsonl(path, "seq-cls"), tokenizer, "seq-cls", max_length=8)
    assert max(len(r) for r in enc.input_ids) == 8
    batch = collate(enc, [1, 0], ["input_ids", "attention_mask", "token_type_ids"])
    assert batch["labels"].tolist() == [0, 1]
    assert "position_ids" not in batch


def test_batch_order_is_seeded_and_complete():
    a = batch_order(10, 4, seed=3, epoch=0)
    assert a == batch_order(10, 4, seed=3, epoch=0)
    assert a != batch_order(10, 4, seed=3, epoch=1) and a != batch_order(10, 4, seed=4, epoch=0)
    assert [len(b) for b in a] == [4, 4, 2] and sorted(sum(a, [])) == list(range(10))
    # the permutation does not depend on the batch size: accumulation sees the same examples
    assert sum(batch_order(10, 2, seed=3, epoch=0), []) == sum(a, [])
    assert batch_order(5, 2, seed=0, epoch=0, shuffle=False) == [[0, 1], [2, 3], [4]]


def test_iter_batches_resumes_mid_epoch(tmp_path, tokenizer):
    path = _write(tmp_path, [{"text": f"sentence number {i}"} for i in range(7)])
    enc = encode(read_jsonl(path, "causal-lm"), tokenizer, "causal-lm")
    names = ["input_ids", "attention_mask", "position_ids"]
    full = list(iter_batches(enc, names, 2, seed=1, epoch=2))
    rest = list(iter_batches(enc, names, 2, seed=1, epoch=2, start=2))
    assert len(full) == 4 and len(rest) == 2
    for x, y in zip(full[2:], rest, strict=True):
        assert all(x[k].equal(y[k]) for k in x)


def test_shipped_data_is_valid_and_balanced():
    train, evaluation = default_data("minilm", "seq-cls")
    tr, ev = read_jsonl(train, "seq-cls"), read_jsonl(evaluation, "seq-cls", label2id={"negative": 0, "positive": 1})
    assert tr.id2label == {0: "negative", 1: "positive"}
    assert 400 <= len(tr) <= 600 and 100 <= len(ev) <= 150
    for data in (tr, ev):
        share = sum(data.labels) / len(data)
        assert 0.45 <= share <= 0.55, share
    assert not set(tr.texts) & set(ev.texts), "eval sentences must not appear in the training data"
    corpus, held_out = default_data("tiny-gpt2", "causal-lm")
    c, h = read_jsonl(corpus, "causal-lm"), read_jsonl(held_out, "causal-lm")
    assert len(c) >= 200 and len(h) >= 20 and not set(c.texts) & set(h.texts)
    assert default_data("minilm", "causal-lm") is None


def test_causal_texts_end_with_eos_unless_cut(tmp_path):
    """A causal tokenizer's eos ends every text that fits; a text cut at max_length gets none."""
    from peftc.models import causal_tokenizer, preset_path

    try:
        tok = causal_tokenizer(preset_path("minilm"))
    except Exception as e:  # noqa: BLE001 - the package is optional
        pytest.skip(f"MiniLM tokenizer unavailable: {e}")
    path = _write(tmp_path, [{"text": "one two three"}, {"text": "word " * 20}, {"text": "a b c d e f g h"}])
    enc = encode(read_jsonl(path, "causal-lm"), tok, "causal-lm", max_length=8)
    plain = [tok(t)["input_ids"] for t in ("one two three", "a b c d e f g h")]
    assert enc.input_ids[0] == plain[0] + [tok.eos_token_id]
    assert enc.input_ids[1] == tok("word " * 20)["input_ids"][:8]  # cut: no eos
    assert enc.input_ids[2] == plain[1] and len(plain[1]) == 8  # exactly max_length: no room for one
    assert enc.token_type_ids is None
    assert tok.cls_token_id is None or tok.cls_token_id not in sum(enc.input_ids, [])
