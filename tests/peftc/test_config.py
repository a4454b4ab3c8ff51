"""LoraConfig and adapter_config.json: HF PEFT 0.21's JSON both ways, and refusals with one-line ConfigErrors."""

from __future__ import annotations

import dataclasses
import json
import math

import peft
import pytest
from peft.utils.other import get_pattern_key

from peftc.config import LoraConfig, config_from_dict, load_config
from peftc.errors import ConfigError

#: A config with every LoRA field away from its default (as HF PEFT accepts it).
NON_DEFAULT = dict(
    task_type="SEQ_CLS",
    base_model_name_or_path="models/tiny",
    revision="main",
    r=4,
    lora_alpha=16,
    lora_dropout=0.05,
    target_modules=["c_attn", "c_fc"],
    exclude_modules=["h.1.mlp.c_fc"],
    fan_in_fan_out=True,
    bias="lora_only",
    use_rslora=True,
    modules_to_save=["score"],
    init_lora_weights="gaussian",
    layers_to_transform=[0, 1],
    layers_pattern="h",
    rank_pattern={"c_fc": 2, "h.0.attn.c_attn": 6},
    alpha_pattern={"c_attn": 32},
)
FIELDS = [f.name for f in dataclasses.fields(LoraConfig) if not f.metadata.get("internal")]


def _norm(name, value):
    """HF PEFT keeps target/exclude modules as sets (written in set order); compare as sorted lists."""
    if name in ("target_modules", "exclude_modules") and isinstance(value, (set, frozenset, list)):
        return sorted(value)
    return value


def _assert_same_fields(ours: LoraConfig, theirs: peft.LoraConfig) -> None:
    for name in FIELDS:
        assert _norm(name, getattr(ours, name)) == _norm(name, getattr(theirs, name)), name


def test_defaults_and_field_names_match_hf_peft():
    ours, theirs = LoraConfig(), peft.LoraConfig()
    _assert_same_fields(ours, theirs)
    assert ours.peft_type == "LORA"
    assert all(LoraConfig.field_help()[name] for name in FIELDS)


def test_hf_peft_to_dict_and_save_pretrained_load_in_peftc(tmp_path):
    theirs = peft.LoraConfig(**NON_DEFAULT)
    ours = config_from_dict(theirs.to_dict())
    assert isinstance(ours, LoraConfig)
    _assert_same_fields(ours, theirs)
    theirs.save_pretrained(str(tmp_path))
    loaded = load_config(tmp_path / "adapter_config.json")
    _assert_same_fields(loaded, theirs)
    assert loaded.to_dict() == {**ours.to_dict(), "target_modules": loaded.target_modules}
    # keys HF PEFT writes that peftc has no field for are kept and written back
    assert loaded.extra["megatron_core"] == "megatron.core"
    assert loaded.to_dict()["megatron_core"] == "megatron.core"


def test_peftc_json_loads_in_hf_peft(tmp_path):
    ours = LoraConfig(**NON_DEFAULT)
    ours.save(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and data["use_dora"] is False
    assert data["use_qalora"] is False and data["lora_bias"] is False  # unsupported options written as "off"
    theirs = peft.LoraConfig.from_pretrained(str(tmp_path))
    _assert_same_fields(ours, theirs)
    generic = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(generic, peft.LoraConfig) and generic.peft_type == peft.PeftType.LORA
    _assert_same_fields(ours, generic)
    assert config_from_dict(ours.to_dict()) == ours


def test_unknown_keys_are_kept_and_written_back():
    data = {**LoraConfig().to_dict(), "future_option": [1, 2]}
    cfg = config_from_dict(data)
    assert cfg.extra == {"future_option": [1, 2]}
    assert cfg.to_dict()["future_option"] == [1, 2]


@pytest.mark.parametrize(
    "key,value",
    [
        ("lora_bias", True),
        ("use_qalora", True),
        ("layer_replication", [[0, 1]]),
        ("loftq_config", {"loftq_bits": 4}),
        ("kasa_config", {"r": 4}),
        ("use_bdlora", {"block": 2}),
        ("target_parameters", ["mlp.experts.weight"]),
    ],
)
def test_unsupported_features_switched_on_are_refused(key, value):
    with pytest.raises(ConfigError) as info:
        config_from_dict({"peft_type": "LORA", key: value})
    msg = str(info.value)
    assert "\n" not in msg
    assert f"{key}={value!r}" in msg and "not supported by peftc" in msg


def test_unsupported_features_switched_off_are_accepted():
    cfg = config_from_dict(peft.LoraConfig(use_dora=False, loftq_config={}, layer_replication=None).to_dict())
    assert isinstance(cfg, LoraConfig)


def test_hf_peft_dora_file_loads_as_a_lora_config(tmp_path):
    peft.LoraConfig(use_dora=True, target_modules=["c_attn"]).save_pretrained(str(tmp_path))
    cfg = load_config(tmp_path / "adapter_config.json")
    assert isinstance(cfg, LoraConfig) and cfg.use_dora is True and cfg.to_dict()["use_dora"] is True


def test_adalora_refuses_dora():
    with pytest.raises(ConfigError, match=r"AdaLoRA does not support DoRA \(use_dora=True\)"):
        config_from_dict({"peft_type": "ADALORA", "use_dora": True})


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"r": "8"}, "field 'r' must be int, got '8' (str)"),
        ({"r": True}, "field 'r' must be int"),
        ({"r": 2.5}, "field 'r' must be int"),
        ({"r": 0}, "r must be a positive integer, got r=0"),
        ({"r": -4}, "r must be a positive integer, got r=-4"),
        ({"bias": "x"}, "bias must be 'none', 'all' or 'lora_only', got 'x'"),
        ({"lora_dropout": 1.5}, "lora_dropout must be in [0, 1), got 1.5"),
        ({"lora_dropout": -0.1}, "lora_dropout must be in [0, 1)"),
        ({"lora_dropout": "0.1"}, "field 'lora_dropout' must be float"),
        ({"target_modules": 5}, "field 'target_modules'"),
        ({"target_modules": [1, 2]}, "field 'target_modules'"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa' is not supported"),
        ({"rank_pattern": {"c_attn": 0}}, "rank_pattern['c_attn'] must be a positive integer"),
        ({"rank_pattern": {"c_attn": "4"}}, "field 'rank_pattern'"),
        ({"alpha_pattern": ["c_attn"]}, "field 'alpha_pattern'"),
        ({"layers_to_transform": "0"}, "field 'layers_to_transform'"),
        ({"use_rslora": "yes"}, "field 'use_rslora' must be bool"),
    ],
)
def test_wrong_types_and_values_are_refused(kwargs, fragment):
    with pytest.raises(ConfigError) as info:
        LoraConfig(**kwargs)
    assert fragment in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigError):  # the same through the JSON path
        config_from_dict({"peft_type": "LORA", **kwargs})


@pytest.mark.parametrize(
    "data,fragment",
    [
        ({"peft_type": "BOGUS", "r": 8}, "names peft_type='BOGUS', which peftc does not know; supported: "),
        ({"r": 8}, "names peft_type=None"),
        ([{"peft_type": "LORA"}], "must be a JSON object, got list"),
    ],
)
def test_unknown_or_missing_peft_type_is_refused(tmp_path, data, fragment):
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert fragment in str(info.value) and str(path) in str(info.value)
    assert "LORA" in str(info.value) or "list" in str(info.value)


def test_not_json_and_missing_files_are_refused(tmp_path):
    path = tmp_path / "adapter_config.json"
    path.write_text('{"peft_type": "LORA", r: 8}')
    with pytest.raises(ConfigError, match=r"is not valid JSON \(line 1, column 23\)"):
        load_config(path)
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.json")


NAMES = [
    "transformer.h.0.attn.c_attn",
    "transformer.h.0.attn.c_proj",
    "transformer.h.1.mlp.c_proj",
    "transformer.h.1.mlp.c_fc",
    "model.layers.0.self_attn.q_proj",
]


@pytest.mark.parametrize("use_rslora", [False, True])
def test_rank_and_alpha_patterns_follow_hf_peft(use_rslora):
    """peftc's per-module rank/alpha/scale against HF PEFT's own key matching (get_pattern_key)."""
    rank_pattern = {"mlp.c_proj": 2, "c_proj": 4, r"h\.1\..*c_fc": 6}
    alpha_pattern = {"attn.c_attn": 32, "q_proj": 3}
    cfg = LoraConfig(r=8, lora_alpha=16, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, use_rslora=use_rslora)
    for name in NAMES:
        r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), name), 8)
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), name), 16)
        assert cfg.rank_for(name) == r, name
        assert cfg.alpha_for(name) == alpha, name
        assert cfg.scale_for(name) == pytest.approx(alpha / math.sqrt(r) if use_rslora else alpha / r)
    assert cfg.rank_for("transformer.h.1.mlp.c_proj") == 2 and cfg.rank_for("transformer.h.0.attn.c_proj") == 4


def test_task_names_are_the_task_registry_s():
    """The command line's --task choices (peftc.config, no torch import) are exactly peftc.tasks.TASKS."""
    from peftc.config import TASK_NAMES
    from peftc.tasks import TASKS

    assert set(TASK_NAMES) == set(TASKS) and len(TASK_NAMES) == len(TASKS)
