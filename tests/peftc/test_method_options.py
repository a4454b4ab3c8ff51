"""Method options from the CLI: ``--num-virtual-tokens`` and ``--set FIELD=VALUE`` over ``--config``.

Only the config that training would build is checked here (``method_config``): no model runs.
"""

from __future__ import annotations

import json

import pytest

from peftc.cli import _parse_settings
from peftc.errors import ConfigError
from peftc.training import TrainConfig
from peftc.training.options import method_config as _method_config


def test_set_values_are_json_or_strings():
    got = _parse_settings(("init_r=12", "prefix_projection=true", "init_text=Classify the review", "x=[1, 2]"))
    assert got == {"init_r": 12, "prefix_projection": True, "init_text": "Classify the review", "x": [1, 2]}
    with pytest.raises(ConfigError, match="FIELD=VALUE"):
        _parse_settings(("init_r",))


def test_flags_override_the_config_file(tmp_path):
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({"peft_type": "ADALORA", "init_r": 6, "target_r": 2, "total_step": 50}))
    cfg = _method_config(TrainConfig(config_file=str(path), method=None, options={"init_r": 12}), "causal-lm")
    assert (cfg.peft_type, cfg.init_r, cfg.target_r, cfg.total_step) == ("ADALORA", 12, 2, 50)


def test_num_virtual_tokens_reaches_prompt_methods_and_not_lora():
    cfg = _method_config(TrainConfig(method="prompt-tuning", num_virtual_tokens=7), "causal-lm")
    assert cfg.num_virtual_tokens == 7
    with pytest.raises(ConfigError, match="--num-virtual-tokens does not apply"):
        _method_config(TrainConfig(method="lora", num_virtual_tokens=7), "causal-lm")


def test_unknown_field_lists_the_fields():
    with pytest.raises(ConfigError, match=r"--set adapter_len: not a field of LORA configs.*lora_alpha"):
        _method_config(TrainConfig(method="lora", options={"adapter_len": 4}), "causal-lm")


def test_wrong_type_and_bad_value_are_config_errors():
    with pytest.raises(ConfigError):
        _method_config(TrainConfig(method="prompt-tuning", options={"num_virtual_tokens": "many"}), "causal-lm")
    with pytest.raises(ConfigError):
        _method_config(TrainConfig(method="prompt-tuning", num_virtual_tokens=0), "causal-lm")


def test_training_presets_fill_only_what_nothing_else_sets(tmp_path):
    from peftc.training.options import TRAIN_PRESETS

    cfg = _method_config(TrainConfig(method="lora"), "causal-lm")
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (8, TRAIN_PRESETS["lora_alpha"], TRAIN_PRESETS["lora_dropout"])
    assert _method_config(TrainConfig(method="adalora"), "causal-lm").lora_alpha == TRAIN_PRESETS["lora_alpha"]
    cfg = _method_config(TrainConfig(method="lora", lora_alpha=4, options={"lora_dropout": 0.0}), "causal-lm")
    assert (cfg.lora_alpha, cfg.lora_dropout) == (4, 0.0)
    # a config file is taken as written: what it leaves out is HF PEFT's default, as HF PEFT reads it
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    cfg = _method_config(TrainConfig(config_file=str(path)), "causal-lm")
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (4, 8, 0.0)


def test_config_file_alone_selects_its_method(tmp_path):
    """Without --method the config file's method is used (the default is not lora-vs-the-file)."""
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({"peft_type": "IA3", "target_modules": ["c_attn"], "feedforward_modules": []}))
    assert _method_config(TrainConfig(config_file=str(path)), "causal-lm").peft_type == "IA3"
    with pytest.raises(ConfigError, match="holds peft_type='IA3' but --method is 'lora'"):
        _method_config(TrainConfig(config_file=str(path), method="lora"), "causal-lm")


def test_flag_of_another_method_names_the_methods_it_applies_to():
    with pytest.raises(ConfigError, match=r"--r does not apply to method 'ia3'; it applies to lora, dora, adalora, lo"):
        _method_config(TrainConfig(method="ia3", r=4), "causal-lm")


def test_method_name_comes_from_the_registry():
    from peftc.training.options import method_name

    cfg = _method_config(TrainConfig(method="llama-adapter"), "causal-lm")
    assert method_name(cfg, "llama-adapter") == "llama-adapter"
    assert method_name(cfg) == "adaption-prompt"  # the first registered name
    assert method_name(_method_config(TrainConfig(), "causal-lm")) == "lora"


def test_method_fields_of_train_config_are_documented_by_the_method_configs():
    from peftc.config import LoraConfig, PromptLearningConfig

    helps = TrainConfig.field_help()
    assert helps["lora_alpha"] == LoraConfig.field_help()["lora_alpha"]
    assert helps["num_virtual_tokens"] == PromptLearningConfig.field_help()["num_virtual_tokens"]
    assert all(helps.values())
