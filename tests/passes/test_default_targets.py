"""peftc's default ``target_modules`` tables equal HF PEFT 0.21's (``peft.utils.constants``), method by method.

The tables are copied from HF PEFT (it is a test dependency, not a runtime one); this test catches a table
that drifts. Every registered method whose insertion pass targets linear layers is checked, so a new
method is covered the day it registers.
"""

from __future__ import annotations

import pytest

peft_constants = pytest.importorskip("peft.utils.constants", reason="HF PEFT (the test reference) is not installed")

from peftc.passes.targets import LinearAdapterPass  # noqa: E402

from peftc.methods import methods  # noqa: E402


def _linear_methods():
    out = []
    for method in methods():
        first = next(iter(method.pipeline(method.config_class(), None)))
        if isinstance(first, LinearAdapterPass):
            out.append(pytest.param(method, first, id=method.peft_type))
    return out


@pytest.mark.parametrize(("method", "insertion"), _linear_methods())
def test_default_targets_match_hf_peft(method, insertion):
    hf = getattr(peft_constants, f"TRANSFORMERS_MODELS_TO_{method.peft_type}_TARGET_MODULES_MAPPING", None)
    assert hf is not None, f"HF PEFT has no default-target table for {method.peft_type}; peftc should not invent one"
    ours = insertion.default_targets
    assert ours, f"{method.peft_type} has no default targets"
    different = {k: (v, hf.get(k)) for k, v in ours.items() if hf.get(k) != v}
    assert not different, f"{method.peft_type} defaults differ from HF PEFT (peftc, HF): {different}"


def test_ia3_feedforward_defaults_match_hf_peft():
    from peftc.passes.ia3 import IA3_DEFAULT_FEEDFORWARD

    hf = peft_constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING
    assert {k: v for k, v in IA3_DEFAULT_FEEDFORWARD.items() if hf.get(k) != v} == {}


def test_adaption_prompt_targets_match_hf_peft():
    from peft.tuners.adaption_prompt.config import TRANSFORMERS_MODEL_CONFIG
    from peftc.passes.adaption_prompt import ADAPTION_PROMPT_TARGETS, PROJECTIONS

    assert set(ADAPTION_PROMPT_TARGETS) == set(TRANSFORMERS_MODEL_CONFIG)
    for model_type, cfg in TRANSFORMERS_MODEL_CONFIG.items():
        assert ADAPTION_PROMPT_TARGETS[model_type] == cfg.target_modules
        # HF leaves v_proj_layer None where one fused layer gives keys and values (GPT-2's c_attn)
        assert PROJECTIONS[model_type] == (cfg.k_proj_layer, cfg.v_proj_layer or cfg.k_proj_layer, cfg.o_proj_layer)
