"""The readers, fuzzed: every input is accepted or refused with a one-line PeftcError.

Property-based tests (hypothesis) over what a user hands peftc: ``adapter_config.json`` (random JSON and
mutations of a valid one), ``adapter_model.safetensors`` (random bytes, mutated headers), data files
(JSON lines for each task, then tokenised) and ``peftc train``'s option values (through ``peftc.cli.main``,
stopped before the model loads). Never a traceback, a hang (each example has a deadline) or a file
written outside ``--out``. Bounded to run in well under a minute.
"""

from __future__ import annotations

import json
import math
import os
import struct
from datetime import timedelta
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from peftc.errors import PeftcError  # noqa: E402

FUZZ = settings(
    max_examples=int(os.environ.get("PEFTC_FUZZ_EXAMPLES", "150")),  # more for a deeper local hunt
    deadline=timedelta(seconds=5),
    database=None,  # nothing written into the checkout
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


def accepted_or_refused(call, *args, **kwargs):
    """Run ``call``; a PeftcError must be one line. Returns the result, or ``None`` when refused."""
    try:
        return call(*args, **kwargs)
    except PeftcError as e:
        message = str(e)
        assert message.strip() and "\n" not in message, repr(message)
        return None


# -- adapter_config.json ---------------------------------------------------------------------------------------------

VALID_CONFIG = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "target_modules": ["c_attn"],
    "base_model_name_or_path": None,
    "bias": "none",
    "fan_in_fan_out": True,
    "modules_to_save": None,
    "rank_pattern": {},
    "alpha_pattern": {},
}
OTHER_KEYS = ["init_lora_weights", "use_rslora", "layers_to_transform", "use_dora", "num_virtual_tokens", "init_r",
              "target_r", "feedforward_modules", "inference_mode", "exclude_modules", "prompt_tuning_init"]  # fmt: skip
KEYS = sorted({*VALID_CONFIG, *OTHER_KEYS})
PEFT_TYPES = ["LORA", "ADALORA", "IA3", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "ADAPTION_PROMPT", "lora", ""]


@st.composite
def adapter_configs(draw):
    """Random JSON, or the valid LoRA config with keys changed, removed or added."""
    if draw(st.booleans()):
        return draw(JSON)
    config = dict(VALID_CONFIG)
    config["peft_type"] = draw(st.sampled_from(PEFT_TYPES))
    for _ in range(draw(st.integers(0, 4))):
        key = draw(st.sampled_from(KEYS) | st.text(max_size=8))
        if draw(st.booleans()) and key in config:
            del config[key]
        else:
            config[key] = draw(JSON)
    return config


def _weights(path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    key = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
    save_file({key: torch.ones(4, 8)}, str(path), metadata={"format": "pt"})


@FUZZ
@given(config=adapter_configs())
def test_adapter_config(tmp_path_factory, config):
    from peftc.adapters import AdapterState
    from peftc.config import load_config
    from peftc.runs import resolve_source

    root = tmp_path_factory.mktemp("adapter")
    (root / "adapter_config.json").write_text(json.dumps(config))
    _weights(root / "adapter_model.safetensors")
    state = accepted_or_refused(AdapterState.load, root)
    if state is not None:  # what was accepted saves and loads back to the same config
        state.config.save(root)
        again = AdapterState.load(root).config.to_dict()
        assert json.dumps(again, sort_keys=True) == json.dumps(state.config.to_dict(), sort_keys=True)
    accepted_or_refused(load_config, root / "adapter_config.json")
    accepted_or_refused(resolve_source, root)


@FUZZ
@given(raw=st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_adapter_config_bytes(tmp_path_factory, raw):
    from peftc.adapters import AdapterState

    root = tmp_path_factory.mktemp("adapter")
    (root / "adapter_config.json").write_bytes(raw)
    _weights(root / "adapter_model.safetensors")
    accepted_or_refused(AdapterState.load, root)


# -- adapter_model.safetensors ------------------------------------------------------------------------------------

DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "F8_E4M3", "X", ""]


@st.composite
def safetensors_files(draw):
    """Random bytes, a valid file with bytes flipped or cut, or a header of random tensors over random data."""
    kind = draw(st.sampled_from(["bytes", "mutated", "header"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "mutated":
        header = json.dumps(
            {"__metadata__": {"format": "pt"}, "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
        ).encode()
        data = bytearray(struct.pack("<Q", len(header)) + header + struct.pack("<4f", 1, 2, 3, 4))
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        return bytes(data[: draw(st.integers(0, len(data)))])
    tensors = draw(
        st.dictionaries(
            st.text(max_size=10),
            st.fixed_dictionaries(
                {
                    "dtype": st.sampled_from(DTYPES),
                    "shape": st.lists(st.integers(-2, 2**40), max_size=3) | JSON,
                    "data_offsets": st.lists(st.integers(-1, 2**40), max_size=3) | JSON,
                }
            ),
            max_size=3,
        )
    )
    header = json.dumps(tensors).encode()
    size = draw(st.sampled_from([len(header), len(header) + 3, 2**63, 2**64 - 1, 0]))
    return struct.pack("<Q", size) + header + draw(st.binary(max_size=64))


@FUZZ
@given(blob=safetensors_files())
def test_safetensors_file(tmp_path_factory, blob):
    from peftc.adapters import AdapterState

    root = tmp_path_factory.mktemp("adapter")
    (root / "adapter_config.json").write_text(json.dumps(VALID_CONFIG))
    (root / "adapter_model.safetensors").write_bytes(blob)
    accepted_or_refused(AdapterState.load, root)


# -- data files ----------------------------------------------------------------------------------------------------

EXAMPLES = {
    "causal-lm": {"text": "Once upon a time"},
    "seq-cls": {"text": "Great film!", "label": "positive"},
    "token-cls": {"tokens": ["John", "lives", "in", "Paris"], "labels": ["B-PER", "O", "O", "B-LOC"]},
}


@st.composite
def data_files(draw, task):
    """Lines that are valid examples, mutated examples, random JSON or random text."""
    lines = []
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["valid", "mutated", "json", "text"]))
        if kind == "text":
            lines.append(draw(st.text(max_size=30)).encode("utf-8", "surrogatepass"))
            continue
        if kind == "json":
            lines.append(json.dumps(draw(JSON)).encode())
            continue
        obj = dict(EXAMPLES[task])
        if kind == "mutated":
            key = draw(st.sampled_from([*obj, "text", "label", "labels", "tokens"]))
            obj[key] = draw(JSON | st.lists(st.text(max_size=5), max_size=4) | st.integers(-2, 3))
        lines.append(json.dumps(obj).encode())
    return b"\n".join(lines) + draw(st.sampled_from([b"", b"\n", b"\r\n", b"\xff"]))


@pytest.fixture(scope="module")
def tokenizers():
    from peftc.models import causal_tokenizer, load_tokenizer, preset_path

    try:
        return {"bert": load_tokenizer(preset_path("minilm")), "causal": causal_tokenizer(preset_path("minilm"))}
    except Exception as e:  # noqa: BLE001 - the MiniLM package is optional
        pytest.skip(f"MiniLM tokenizer unavailable: {e}")


@pytest.mark.parametrize("task", sorted(EXAMPLES))
def test_data_lines(task, tmp_path_factory, tokenizers):
    from peftc.dataset import collate, encode, read_jsonl

    @FUZZ
    @given(raw=data_files(task), eval_raw=data_files(task), max_length=st.integers(-1, 8))
    def check(raw, eval_raw, max_length):
        root = tmp_path_factory.mktemp("data")
        (root / "train.jsonl").write_bytes(raw)
        (root / "eval.jsonl").write_bytes(eval_raw)
        data = accepted_or_refused(read_jsonl, root / "train.jsonl", task)
        if data is None:
            return
        accepted_or_refused(read_jsonl, root / "eval.jsonl", task, **data.eval_kwargs())
        for tokenizer in tokenizers.values():
            enc = accepted_or_refused(encode, data, tokenizer, task, max_length)
            if enc is not None:
                names = ["input_ids", "attention_mask", "position_ids"]
                batch = collate(enc, list(range(len(enc))), names)
                assert batch["input_ids"].shape[1] <= max_length

    check()


# -- peftc train's option values -----------------------------------------------------------------------------------

NUMERIC = {
    "--epochs": "int", "--max-steps": "int", "--batch-size": "int", "--grad-accum": "int", "--seed": "int",
    "--max-length": "int", "--save-every": "int", "--log-every": "int", "--r": "int", "--num-virtual-tokens": "int",
    "--lr": "float", "--warmup-ratio": "float", "--max-grad-norm": "float", "--weight-decay": "float",
    "--lora-alpha": "float", "--lora-dropout": "float",
}  # fmt: skip
VALUES = (
    st.integers(-(2**70), 2**70).map(str)
    | st.floats(allow_nan=True, allow_infinity=True).map(repr)
    | st.sampled_from(["nan", "inf", "-inf", "1e400", "-0", "0", "1", "0.5", "", " ", "1_000", "0x10", "²"])
    | st.text(max_size=6)
)


def _non_finite(text: str) -> bool:
    try:
        return not math.isfinite(float(text))
    except (ValueError, OverflowError):
        return False


class _Parsed(PeftcError):
    """Raised where the model would load: everything a user typed was accepted up to there."""


def test_train_option_values(tmp_path, monkeypatch, capsys):
    import peftc.training.loop as loop
    from peftc.cli import main

    def parsed(*args, **kwargs):
        raise _Parsed("parsed")

    monkeypatch.setattr(loop, "_build", parsed)
    monkeypatch.chdir(tmp_path)

    @FUZZ
    @given(
        flags=st.dictionaries(st.sampled_from(sorted(NUMERIC)), VALUES, min_size=1, max_size=3),
        method=st.sampled_from(["lora", "adalora", "ia3", "prompt-tuning", "prefix-tuning"]),
        sets=st.lists(st.tuples(st.sampled_from(["init_r", "r", "lora_alpha", "target_r", "bias", "x"]), JSON),
                      max_size=2),
    )  # fmt: skip
    def check(flags, method, sets):
        out = tmp_path / "out"
        argv = ["train", "--model", "tiny-gpt2", "--method", method, "--out", str(out), "--no-progress"]
        for flag, value in flags.items():
            argv += [f"{flag}={value}"]
        for name, value in sets:
            argv += ["--set", f"{name}={json.dumps(value)}"]
        with pytest.raises(SystemExit) as exc:
            main(argv)
        _, err = capsys.readouterr()
        code = exc.value.code
        assert "Traceback" not in err and "internal error" not in err, (argv, err)
        if code == 2:  # click's usage error: a value of the wrong type
            assert "Error: " in err, err
        else:
            lines = err.strip().splitlines()
            assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing written, not even --out"
        if any(_non_finite(v) for v in flags.values()):  # nan/inf pass range checks; they must not pass
            assert "error: parsed" not in err, (argv, err)

    check()
