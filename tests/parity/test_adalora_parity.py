"""AdaLoRA parity with HF PEFT 0.21: forward, on-disk format both ways, pruned adapters, RankAllocator, regulariser.

Adapters are never at identity init: E (HF inits it to 0) and A, B are perturbed. fp32, atol 1e-4, on a batch
with a left-padded row (real positions only).
"""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from conftest import FAMILIES, batch_for, captured, real_positions
from peftc.passes import insertion_pipeline, merge_pipeline
from peftc.passes.adalora_training import AdaLoraTraining, resize_by_rank_pattern
from torch import nn

from peftc.adapters import AdapterState
from peftc.config import AdaLoraConfig

ATOL = 1e-4
CASES = [("gpt2", "causal-lm"), ("llama", "causal-lm"), ("bert", "seq-cls")]
IDS = [f"{f}-{t}" for f, t in CASES]
TARGETS = {"gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value"]}


def _kwargs(case, **extra) -> dict:
    fam, task = case
    kw = {**dict(init_r=6, target_r=2, lora_alpha=12, total_step=10, target_modules=TARGETS[fam]), **extra}
    if task == "seq-cls":
        return dict(task_type="SEQ_CLS", modules_to_save=["classifier", "score"], **kw)
    return dict(task_type="CAUSAL_LM", **kw)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread avoids oversubscription on shared CPUs (measured 50x faster backward)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _perturb(params, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.3 * torch.randn(p.shape, generator=gen))


def _hf_logits(model, program, inputs):
    model.eval()
    with torch.no_grad():
        return model(**dict(zip(program.input_names, inputs, strict=True))).logits


def _ours(program, inputs):
    with torch.no_grad():
        return program(*inputs)


def _max_diff(program, inputs, ours, theirs) -> float:
    sel = real_positions(program, inputs)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours[sel], theirs[sel], atol=ATOL, rtol=0)
    return float((ours[sel] - theirs[sel]).abs().max())


def _key_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "keys" in str(w.message).lower()]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_peftc_adapter_loads_in_hf_peft(tmp_path, case):
    program, _ = captured(*case)
    insertion_pipeline(AdaLoraConfig(**_kwargs(case)))(program)
    state = program.adapter
    _perturb(state.tensors.values(), seed=0)
    state.save(tmp_path / "adapter")
    inputs = batch_for(program)
    ours = _ours(program, inputs)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf = peft.PeftModel.from_pretrained(FAMILIES[case](), str(tmp_path / "adapter"))
    assert _key_warnings(caught) == []
    theirs = _hf_logits(hf, program, inputs)
    print("peftc->hf max diff", case, _max_diff(program, inputs, ours, theirs))
    base = _hf_logits(FAMILIES[case](), program, inputs)
    assert (theirs - base)[real_positions(program, inputs)].abs().max() > 1e-2  # the adapter does something

    merge_pipeline()(program)
    merged = _hf_logits(hf.merge_and_unload(), program, inputs)
    print("merged max diff", case, _max_diff(program, inputs, _ours(program, inputs), merged))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_hf_peft_adapter_binds_in_peftc(tmp_path, case):
    torch.manual_seed(1)
    hf = peft.get_peft_model(FAMILIES[case](), peft.AdaLoraConfig(**_kwargs(case)))
    _perturb([p for p in hf.parameters() if p.requires_grad], seed=1)
    hf.save_pretrained(str(tmp_path / "hf"))

    state = AdapterState.load(tmp_path / "hf")
    assert isinstance(state.config, AdaLoraConfig) and state.config.init_r == 6
    assert not any(k.endswith("ranknum") for k in state.tensors)  # HF PEFT 0.21 does not save it
    program, _ = captured(*case)
    assert insertion_pipeline(state.config, state)(program).modified
    assert len(program.sites) == sum(1 for n, _ in hf.named_modules() if n.endswith(".lora_E"))
    inputs = batch_for(program)
    theirs = _hf_logits(hf, program, inputs)
    print("hf->peftc max diff", case, _max_diff(program, inputs, _ours(program, inputs), theirs))

    state.save(tmp_path / "again")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = peft.PeftModel.from_pretrained(FAMILIES[case](), str(tmp_path / "again"))
    assert _key_warnings(caught) == []
    _max_diff(program, inputs, _hf_logits(again, program, inputs), theirs)


def _fake_grads(hf_model, state, gen):
    """The same random gradient on each HF parameter and its peftc twin."""
    for n, p in hf_model.named_parameters():
        if "lora_" in n and p.requires_grad:
            g = torch.randn(p.shape, generator=gen)
            p.grad = g.clone()
            state.tensors[n.replace(".default", "")].grad = g.clone()


def _twin_state(hf, config: AdaLoraConfig) -> AdapterState:
    tensors = {
        n.replace(".default", ""): nn.Parameter(p.detach().clone())
        for n, p in hf.named_parameters()
        if "lora_" in n and p.requires_grad
    }
    return AdapterState(config, tensors)


def test_rank_allocator_matches_hf():
    case = ("gpt2", "causal-lm")
    kw = _kwargs(case, tinit=2, tfinal=3, deltaT=2, total_step=14, init_r=6, target_r=2)
    torch.manual_seed(3)
    hf = peft.get_peft_model(FAMILIES[case](), peft.AdaLoraConfig(**kw))
    _perturb([p for p in hf.parameters() if p.requires_grad], seed=3)
    config = AdaLoraConfig(**kw)
    state = _twin_state(hf, config)
    hooks = AdaLoraTraining(config, state, total_steps=14)
    hf_alloc = hf.base_model.rankallocator
    assert (hooks.allocator.init_bgt, hooks.allocator.target_bgt) == (hf_alloc.init_bgt, hf_alloc.target_bgt)
    gen = torch.Generator().manual_seed(4)
    masked_steps = 0
    for step in range(1, 18):
        assert hooks.allocator.budget_schedule(step) == hf_alloc.budget_schedule(step)
        _fake_grads(hf, state, gen)
        hf.base_model.update_and_allocate(step)
        hooks.after_step(step)
        theirs = hf.peft_config["default"].rank_pattern
        if theirs is not None:
            masked_steps += 1
            assert config.rank_pattern == {k.replace(".default", ""): v for k, v in theirs.items()}
        for n, p in hf.named_parameters():
            if "lora_E" in n:
                assert torch.equal(p.detach(), state.tensors[n.replace(".default", "")].detach()), (step, n)
    assert masked_steps > 5
    kept = [sum(m) for m in config.rank_pattern.values()]
    assert sum(kept) == 2 * len(kept)


def test_pruned_adapter_both_ways(tmp_path):
    """An adapter after rank allocation: HF PEFT saves cut tensors plus rank_pattern; peftc reads and writes that."""
    case = ("gpt2", "causal-lm")
    kw = _kwargs(case, total_step=6, init_r=6, target_r=2)
    torch.manual_seed(5)
    hf = peft.get_peft_model(FAMILIES[case](), peft.AdaLoraConfig(**kw))
    _perturb([p for p in hf.parameters() if p.requires_grad], seed=5)
    gen = torch.Generator().manual_seed(6)
    for step in range(1, 7):
        for p in hf.parameters():
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=gen)
        hf.base_model.update_and_allocate(step)
    hf.save_pretrained(str(tmp_path / "hf"))

    state = AdapterState.load(tmp_path / "hf")
    ranks = {k: sum(v) for k, v in state.config.rank_pattern.items()}
    assert sum(ranks.values()) == 2 * len(ranks) and len(set(ranks.values())) > 1  # uneven, as pruning makes it
    for key, rank in ranks.items():
        assert state.tensors[f"base_model.model.{key}"].shape == (rank, 1)
    program, _ = captured(*case)
    insertion_pipeline(state.config, state)(program)
    inputs = batch_for(program)
    hf_fresh = peft.PeftModel.from_pretrained(FAMILIES[case](), str(tmp_path / "hf"))
    theirs = _hf_logits(hf_fresh, program, inputs)
    print("pruned hf->peftc max diff", _max_diff(program, inputs, _ours(program, inputs), theirs))

    # peftc's own pruning: masked full-size tensors resized by rank_pattern load in HF PEFT with the same logits
    config = AdaLoraConfig(**kw)
    full = _twin_state(hf, config)
    config.rank_pattern = {k.replace(".default", ""): v for k, v in hf.peft_config["default"].rank_pattern.items()}
    program2, _ = captured(*case)
    insertion_pipeline(config, full)(program2)  # init_r-shaped tensors with rank_pattern set: the mid-training form
    masked = _ours(program2, inputs)
    resized = resize_by_rank_pattern(full)
    resized.save(tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(FAMILIES[case](), str(tmp_path / "ours"))
    print("pruned peftc->hf max diff", _max_diff(program2, inputs, masked, _hf_logits(again, program2, inputs)))


def test_orthogonal_regularization_matches_hf():
    case = ("gpt2", "causal-lm")
    torch.manual_seed(7)
    hf = peft.get_peft_model(FAMILIES[case](), peft.AdaLoraConfig(**_kwargs(case, orth_reg_weight=0.3)))
    _perturb([p for p in hf.parameters() if p.requires_grad], seed=7)
    program, _ = captured(*case)
    inputs = dict(zip(program.input_names, batch_for(program), strict=True))
    with torch.no_grad():
        with_reg = hf(**inputs, labels=inputs["input_ids"]).loss
        plain = hf.base_model.model(**inputs, labels=inputs["input_ids"]).loss
    config = AdaLoraConfig(**_kwargs(case, orth_reg_weight=0.3))
    ours = AdaLoraTraining(config, _twin_state(hf, config), total_steps=10).regularization()
    assert float(with_reg - plain) > 0.01
    torch.testing.assert_close(ours.detach(), with_reg - plain, atol=1e-5, rtol=1e-5)
