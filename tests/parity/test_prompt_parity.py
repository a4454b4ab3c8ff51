"""Prompt tuning and P-tuning vs HF PEFT 0.21: same weights, same logits; adapters cross-load both ways.

Causal-lm logits are ``[batch, n_virtual + seq, vocab]`` in both; they are compared at the virtual
positions and the real (unpadded) tokens of a left-padded batch. Seq-cls logits are compared per row.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import batch_for, captured
from peftc.passes import insertion_pipeline

from peftc.adapters import AdapterState
from peftc.config import PromptEncoderConfig, PromptTuningConfig

peft = pytest.importorskip("peft")

ATOL = 1e-4
N_VT = 5


def _hf_config(cfg):
    data = {k: v for k, v in cfg.to_dict().items() if k not in ("peft_type",)}
    cls = peft.PromptTuningConfig if cfg.peft_type == "PROMPT_TUNING" else peft.PromptEncoderConfig
    return cls(**data)


def _hf_model(model, cfg, state):
    """HF PEFT around a copy of ``model`` with the peftc adapter's weights (encoder, head) copied in."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.get_peft_model(copy.deepcopy(model), _hf_config(cfg)).eval()
    with torch.no_grad():
        for name, param in hf.prompt_encoder["default"].named_parameters():
            key = "prompt_embeddings" if cfg.peft_type == "PROMPT_TUNING" else f"prompt_encoder.{name}"
            param.copy_(state.tensors[key])
        for name, param in hf.named_parameters():
            if ".modules_to_save.default." in name:
                key = "base_model.model." + name.removeprefix("base_model.").replace(".modules_to_save.default", "")
                param.copy_(state.tensors[key])
    return hf


def _logits(hf, program, inputs):
    kwargs = dict(zip(program.input_names, inputs, strict=True))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf(**kwargs).logits


def _max_diff(program, inputs, actual, expected) -> float:
    assert actual.shape == expected.shape
    if program.task.name != "causal-lm":
        return float((actual - expected).abs().max())
    mask = inputs[program.input_names.index("attention_mask")].bool()
    rows = torch.cat([torch.ones(mask.shape[0], N_VT, dtype=torch.bool), mask], dim=1)
    return float((actual - expected)[rows].abs().max())


def _perturb(state: AdapterState, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in state.tensors.values():
            t.add_(0.1 * torch.randn(t.shape, generator=gen))


CASES = [
    ("gpt2", "causal-lm", PromptTuningConfig(num_virtual_tokens=N_VT, task_type="CAUSAL_LM")),
    (
        "gpt2",
        "causal-lm",
        PromptEncoderConfig(num_virtual_tokens=N_VT, task_type="CAUSAL_LM", encoder_hidden_size=32),
    ),
    (
        "bert",
        "seq-cls",
        PromptEncoderConfig(
            num_virtual_tokens=N_VT,
            task_type="SEQ_CLS",
            encoder_reparameterization_type="LSTM",
            encoder_hidden_size=16,
            modules_to_save=["classifier", "score"],
        ),
    ),
    # grouped-query attention (num_key_value_heads=2 < 4 heads): keys/values are n + seq long after prepending
    ("llama", "causal-lm", PromptTuningConfig(num_virtual_tokens=N_VT, task_type="CAUSAL_LM")),
    (
        "llama",
        "causal-lm",
        PromptEncoderConfig(num_virtual_tokens=N_VT, task_type="CAUSAL_LM", encoder_hidden_size=32),
    ),
]


@pytest.mark.parametrize(
    "fam,task,cfg,hf_to_peftc",
    [(*c, hf) for c, hf in zip(CASES, (True, False, True, True, False), strict=True)],
    ids=["gpt2-pt", "gpt2-ptuning-mlp", "bert-ptuning-lstm-head", "llama-gqa-pt", "llama-gqa-ptuning-mlp"],
)
def test_same_logits_and_cross_loading(fam, task, cfg, hf_to_peftc, tmp_path):
    cfg = copy.deepcopy(cfg)
    program, model = captured(fam, task)
    insertion_pipeline(cfg)(program)
    state = program.adapter
    _perturb(state)
    inputs = batch_for(program)
    ours = program(*inputs).detach()
    hf = _hf_model(model, cfg, state)
    diff = _max_diff(program, inputs, ours, _logits(hf, program, inputs))
    print(f"{fam}/{task}/{cfg.peft_type}: peftc vs HF PEFT max diff {diff:.3g}")
    assert diff <= ATOL

    # peftc-saved -> HF PEFT (P-tuning: the file holds the encoder's output)
    saved = state.save(tmp_path / "peftc", force=False)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), saved).eval()
    diff = _max_diff(program, inputs, ours, _logits(loaded, program, inputs))
    print(f"  peftc-saved -> PeftModel.from_pretrained: max diff {diff:.3g}")
    assert diff <= ATOL

    if not hf_to_peftc:  # each direction costs a capture; half the cases cover it
        return
    # HF-saved -> peftc (fixed embeddings, HF's inference mode)
    hf.save_pretrained(tmp_path / "hf")
    hf_state = AdapterState.load(tmp_path / "hf")
    assert set(hf_state.tensors) >= {"prompt_embeddings"}
    bound, _ = captured(fam, task)
    insertion_pipeline(hf_state.config, hf_state)(bound)
    diff = _max_diff(program, inputs, ours, bound(*inputs).detach())
    print(f"  HF-saved -> peftc: max diff {diff:.3g}")
    assert diff <= ATOL


def test_llama_gqa_captures_with_index_select_heads():
    """The GQA capture repeats key/value heads with index_select (see passes/prompt.py), and only while capturing."""
    program, model = captured("llama", "causal-lm")
    insertion_pipeline(PromptTuningConfig(num_virtual_tokens=N_VT, task_type="CAUSAL_LM"))(program)
    hist = program.op_histogram()
    assert hist.get("index_select.default", 0) == 2 * 2  # keys and values of both layers
    assert model.config._attn_implementation != "sdpa_without_vmap_gqa"  # restored after the capture
    inputs = batch_for(program, seq=30)  # a length other than the capture's
    assert program(*inputs).shape == (3, N_VT + 30, 128)
