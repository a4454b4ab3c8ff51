"""LoRA parity with HF PEFT 0.21 through its on-disk format, both directions, every family and task.

peftc → HF PEFT: a perturbed peftc adapter saved with ``AdapterState.save`` loads with
``peft.PeftModel.from_pretrained(fresh_base, dir)`` and gives the peftc program's logits; merged,
it gives ``merge_and_unload()``'s. HF PEFT → peftc: an adapter made with ``get_peft_model``, perturbed
and saved with ``save_pretrained`` loads with ``AdapterState.load``, binds into a peftc program and
gives HF PEFT's logits. fp32, atol 1e-4, on a batch with a left-padded row (real positions only).
"""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from conftest import FAMILIES, batch_for, captured, real_positions
from peftc.passes import insertion_pipeline, merge_pipeline

from peftc.adapters import AdapterState
from peftc.config import LoraConfig

ATOL = 1e-4
CASES = sorted(FAMILIES)
#: Non-default configs: several targets incl. MLP layers, rank/alpha patterns, rsLoRA, trained biases.
NON_DEFAULT = {
    "gpt2": dict(
        r=6,
        lora_alpha=12,
        target_modules=["c_attn", "c_proj", "c_fc"],
        rank_pattern={"c_fc": 4},
        alpha_pattern={"mlp.c_proj": 32},
        use_rslora=True,
        bias="all",
    ),
    "llama": dict(
        r=6,
        lora_alpha=12,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        rank_pattern={"down_proj": 2, "k_proj": 4},
        alpha_pattern={"up_proj": 3.0},
        use_rslora=True,
        bias="all",
    ),
    "bert": dict(
        r=6,
        lora_alpha=12,
        target_modules=["query", "key", "value", "dense"],
        rank_pattern={"intermediate.dense": 4},
        alpha_pattern={"value": 32},
        use_rslora=True,
        bias="all",
    ),
}
LORA_ONLY = {
    "gpt2": dict(target_modules=["c_attn", "c_fc"], bias="lora_only"),
    "bert": dict(target_modules=["query", "dense"], bias="lora_only"),
}
PARAMS = [(case, "default") for case in CASES]
PARAMS += [(case, "non-default") for case in CASES]
PARAMS += [(case, "lora_only") for case in CASES if case[0] in LORA_ONLY and case[1] == "seq-cls"]
IDS = [f"{f}-{t}-{kind}" for (f, t), kind in PARAMS]


def _kwargs(case, kind) -> dict:
    fam, task = case
    kwargs = {"default": {}, "non-default": NON_DEFAULT.get(fam, {}), "lora_only": LORA_ONLY.get(fam, {})}[kind]
    if task == "seq-cls":
        return dict(task_type="SEQ_CLS", modules_to_save=["classifier", "score"], **kwargs)
    return dict(task_type="CAUSAL_LM", **kwargs)


def _perturb(params, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


def _hf_logits(model, program, inputs):
    model.eval()
    with torch.no_grad():
        return model(**dict(zip(program.input_names, inputs, strict=True))).logits


def _ours(program, inputs):
    with torch.no_grad():
        return program(*inputs)


def _assert_close(program, inputs, ours, theirs):
    sel = real_positions(program, inputs)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours[sel], theirs[sel], atol=ATOL, rtol=0)


def _key_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "keys" in str(w.message).lower()]


@pytest.mark.parametrize("case,kind", PARAMS, ids=IDS)
def test_peftc_adapter_loads_in_hf_peft(tmp_path, case, kind):
    program, _ = captured(*case)
    insertion_pipeline(LoraConfig(**_kwargs(case, kind)))(program)
    state = program.adapter
    _perturb(state.tensors.values(), seed=0)  # B, A, the head copy and trained biases: no identity init
    state.save(tmp_path / "adapter")
    inputs = batch_for(program)
    ours = _ours(program, inputs)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf = peft.PeftModel.from_pretrained(FAMILIES[case](), str(tmp_path / "adapter"))
    assert _key_warnings(caught) == []
    n_hf = sum(p.numel() for n, p in hf.named_parameters() if "lora_" in n)
    assert n_hf == sum(t.numel() for k, t in state.tensors.items() if "lora_" in k)
    theirs = _hf_logits(hf, program, inputs)
    _assert_close(program, inputs, ours, theirs)
    base = _hf_logits(FAMILIES[case](), program, inputs)
    assert (theirs - base)[real_positions(program, inputs)].abs().max() > 1e-2  # the adapter does something

    merge_pipeline()(program)
    merged_hf = hf.merge_and_unload()
    _assert_close(program, inputs, _ours(program, inputs), _hf_logits(merged_hf, program, inputs))


@pytest.mark.parametrize("case,kind", PARAMS, ids=IDS)
def test_hf_peft_adapter_binds_in_peftc(tmp_path, case, kind):
    torch.manual_seed(1)
    hf = peft.get_peft_model(FAMILIES[case](), peft.LoraConfig(**_kwargs(case, kind)))
    _perturb([p for p in hf.parameters() if p.requires_grad], seed=1)
    hf.save_pretrained(str(tmp_path / "hf"))

    state = AdapterState.load(tmp_path / "hf")
    assert state.config.to_dict()["r"] == hf.peft_config["default"].r
    program, _ = captured(*case)
    result = insertion_pipeline(state.config, state)(program)
    assert result.modified and program.adapter is state
    n_sites = sum(1 for n, _ in hf.named_modules() if n.endswith(".lora_A.default"))
    assert len(program.sites) == n_sites
    inputs = batch_for(program)
    theirs = _hf_logits(hf, program, inputs)
    _assert_close(program, inputs, _ours(program, inputs), theirs)

    # and back: peftc re-saves it (HF PEFT's duplicate head-bias keys dropped), HF PEFT loads the same adapter
    state.save(tmp_path / "again")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = peft.PeftModel.from_pretrained(FAMILIES[case](), str(tmp_path / "again"))
    assert _key_warnings(caught) == []
    _assert_close(program, inputs, _hf_logits(again, program, inputs), theirs)
