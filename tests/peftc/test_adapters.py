"""AdapterState: HF PEFT's on-disk format (keys, files), round trips, and one-line refusals of bad files.

Numerical parity with HF PEFT in both directions is in tests/parity/test_lora_parity.py; here the
saved *names* are compared with what HF PEFT 0.21 writes for the same config on the same model.
"""

from __future__ import annotations

import json

import peft
import pytest
import torch
from conftest import FAMILIES, captured
from peftc.passes import insertion_pipeline
from safetensors import safe_open
from safetensors.torch import load_file

from peftc.adapters import CONFIG_FILE, WEIGHTS_FILE, AdapterState, graph_path, peft_key
from peftc.config import LoraConfig
from peftc.errors import AdapterFormatError, OutputExistsError

HEADS = ["classifier", "score"]


def _perturb(state: AdapterState, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in state.tensors.values():
            t.add_(0.1 * torch.randn(t.shape, generator=gen))


@pytest.fixture
def saved(tmp_path):
    """A perturbed GPT-2 seq-cls adapter (LoRA + head copy) saved with AdapterState.save."""
    program, _ = captured("gpt2", "seq-cls")
    insertion_pipeline(LoraConfig(r=4, task_type="SEQ_CLS", modules_to_save=HEADS))(program)
    _perturb(program.adapter)
    out = program.adapter.save(tmp_path / "adapter")
    return program.adapter, out


def test_save_load_round_trip(saved):
    state, directory = saved
    assert sorted(p.name for p in directory.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    with safe_open(str(directory / WEIGHTS_FILE), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    keys = sorted(state.tensors)
    assert keys == [
        "base_model.model.score.weight",
        "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight",
        "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight",
        "base_model.model.transformer.h.1.attn.c_attn.lora_A.weight",
        "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight",
    ]
    loaded = AdapterState.load(directory)
    assert loaded.loaded and not state.loaded
    assert loaded.name == "adapter"
    assert sorted(loaded.tensors) == keys
    for key in keys:
        assert torch.equal(loaded.tensors[key], state.tensors[key].detach()), key
        assert isinstance(loaded.tensors[key], torch.nn.Parameter) and not loaded.tensors[key].requires_grad
    assert loaded.config.to_dict() == state.config.to_dict()
    assert loaded.num_parameters() == state.num_parameters() == 4 * 64 * 2 + 192 * 4 * 2 + 3 * 64
    assert all(t.requires_grad for t in loaded.trainable_().tensors.values())
    assert peft_key("transformer.h.0.attn.c_attn", "lora_A.weight") == keys[1]
    assert graph_path(keys[1]) == "model.transformer.h.0.attn.c_attn.lora_A.weight"


def test_save_refuses_non_empty_directory_without_force(saved):
    state, directory = saved
    with pytest.raises(OutputExistsError, match="not empty; pass --force"):
        state.save(directory)
    (directory / "stray.txt").write_text("x")
    state.save(directory, force=True)
    assert sorted(p.name for p in directory.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]


@pytest.mark.parametrize(
    "case,hf_kwargs",
    [
        (("gpt2", "seq-cls"), dict(target_modules=["c_attn", "c_fc"], bias="all")),
        (("gpt2", "causal-lm"), dict(target_modules=["c_attn", "mlp.c_proj"], bias="lora_only")),
        (("bert", "seq-cls"), dict(target_modules=["query", "dense"], bias="all")),
        (("bert", "seq-cls"), dict(bias="lora_only", rank_pattern={"value": 2})),
        (("llama", "seq-cls"), dict(target_modules=["q_proj", "down_proj"], bias="all")),
    ],
    ids=["gpt2-cls-all", "gpt2-lm-lora_only", "bert-all", "bert-lora_only", "llama-all"],
)
def test_saved_keys_and_shapes_equal_hf_peft(tmp_path, case, hf_kwargs):
    """The same config on the same model: peftc writes exactly HF PEFT's tensor names and shapes.

    HF PEFT names a trained bias of a LoRA-wrapped module ``<module>.base_layer.bias``; with
    ``bias="all"`` it also writes a head's bias twice more (``modules_to_save.bias``,
    ``original_module.bias``), which peftc does not write back.
    """
    fam, task = case
    task_type = "CAUSAL_LM" if task == "causal-lm" else "SEQ_CLS"
    mts = HEADS if task == "seq-cls" else None
    hf = peft.get_peft_model(FAMILIES[case](), peft.LoraConfig(task_type=task_type, modules_to_save=mts, **hf_kwargs))
    hf.save_pretrained(str(tmp_path / "hf"))
    theirs = {
        k: tuple(v.shape)
        for k, v in load_file(str(tmp_path / "hf" / WEIGHTS_FILE)).items()
        if ".modules_to_save." not in k and ".original_module." not in k
    }
    program, _ = captured(fam, task)
    insertion_pipeline(LoraConfig(task_type=task_type, modules_to_save=mts, **hf_kwargs))(program)
    program.adapter.save(tmp_path / "ours")
    ours = {k: tuple(v.shape) for k, v in load_file(str(tmp_path / "ours" / WEIGHTS_FILE)).items()}
    assert ours == theirs
    if hf_kwargs.get("bias") in ("all", "lora_only") and fam != "llama":
        assert any(k.endswith(".base_layer.bias") for k in ours)


def _one_line(excinfo, *fragments: str) -> None:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


def test_truncated_weights_are_refused(saved):
    _, directory = saved
    weights = directory / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFormatError) as info:
        AdapterState.load(directory)
    _one_line(info, str(weights), "corrupt or truncated", "re-save the adapter")


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x00\x01", b"not a safetensors file at all", (10**9).to_bytes(8, "little") + b"{}"],
    ids=["empty", "short", "text", "huge-header"],
)
def test_corrupt_weights_are_refused(saved, payload):
    _, directory = saved
    (directory / WEIGHTS_FILE).write_bytes(payload)
    with pytest.raises(AdapterFormatError) as info:
        AdapterState.load(directory)
    _one_line(info, "corrupt or truncated")


def test_config_not_json_is_refused(saved):
    _, directory = saved
    (directory / CONFIG_FILE).write_text("{'peft_type': 'LORA'}")
    with pytest.raises(AdapterFormatError) as info:
        AdapterState.load(directory)
    _one_line(info, str(directory / CONFIG_FILE), "is not valid JSON")
    (directory / CONFIG_FILE).write_bytes(b"\xff\xfe\x00\x00")
    with pytest.raises(AdapterFormatError) as info:
        AdapterState.load(directory)
    _one_line(info, "is not UTF-8 text", "expected JSON")


@pytest.mark.parametrize(
    "patch,fragments",
    [
        ({"peft_type": "BOGUS"}, ["peft_type='BOGUS'", "does not know", "supported: "]),
        ({"use_qalora": True}, ["use_qalora=True is not supported by peftc"]),
        ({"r": "8"}, ["field 'r' must be int"]),
    ],
    ids=["unknown-peft-type", "qalora", "bad-r"],
)
def test_bad_config_is_refused(saved, patch, fragments):
    _, directory = saved
    path = directory / CONFIG_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **patch}))
    with pytest.raises(AdapterFormatError) as info:
        AdapterState.load(directory)
    _one_line(info, *fragments)


def test_pickle_only_adapter_is_refused_without_unpickling(saved):
    _, directory = saved
    (directory / WEIGHTS_FILE).unlink()
    # Not a valid pickle at all: peftc must refuse by name before any attempt to read it.
    (directory / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(AdapterFormatError) as info:
        AdapterState.load(directory)
    _one_line(info, "adapter_model.bin (a pickle)", "never loads", "safe_serialization=True")


def test_missing_pieces_are_refused(saved, tmp_path):
    _, directory = saved
    with pytest.raises(AdapterFormatError) as info:
        AdapterState.load(tmp_path / "nowhere")
    _one_line(info, "does not exist")
    (directory / WEIGHTS_FILE).unlink()
    with pytest.raises(AdapterFormatError) as info:
        AdapterState.load(directory)
    _one_line(info, f"has no {WEIGHTS_FILE}")
    (directory / CONFIG_FILE).unlink()
    with pytest.raises(AdapterFormatError) as info:
        AdapterState.load(directory)
    _one_line(info, f"has no {CONFIG_FILE}")


@pytest.mark.parametrize(
    "value,fragments",
    [
        (float("nan"), ["holds 1 NaN value(s)", "retrain or use an earlier checkpoint"]),
        (float("inf"), ["holds 1 inf value(s)"]),
        (None, ["has dtype int64", "adapters are floating point"]),
    ],
    ids=["nan", "inf", "int64"],
)
def test_non_finite_or_integer_tensors_are_refused_by_name(saved, value, fragments):
    from safetensors.torch import load_file, save_file

    _, directory = saved
    tensors = load_file(str(directory / WEIGHTS_FILE))
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    if value is None:
        tensors[key] = torch.ones_like(tensors[key], dtype=torch.int64)
    else:
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = value
    save_file(tensors, str(directory / WEIGHTS_FILE))
    with pytest.raises(AdapterFormatError) as info:
        AdapterState.load(directory)
    _one_line(info, key, *fragments)
