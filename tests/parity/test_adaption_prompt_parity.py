"""LLaMA-Adapter (adaption prompt) parity with HF PEFT 0.21: same tensors give the same logits, adapters
load both ways, a fresh adapter (gate 0) is what HF PEFT's is, and an adapter saved by HF PEFT exports
to a verified ONNX file.

The reference is ``peft.get_peft_model(model, peft.AdaptionPromptConfig(...))`` on an untouched copy of
the same tiny model. Gates are set away from 0 and prompts perturbed, so the adapter is never the
identity. Logits are compared in fp32 on a left-padded batch (real positions for causal-lm, every row
for seq-cls), with ``position_ids`` from the mask fed to both.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from conftest import batch_for, real_positions, tiny_gpt2, tiny_llama
from peftc.passes import insertion_pipeline

from peftc.adapters import AdapterState
from peftc.config import AdaptionPromptConfig
from peftc.errors import ConfigError
from peftc.program import capture

peft = pytest.importorskip("peft", reason="HF PEFT is the parity reference (a test dependency)")

ATOL = 1e-4
ADAPTER_LEN = 5


def tiny_mistral():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, pad_token_id=0)  # fmt: skip
    return MistralForCausalLM(cfg).eval()


def tiny_llama_bias():
    """LLaMA with biased projections: HF PEFT's o_proj(adapter output) adds the o_proj bias a second time."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=1, vocab_size=128, max_position_embeddings=128, pad_token_id=0,
                      attention_bias=True)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.1)  # transformers zero-inits biases: make them count
    return model


MODELS = {
    ("llama", "causal-lm"): tiny_llama,  # grouped-query attention: 4 query heads, 2 key/value heads
    ("llama", "seq-cls"): lambda: tiny_llama(num_labels=3),
    ("gpt2", "causal-lm"): tiny_gpt2,  # fused c_attn, no output projection
    ("gpt2", "seq-cls"): lambda: tiny_gpt2(num_labels=3),
    ("mistral", "causal-lm"): tiny_mistral,
    ("llama-bias", "causal-lm"): tiny_llama_bias,  # 4 query heads share 1 key/value head; biased k/v/o
}
CASES = {  # name: (model, task, adapter_layers)
    "llama-gqa-top1": ("llama", "causal-lm", 1),
    "llama-gqa-all": ("llama", "causal-lm", None),
    "llama-seq-cls": ("llama", "seq-cls", 1),
    "gpt2-all": ("gpt2", "causal-lm", 2),
    "gpt2-seq-cls": ("gpt2", "seq-cls", 1),
    "mistral-gqa": ("mistral", "causal-lm", 2),
    "llama-o-proj-bias": ("llama-bias", "causal-lm", 2),
}


@pytest.fixture(scope="module")
def pristine():
    """``pristine(model, task)``: (untouched model copy, deep copy of its eval capture)."""
    cache = {}

    def get(name: str, task: str):
        if (name, task) not in cache:
            model = MODELS[(name, task)]()
            reference = copy.deepcopy(model)  # before capture, which switches the attention implementation
            cache[(name, task)] = (reference, capture(model, task, mode="eval"))
        reference, program = cache[(name, task)]
        return copy.deepcopy(reference), copy.deepcopy(program)

    return get


def _task_type(task: str) -> str:
    return "SEQ_CLS" if task == "seq-cls" else "CAUSAL_LM"


def _hf_model(reference, task: str, adapter_layers: int, state: AdapterState | None = None):
    """HF PEFT's adaption prompt model around ``reference``, with ``state``'s tensors when given."""
    config = peft.AdaptionPromptConfig(
        task_type=_task_type(task), adapter_len=ADAPTER_LEN, adapter_layers=adapter_layers
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(reference, config).eval()
    if state is not None:
        result = peft.set_peft_model_state_dict(model, state.state_dict())
        assert not result.unexpected_keys
        assert not [k for k in result.missing_keys if ".adaption_" in k]
    return model


def _perturb(state: AdapterState, seed: int = 7) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in state.tensors.items():
            if key.endswith("adaption_gate"):
                t.copy_(0.5 + 0.5 * torch.rand(t.shape, generator=gen))  # open the gate
            else:
                t.add_(0.5 * torch.randn(t.shape, generator=gen))


def _logits(model, program, inputs) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(**dict(zip(program.input_names, inputs, strict=True))).logits


def _diff(a: torch.Tensor, b: torch.Tensor, sel: torch.Tensor) -> float:
    return (a - b)[sel].abs().max().item()


@pytest.mark.parametrize("case", list(CASES))
def test_adaption_prompt_matches_hf_peft(pristine, case, tmp_path):
    name, task, layers = CASES[case]
    reference, prog = pristine(name, task)
    reference_2, base = pristine(name, task)
    cfg = AdaptionPromptConfig(task_type=_task_type(task), adapter_len=ADAPTER_LEN, adapter_layers=layers)
    insertion_pipeline(cfg)(prog)
    layers = cfg.adapter_layers  # filled in (every layer) when left None
    _perturb(prog.adapter)
    inputs = batch_for(prog)
    sel = real_positions(prog, inputs)
    with torch.no_grad():
        ours = prog(*inputs)
        assert _diff(ours, base(*inputs), sel) > 1e-2  # the adapter is not the identity

    # 1. same tensors set into HF PEFT -> same logits; HF has exactly the tensors peftc made
    hf = _hf_model(reference, task, layers, prog.adapter)
    hf_keys = {k.replace(".default", "") for k, _ in hf.named_parameters() if ".adaption_" in k}
    assert hf_keys == set(prog.adapter.tensors)
    theirs = _logits(hf, prog, inputs)
    d_forward = _diff(ours, theirs, sel)
    assert d_forward <= ATOL, d_forward

    # 2. HF PEFT's save_pretrained -> AdapterState.load -> bind into a fresh capture
    hf.save_pretrained(tmp_path / "hf")
    loaded = AdapterState.load(tmp_path / "hf")
    assert isinstance(loaded.config, AdaptionPromptConfig)
    assert (loaded.config.adapter_len, loaded.config.adapter_layers) == (ADAPTER_LEN, layers)
    assert set(loaded.tensors) == set(prog.adapter.tensors)
    bound = copy.deepcopy(base)
    insertion_pipeline(loaded.config, loaded)(bound)
    with torch.no_grad():
        d_load = _diff(bound(*inputs), theirs, sel)
    assert d_load <= ATOL, d_load

    # 3. peftc's AdapterState.save -> peft.PeftModel.from_pretrained; the two configs agree
    prog.adapter.save(tmp_path / "peftc")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_loaded = peft.PeftModel.from_pretrained(reference_2, str(tmp_path / "peftc")).eval()
    d_save = _diff(ours, _logits(hf_loaded, prog, inputs), sel)
    assert d_save <= ATOL, d_save
    ours_json = json.loads((tmp_path / "peftc" / "adapter_config.json").read_text())
    hf_json = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    for key in ("peft_type", "task_type", "adapter_len", "adapter_layers", "target_modules"):
        assert ours_json[key] == hf_json[key], key
    print(f"{case}: forward {d_forward:.2e}, hf->peftc {d_load:.2e}, peftc->hf {d_save:.2e}")


@pytest.mark.parametrize("name", ["llama", "gpt2", "llama-bias"])
def test_fresh_adapter_equals_hf_at_gate_zero(pristine, name):
    """Gate 0: LLaMA and GPT-2 are the base model exactly, in HF PEFT and in peftc. With a biased o_proj,
    HF PEFT's output is base + o_proj.bias (o_proj(0) = bias); peftc follows HF, not the base."""
    reference, prog = pristine(name, "causal-lm")
    _, base = pristine(name, "causal-lm")
    insertion_pipeline(AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=ADAPTER_LEN))(prog)
    assert all(float(t.abs().max()) == 0 for k, t in prog.adapter.tensors.items() if k.endswith("adaption_gate"))
    hf = _hf_model(reference, "causal-lm", 2, prog.adapter)
    inputs = batch_for(prog)
    sel = real_positions(prog, inputs)
    with torch.no_grad():
        ours, base_out = prog(*inputs), base(*inputs)
    theirs = _logits(hf, prog, inputs)
    assert _diff(ours, theirs, sel) <= ATOL
    if name == "llama-bias":
        assert _diff(theirs, base_out, sel) > 1e-3 and _diff(ours, base_out, sel) > 1e-3
    else:
        assert _diff(theirs, base_out, sel) == 0.0 and torch.equal(ours[sel], base_out[sel])


def test_same_seed_gives_hf_peft_initial_prompts(pristine):
    """Fresh prompts are drawn as HF PEFT draws them (N(0, 1), layer by layer): same seed, same tensors."""
    reference, prog = pristine("llama", "causal-lm")
    torch.manual_seed(123)
    insertion_pipeline(AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=ADAPTER_LEN))(prog)
    torch.manual_seed(123)
    hf = _hf_model(reference, "causal-lm", 2)
    hf_tensors = {k.replace(".default", ""): p for k, p in hf.named_parameters() if ".adaption_" in k}
    assert set(hf_tensors) == set(prog.adapter.tensors)
    for key, tensor in prog.adapter.tensors.items():
        assert torch.equal(tensor, hf_tensors[key]), key


def _hf_saved_adapter(tmp_path, make, layers: int):
    """Base model dir + an adapter dir written by HF PEFT itself (gate open, prompt perturbed)."""
    model = make()
    model.save_pretrained(tmp_path / "base", safe_serialization=True)
    hf = _hf_model(copy.deepcopy(model), "causal-lm", layers)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for key, param in hf.named_parameters():
            if key.endswith("adaption_gate"):
                param.fill_(0.8)
            elif key.endswith("adaption_prompt"):
                param.add_(0.3 * torch.randn(param.shape, generator=gen))
    hf.save_pretrained(tmp_path / "hf-adapter")
    return tmp_path / "base", tmp_path / "hf-adapter", hf


def _ort_vs_hf(path, hf, inputs: dict[str, torch.Tensor]) -> float:
    """ONNX Runtime logits vs HF PEFT's at real positions; a KV-cache graph gets an empty past."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {}
    for spec in session.get_inputs():
        if spec.name in inputs:
            feeds[spec.name] = inputs[spec.name].numpy()
        else:  # past_key_values.{i}.key|value [batch, kv_heads, 0, head_dim]
            shape = [inputs["input_ids"].shape[0], spec.shape[1], 0, spec.shape[3]]
            feeds[spec.name] = torch.zeros(shape).numpy()
    logits = torch.from_numpy(session.run(["logits"], feeds)[0])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = hf(**inputs).logits
    mask = inputs["attention_mask"].bool()
    return float((logits - expected)[mask].abs().max())


def _padded_inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 128, (3, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :1] = 0
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def _optimum_generates_like_hf_peft(out, hf, make) -> None:
    """optimum's ORTModelForCausalLM on the KV-cache artifact: HF PEFT's greedy tokens and every step's logits
    (prefill and 7 cached decode steps) on a left-padded batch; the base model's differ."""
    from optimum.onnxruntime import ORTModelForCausalLM

    ids = torch.randint(1, 128, (3, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0  # left-padded rows
    ids[2, :1], mask[2, :1] = 0, 0
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)

    def generate(model) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = model.generate(input_ids=ids, attention_mask=mask, **settings)
        return result.sequences[:, ids.shape[1] :], torch.stack([x.float() for x in result.logits])

    ort_model = ORTModelForCausalLM.from_pretrained(out)
    assert ort_model.can_use_cache
    tokens, logits = generate(hf)
    got_tokens, got_logits = generate(ort_model)
    assert torch.equal(got_tokens, tokens)
    assert (got_logits - logits).abs().max() < ATOL
    _, base_logits = generate(make())
    assert (base_logits[0] - logits[0]).abs().max() > 1e-3  # the adapter matters


@pytest.mark.parametrize(
    "make,layers",
    [pytest.param(tiny_llama, 2, id="llama-gqa"), pytest.param(tiny_gpt2, 1, id="gpt2", marks=pytest.mark.slow)],
)
def test_export_of_an_hf_peft_adapter_verifies_and_merge_is_refused(tmp_path, make, layers):
    pytest.importorskip("onnxruntime")
    from peftc.exporting import export

    base_dir, adapter_dir, hf = _hf_saved_adapter(tmp_path, make, layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = export(adapter_dir, model=str(base_dir), out=tmp_path / "onnx")
    report = json.loads((out / "report.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert report["verified"] and report["max_abs_diff"] <= ATOL
    assert manifest["merged"] is False
    d_hf = _ort_vs_hf(out / "model.onnx", hf, _padded_inputs())
    print(f"adaption prompt ONNX export ({make.__name__}): ORT vs torch {report['max_abs_diff']:.2e}, vs HF {d_hf:.2e}")
    assert d_hf <= ATOL
    _optimum_generates_like_hf_peft(out, hf, make)
    with pytest.raises(ConfigError, match="--merge cannot fold LLaMA-Adapter adapters"):
        export(adapter_dir, model=str(base_dir), out=tmp_path / "merged", merge=True)
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_bf16_model(tmp_path, make):
    """A bf16 model: fresh prompts and gates are bf16 (HF's target dtype), the softmax runs in fp32 and the
    result is cast back, as in HF PEFT; an fp32 adapter file is rounded to bf16 on binding, as HF's load is."""
    model = make().to(torch.bfloat16)
    reference = copy.deepcopy(model)
    prog = capture(model, "causal-lm", mode="eval")
    insertion_pipeline(AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=ADAPTER_LEN))(prog)
    assert {t.dtype for t in prog.adapter.tensors.values()} == {torch.bfloat16}
    # fp32 file with values that are not bf16-representable
    gen = torch.Generator().manual_seed(1)
    tensors = {k: torch.nn.Parameter(t.float() + 0.3 * torch.rand(t.shape, generator=gen) + 0.1)
               for k, t in prog.adapter.tensors.items()}  # fmt: skip
    AdapterState(AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=ADAPTER_LEN, adapter_layers=2),
                 tensors).save(tmp_path / "fp32")  # fmt: skip
    state = AdapterState.load(tmp_path / "fp32")
    bound = capture(make().to(torch.bfloat16), "causal-lm", mode="eval")
    insertion_pipeline(state.config, state)(bound)
    casts = [n for n in bound.graph.nodes if n.meta.get("peftc_role") == "adaption_cast"]
    assert casts and all(n.meta["val"].dtype in (torch.bfloat16, torch.float32) for n in casts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.PeftModel.from_pretrained(reference, str(tmp_path / "fp32")).eval()
    assert {p.dtype for k, p in hf.named_parameters() if ".adaption_" in k} == {torch.bfloat16}
    inputs = batch_for(bound)
    sel = real_positions(bound, inputs)
    with torch.no_grad():
        ours = bound(*inputs)
    theirs = _logits(hf, bound, inputs)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    d = _diff(ours.float(), theirs.float(), sel)
    print(f"bf16 {make.__name__}: peftc vs HF PEFT {d:.2e}")
    assert d <= ATOL, d
