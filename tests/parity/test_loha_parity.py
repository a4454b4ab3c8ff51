"""LoHa parity with HF PEFT 0.21 through its on-disk format, both directions, fp32.

HF PEFT → peftc: an adapter made with ``get_peft_model``, every factor perturbed, saved with
``save_pretrained`` (its default: for a targeted ``lm_head`` that includes HF's copy of the base weight),
loads with ``AdapterState.load``, binds into a peftc program and gives HF PEFT's logits. peftc → HF PEFT:
a perturbed peftc adapter saved with ``AdapterState.save`` loads with ``PeftModel.from_pretrained`` and
gives the peftc program's logits; merged, ``merge_and_unload()``'s. Batches are right- and left-padded
(real positions compared). Families: GPT-2, LLaMA and OPT (positions derived from the attention mask) causal
LMs, BERT sequence classification (the classifier trained in full, ``modules_to_save``). Train programs draw
HF PEFT's random numbers in HF's order (rank and module dropout), and their factor gradients equal those of
HF's hand-written ``HadaWeight.backward``.

HF PEFT 0.21's LoHa refuses GPT-2's Conv1D (``TypeError``); peftc adapts it as the equivalent nn.Linear, so
GPT-2's reference is HF PEFT on GPT-2 with its Conv1D layers converted to nn.Linear (``conftest.hf_base``:
same module names, same adapter keys). The conversion is the identity for LLaMA.
"""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from conftest import captured, hf_base, model_for
from peft.tuners.loha import LoHaLayer
from peftc.passes import insertion_pipeline, merge_pipeline
from peftc.passes.loha import LoHaConfig

from peftc.adapters import AdapterState
from peftc.errors import AdapterMismatchError

ATOL = 1e-5
ALL_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: name -> (family, HF PEFT LoHaConfig kwargs)
CASES = {
    "gpt2-default": ("gpt2", dict(r=4, alpha=8)),  # HF's table: c_attn, a Conv1D
    "gpt2-c_attn-c_fc": (
        "gpt2",
        dict(r=6, alpha=9, target_modules=["c_attn", "mlp.c_fc"], rank_pattern={"c_fc": 2}, alpha_pattern={"c_fc": 3}),
    ),  # fmt: skip
    "gpt2-lm_head": ("gpt2", dict(r=4, alpha=8, target_modules=["lm_head"])),
    "llama-default": ("llama", dict(r=4, alpha=6)),  # HF's table: q_proj, v_proj
    "llama-all-patterns": (
        "llama",
        dict(
            r=6,
            alpha=9,
            target_modules=ALL_LLAMA,
            rank_pattern={"down_proj": 2, "k_proj": 4},
            alpha_pattern={"up_proj": 3},
            init_weights=False,
        ),
    ),  # fmt: skip
    # BERT seq-cls (the classifier trained in full, modules_to_save) and OPT (positions from the attention mask)
    "bert-seq-cls": ("bert", dict(r=4, alpha=8, target_modules=["query", "value", "dense"])),
    "opt-default": ("opt", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "fc1"], rank_pattern={"fc1": 2})),
}
#: The task of each family's cases.
TASKS = {"bert": "seq-cls"}
#: max |peftc - HF PEFT| per (case, direction, padding), printed at the end of the module (pytest -s)
FIGURES: dict[str, float] = {}


def _batch(program, pad: str, batch: int = 3, seq: int = 9, seed: int = 1) -> dict[str, torch.Tensor]:
    """Row 0 padded by 3 tokens (pad id 0) on the ``pad`` side, row 2 by 1."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row, n in ((0, 3), (2, 1)):
        cols = slice(0, n) if pad == "left" else slice(seq - n, seq)
        mask[row, cols] = 0
        ids[row, cols] = 0
    tensors = {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": torch.zeros_like(ids),
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
    }
    return {n: tensors[n] for n in program.input_names}


def _perturb_named(params, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(params, key=lambda kv: kv[0]):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _compare(program, hf_model, pad: str) -> float:
    x = _batch(program, pad)
    with torch.no_grad():
        got = program(*x.values())
        want = hf_model(**x).logits
    family = program.model_config.model_type
    rows = x["attention_mask"].bool() if _task(family) == "causal-lm" else slice(None)  # seq-cls: every row
    assert (want - model_for(family, _task(family))(**x).logits)[rows].abs().max() > 1e-2  # not identity
    return (got - want)[rows].abs().max().item()


def _task(family: str) -> str:
    return TASKS.get(family, "causal-lm")


def _config_kwargs(family: str, kwargs: dict) -> dict:
    """HF PEFT's task type; a seq-cls head is trained in full (modules_to_save)."""
    if _task(family) == "seq-cls":
        return dict(task_type="SEQ_CLS", modules_to_save=["classifier"], **kwargs)
    return dict(task_type="CAUSAL_LM", **kwargs)


def _hf_loha(family: str, kwargs: dict, seed: int):
    base = hf_base(lambda: model_for(family, _task(family)))
    model = peft.get_peft_model(base, peft.LoHaConfig(**_config_kwargs(family, kwargs))).eval()
    _perturb_named([(n, p) for n, p in model.named_parameters() if "hada_" in n or "modules_to_save" in n], seed)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_peft_saves_peftc_loads(case, tmp_path):
    family, kwargs = CASES[case]
    hf = _hf_loha(family, kwargs, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lm_head: "Setting save_embedding_layers to True"
        hf.save_pretrained(tmp_path)
    state = AdapterState.load(tmp_path)
    assert isinstance(state.config, LoHaConfig)
    program, _ = captured(family, _task(family))
    insertion_pipeline(state.config, state)(program)
    assert len(program.sites) == sum(isinstance(m, LoHaLayer) for m in hf.modules())
    for pad in ("right", "left"):
        diff = FIGURES[f"{case} HF->peftc {pad}"] = _compare(program, hf, pad)
        assert diff <= ATOL, (pad, diff)


def test_hf_peft_copy_of_a_targeted_lm_head_is_checked_and_dropped(tmp_path):
    """HF PEFT saves ``lm_head.base_layer.weight`` (``save_embedding_layers``): equal to the base, a no-op."""
    from safetensors.torch import load_file, save_file

    hf = _hf_loha("gpt2", CASES["gpt2-lm_head"][1], seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    saved = load_file(str(weights))
    copy = "base_model.model.lm_head.base_layer.weight"
    assert copy in saved
    state = AdapterState.load(tmp_path)
    program, _ = captured("gpt2", "causal-lm")
    insertion_pipeline(state.config, state)(program)
    assert copy not in state.tensors  # checked against the base, then not kept (nor written back)
    saved[copy] = saved[copy] + 0.5  # a resized or changed vocabulary: not this base
    save_file(saved, str(weights))
    state = AdapterState.load(tmp_path)
    program, _ = captured("gpt2", "causal-lm")
    with pytest.raises(AdapterMismatchError, match=r"lm_head\.base_layer\.weight is HF PEFT's copy of the base"):
        insertion_pipeline(state.config, state)(program)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peftc_saves_hf_peft_loads(case, tmp_path):
    family, kwargs = CASES[case]
    program, _ = captured(family, _task(family))
    insertion_pipeline(LoHaConfig(**_config_kwargs(family, kwargs)))(program)
    _perturb_named(program.adapter.tensors.items(), seed=4)
    program.adapter.save(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lm_head is tied to the embedding
        hf = peft.PeftModel.from_pretrained(hf_base(lambda: model_for(family, _task(family))), str(tmp_path)).eval()
    hf_keys = {k.replace(".default", "") for k, _ in hf.named_parameters() if "hada_" in k}
    assert hf_keys == {k for k in program.adapter.tensors if "hada_" in k}
    for pad in ("right", "left"):
        diff = FIGURES[f"{case} peftc->HF {pad}"] = _compare(program, hf, pad)
        assert diff <= ATOL, (pad, diff)
    merge_pipeline()(program)
    for pad in ("right", "left"):
        diff = FIGURES[f"{case} merged peftc vs HF {pad}"] = _compare(program, hf, pad)
        assert diff <= ATOL, (pad, diff)
    if "lm_head" in kwargs.get("target_modules", []):
        return  # HF's merge_and_unload adds ΔW to the lm_head tensor it shares with wte (HF warns); peftc unties it
    merged_hf = hf.merge_and_unload()
    for pad in ("right", "left"):
        diff = FIGURES[f"{case} merged peftc vs HF merge_and_unload {pad}"] = _compare(program, merged_hf, pad)
        assert diff <= ATOL, (pad, diff)


def _train_pair(kwargs: dict, tmp_path):
    hf = _hf_loha("llama", kwargs, seed=5).train()
    hf.save_pretrained(tmp_path)
    state = AdapterState.load(tmp_path)
    state.trainable_(True)
    program, _ = captured("llama", "causal-lm", mode="train")
    insertion_pipeline(state.config, state)(program)
    return hf, program, state


@pytest.mark.parametrize(
    "dropouts", [dict(rank_dropout=0.5), dict(module_dropout=0.5)], ids=["rank_dropout", "module_dropout"]
)
def test_train_mode_dropout_draws_hf_peft_random_numbers(dropouts, tmp_path):
    """Same seed, same output: the gate's rand(1) then the rows' rand(out), per site, as HF PEFT draws them."""
    hf, program, _ = _train_pair(dict(r=4, alpha=6, **dropouts), tmp_path)
    x = _batch(program, "left")
    outs = []
    for seed in range(4):
        torch.manual_seed(seed)
        with torch.no_grad():
            got = program(*x.values())
        torch.manual_seed(seed)
        with torch.no_grad():
            want = hf(**x).logits
        FIGURES[f"train-mode {next(iter(dropouts))} seed {seed}"] = diff = (got - want).abs().max().item()
        assert diff <= ATOL
        outs.append(got)
    assert max((outs[0] - o).abs().max().item() for o in outs[1:]) > 1e-3  # the dropout is random


def test_factor_gradients_match_hf_peft_backward(tmp_path):
    hf, program, state = _train_pair(dict(r=4, alpha=6, target_modules=ALL_LLAMA), tmp_path)
    x = _batch(program, "right")
    rows = x["attention_mask"].bool()
    program(*x.values())[rows].pow(2).mean().backward()
    hf(**x).logits[rows].pow(2).mean().backward()
    worst = 0.0
    for name, p in hf.named_parameters():
        if "hada_" in name:
            ours = state.tensors[name.replace(".default", "")].grad
            assert ours is not None and p.grad.abs().max() > 0, name
            worst = max(worst, ((ours - p.grad).abs().max() / p.grad.abs().max()).item())
    FIGURES["factor gradients, max relative diff"] = worst
    assert worst <= 1e-5


@pytest.fixture(scope="module", autouse=True)
def _print_figures():
    """Prints the figures gathered by the module's tests when it ends (visible with ``pytest -s``)."""
    yield
    for key, value in FIGURES.items():
        print(f"{key}: {value:.2e}")
