"""Method options from the CLI: ``--num-virtual-tokens`` and ``--set FIELD=VALUE`` over ``--config``.

Only the config that training would build is checked here (``_method_config``): no model runs.
"""

from __future__ import annotations

import json

import pytest

from peftc.cli import _parse_settings
from peftc.errors import ConfigError
from peftc.training import TrainConfig, _method_config


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
