"""(IA)³ parity with HF PEFT 0.21: same tensors give the same logits, both adapter formats load both ways,
and peftc's merge gives HF PEFT's merged weights.

The reference is ``peft.get_peft_model`` on an untouched copy of the same tiny model, with the
peftc adapter's tensors (perturbed away from 1, head included) set by ``set_peft_model_state_dict``.
Logits are compared in fp32 on a left-padded batch at real positions.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch_for, real_positions, tiny_bert, tiny_gpt2, tiny_llama
from peftc.passes import insertion_pipeline, merge_pipeline

from peftc.adapters import AdapterState
from peftc.config import IA3Config
from peftc.program import capture

peft = pytest.importorskip("peft", reason="HF PEFT is the parity reference (a test dependency)")

ATOL = 1e-4
FAMILIES = {"gpt2": (tiny_gpt2, "causal-lm"), "llama": (tiny_llama, "causal-lm"), "bert": (tiny_bert, "seq-cls")}
CASES = {
    "gpt2-default": ("gpt2", {}),  # Conv1D: c_attn output-scaled (bias too), mlp.c_proj input-scaled
    "llama-default": ("llama", {}),  # GQA k_proj/v_proj, down_proj feed-forward
    "bert-default": ("bert", {}),  # attention.output.dense and output.dense both feed-forward
    "llama-targets-only": (  # feedforward_modules left out: HF's table (down_proj) still applies; up_proj is output
        "llama",
        {"target_modules": ["q_proj", "o_proj", "up_proj", "down_proj"]},
    ),
    "bert-regex": (  # output-scaled Linear with bias; regex feed-forward
        "bert",
        {
            "target_modules": r".*\.(query|intermediate\.dense|output\.dense)",
            "feedforward_modules": r".*\.intermediate\.dense",
            "exclude_modules": ["layer.1.attention.output.dense"],
        },
    ),
}


@pytest.fixture(scope="module")
def pristine():
    """``pristine(family)``: (untouched model copy, deep copy of its eval capture)."""
    cache = {}

    def get(family: str):
        if family not in cache:
            make, task = FAMILIES[family]
            model = make()
            reference = copy.deepcopy(model)  # before capture, which switches the attention implementation
            cache[family] = (reference, capture(model, task, mode="eval"))
        reference, program = cache[family]
        return copy.deepcopy(reference), copy.deepcopy(program)

    return get


def _configs(family: str, options: dict) -> tuple[IA3Config, object]:
    task_type = "SEQ_CLS" if family == "bert" else "CAUSAL_LM"
    save = ["classifier", "score"] if family == "bert" else None
    return (
        IA3Config(task_type=task_type, modules_to_save=save, **options),
        peft.IA3Config(task_type=task_type, modules_to_save=save, **options),
    )


def _perturb(state: AdapterState) -> None:
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for t in state.tensors.values():
            t.add_(0.5 * torch.randn(t.shape, generator=gen))


def _hf_logits(model, program, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**dict(zip(program.input_names, inputs, strict=True))).logits


def _diff(a: torch.Tensor, b: torch.Tensor, sel: torch.Tensor) -> float:
    return (a - b)[sel].abs().max().item()


@pytest.mark.parametrize("case", sorted(CASES))
def test_ia3_matches_hf_peft(pristine, case, tmp_path):
    family, options = CASES[case]
    cfg, hf_cfg = _configs(family, options)
    reference, prog = pristine(family)
    fresh_reference, base = pristine(family)
    insertion_pipeline(cfg)(prog)
    _perturb(prog.adapter)
    inputs = batch_for(prog)
    sel = real_positions(prog, inputs)
    with torch.no_grad():
        ours = prog(*inputs)
        assert _diff(ours, base(*inputs), sel) > 1e-2  # the adapter is not the identity

    # 1. same tensors set into HF PEFT -> same logits
    hf = peft.get_peft_model(reference, hf_cfg).eval()
    result = peft.set_peft_model_state_dict(hf, prog.adapter.state_dict())
    assert not result.unexpected_keys
    hf_ia3 = {k for k, _ in hf.named_parameters() if ".ia3_l." in k}
    assert len(hf_ia3) == len([k for k in prog.adapter.tensors if k.endswith(".ia3_l")])
    theirs = _hf_logits(hf, prog, inputs)
    d_forward = _diff(ours, theirs, sel)
    assert d_forward <= ATOL, d_forward

    # 2. HF PEFT adapter dir -> AdapterState.load -> bind into a fresh capture
    hf.save_pretrained(tmp_path / "hf")
    loaded = AdapterState.load(tmp_path / "hf")
    assert isinstance(loaded.config, IA3Config) and set(loaded.tensors) == set(prog.adapter.tensors)
    bound = copy.deepcopy(base)
    insertion_pipeline(loaded.config, loaded)(bound)
    with torch.no_grad():
        d_load = _diff(bound(*inputs), theirs, sel)
    assert d_load <= ATOL, d_load

    # 3. peftc AdapterState.save -> peft.PeftModel.from_pretrained
    prog.adapter.save(tmp_path / "peftc")
    hf_loaded = peft.PeftModel.from_pretrained(fresh_reference, str(tmp_path / "peftc")).eval()
    d_save = _diff(ours, _hf_logits(hf_loaded, prog, inputs), sel)
    assert d_save <= ATOL, d_save

    # 4. merged: equals unmerged, and every folded tensor equals HF PEFT's merge_and_unload
    merge_pipeline()(prog)
    merged_hf = hf.merge_and_unload()
    with torch.no_grad():
        d_merge = _diff(prog(*inputs), ours, sel)
    assert d_merge <= ATOL, d_merge
    hf_params = dict(merged_hf.named_parameters())
    site_names = {k.removeprefix("base_model.model.").removesuffix(".ia3_l") for k in loaded.tensors}
    checked = 0
    for name, param in prog.graph_module.named_parameters():
        module = name.removeprefix("model.").rpartition(".")[0]
        if module in site_names:
            assert torch.equal(param, hf_params[name.removeprefix("model.")]), name
            checked += 1
    assert checked >= len(site_names)
    print(f"{case}: forward {d_forward:.2e}, hf->peftc {d_load:.2e}, peftc->hf {d_save:.2e}, merged {d_merge:.2e}")


def test_ia3_bf16_model_fp32_vectors(tmp_path):
    """An fp32 adapter on a bf16 model: HF PEFT keeps l in fp32 (autocast_adapter_dtype) and casts each product
    back to bf16; peftc inserts the same cast, and its merge is computed as HF's (product in fp32, stored bf16)."""
    model = tiny_gpt2().to(torch.bfloat16)
    reference = copy.deepcopy(model)
    prog = capture(model, "causal-lm", mode="eval")
    gen = torch.Generator().manual_seed(0)
    shapes = {f"transformer.h.{i}.attn.c_attn": (192, 1) for i in (0, 1)}
    shapes.update({f"transformer.h.{i}.mlp.c_proj": (1, 256) for i in (0, 1)})
    tensors = {
        f"base_model.model.{name}.ia3_l": torch.nn.Parameter(1 + 0.5 * torch.randn(shape, generator=gen))
        for name, shape in shapes.items()
    }
    AdapterState(IA3Config(task_type="CAUSAL_LM"), tensors).save(tmp_path / "a")
    state = AdapterState.load(tmp_path / "a")
    insertion_pipeline(state.config, state)(prog)
    casts = [n for n in prog.graph.nodes if n.meta.get("peftc_role") == "ia3_cast"]
    assert len(casts) == 4 and all(n.meta["val"].dtype == torch.bfloat16 for n in casts)
    hf = peft.PeftModel.from_pretrained(reference, str(tmp_path / "a")).eval()
    assert {p.dtype for k, p in hf.named_parameters() if ".ia3_l." in k} == {torch.float32}
    inputs = batch_for(prog)
    sel = real_positions(prog, inputs)
    with torch.no_grad():
        ours, theirs = prog(*inputs), _hf_logits(hf, prog, inputs)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    d_forward = _diff(ours.float(), theirs.float(), sel)
    assert d_forward <= ATOL, d_forward
    merge_pipeline()(prog)
    with torch.no_grad():
        d_merged = _diff(prog(*inputs).float(), _hf_logits(hf.merge_and_unload(), prog, inputs).float(), sel)
    assert d_merged <= ATOL, d_merged
    print(f"bf16 model, fp32 l: forward {d_forward:.2e}, merged vs HF merged {d_merged:.2e}")
