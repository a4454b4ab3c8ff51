"""LoKr parity with HF PEFT 0.21 through its on-disk format, both directions, every factor layout.

peftc → HF PEFT: a perturbed peftc adapter saved with ``AdapterState.save`` loads with
``peft.PeftModel.from_pretrained`` and gives the peftc program's logits; merged, ``merge_and_unload()``'s.
HF PEFT → peftc: an adapter made with ``get_peft_model``, perturbed (every factor, w1 included: HF inits it
to zero) and saved with ``save_pretrained`` binds into a peftc program and gives HF PEFT's logits, and re-saved
by peftc loads in HF PEFT again. fp32, atol 1e-5, on batches with left- and right-padded rows (real positions).
Families: GPT-2 and LLaMA (every layout), OPT (positions derived from the attention mask) and BERT seq-cls.

GPT-2's reference is HF PEFT on GPT-2 with its Conv1D layers as nn.Linear (HF PEFT 0.21 refuses LoKr on
Conv1D; see ``conftest.linearise_conv1d``). Train programs are compared with HF PEFT in train mode at the same
seed: rank and module dropout draw the same numbers.
"""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from conftest import FAMILIES, captured, hf_base, model_for, real_positions
from lokr_cases import LAYOUT_IDS, LAYOUTS, TASKS, padded_batch, perturb
from peftc.passes import insertion_pipeline, merge_pipeline

from peftc.adapters import AdapterState
from peftc.config import LoKrConfig

ATOL = 1e-5
FAMILY_IDS = ["gpt2", "llama"]
PARAMS = [(fam, kind) for fam in FAMILY_IDS for kind in LAYOUT_IDS]
PARAMS += [("opt", "w2_decomposed"), ("bert", "decompose_both")]  # mask-derived positions; a seq-cls head
IDS = [f"{fam}-{kind}" for fam, kind in PARAMS]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _kwargs(fam: str, kind: str, task: str = "causal-lm") -> dict:
    kw = dict(LAYOUTS[(fam, kind)])
    if task == "seq-cls":
        return dict(task_type="SEQ_CLS", modules_to_save=["classifier", "score"], **kw)
    return dict(task_type="CAUSAL_LM", **kw)


def _hf_logits(model, program, inputs):
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


def _hf_layout(hf) -> set[str]:
    return {n.split(".lokr_")[1].split(".")[0] for n, _ in hf.named_parameters() if ".lokr_" in n}


def _factory(case: tuple[str, str]):
    return lambda: model_for(*case)


def _load_hf(factory, directory) -> torch.nn.Module:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf = peft.PeftModel.from_pretrained(hf_base(factory), str(directory)).eval()
    assert _key_warnings(caught) == []
    return hf


def test_hf_peft_021_refuses_lokr_on_conv1d():
    """Why GPT-2's reference is linearised: if this starts passing through, compare with HF PEFT on Conv1D directly."""
    with pytest.raises(TypeError, match="Conv1D"):
        peft.get_peft_model(FAMILIES[("gpt2", "causal-lm")](), peft.LoKrConfig(target_modules=["c_attn"]))


@pytest.mark.parametrize("fam,kind", PARAMS, ids=IDS)
def test_peftc_adapter_loads_in_hf_peft(tmp_path, fam, kind):
    case = (fam, TASKS.get(fam, "causal-lm"))
    program, _ = captured(*case)
    insertion_pipeline(LoKrConfig(**_kwargs(fam, kind, case[1])))(program)
    state = program.adapter
    perturb(state.tensors.values(), seed=0)
    state.save(tmp_path / "adapter")

    hf = _load_hf(_factory(case), tmp_path / "adapter")
    n_hf = sum(p.numel() for n, p in hf.named_parameters() if "lokr_" in n)
    lokr = {k: t for k, t in state.tensors.items() if ".lokr_" in k}  # (seq-cls: the head's copies besides)
    assert n_hf == sum(t.numel() for t in lokr.values())
    assert _hf_layout(hf) == {k.split(".lokr_")[1] for k in lokr}
    for side in ("left", "right"):
        inputs = padded_batch(program, side)
        theirs = _hf_logits(hf, program, inputs)
        diff = _max_diff(program, inputs, _ours(program, inputs), theirs)
        base = _hf_logits(model_for(*case), program, inputs)
        assert (theirs - base)[real_positions(program, inputs)].abs().max() > 1e-2  # the adapter does something
        print(f"PARITY peftc->hf {fam} {kind} {side}-padded max_abs_diff={diff:.3g}")

    inputs = padded_batch(program, "left")
    merge_pipeline()(program)
    merged = _hf_logits(hf.merge_and_unload(), program, inputs)
    diff = _max_diff(program, inputs, _ours(program, inputs), merged)
    print(f"PARITY merged {fam} {kind} max_abs_diff={diff:.3g}")


@pytest.mark.parametrize("fam,kind", PARAMS, ids=IDS)
def test_hf_peft_adapter_binds_in_peftc(tmp_path, fam, kind):
    case = (fam, TASKS.get(fam, "causal-lm"))
    torch.manual_seed(1)
    hf = peft.get_peft_model(hf_base(_factory(case)), peft.LoKrConfig(**_kwargs(fam, kind, case[1]))).eval()
    perturb([p for p in hf.parameters() if p.requires_grad], seed=1)
    hf.save_pretrained(str(tmp_path / "hf"))

    state = AdapterState.load(tmp_path / "hf")
    assert isinstance(state.config, LoKrConfig) and state.config.r == LAYOUTS[(fam, kind)]["r"]
    program, _ = captured(*case)
    result = insertion_pipeline(state.config, state)(program)
    assert result.modified and program.adapter is state
    assert len(program.sites) == sum(1 for _, m in hf.named_modules() if isinstance(m, peft.tuners.lokr.LoKrLayer))
    for side in ("left", "right"):
        inputs = padded_batch(program, side)
        diff = _max_diff(program, inputs, _ours(program, inputs), _hf_logits(hf, program, inputs))
        print(f"PARITY hf->peftc {fam} {kind} {side}-padded max_abs_diff={diff:.3g}")

    state.save(tmp_path / "again")  # and back
    again = _load_hf(_factory(case), tmp_path / "again")
    inputs = padded_batch(program, "left")
    _max_diff(program, inputs, _hf_logits(again, program, inputs), _hf_logits(hf, program, inputs))


@pytest.mark.parametrize("direction", ["peftc->hf", "hf->peftc"])
def test_seq_cls_head_round_trips(tmp_path, direction):
    """LoKr sites plus a trained head (``modules_to_save``) on LLaMA seq-cls."""
    case = ("llama", "seq-cls")
    kw = _kwargs("llama", "w2_decomposed", task="seq-cls")
    program, _ = captured(*case)
    if direction == "peftc->hf":
        insertion_pipeline(LoKrConfig(**kw))(program)
        perturb(program.adapter.tensors.values(), seed=2)
        program.adapter.save(tmp_path / "a")
        hf = _load_hf(FAMILIES[case], tmp_path / "a")
    else:
        torch.manual_seed(2)
        hf = peft.get_peft_model(hf_base(FAMILIES[case]), peft.LoKrConfig(**kw)).eval()
        perturb([p for p in hf.parameters() if p.requires_grad], seed=2)
        hf.save_pretrained(str(tmp_path / "a"))
        state = AdapterState.load(tmp_path / "a")
        insertion_pipeline(state.config, state)(program)
    inputs = padded_batch(program, "left")
    diff = _max_diff(program, inputs, _ours(program, inputs), _hf_logits(hf, program, inputs))
    print(f"PARITY {direction} llama seq-cls w2_decomposed max_abs_diff={diff:.3g}")


@pytest.mark.parametrize(
    "kw,seeds",
    [
        # every q/v site: HF draws rand(1) (module dropout 0) then rand(out) per site, as the train graph does
        (dict(rank_dropout=0.5, target_modules=["q_proj", "v_proj"]), [0, 1]),
        # module dropout skips a site's rand(out) in HF: one site keeps the draws aligned; seeds cover skip and keep
        (
            dict(rank_dropout=0.3, rank_dropout_scale=True, module_dropout=0.5, target_modules=["0.self_attn.v_proj"]),
            [0, 1, 2, 3, 4, 5],
        ),
    ],  # fmt: skip
    ids=["rank_dropout", "module_and_scaled_rank_dropout"],
)
def test_train_mode_dropouts_draw_what_hf_peft_draws(kw, seeds):
    """LLaMA has no other randomness in train mode, so a seeded forward must give HF PEFT's logits exactly."""
    case = ("llama", "causal-lm")
    cfg = LoKrConfig(r=2, alpha=4, decompose_both=True, task_type="CAUSAL_LM", **kw)
    program, _ = captured(*case, mode="train")
    insertion_pipeline(cfg)(program)
    perturb(program.adapter.tensors.values(), seed=3)
    hf = peft.get_peft_model(hf_base(FAMILIES[case]), peft.LoKrConfig(**cfg.to_dict()))
    assert not hf.load_state_dict(_hf_keys(program.adapter), strict=False).unexpected_keys
    inputs = padded_batch(program, "left")
    eval_out = _hf_logits(hf.eval(), program, inputs)
    hf.train()
    outcomes, kept = set(), set()
    for seed in seeds:
        torch.manual_seed(seed)
        ours = _ours(program, inputs)
        torch.manual_seed(seed)
        theirs = _hf_logits(hf, program, inputs)
        diff = _max_diff(program, inputs, ours, theirs)
        outcomes.add(bool((theirs - eval_out).abs().max() > 1e-6))
        if cfg.module_dropout:
            torch.manual_seed(seed)
            kept.add(bool(torch.rand(1) > cfg.module_dropout))
        print(f"PARITY train-mode {sorted(kw)} seed={seed} max_abs_diff={diff:.3g}")
    assert True in outcomes  # dropout changed the output at least once
    assert kept in (set(), {True, False})  # module dropout: the seeds cover a skipped and a kept branch


def _hf_keys(state: AdapterState) -> dict[str, torch.Tensor]:
    """peftc's saved keys as HF PEFT's in-memory state-dict keys (``….lokr_w1.default``)."""
    return {f"{k}.default": v.detach() for k, v in state.tensors.items()}
