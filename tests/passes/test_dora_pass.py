"""DoRA (LoRA with ``use_dora``): which nodes, what numbers, which gradients, merge, lift, and the errors.

The reference is HF PEFT 0.21's DoRA layer itself: ``get_peft_model(model, LoraConfig(use_dora=True))``
with peftc's tensors copied in (``set_peft_model_state_dict``); the on-disk round trip both ways is in
tests/parity/test_dora_parity.py. Adapters are away from their init: B random, m scaled by 1 ± 0.2.
"""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import FAMILIES, batch_for, captured, real_positions
from peftc.passes import EvalModePass, LiftAdaptersToInputsPass, insertion_pipeline, merge_pipeline
from peftc.passes.base import graph_fingerprint
from peftc.passes.dora import MAGNITUDE
from peftc.passes.lift import lifted_inputs

from peftc.adapters import AdapterState, peft_key
from peftc.config import LoraConfig
from peftc.errors import AdapterMismatchError, TargetNotFoundError
from peftc.program import MODEL_PREFIX

aten = torch.ops.aten
GPT2, LLAMA = ("gpt2", "causal-lm"), ("llama", "causal-lm")
CASES = [GPT2, LLAMA]
IDS = ["gpt2-conv1d", "llama-linear"]
#: Attention and MLP targets: GPT-2's are Conv1D (fan_in_fan_out, with bias), LLaMA's Linear without bias.
TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"], "llama": ["q_proj", "v_proj", "o_proj", "down_proj"]}


def _config(case, **kwargs) -> LoraConfig:
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS[case[0]], **kwargs}
    return LoraConfig(task_type="CAUSAL_LM", use_dora=True, **kwargs)


def _away(state: AdapterState, seed: int = 0) -> None:
    """B random, m off ‖W‖ by ±20 % per row, A moved: the adapter is far from the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in sorted(state.tensors.items()):
            if "lora_B" in key:
                t.copy_(0.1 * torch.randn(t.shape, generator=gen))
            elif MAGNITUDE in key:
                t.mul_(1 + 0.2 * torch.randn(t.shape, generator=gen))
            elif "lora_A" in key:
                t.add_(0.05 * torch.randn(t.shape, generator=gen))


def _dora(case, mode="eval", **kwargs):
    program, model = captured(*case, mode=mode)
    insertion_pipeline(_config(case, **kwargs))(program)
    _away(program.adapter)
    return program, model


_HF_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_dora", "task_type", "init_lora_weights")


def _hf(case, program, **kwargs):
    """HF PEFT's DoRA model of the same config, holding the program's tensors."""
    cfg = _config(case, **kwargs).to_dict()
    hf = peft.get_peft_model(FAMILIES[case](), peft.LoraConfig(**{k: cfg[k] for k in _HF_FIELDS if k in cfg}))
    result = peft.set_peft_model_state_dict(hf, program.adapter.state_dict())
    assert not result.unexpected_keys
    return hf


def _hf_name(key: str) -> str:
    """HF PEFT's parameter name of a saved key (the adapter name ``default`` put back)."""
    return key.replace(".weight", ".default.weight") if key.endswith(".weight") else key + ".default.weight"


def _logits(model_or_program, program, inputs):
    with torch.no_grad():
        if model_or_program is program:
            return program(*inputs)
        return model_or_program(**dict(zip(program.input_names, inputs, strict=True))).logits


def _roles(program, site=None) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in program.graph.nodes:
        role = node.meta.get("peftc_role")
        if role and (site is None or node.meta.get("peftc_site") == site):
            counts[role] = counts.get(role, 0) + 1
    return counts


def _w(program, site) -> torch.Tensor:
    w = program.graph_module.get_parameter(f"{MODEL_PREFIX}{site.name}.weight").detach()
    return w.T if site.fan_in_fan_out else w


# -- structure -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_dora_sites_nodes_and_fresh_magnitude(case):
    program, model = captured(*case)
    inputs = batch_for(program)
    base = _logits(program, program, inputs)
    result = insertion_pipeline(_config(case))(program)
    assert result.modified and result.program is program and program.history == ["LoraPass"]
    conv1d = case[0] == "gpt2"
    assert len(program.sites) == 8  # GPT-2: c_attn, attn.c_proj, c_fc, mlp.c_proj per layer
    for name, site in program.sites.items():
        assert (site.method, site.variant, site.fan_in_fan_out) == ("LORA", "dora", conv1d)
        m = program.adapter.tensors[peft_key(name, MAGNITUDE)]
        assert m.shape == (site.out_features,) and m.requires_grad
        assert program.graph_module.get_parameter(f"{MODEL_PREFIX}{name}.{MAGNITUDE}") is m
        # fresh: B = 0, so m = ‖W‖ per output row (HF PEFT's init)
        torch.testing.assert_close(m.detach(), torch.linalg.norm(_w(program, site), dim=1), atol=0, rtol=0)
        roles = _roles(program, name)
        has_bias = conv1d  # LLaMA's projections have no bias: x·Wᵀ is the base output itself
        assert roles == {
            "param": 3,
            "lora_A": 1,
            "lora_B": 1,
            **({"dora_weight_t": 1} if conv1d else {}),
            "dora_lora_weight": 1,
            "lora_scale": 2,
            "dora_weight": 1,
            "dora_norm": 1,
            "dora_norm_detach": 1,
            "dora_scale": 1,
            **({"dora_base": 1} if has_bias else {}),
            "dora_scale_minus_one": 1,
            "dora_base_term": 1,
            "dora_lora": 1,
            "dora_result": 1,
            "lora_out": 1,
        }, name
        nodes = {n.meta["peftc_role"]: n for n in program.graph.nodes if n.meta.get("peftc_site") == name}
        norm = nodes["dora_norm"]
        assert norm.target == aten.linalg_vector_norm.default and norm.args[1:] == (2, [1])
        assert nodes["dora_norm_detach"].target == aten.detach.default  # HF: weight_norm.detach()
        assert nodes["dora_scale"].args[1] is nodes["dora_norm_detach"]
        weight = nodes["dora_weight"].args[0]
        weight = weight.args[0] if conv1d else weight
        assert weight.op == "get_attr" and weight.target == f"{MODEL_PREFIX}{name}.weight"  # the base's own W
        out = nodes["lora_out"]
        assert out.target == aten.add.Tensor and out.args[0].meta.get("peftc_site") is None  # base + result
        if has_bias:
            assert nodes["dora_base"].args[0] is out.args[0]  # x·Wᵀ = base output − bias
        for node in nodes.values():
            if node.op == "call_function":
                assert isinstance(node.meta["val"], torch.Tensor) and node.meta["nn_module_stack"]
    trainable = {id(p) for p in program.parameters(trainable=True)}
    assert trainable == {id(t) for t in program.adapter.tensors.values()}
    # m = ‖W‖ and B = 0: m/‖W + s·BA‖ is exactly 1, the base model bit for bit
    assert torch.equal(_logits(program, program, inputs), base)


def test_fresh_magnitude_with_random_b_is_the_norm_of_w_plus_sba():
    program, _ = captured(*GPT2)
    insertion_pipeline(_config(GPT2, init_lora_weights=False, lora_alpha=12))(program)
    for name, site in program.sites.items():
        a = program.adapter.tensors[peft_key(name, "lora_A.weight")].detach()
        b = program.adapter.tensors[peft_key(name, "lora_B.weight")].detach()
        assert b.abs().min() > 0 and site.scale == 3.0
        want = torch.linalg.norm(_w(program, site) + site.scale * (b @ a), dim=1)
        torch.testing.assert_close(program.adapter.tensors[peft_key(name, MAGNITUDE)].detach(), want, atol=0, rtol=0)


def test_plan_and_inspect_tell_dora_sites():
    from peftc.inspect import adapter_sites, program_summary

    program, _ = captured(*GPT2)
    cfg = _config(GPT2, target_modules=["c_attn"])
    plan = insertion_pipeline(cfg).plan(program)["LoraPass"]
    assert [d.details["variant"] for d in plan if d.action == "rewrite"] == ["dora", "dora"]
    insertion_pipeline(cfg)(program)
    sites = adapter_sites(program.adapter.state_dict(), program.adapter.config)
    assert sites == [
        {
            "module": f"transformer.h.{i}.attn.c_attn",
            "method": "LORA",
            "rank": 4,
            "in": 64,
            "out": 192,
            "variant": "dora",
            "magnitude": [192],
        }
        for i in (0, 1)
    ]
    assert {s["variant"] for s in program_summary(program)["sites"]} == {"dora"}
    program, _ = captured(*GPT2)
    insertion_pipeline(LoraConfig(target_modules=["c_attn"]))(program)  # plain LoRA: no variant
    assert {s["variant"] for s in program_summary(program)["sites"]} == {None}
    assert "variant" not in adapter_sites(program.adapter.state_dict(), program.adapter.config)[0]


# -- numbers against HF PEFT's DoRA layers ---------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_and_gradients_match_hf_peft_norm_detached(case):
    program, model = _dora(case)
    hf = _hf(case, program).eval()
    inputs = batch_for(program)
    sel = real_positions(program, inputs)
    ours, theirs = program(*inputs), hf(**dict(zip(program.input_names, inputs, strict=True))).logits
    torch.testing.assert_close(ours[sel], theirs[sel], atol=1e-5, rtol=0)
    assert (ours - _logits(model, program, inputs))[sel].abs().max() > 1e-2  # not the identity
    weights = torch.randn(ours.shape, generator=torch.Generator().manual_seed(3))
    (ours * weights)[sel].sum().backward()
    (theirs * weights)[sel].sum().backward()
    hf_params = dict(hf.named_parameters())

    def worst_grad_diff() -> float:
        return max(
            (t.grad - hf_params[_hf_name(k)].grad).abs().max().item() for k, t in program.adapter.tensors.items()
        )

    assert worst_grad_diff() <= 1e-5
    assert all(t.grad.abs().max() > 0 for t in program.adapter.tensors.values())
    # the same graph without the detach: gradients flow through the norm and differ from HF PEFT's
    for node in [n for n in program.graph.nodes if n.meta.get("peftc_role") == "dora_norm_detach"]:
        node.replace_all_uses_with(node.args[0])
        program.graph.erase_node(node)
    program.graph_module.recompile()
    for t in program.adapter.tensors.values():
        t.grad = None
    (program(*inputs) * weights)[sel].sum().backward()
    assert worst_grad_diff() > 1e-2


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_train_program_with_dropout_matches_hf_peft(case):
    """lora_dropout > 0 in training: x·Wᵀ recomputed on dropout(x), as HF PEFT does (same RNG draws)."""
    program, _ = _dora(case, mode="train", lora_dropout=0.3)
    hf = _hf(case, program, lora_dropout=0.3).train()
    inputs = batch_for(program)
    sel = real_positions(program, inputs)
    torch.manual_seed(5)
    ours = program(*inputs)
    torch.manual_seed(5)
    theirs = hf(**dict(zip(program.input_names, inputs, strict=True))).logits
    torch.testing.assert_close(ours[sel], theirs[sel], atol=1e-5, rtol=0)
    torch.manual_seed(6)
    assert (program(*inputs) - theirs)[sel].abs().max() > 1e-2  # the dropout masks matter


def test_dropout_nodes_only_in_train_programs():
    drop = _config(GPT2, lora_dropout=0.1)
    train, _ = captured(*GPT2, mode="train")
    evl, _ = captured(*GPT2, mode="eval")
    nodrop, _ = captured(*GPT2, mode="train")
    insertion_pipeline(drop)(train)
    insertion_pipeline(drop)(evl)
    insertion_pipeline(_config(GPT2, lora_dropout=0.0))(nodrop)
    n = len(train.sites)
    drops = [node for node in train.graph.nodes if node.meta.get("peftc_role") == "lora_dropout"]
    assert len(drops) == n
    for node in drops:  # dropout(x) feeds A and the recomputed x·Wᵀ, nothing else
        assert sorted(u.meta["peftc_role"] for u in node.users) == ["dora_base", "lora_A"]
        (base,) = [u for u in node.users if u.meta["peftc_role"] == "dora_base"]
        assert base.target == aten.linear.default and base.args[1].meta["peftc_role"] == "dora_weight_t"
    for program in (evl, nodrop):  # no dropout: x·Wᵀ is the base output minus the bias (HF's Identity path)
        assert "lora_dropout" not in _roles(program)
        bases = [node for node in program.graph.nodes if node.meta.get("peftc_role") == "dora_base"]
        assert len(bases) == n and all(node.target == aten.sub.Tensor for node in bases)


# -- errors ----------------------------------------------------------------------------------------------


def test_targets_matching_nothing_change_nothing():
    program, _ = captured(*GPT2)
    before = graph_fingerprint(program.graph)
    with pytest.raises(TargetNotFoundError) as info:
        insertion_pipeline(_config(GPT2, target_modules=["q_proj"]))(program)
    msg = str(info.value)
    assert "\n" not in msg and "target_modules=['q_proj'] matched no adaptable module" in msg
    assert "linear modules here: c_attn, c_proj, c_fc, lm_head" in msg
    assert graph_fingerprint(program.graph) == before and program.adapter is None and not program.sites


def _saved_state(**changes) -> AdapterState:
    program, _ = _dora(GPT2, target_modules=["c_attn"])
    state = AdapterState(program.adapter.config, dict(program.adapter.tensors), loaded=True)
    for key, value in changes.items():
        if value is None:
            del state.tensors[key]
        else:
            state.tensors[key] = value
    return state


def test_adapter_without_or_with_wrong_magnitude_is_refused():
    key = peft_key("transformer.h.0.attn.c_attn", MAGNITUDE)
    cases = [
        (_saved_state(**{key: None}), f"adapter has no tensor {key} for DoRA module transformer.h.0.attn.c_attn"),
        (_saved_state(**{key: torch.nn.Parameter(torch.ones(64))}), f"adapter tensor {key} has shape [64]"),
    ]
    for state, match in cases:
        program, _ = captured(*GPT2)
        before = graph_fingerprint(program.graph)
        with pytest.raises(AdapterMismatchError) as info:
            insertion_pipeline(state.config, state)(program)
        assert match in str(info.value) and "\n" not in str(info.value)
        assert graph_fingerprint(program.graph) == before and not program.sites  # the first site is refused
    # a DoRA adapter bound as plain LoRA (use_dora off): its magnitudes match nothing
    state = _saved_state()
    state.config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["c_attn"])
    program, _ = captured(*GPT2)
    with pytest.raises(AdapterMismatchError, match=r"lora_magnitude_vector \(and 1 more\) matches no targeted module"):
        insertion_pipeline(state.config, state)(program)


# -- merge -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merged_equals_unmerged_and_base_graph(case):
    program, model = _dora(case)
    originals = {k: v.detach().clone() for k, v in model.state_dict().items()}
    site = next(iter(program.sites.values()))
    a = program.adapter.tensors[peft_key(site.name, "lora_A.weight")].detach().clone()
    b = program.adapter.tensors[peft_key(site.name, "lora_B.weight")].detach().clone()
    m = program.adapter.tensors[peft_key(site.name, MAGNITUDE)].detach().clone()
    w = _w(program, site).clone()
    inputs = batch_for(program)
    sel = real_positions(program, inputs)
    unmerged = _logits(program, program, inputs)
    result = merge_pipeline()(program)
    assert result.modified and program.history[-1] == "MergeLoraPass"
    merged = _logits(program, program, inputs)
    torch.testing.assert_close(merged[sel], unmerged[sel], atol=1e-5, rtol=0)
    assert (merged - _logits(model, program, inputs))[sel].abs().max() > 1e-2
    base, _ = captured(*case)
    EvalModePass()(base)
    assert program.op_histogram() == base.op_histogram()  # the base graph, op for op
    assert not any(n.meta.get("peftc_site") for n in program.graph.nodes)
    assert not any("lora_" in name for name, _ in program.graph_module.named_parameters())
    assert program.sites == {}
    # HF PEFT's merge formula: W' = m/‖W + s·BA‖ · (W + s·BA), row-wise (Conv1D stores it transposed)
    v = w + site.scale * (b @ a)
    want = (m / torch.linalg.norm(v, dim=1)).unsqueeze(1) * v
    folded = program.graph_module.get_parameter(f"{MODEL_PREFIX}{site.name}.weight").detach()
    torch.testing.assert_close(folded.T if site.fan_in_fan_out else folded, want, atol=1e-6, rtol=0)
    for k, t in model.state_dict().items():  # the base model is untouched
        assert torch.equal(t, originals[k]), k


# -- lift (swappable) ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_lift_makes_a_scaled_b_and_magnitude_inputs_whose_defaults_are_the_base(case):
    program, model = _dora(case)
    base_program, _ = captured(*case)
    inputs = batch_for(program)
    sel = real_positions(program, inputs)
    want = _logits(program, program, inputs)
    base = _logits(base_program, base_program, inputs)
    pairs = lifted_inputs(program)
    sites = list(program.sites)
    n_scale = _roles(program)["lora_scale"]
    assert LiftAdaptersToInputsPass()(program).modified
    names = [f"{s}.{part}" for s in sites for part in ("lora_A", "lora_B", MAGNITUDE)]
    assert program.input_names[-len(names) :] == names
    assert n_scale == 2 * len(sites) and "lora_scale" not in _roles(program)  # both scale ops: B is pre-scaled
    assert not [k for k, _ in program.graph_module.named_parameters() if "lora_" in k]
    for s in sites:
        assert program.dynamic_dims[f"{s}.{MAGNITUDE}"] == {}  # static [out]
        assert program.input_defaults[f"{s}.{MAGNITUDE}"].shape == (program.sites[s].out_features,)
    values = [t.value for _, t in pairs]
    defaults = [program.input_defaults[n] for n in names]
    with torch.no_grad():
        got = program(*inputs, *values)
        got_base = program(*inputs, *defaults)
    torch.testing.assert_close(got[sel], want[sel], atol=1e-5, rtol=0)
    assert (got - base)[sel].abs().max() > 1e-2
    assert torch.equal(got_base, base)  # rank-0 A, B' and m = ‖W‖: m/‖W + B'A‖ = 1, the base program bit for bit
    # a rank-8 adapter through the same graph: the magnitude must come with it (m/‖W + B'A‖)
    other = [
        torch.randn(8, v.shape[1]) if n.endswith("lora_A") else 0.1 * torch.randn(v.shape[0], 8) if n.endswith("lora_B")
        else v for n, v in zip(names, values, strict=True)
    ]  # fmt: skip
    with torch.no_grad():
        assert (program(*inputs, *other) - got)[sel].abs().max() > 1e-2
