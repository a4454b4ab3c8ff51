"""Model families beyond GPT-2 / LLaMA / BERT: capture, LoRA and IA3 parity with HF PEFT, merge, ONNX export.

One tiny model per family and task (2 layers, hidden 64, vocab 128: the support matrix's configs,
``peftc.support.FAMILIES``, built from its transformers config class, seeded; no downloads), captured
once per module. For each: the eval capture equals
the eager model on a left-padded batch at real positions and at a second shape (dynamic batch and
sequence); LoRA and IA3 with HF PEFT's default targets, perturbed away from identity, equal
``peft.get_peft_model`` loaded with the same tensors through ``set_peft_model_state_dict``; the merged
program equals the unmerged one. The ONNX cases (slow) export the merged LoRA program and verify it
with ONNX Runtime, for the families whose graphs differ from the ones the exporter tests cover.
fp32, atol 1e-5 (capture) and 1e-4 (adapters, export).
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from conftest import batch_for, real_positions
from peft import set_peft_model_state_dict
from peftc.passes import insertion_pipeline, merge_pipeline
from torch.nn import ModuleDict, ParameterDict

from peftc.config import IA3Config, LoraConfig
from peftc.program import capture
from peftc.support import FAMILIES

CAPTURE_ATOL = 1e-5
ATOL = 1e-4
#: Families the support matrix does not list, on a listed family's config: family -> (config class, kwargs).
UNLISTED = {
    "mistral": ("MistralConfig", FAMILIES["llama"][1]),
    "qwen2": ("Qwen2Config", FAMILIES["llama"][1]),
    "electra": ("ElectraConfig", dict(FAMILIES["bert"][1], embedding_size=64, pad_token_id=0)),
}
#: family -> (causal-lm class or None, seq-cls class); each family's config is the support matrix's
#: (peftc.support.FAMILIES) or UNLISTED's. Notes: GPT-Neo has one global and one local (sliding-window)
#: attention layer, GPT-J a partial interleaved rotary embedding, GPT-NeoX a fused query_key_value and a
#: parallel residual, BLOOM ALiBi (no position_ids input at all), RoBERTa positions from input_ids !=
#: pad_token_id offset by it, DeBERTa-v2 disentangled relative attention, DeBERTa a fused in_proj.
SPECS = {
    "opt": ("OPTForCausalLM", "OPTForSequenceClassification"),
    "gpt_neo": ("GPTNeoForCausalLM", "GPTNeoForSequenceClassification"),
    "gptj": ("GPTJForCausalLM", "GPTJForSequenceClassification"),
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXForSequenceClassification"),
    "bloom": ("BloomForCausalLM", "BloomForSequenceClassification"),
    "mistral": ("MistralForCausalLM", "MistralForSequenceClassification"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
    "roberta": (None, "RobertaForSequenceClassification"),
    "deberta-v2": (None, "DebertaV2ForSequenceClassification"),
    "deberta": (None, "DebertaForSequenceClassification"),
    "electra": (None, "ElectraForSequenceClassification"),
}


def config_spec(fam: str) -> tuple[str, dict]:
    """(transformers config class name, config kwargs) of ``fam``: the support matrix's tiny config."""
    return UNLISTED[fam] if fam in UNLISTED else FAMILIES[fam][:2]


#: Families whose modelling code is LLaMA's (tests/parity covers LLaMA): slow, to keep the default run short.
LLAMA_CLONES = {"mistral"}
#: One model per family in the default run (causal-lm for decoders, seq-cls for encoders); a decoder's
#: seq-cls head (``score`` on the last real token) is the GPT-2 / LLaMA one, so those cases are slow.
CASES = [
    pytest.param(fam, task, id=f"{fam}-{task}", marks=[pytest.mark.slow] if slow or fam in LLAMA_CLONES else [])
    for fam, spec in SPECS.items()
    for task, slow in ((("causal-lm", False), ("seq-cls", True)) if spec[0] else (("seq-cls", False),))
]
#: HF PEFT has no IA3 default targets for these model types (peftc raises ConfigError, as HF PEFT raises).
NO_IA3_DEFAULT = {"electra"}
#: ONNX export cases: graphs unlike GPT-2 / LLaMA / BERT (which tests/exporters covers); ~25 s each.
ONNX_CASES = [
    ("opt", "causal-lm"),
    ("gpt_neo", "causal-lm"),
    ("gptj", "causal-lm"),
    ("gpt_neox", "causal-lm"),
    ("bloom", "causal-lm"),
    ("deberta-v2", "seq-cls"),
    ("deberta", "seq-cls"),
]


def build(fam: str, task: str) -> torch.nn.Module:
    """A fresh, seeded tiny model of ``fam`` for ``task`` (same weights on every call)."""
    import transformers

    cfg_cls, kwargs = config_spec(fam)
    causal_cls, seqcls_cls = SPECS[fam]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**kwargs)
    if task == "seq-cls":
        cfg.num_labels = 3
        return getattr(transformers, seqcls_cls)(cfg).eval()
    return getattr(transformers, causal_cls)(cfg).eval()


_CAPTURES: dict = {}


def captured(fam: str, task: str):
    """A private copy of the cached eval capture of ``(fam, task)`` and the (shared) eager model."""
    if (fam, task) not in _CAPTURES:
        model = build(fam, task)
        _CAPTURES[(fam, task)] = (capture(model, task, mode="eval"), model)
    program, model = _CAPTURES[(fam, task)]
    gm = program.graph_module
    memo = {id(t): t for t in [*gm.parameters(), *gm.buffers()]}
    memo[id(program.model_config)] = program.model_config
    return copy.deepcopy(program, memo), model


@pytest.fixture(scope="module", autouse=True)
def _drop_captures():
    yield
    _CAPTURES.clear()


def _kwargs(task: str) -> dict:
    if task == "seq-cls":
        return dict(task_type="SEQ_CLS", modules_to_save=["classifier", "score"])
    return dict(task_type="CAUSAL_LM")


def _perturb(params, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


def _eager(model, program, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**dict(zip(program.input_names, inputs, strict=True))).logits


def _run(program, inputs) -> torch.Tensor:
    with torch.no_grad():
        return program(*inputs)


def _max_diff(program, inputs, a, b) -> float:
    assert a.shape == b.shape
    sel = real_positions(program, inputs)
    return (a[sel] - b[sel]).abs().max().item()


@pytest.mark.parametrize("fam,task", CASES)
def test_capture_matches_eager(fam, task):
    program, model = captured(fam, task)
    expected = ["input_ids", "attention_mask"]
    assert program.input_names[:2] == expected
    # up to the table size (64 for most here), or one less where the model's code guards it (GPT-Neo: 63)
    longest = min(program.max_positions() or 64, 64)
    for shape in ((3, 9), (2, 5), (2, longest)):  # none is the capture example's 2 x 8: the dims are dynamic
        inputs = batch_for(program, *shape)
        ours, eager = _run(program, inputs), _eager(model, program, inputs)
        assert _max_diff(program, inputs, ours, eager) <= CAPTURE_ATOL, shape


def _hf_parity(fam, task, peftc_config, hf_config, marker):
    """Insert, perturb, compare with HF PEFT loaded with the same tensors, merge; the figures."""
    program, model = captured(fam, task)
    inputs = batch_for(program)
    base = _run(program, inputs)
    insertion_pipeline(peftc_config)(program)
    state = program.adapter
    _perturb(state.tensors.values())
    ours = _run(program, inputs)
    assert _max_diff(program, inputs, ours, base) > 10 * ATOL  # the adapter does something

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.get_peft_model(build(fam, task), hf_config)
    result = set_peft_model_state_dict(hf, {k: t.detach() for k, t in state.tensors.items()})
    assert [k for k in result.unexpected_keys if marker in k] == []
    hf_sites = [n for n, m in hf.named_modules() if isinstance(getattr(m, marker, None), (ModuleDict, ParameterDict))]
    assert len(program.sites) == len(hf_sites) > 0
    hf.eval()
    assert _max_diff(program, inputs, ours, _eager(hf, program, inputs)) <= ATOL

    merge_pipeline()(program)
    assert not program.sites
    assert _max_diff(program, inputs, _run(program, inputs), ours) <= ATOL


@pytest.mark.parametrize("fam,task", CASES)
def test_lora_default_targets_match_hf_peft_and_merge(fam, task):
    _hf_parity(fam, task, LoraConfig(**_kwargs(task)), peft.LoraConfig(**_kwargs(task)), "lora_A")


@pytest.mark.parametrize("fam,task", CASES)
def test_ia3_default_targets_match_hf_peft_and_merge(fam, task):
    if fam in NO_IA3_DEFAULT:
        pytest.skip(f"HF PEFT 0.21 has no IA3 default target_modules for {fam}")
    _hf_parity(fam, task, IA3Config(**_kwargs(task)), peft.IA3Config(**_kwargs(task)), "ia3_l")


@pytest.mark.slow
@pytest.mark.parametrize("fam,task", ONNX_CASES, ids=[f"{f}-{t}" for f, t in ONNX_CASES])
def test_merged_lora_onnx_export_verifies(fam, task, tmp_path):
    from peftc.exporters.onnx import export_program_onnx
    from peftc.exporters.verify import make_cases, run_torch, verify_artifact

    program, _ = captured(fam, task)
    insertion_pipeline(LoraConfig(**_kwargs(task)))(program)
    _perturb(program.adapter.tensors.values())
    cases = make_cases(program)
    unmerged = run_torch(program, cases, program.input_names)  # the reference: the unmerged LoRA program
    merge_pipeline()(program)
    export_program_onnx(program, tmp_path / "model.onnx")
    report = verify_artifact("onnx", tmp_path / "model.onnx", program, cases=cases, reference=unmerged, atol=ATOL)
    assert report.cases and all(c.passed for c in report.cases)
