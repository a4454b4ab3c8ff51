"""Prefix tuning vs HF PEFT 0.21: same weights, same logits (fp32, atol 1e-4); adapters cross-load both ways.

GPT-2, LLaMA with grouped-query attention (2 key/value heads for 4 query heads) and BERT (seq-cls: HF
PEFT's backbone + head path), each with and without ``prefix_projection``, on a left-padded batch. Every
prefix (and head) is perturbed with random values, and each case first checks that the prefix changes the
base model's logits, so equal logits prove something. Causal-lm logits are compared at real tokens.
Token classification (BERT, RoBERTa: HF PEFT's backbone + head path on every position) is compared at
real tokens of left- and right-padded batches, atol 1e-5.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import batch_for, captured, real_positions
from peftc.passes import insertion_pipeline

from peftc.adapters import AdapterState
from peftc.config import PrefixTuningConfig

peft = pytest.importorskip("peft")

ATOL = 1e-4
N_VT = 5


def _config(task: str, projection: bool) -> PrefixTuningConfig:
    return PrefixTuningConfig(
        num_virtual_tokens=N_VT,
        task_type="CAUSAL_LM" if task == "causal-lm" else "SEQ_CLS",
        prefix_projection=projection,
        encoder_hidden_size=24 if projection else None,
        modules_to_save=["classifier", "score"] if task == "seq-cls" else None,
    )


def _hf_model(model, cfg: PrefixTuningConfig, state: AdapterState):
    """HF PEFT around a copy of ``model`` with the peftc adapter's weights (prefix or encoder, head) copied in."""
    data = {k: v for k, v in cfg.to_dict().items() if k != "peft_type"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.get_peft_model(copy.deepcopy(model), peft.PrefixTuningConfig(**data)).eval()
    with torch.no_grad():
        for name, param in hf.prompt_encoder["default"].named_parameters():
            param.copy_(state.tensors[f"prompt_encoder.{name}" if cfg.prefix_projection else "prompt_embeddings"])
        for name, param in hf.named_parameters():
            if ".modules_to_save.default." in name:
                key = "base_model.model." + name.removeprefix("base_model.").replace(".modules_to_save.default", "")
                param.copy_(state.tensors[key])
    return hf


def _logits(module, program, inputs) -> torch.Tensor:
    kwargs = dict(zip(program.input_names, inputs, strict=True))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return module(**kwargs).logits


def _max_diff(program, inputs, actual, expected) -> float:
    assert actual.shape == expected.shape
    rows = real_positions(program, inputs)
    return float((actual - expected)[rows].abs().max())


def _perturb(state: AdapterState, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in state.tensors.values():
            t.add_(0.5 * torch.randn(t.shape, generator=gen))


CASES = [
    ("gpt2", "causal-lm", False, False),
    ("gpt2", "causal-lm", True, True),
    ("llama", "causal-lm", False, False),
    ("llama", "causal-lm", True, True),
    ("bert", "seq-cls", False, True),
    ("bert", "seq-cls", True, False),
]


@pytest.mark.parametrize(
    "fam,task,projection,hf_to_peftc",
    CASES,
    ids=[f"{f}-{'projection' if p else 'direct'}" for f, _, p, _ in CASES],
)
def test_same_logits_and_cross_loading(fam, task, projection, hf_to_peftc, tmp_path):
    cfg = _config(task, projection)
    program, model = captured(fam, task)
    inputs = batch_for(program)  # row 0 left-padded by 3 tokens
    base = _logits(model, program, inputs)
    names = list(program.input_names)
    insertion_pipeline(cfg)(program)
    assert program.input_names == names  # causal-lm keeps position_ids (shifted by n inside), BERT token_type_ids
    if fam == "llama":  # grouped-query attention: the prefix has the key/value heads' width (HF PEFT's rule)
        assert (cfg.num_attention_heads, cfg.token_dim) == (2, 32)
    state = program.adapter
    _perturb(state)
    ours = program(*inputs).detach()
    assert ours.shape == base.shape  # nothing is prepended to the sequence itself
    assert _max_diff(program, inputs, ours, base) > 1e-2  # the prefix is not a no-op

    hf = _hf_model(model, cfg, state)
    diff = _max_diff(program, inputs, ours, _logits(hf, program, inputs))
    print(f"{fam}/{task} prefix_projection={projection}: peftc vs HF PEFT max diff {diff:.3g}")
    assert diff <= ATOL

    # peftc-saved -> HF PEFT (with projection the file holds the encoder's output)
    saved = state.save(tmp_path / "peftc")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), saved).eval()
    diff = _max_diff(program, inputs, ours, _logits(loaded, program, inputs))
    print(f"  peftc-saved -> PeftModel.from_pretrained: max diff {diff:.3g}")
    assert diff <= ATOL

    if not hf_to_peftc:  # each direction costs a capture; half the cases cover it
        return
    # HF-saved -> peftc (prompt_embeddings = the prefix, HF PEFT's inference mode)
    hf.save_pretrained(tmp_path / "hf")
    hf_state = AdapterState.load(tmp_path / "hf")
    assert hf_state.tensors["prompt_embeddings"].shape == (N_VT, cfg.num_layers * 2 * cfg.token_dim)
    bound, _ = captured(fam, task)
    insertion_pipeline(hf_state.config, hf_state)(bound)
    diff = _max_diff(program, inputs, ours, bound(*inputs).detach())
    print(f"  HF-saved -> peftc: max diff {diff:.3g}")
    assert diff <= ATOL


def test_prefix_key_values_are_hf_peft_cache_contents():
    """``prefix_key_values`` gives per layer exactly the (key, value) HF PEFT puts in the model's cache."""
    from peftc.passes import prefix_key_values

    cfg = _config("causal-lm", True)
    program, model = captured("llama", "causal-lm")
    insertion_pipeline(cfg)(program)
    _perturb(program.adapter)
    ours = prefix_key_values(program, model.config)
    hf = _hf_model(model, cfg, program.adapter)
    with torch.no_grad():
        cache = hf.get_prompt(batch_size=1)
    assert len(ours) == len(cache.layers) == 2
    for (k, v), layer in zip(ours, cache.layers, strict=True):
        assert k.shape == v.shape == (1, 2, N_VT, 16)  # [1, kv_heads, n, head_dim]
        torch.testing.assert_close(k, layer.keys, atol=1e-6, rtol=0)
        torch.testing.assert_close(v, layer.values, atol=1e-6, rtol=0)


def _token_cls_model(fam: str):
    """BERT or RoBERTa with a token-classification head (a ``classifier`` over every position)."""
    import transformers
    from conftest import tiny_bert_token

    from peftc.support import FAMILIES

    if fam == "bert":
        return tiny_bert_token()
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(**FAMILIES["roberta"][1], num_labels=5)
    return transformers.RobertaForTokenClassification(cfg).eval()


TOKEN_CASES = [("bert", False), ("bert", True), ("roberta", False)]


@pytest.mark.parametrize(
    "fam,projection", TOKEN_CASES, ids=[f"{f}-{'projection' if p else 'direct'}" for f, p in TOKEN_CASES]
)
def test_token_cls_backbone_and_head_match_hf_peft(fam, projection, tmp_path):
    """Token-cls heads take no past_key_values: backbone + dropout + head on every position, as HF PEFT does."""
    from peftc.program import capture

    model = _token_cls_model(fam)
    program = capture(model, "token-cls", mode="eval")
    cfg = PrefixTuningConfig(
        num_virtual_tokens=N_VT,
        task_type="TOKEN_CLS",
        prefix_projection=projection,
        encoder_hidden_size=24 if projection else None,
        modules_to_save=["classifier"],
    )
    insertion_pipeline(cfg)(program)
    state = program.adapter
    _perturb(state)
    hf = _hf_model(model, cfg, state)
    saved = state.save(tmp_path / "peftc")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), saved).eval()
    assert type(loaded).__name__ == "PeftModelForTokenClassification"
    for padding in ("left", "right"):
        inputs = dict(zip(program.input_names, batch_for(program, left_pad=False), strict=True))
        pads = slice(0, 3) if padding == "left" else slice(-3, None)
        inputs["input_ids"][0, pads], inputs["attention_mask"][0, pads] = 0, 0
        inputs = tuple(inputs.values())
        real = inputs[program.input_names.index("attention_mask")].bool()
        ours = program(*inputs).detach()
        assert ours.shape == (3, 9, 5)  # one row of label logits per position
        assert (ours - _logits(model, program, inputs))[real].abs().max() > 1e-2  # the prefix is not a no-op
        diff = float((ours - _logits(hf, program, inputs))[real].abs().max())
        saved_diff = float((ours - _logits(loaded, program, inputs))[real].abs().max())
        print(
            f"{fam}/token-cls projection={projection} {padding}-padded: vs HF PEFT {diff:.3g}, saved {saved_diff:.3g}"
        )
        assert max(diff, saved_diff) <= 1e-5, padding
