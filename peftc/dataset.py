"""Training data: JSON-lines files, tokenised and batched for a captured program.

A data file holds one JSON object per line: ``{"text": "..."}`` for ``causal-lm``, and
``{"text": "...", "label": 1}`` or ``{"text": "...", "label": "positive"}`` for ``seq-cls``, and
``{"tokens": ["John", "lives", "in", "Paris"], "labels": ["B-PER", "O", "O", "B-LOC"]}`` (one label
per word, the CoNLL layout HF datasets use) for ``token-cls``: words are tokenised with
``is_split_into_words`` and a word's label goes to its first sub-word; other sub-words, special
tokens and padding get ``-100`` (ignored by the loss), as HF's token-classification examples do.
``seq2seq`` lines hold ``{"source": "...", "target": "..."}``: the source is the encoder's input, the
target tokenised as labels (``text_target``, both cut at ``max_length``), padding ``-100``, and the
decoder's inputs are the labels shifted right behind ``decoder_start_token_id`` (transformers'
``shift_tokens_right``, -100 read as the pad id).
Reading is strict: a line that is not a JSON object with the right fields is a
:class:`~peftc.errors.DataError` naming ``file:line`` (a silently skipped line would train a
different model than the user thinks). String labels get a label map (sorted names → ids) that the
run saves, so export can name the classes; integer labels must be ``0..n-1``.

A causal-lm text that fits in ``max_length`` ends with the tokenizer's eos token (when it declares
one), so a fine-tuned model learns where a text ends and ``generate`` stops there.

Batches are padded per batch (right padding) and hold every graph input the program takes
(``input_ids``, ``attention_mask``, ``token_type_ids`` for BERT-like models, ``position_ids`` for
decoders, computed from the mask as optimum exports them) plus ``labels``. The order is a seeded
permutation per epoch, so a run resumed at (epoch, batch) sees exactly the batches an
uninterrupted run would.

This module is ``peftc.dataset`` because ``peftc.data`` is the package of shipped data files
(``examples/data``, see pyproject.toml).
"""

from __future__ import annotations

import importlib.resources
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from peftc.errors import DataError
from peftc.files import json_lines

__all__ = [
    "Dataset",
    "Encoded",
    "batch_order",
    "collate",
    "count_targets",
    "default_data",
    "encode",
    "iter_batches",
    "read_jsonl",
    "shipped_file",
]

logger = logging.getLogger(__name__)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers' threads fight torch's for 2 cores

_EXAMPLE = {
    "causal-lm": '{"text": "Once upon a time..."}',
    "seq-cls": '{"text": "Great film!", "label": "positive"}',
    "token-cls": '{"tokens": ["John", "lives", "in", "Paris"], "labels": ["B-PER", "O", "O", "B-LOC"]}',
    "seq2seq": '{"source": "translate English to German: Thank you", "target": "Danke"}',
}

#: (model preset, task) -> (train file, eval file) shipped in ``peftc.data``.
DEFAULT_DATA = {
    ("minilm", "seq-cls"): ("sentiment_train.jsonl", "sentiment_eval.jsonl"),
    ("tiny-gpt2", "causal-lm"): ("tiny_corpus.jsonl", "tiny_corpus_eval.jsonl"),
}


@dataclass
class Dataset:
    """Examples read from one JSON-lines file.

    Attributes:
        path: the file read.
        texts: one text per example.
        labels: class ids for ``seq-cls``, one list of word class ids per example for ``token-cls``
            (``None`` for ``causal-lm``).
        id2label: class id -> name (string labels keep their names; integer labels get ``LABEL_i``).
        lines: the 1-based line number of each example, for messages.
        string_labels: whether the file's labels were names (else integers).
    """

    path: Path
    texts: list[str]
    labels: list[int] | None = None
    id2label: dict[int, str] | None = None
    lines: list[int] = field(default_factory=list)
    string_labels: bool = False
    words: list[list[str]] | None = None  # token-cls: the words of each example
    targets: list[str] | None = None  # seq2seq: the target text of each example (``texts`` are the sources)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def label2id(self) -> dict[str, int] | None:
        return {v: k for k, v in self.id2label.items()} if self.id2label else None

    def eval_kwargs(self) -> dict[str, Any]:
        """What :func:`read_jsonl` needs to check evaluation data against these (training) labels."""
        if self.labels is None:
            return {}
        return {"label2id": self.label2id} if self.string_labels else {"num_labels": len(self.id2label or {})}


def shipped_file(name: str) -> Path:
    """Path of a data file shipped in the ``peftc.data`` package (``examples/data`` in the repo)."""
    try:
        root = importlib.resources.files("peftc.data")
        path = Path(str(root / name))
    except (ModuleNotFoundError, TypeError):  # running from a checkout without the package installed
        path = Path(__file__).resolve().parent.parent / "examples" / "data" / name
    if not path.is_file():
        raise DataError(f"shipped data file {name} is missing from {path.parent}; reinstall peftc")
    return path


def default_data(model: str, task: str) -> tuple[Path, Path] | None:
    """The shipped (train, eval) files for a preset and task, or ``None`` when there are none."""
    names = DEFAULT_DATA.get((model, task))
    return (shipped_file(names[0]), shipped_file(names[1])) if names else None


def _names(obj: dict) -> str:
    """The keys of a data line for a message: as they are when printable, else quoted (a message is one line)."""
    return ", ".join(k if k.isprintable() and k.strip() == k and k else repr(k) for k in sorted(obj)) or "none"


def _fail(path: Path, lineno: int, what: str, task: str) -> DataError:
    return DataError(f"{path}:{lineno}: {what}; each line must be a JSON object like {_EXAMPLE[task]}")


def read_jsonl(
    path: str | Path, task: str, label2id: dict[str, int] | None = None, num_labels: int | None = None
) -> Dataset:
    """Read and check a JSON-lines data file.

    Args:
        path: the file.
        task: ``causal-lm`` (lines need ``text``), ``seq-cls`` (``text`` and ``label``),
            ``token-cls`` (``tokens`` and ``labels``, lists of the same length) or ``seq2seq``
            (``source`` and ``target``, non-empty strings).
        label2id: for evaluation data whose training data had string labels: the training label
            map; every label must be in it.
        num_labels: for evaluation data whose training data had integer labels: labels must be
            below it.

    Returns:
        A :class:`Dataset`; for ``seq-cls`` with its ``labels`` and ``id2label``.

    Raises:
        DataError: the file is unreadable or empty, or a line is not a JSON object with the right
            fields (the message names ``file:line`` and says what a line must look like).
    """
    path = Path(path).expanduser()
    if task not in _EXAMPLE:
        raise DataError(f"task {task!r} has no data format; supported: {', '.join(_EXAMPLE)}")
    try:
        raw = path.read_bytes()
    except IsADirectoryError as e:
        raise DataError(f"data path {path} is a directory; pass a JSON-lines file") from e
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e.strerror or e}; pass an existing JSON-lines file") from e
    texts: list[str] = []
    raw_labels: list[Any] = []
    lines: list[int] = []
    words: list[list[str]] = []
    word_lines: list[int] = []  # token-cls: the line of each word label (flattened), for messages
    targets: list[str] = []  # seq2seq
    for lineno, obj in json_lines(path, raw, lambda n, what: _fail(path, n, what, task)):
        if task == "token-cls":
            tokens, labels = _token_example(path, lineno, obj, raw_labels)
            words.append(tokens)
            raw_labels += labels
            word_lines += [lineno] * len(labels)
            texts.append(" ".join(tokens))
            lines.append(lineno)
            continue
        if task == "seq2seq":
            for key in ("source", "target"):
                if key not in obj:
                    raise _fail(path, lineno, f"missing field {key!r} (fields: {_names(obj)})", task)
                if not isinstance(obj[key], str):
                    raise _fail(path, lineno, f"field {key!r} must be a string, got {type(obj[key]).__name__}", task)
                if not obj[key].strip():
                    raise _fail(path, lineno, f"field {key!r} is empty", task)
            texts.append(obj["source"])
            targets.append(obj["target"])
            lines.append(lineno)
            continue
        if "text" not in obj:
            raise _fail(path, lineno, f"missing field 'text' (fields: {_names(obj)})", task)
        text = obj["text"]
        if not isinstance(text, str):
            raise _fail(path, lineno, f"field 'text' must be a string, got {type(text).__name__}", task)
        if not text.strip():
            raise _fail(path, lineno, "field 'text' is empty", task)
        if task == "seq-cls":
            if "label" not in obj:
                raise _fail(path, lineno, "missing field 'label'", task)
            label = obj["label"]
            if isinstance(label, bool) or not isinstance(label, (int, str)):
                raise _fail(path, lineno, f"field 'label' must be an integer or a string, got {label!r}", task)
            if isinstance(label, str) and not label.strip():
                raise _fail(path, lineno, "field 'label' is an empty string", task)
            if raw_labels and type(label) is not type(raw_labels[0]):
                raise DataError(
                    f"{path}:{lineno}: label {label!r} is a {type(label).__name__} but line {lines[0]} has "
                    f"{raw_labels[0]!r}; use integer labels or string labels throughout the file"
                )
            raw_labels.append(label)
        texts.append(text)
        lines.append(lineno)
    if not texts:
        raise DataError(f"data file {path} holds no examples; add JSON lines like {_EXAMPLE[task]}")
    data = Dataset(path=path, texts=texts, lines=lines, targets=targets if task == "seq2seq" else None)
    if task == "token-cls":
        flat, data.id2label = _label_ids(path, raw_labels, word_lines, label2id, num_labels)
        data.labels, data.words, start = [], words, 0
        for tokens in words:
            data.labels.append(flat[start : start + len(tokens)])
            start += len(tokens)
        data.string_labels = isinstance(raw_labels[0], str)
    if task == "seq-cls":
        data.labels, data.id2label = _label_ids(path, raw_labels, lines, label2id, num_labels)
        data.string_labels = isinstance(raw_labels[0], str)
    return data


def _token_example(path: Path, lineno: int, obj: dict, seen: list[Any]) -> tuple[list[str], list[Any]]:
    """The words and word labels of one token-cls line, checked (same length, one label kind per file)."""
    task = "token-cls"
    for key in ("tokens", "labels"):
        if key not in obj:
            raise _fail(path, lineno, f"missing field {key!r} (fields: {_names(obj)})", task)
        if not isinstance(obj[key], list) or not obj[key]:
            raise _fail(path, lineno, f"field {key!r} must be a non-empty list, got {obj[key]!r}", task)
    tokens, labels = obj["tokens"], obj["labels"]
    if len(tokens) != len(labels):
        raise _fail(path, lineno, f"{len(tokens)} tokens but {len(labels)} labels; give one label per token", task)
    for token in tokens:
        if not isinstance(token, str) or not token.strip():
            raise _fail(path, lineno, f"every token must be a non-empty string, got {token!r}", task)
    for label in labels:
        if isinstance(label, bool) or not isinstance(label, (int, str)) or (isinstance(label, str) and not label):
            raise _fail(path, lineno, f"every label must be an integer or a non-empty string, got {label!r}", task)
        first = seen[0] if seen else labels[0]
        if type(label) is not type(first):
            raise DataError(
                f"{path}:{lineno}: label {label!r} is a {type(label).__name__} but the file's first label is "
                f"{first!r}; use integer labels or string labels throughout the file"
            )
    return tokens, labels


def _label_ids(
    path: Path, raw: list[Any], lines: list[int], label2id: dict[str, int] | None, num_labels: int | None
) -> tuple[list[int], dict[int, str]]:
    """Class ids and id2label; ``label2id``/``num_labels`` come from the training data when checking eval data."""
    if isinstance(raw[0], str):
        if label2id is None and num_labels is not None:
            raise DataError(
                f"{path}:{lines[0]}: label {raw[0]!r} is a string but the training data has integer labels; "
                "use the same kind of label in both files"
            )
        if label2id is None:
            names = sorted(set(raw))
            if len(names) < 2:
                raise DataError(
                    f"{path}: every example has label {names[0]!r}; classification needs two classes or more"
                )
            label2id = {name: i for i, name in enumerate(names)}
        for label, lineno in zip(raw, lines, strict=True):
            if label not in label2id:
                raise DataError(
                    f"{path}:{lineno}: label {label!r} does not occur in the training data "
                    f"(labels: {', '.join(sorted(label2id))}); fix the label or add examples of it to the training data"
                )
        return [label2id[x] for x in raw], {i: name for name, i in label2id.items()}
    if label2id is not None:
        raise DataError(
            f"{path}:{lines[0]}: label {raw[0]!r} is an integer but the training data has string labels "
            f"({', '.join(sorted(label2id))}); use the same kind of label in both files"
        )
    limit = num_labels if num_labels is not None else max(raw) + 1
    for label, lineno in zip(raw, lines, strict=True):
        if not 0 <= label < limit:
            raise DataError(
                f"{path}:{lineno}: label {label} is out of range; integer labels must be 0..{limit - 1}"
                + (" (the classes of the training data)" if num_labels is not None else "")
            )
    if num_labels is None:
        if limit < 2:
            raise DataError(f"{path}: every example has label 0; classification needs two classes or more")
        missing = sorted(set(range(limit)) - set(raw))
        if missing:
            raise DataError(
                f"{path}: integer labels must be 0..n-1 with every class present; label {missing[0]} never occurs "
                f"(max label {limit - 1}); renumber the classes"
            )
    return list(raw), {i: f"LABEL_{i}" for i in range(limit)}


@dataclass
class Encoded:
    """Tokenised examples: per-example token lists (unpadded) and labels."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: list[int] | list[list[int]] | None  # token-cls: one label per token, -100 where ignored; seq2seq: targets
    pad_id: int
    task: str
    decoder_start_id: int = 0  # seq2seq: the first decoder input (``config.decoder_start_token_id``)

    def __len__(self) -> int:
        return len(self.input_ids)


def encode(
    data: Dataset,
    tokenizer: Any,
    task: str,
    max_length: int = 128,
    pad_id: int | None = None,
    decoder_start_id: int | None = None,
) -> Encoded:
    """Tokenise ``data`` with the model's tokenizer, truncating each text to ``max_length`` tokens.

    Args:
        data: what :func:`read_jsonl` returned.
        tokenizer: a transformers tokenizer.
        task: ``causal-lm`` or ``seq-cls``.
        max_length: the longest sequence kept (tokens beyond it are cut).
        pad_id: the id written into padding positions; default the tokenizer's pad token (else 0).
            Decoder classifiers find the last real token by this id, so pass the model's
            ``config.pad_token_id`` for them.
        decoder_start_id: ``seq2seq``: the model's ``config.decoder_start_token_id`` (default ``pad_id``).
    """
    if max_length < 2:
        raise DataError(f"max_length={max_length} is too short; use at least 2 tokens")
    if task == "token-cls":
        enc = _encode_words(data, tokenizer, max_length)
        labels = enc.pop("labels")
    elif task == "seq2seq":
        enc = tokenizer(list(data.texts), truncation=True, max_length=max_length)
        labels = [list(x) for x in tokenizer(text_target=list(data.targets or []), truncation=True,
                                             max_length=max_length)["input_ids"]]  # fmt: skip
        for i, row in enumerate(labels):
            if not row:
                raise DataError(
                    f"{data.path}:{data.lines[i]}: the target tokenises to no tokens; use text the tokenizer can read"
                )
    elif task == "causal-lm" and tokenizer.eos_token_id is not None:
        enc, labels = _encode_with_eos(data, tokenizer, max_length), None
    else:
        enc = tokenizer(list(data.texts), truncation=True, max_length=max_length)
        labels = list(data.labels) if data.labels is not None else None
    ids = [list(x) for x in enc["input_ids"]]
    for i, row in enumerate(ids):
        if not row:
            raise DataError(
                f"{data.path}:{data.lines[i]}: the text tokenises to no tokens; use text the tokenizer can read"
            )
    types = [list(x) for x in enc["token_type_ids"]] if "token_type_ids" in enc else None
    if pad_id is None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    start = int(decoder_start_id) if decoder_start_id is not None else int(pad_id)
    return Encoded(ids, types, labels, int(pad_id), task, start)


def _encode_with_eos(data: Dataset, tokenizer: Any, max_length: int) -> dict[str, list[list[int]]]:
    """causal-lm: every text that fits ends with the tokenizer's eos token, where generation learns to stop.

    A text cut at ``max_length`` did not end there and gets no eos; a text of exactly ``max_length`` tokens
    has no room for one. A tokenizer that appends eos itself (``add_eos_token``) is left as it is.
    """
    eos = int(tokenizer.eos_token_id)
    enc = tokenizer(list(data.texts), truncation=True, max_length=max_length + 1)  # one more: was it cut?
    keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc]
    out: dict[str, list[list[int]]] = {k: [] for k in keys}
    for i, ids in enumerate(enc["input_ids"]):
        ids = list(ids)
        rows = {k: list(enc[k][i]) for k in keys}
        if ids and ids[-1] == eos:  # the tokenizer's own eos: keep it last, as truncation at max_length would
            cut = {k: (r[: max_length - 1] + r[-1:] if len(r) > max_length else r) for k, r in rows.items()}
        elif 0 < len(ids) < max_length:  # (a text of no tokens stays empty: encode refuses it by line)
            cut = {k: r + [eos if k == "input_ids" else 1 if k == "attention_mask" else r[-1] if r else 0]
                   for k, r in rows.items()}  # fmt: skip
        else:
            cut = {k: r[:max_length] for k, r in rows.items()}
        for k in keys:
            out[k].append(cut[k])
    return out


def _encode_words(data: Dataset, tokenizer: Any, max_length: int) -> dict[str, Any]:
    """token-cls: tokenise pre-split words; a word's label goes to its first sub-word, -100 elsewhere."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"token-cls data needs a fast tokenizer (word alignment); {type(tokenizer).__name__} is not one: "
            "save the model's tokenizer.json with the model"
        )
    enc = tokenizer(
        [list(w) for w in data.words or []], is_split_into_words=True, truncation=True, max_length=max_length
    )
    labels = []
    for i, word_labels in enumerate(data.labels or []):
        row, previous = [], None
        for word in enc.word_ids(i):
            row.append(-100 if word is None or word == previous else int(word_labels[word]))
            previous = word
        labels.append(row)
    out = {key: enc[key] for key in enc.keys()}
    out["labels"] = labels
    return out


def collate(enc: Encoded, indices: Sequence[int], input_names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Pad the examples at ``indices`` into one batch (right padding) holding ``input_names`` + ``labels``.

    ``causal-lm`` labels are the input ids with ``-100`` on padding (the task's loss shifts them);
    ``seq-cls`` labels are class ids; ``token-cls`` labels are per-token class ids, ``-100`` on
    padding; ``seq2seq`` labels are the target ids, ``-100`` on padding, and ``decoder_input_ids`` are
    them shifted right behind ``decoder_start_id`` (``-100`` as ``pad_id``), as transformers'
    ``shift_tokens_right`` makes them. ``position_ids`` are ``(mask.cumsum(-1) - 1).clamp(min=0)``. Image data
    (:class:`peftc.images.ImageEncoded`) batches itself: ``pixel_values`` and ``labels``.
    """
    if hasattr(enc, "collate"):
        return enc.collate(indices, input_names)
    rows = [enc.input_ids[i] for i in indices]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), enc.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    types = torch.zeros((len(rows), width), dtype=torch.long)
    for j, (i, row) in enumerate(zip(indices, rows, strict=True)):
        ids[j, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[j, : len(row)] = 1
        if enc.token_type_ids is not None:
            types[j, : len(row)] = torch.tensor(enc.token_type_ids[i], dtype=torch.long)
    batch: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": mask}
    if enc.task == "seq2seq":
        targets = [enc.labels[i] for i in indices]
        labels = torch.full((len(rows), max(len(t) for t in targets)), -100, dtype=torch.long)
        for j, target in enumerate(targets):
            labels[j, : len(target)] = torch.tensor(target, dtype=torch.long)
        batch["labels"] = labels
        batch["decoder_input_ids"] = torch.cat(
            (
                labels.new_full((len(rows), 1), enc.decoder_start_id),
                labels[:, :-1].masked_fill(labels[:, :-1] == -100, enc.pad_id),
            ),
            dim=1,
        )
    for name in input_names:
        if name == "token_type_ids":
            batch[name] = types
        elif name == "position_ids":
            batch[name] = (mask.cumsum(-1) - 1).clamp(min=0)
        elif name not in batch:
            raise DataError(f"the program takes input {name!r}, which peftc's data pipeline cannot build")
    if enc.task == "causal-lm":
        batch["labels"] = ids.masked_fill(mask == 0, -100)
    elif enc.task == "seq2seq":
        pass  # made above
    elif enc.task == "token-cls":
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for j, i in enumerate(indices):
            labels[j, : len(enc.labels[i])] = torch.tensor(enc.labels[i], dtype=torch.long)
        batch["labels"] = labels
    else:
        batch["labels"] = torch.tensor([enc.labels[i] for i in indices], dtype=torch.long)
    return batch


def batch_order(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True) -> list[list[int]]:
    """Example indices of every batch of ``epoch``: a permutation seeded by (seed, epoch), cut in batches.

    The order depends only on its arguments (not on any global RNG), so a resumed run reproduces it.
    """
    if shuffle:
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
        order = torch.randperm(n, generator=gen).tolist()
    else:
        order = list(range(n))
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def iter_batches(
    enc: Encoded,
    input_names: Sequence[str],
    batch_size: int,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    start: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield the padded batches of one epoch, from batch ``start`` on (deterministic; see :func:`batch_order`)."""
    for indices in batch_order(len(enc), batch_size, seed, epoch, shuffle)[start:]:
        yield collate(enc, indices, input_names)


def count_targets(batch: dict[str, torch.Tensor], task: str) -> int:
    """How many predictions a batch's mean loss averages over (examples, or next-token targets)."""
    if task in ("causal-lm", "image-to-text"):
        return int((batch["labels"][:, 1:] != -100).sum())
    if task in ("token-cls", "seq2seq"):
        return int((batch["labels"] != -100).sum())
    if task == "semantic-segmentation":  # labelled pixels (255: ignored)
        return int((batch["labels"] != 255).sum())
    return int(batch["labels"].shape[0])
