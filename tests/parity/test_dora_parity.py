"""DoRA parity with HF PEFT 0.21 through its on-disk format, both directions: GPT-2 (Conv1D), LLaMA (Linear),
BERT seq-cls (the classifier in modules_to_save) and OPT (positions from the attention mask).

peftc → HF PEFT: a peftc DoRA adapter, away from init (B random, m off ‖W‖), saved with
``AdapterState.save``, loads with ``PeftModel.from_pretrained(fresh_base, dir)`` and gives the peftc
program's logits; merged, it gives ``merge_and_unload()``'s. HF PEFT → peftc: an adapter made with
``get_peft_model(model, LoraConfig(use_dora=True))``, moved away from init and saved with
``save_pretrained``, loads with ``AdapterState.load``, binds into a peftc program and gives HF PEFT's
logits; re-saved by peftc it loads in HF PEFT again. fp32, atol 1e-5, on a left-padded and a
right-padded batch (real positions only).
"""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from conftest import batch_for, captured, model_for, real_positions
from peftc.passes import insertion_pipeline, merge_pipeline
from peftc.passes.dora import MAGNITUDE

from peftc.adapters import AdapterState
from peftc.config import LoraConfig

ATOL = 1e-5
CASES = [("gpt2", "causal-lm"), ("llama", "causal-lm"), ("bert", "seq-cls"), ("opt", "causal-lm")]
#: Several targets incl. MLP layers, a rank pattern, rsLoRA; GPT-2 also trains its biases (bias="all").
KWARGS = {
    "gpt2": dict(r=6, lora_alpha=12, target_modules=["c_attn", "c_proj", "c_fc"], rank_pattern={"c_fc": 4},
                 use_rslora=True, bias="all"),
    "llama": dict(r=6, lora_alpha=12, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                  "up_proj", "down_proj"], rank_pattern={"down_proj": 2}),
    # BERT seq-cls: the classifier head trained in full beside DoRA (task_type SEQ_CLS saves it)
    "bert": dict(r=4, lora_alpha=8, target_modules=["query", "value", "dense"], modules_to_save=["classifier"]),
    # OPT: positions derived from the attention mask (left padding shifts them)
    "opt": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"], rank_pattern={"fc1": 2}),
}  # fmt: skip
PADDING = ["left", "right"]
PARAMS = [(case, pad) for case in CASES for pad in PADDING]
IDS = [f"{f}-{pad}-pad" for (f, _), pad in PARAMS]


def _kwargs(case) -> dict:
    return dict(task_type="SEQ_CLS" if case[1] == "seq-cls" else "CAUSAL_LM", use_dora=True, **KWARGS[case[0]])


def _batch(program, padding: str) -> tuple:
    """Row 0 padded by 3 tokens on the left (``batch_for``'s) or on the right."""
    if padding == "left":
        return batch_for(program)
    inputs = dict(zip(program.input_names, batch_for(program, left_pad=False), strict=True))
    inputs["attention_mask"][0, -3:] = 0
    inputs["input_ids"][0, -3:] = 0
    if "position_ids" in inputs:
        inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return tuple(inputs[n] for n in program.input_names)


def _away(named: dict[str, torch.Tensor], seed: int) -> None:
    """Move every trainable tensor off its init: B random, m by ±20 % per row, A and biases by noise."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(named.items()):
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif MAGNITUDE in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _hf_logits(model, program, inputs):
    model.eval()
    with torch.no_grad():
        return model(**dict(zip(program.input_names, inputs, strict=True))).logits


def _ours(program, inputs):
    with torch.no_grad():
        return program(*inputs)


def _diff(program, inputs, ours, theirs) -> float:
    sel = real_positions(program, inputs)
    assert ours.shape == theirs.shape
    return (ours[sel] - theirs[sel]).abs().max().item()


def _key_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "keys" in str(w.message).lower()]


def _from_pretrained(case, directory):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(model_for(*case), str(directory))
    assert _key_warnings(caught) == []
    return model


@pytest.mark.parametrize("case,padding", PARAMS, ids=IDS)
def test_peftc_dora_adapter_loads_in_hf_peft(tmp_path, case, padding):
    program, _ = captured(*case)
    insertion_pipeline(LoraConfig(**_kwargs(case)))(program)
    state = program.adapter
    _away(state.tensors, seed=0)
    state.save(tmp_path / "adapter")
    inputs = _batch(program, padding)
    ours = _ours(program, inputs)

    hf = _from_pretrained(case, tmp_path / "adapter")
    assert hf.peft_config["default"].use_dora is True
    n_hf = sum(p.numel() for n, p in hf.named_parameters() if "lora_" in n)
    assert n_hf == sum(t.numel() for k, t in state.tensors.items() if "lora_" in k)
    assert sum(1 for n, _ in hf.named_parameters() if "lora_magnitude_vector" in n) == len(program.sites)
    theirs = _hf_logits(hf, program, inputs)
    diff = _diff(program, inputs, ours, theirs)
    print(f"\nDoRA parity {case[0]} {padding}-pad peftc->HF: {diff:.3g}")
    assert diff <= ATOL
    base = _hf_logits(model_for(*case), program, inputs)
    assert _diff(program, inputs, theirs, base) > 1e-2  # the adapter does something

    merge_pipeline()(program)
    merged = _diff(program, inputs, _ours(program, inputs), _hf_logits(hf.merge_and_unload(), program, inputs))
    print(f"DoRA parity {case[0]} {padding}-pad merged vs HF merge_and_unload: {merged:.3g}")
    assert merged <= ATOL


@pytest.mark.parametrize("case,padding", PARAMS, ids=IDS)
def test_hf_peft_dora_adapter_binds_in_peftc(tmp_path, case, padding):
    torch.manual_seed(1)
    hf = peft.get_peft_model(model_for(*case), peft.LoraConfig(**_kwargs(case)))
    _away({n: p for n, p in hf.named_parameters() if p.requires_grad}, seed=1)
    hf.save_pretrained(str(tmp_path / "hf"))

    state = AdapterState.load(tmp_path / "hf")
    assert state.config.use_dora is True
    program, _ = captured(*case)
    result = insertion_pipeline(state.config, state)(program)
    assert result.modified and program.adapter is state
    n_sites = sum(1 for n, _ in hf.named_modules() if n.endswith(".lora_magnitude_vector.default"))
    assert len(program.sites) == n_sites and {s.variant for s in program.sites.values()} == {"dora"}
    inputs = _batch(program, padding)
    theirs = _hf_logits(hf, program, inputs)
    diff = _diff(program, inputs, _ours(program, inputs), theirs)
    print(f"\nDoRA parity {case[0]} {padding}-pad HF->peftc: {diff:.3g}")
    assert diff <= ATOL

    # and back: peftc re-saves it, HF PEFT loads the same adapter
    state.save(tmp_path / "again")
    again = _hf_logits(_from_pretrained(case, tmp_path / "again"), program, inputs)
    assert _diff(program, inputs, again, theirs) <= ATOL
