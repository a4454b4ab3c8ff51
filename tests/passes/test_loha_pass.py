"""LoHaPass, MergeLoHaPass and the LoHa lift rule: sites, nodes, numbers, and the errors a user can cause.

The numerical reference is the eager transformers model with a forward hook adding
``F.linear(x, ((w1a@w1b)*(w2a@w2b))*alpha/r)`` on each targeted module (independent of the graph
rewrite; for GPT-2's ``Conv1D`` that is the equivalent nn.Linear's update); parity with HF PEFT itself is in
tests/parity/test_loha_parity.py. Adapters are perturbed away from their init (w2b = 0 makes LoHa the identity).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, batch_for, captured, real_positions
from peftc.passes import EvalModePass, insertion_pipeline, merge_pipeline
from peftc.passes.base import graph_fingerprint
from peftc.passes.lift import RANK_DIM, LiftAdaptersToInputsPass, lifted_tensors
from peftc.passes.loha import LOHA_DEFAULT_TARGETS, PARTS, LoHaConfig, LoHaPass, MergeLoHaPass

from peftc.adapters import AdapterState, peft_key
from peftc.errors import AdapterMismatchError, ConfigError, TargetNotFoundError
from peftc.program import MODEL_PREFIX

aten = torch.ops.aten
LLAMA = ("llama", "causal-lm")
GPT2 = ("gpt2", "causal-lm")
#: GPT-2 default targets (HF's table: c_attn), Conv1D with weight [in, out] = [64, 192].
GPT2_SITES = {f"transformer.h.{i}.attn.c_attn": (64, 192) for i in (0, 1)}
#: LLaMA default targets (HF's table: q_proj, v_proj): site -> (in, out); v_proj is GQA's 2 KV heads.
LLAMA_SITES = {
    **{f"model.layers.{i}.self_attn.q_proj": (64, 64) for i in (0, 1)},
    **{f"model.layers.{i}.self_attn.v_proj": (64, 32) for i in (0, 1)},
}
ALL_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _perturb(state: AdapterState, seed: int = 0, scale: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in state.tensors.values():
            t.add_(scale * torch.randn(t.shape, generator=gen))


def _run(program, inputs):
    with torch.no_grad():
        return program(*inputs)


def _factors(state: AdapterState, name: str) -> list[torch.Tensor]:
    return [state.tensors[peft_key(name, p)].detach() for p in PARTS]


def _reference(case, program, inputs):
    """Eager model plus ``F.linear(x, ΔW)`` on each site by a forward hook; copies by assignment."""
    model = FAMILIES[case]()
    state, modules = program.adapter, dict(model.named_modules())
    params = dict(model.named_parameters())
    for key, t in state.tensors.items():
        if "hada_" not in key:
            params[key.removeprefix("base_model.model.")].data.copy_(t.detach())
    for site in program.sites.values():
        w1a, w1b, w2a, w2b = _factors(state, site.name)
        delta = ((w1a @ w1b) * (w2a @ w2b)) * site.scale

        def hook(mod, args, out, delta=delta):
            return out + F.linear(args[0], delta)

        modules[site.name].register_forward_hook(hook)
    kwargs = dict(zip(program.input_names, inputs, strict=True))
    if case[1] == "causal-lm":
        kwargs["use_cache"] = False
    with torch.no_grad():
        return model(**kwargs).logits


def _assert_close_to_reference(case, program, atol=1e-5) -> float:
    inputs = batch_for(program)
    got, want = _run(program, inputs), _reference(case, program, inputs)
    sel = real_positions(program, inputs)
    torch.testing.assert_close(got[sel], want[sel], atol=atol, rtol=0)
    return (got[sel] - want[sel]).abs().max().item()


def _roles(program) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in program.graph.nodes:
        role = node.meta.get("peftc_role")
        if role:
            counts[role] = counts.get(role, 0) + 1
    return counts


def _loha_program(case=LLAMA, mode="eval", seed=0, **kwargs):
    program, _ = captured(*case, mode=mode)
    insertion_pipeline(LoHaConfig(**kwargs))(program)
    _perturb(program.adapter, seed)
    return program


# -- registry and config ---------------------------------------------------------------------------------


def test_registered_as_a_method():
    import peftc.config
    from peftc.methods import get_method, method_by_name, method_of_tensor

    method = method_by_name("LoHa")
    assert method is get_method("LOHA") and method.config_class is LoHaConfig
    assert peftc.config.LoHaConfig is LoHaConfig
    assert isinstance(method.config("loha", r=4), LoHaConfig)
    assert method_of_tensor("base_model.model.model.layers.0.self_attn.q_proj.hada_w1_a") is method
    assert method_of_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight") is not method
    assert method.merge_pass is MergeLoHaPass and method.lift is not None and method.training_hooks is None


def test_config_json_matches_hf_peft():
    from peft import LoHaConfig as HFLoHaConfig

    ours, theirs = LoHaConfig().to_dict(), HFLoHaConfig().to_dict()
    hf_only = set(theirs) - set(ours)
    assert hf_only <= {"auto_mapping", "peft_version"}, hf_only  # kept as unknown keys when read
    for key in set(theirs) - hf_only:
        want = theirs[key].value if hasattr(theirs[key], "value") else theirs[key]  # PeftType enum
        assert ours[key] == want, key
    assert set(ours) == set(theirs) - hf_only  # nothing HF PEFT would not write
    hf = HFLoHaConfig(
        r=4, alpha=12, rank_dropout=0.1, module_dropout=0.2, target_modules=["v_proj", "q_proj"],
        exclude_modules=["o_proj"], init_weights=False, layers_to_transform=[1], layers_pattern="layers",
        rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3}, modules_to_save=["score"], task_type="CAUSAL_LM",
    ).to_dict()  # fmt: skip
    hf["peft_type"] = "LOHA"
    ours = LoHaConfig.from_dict(hf)
    assert (ours.r, ours.alpha, ours.rank_dropout, ours.module_dropout) == (4, 12, 0.1, 0.2)
    assert ours.target_modules == ["q_proj", "v_proj"] and ours.exclude_modules == ["o_proj"]  # HF's sets, sorted
    assert ours.init_weights is False and ours.rank_pattern == {"q_proj": 2} and ours.alpha_pattern == {"v_proj": 3}
    assert ours.scale_for("model.layers.0.self_attn.q_proj") == 6.0  # 12 / 2
    assert ours.scale_for("model.layers.0.self_attn.v_proj") == 0.75  # 3 / 4
    back = ours.to_dict()
    assert back["auto_mapping"] == hf["auto_mapping"] and back["peft_type"] == "LOHA"
    assert {k: back[k] for k in hf if k not in ("target_modules", "exclude_modules")} == {
        k: v for k, v in hf.items() if k not in ("target_modules", "exclude_modules")
    }
    assert all(f.metadata.get("help") for f in dataclasses.fields(LoHaConfig) if not f.metadata.get("internal"))


def test_peftc_config_json_loads_in_hf_peft(tmp_path):
    import peft

    ours = LoHaConfig(r=4, alpha=12, rank_dropout=0.1, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2})
    ours.save(tmp_path)
    theirs = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(theirs, peft.LoHaConfig) and theirs.peft_type == peft.PeftType.LOHA
    for f in dataclasses.fields(LoHaConfig):
        if not f.metadata.get("internal"):
            value = getattr(theirs, f.name)
            assert (sorted(value) if isinstance(value, set) else value) == getattr(ours, f.name), f.name


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\]"),
        (dict(rank_dropout=1.0), "rank_dropout must be in"),
        (dict(module_dropout=-0.1), "module_dropout must be in"),
        (dict(module_dropout=1.0), "skips LoHa at every training step"),
        (dict(layers_pattern="layers"), "layers_pattern is set but layers_to_transform is not"),
        (dict(r="8"), "field 'r' must be int"),
        (dict(init_weights="gaussian"), "field 'init_weights' must be bool"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LoHaConfig(**kwargs)


def test_default_targets_are_hf_peft_loha_table():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING as HF

    assert LOHA_DEFAULT_TARGETS  # the families peftc covers
    for model_type, targets in LOHA_DEFAULT_TARGETS.items():
        assert sorted(targets) == sorted(HF[model_type]), model_type


# -- structure -------------------------------------------------------------------------------------------


def test_default_sites_and_nodes_llama():
    program, _ = captured(*LLAMA)
    before = program.op_histogram()
    result = insertion_pipeline(LoHaConfig(r=4, alpha=6))(program)
    assert result.modified and result.program is program and program.history == ["LoHaPass"]
    assert set(program.sites) == set(LLAMA_SITES)
    for name, (fin, fout) in LLAMA_SITES.items():
        site = program.sites[name]
        assert (site.method, site.module_type, site.in_features, site.out_features) == ("LOHA", "Linear", fin, fout)
        assert site.rank == 4 and site.scale == 1.5 and site.fan_in_fan_out is False
        shapes = [tuple(t.shape) for t in _factors(program.adapter, name)]
        assert shapes == [(fout, 4), (4, fin), (fout, 4), (4, fin)]
        for part in PARTS:
            key = peft_key(name, part)
            assert key == f"base_model.model.{name}.{part}"  # HF PEFT's key: a ParameterDict entry, no .weight
            assert program.graph_module.get_parameter(f"{MODEL_PREFIX}{name}.{part}") is program.adapter.tensors[key]
    assert len(program.adapter.tensors) == 4 * len(LLAMA_SITES)
    n = len(LLAMA_SITES)
    assert _roles(program) == {
        "param": 4 * n, "loha_w1": n, "loha_w2": n, "loha_hadamard": n, "loha_scale": n, "loha_linear": n,
        "loha_out": n,
    }  # fmt: skip
    after = program.op_histogram()
    assert after["mm.default"] == before.get("mm.default", 0) + 2 * n
    assert after["mul.Tensor"] == before.get("mul.Tensor", 0) + 2 * n
    assert after["linear.default"] == before["linear.default"] + n
    assert after["add.Tensor"] == before["add.Tensor"] + n
    for node in program.graph.nodes:
        if node.meta.get("peftc_site") and node.op == "call_function":
            assert isinstance(node.meta["val"], torch.Tensor) and node.meta["nn_module_stack"]
            if node.meta["peftc_role"] == "loha_scale":
                assert node.args[1] == 1.5
                assert tuple(node.meta["val"].shape) == LLAMA_SITES[node.meta["peftc_site"]][::-1]  # ΔW [out, in]
            if node.meta["peftc_role"] == "loha_linear":  # x·ΔWᵀ on the base call's own input
                base = next(iter(node.users)).args[0]
                assert base.target == aten.linear.default and node.args[0] is base.args[0]
    trainable = {id(p) for p in program.parameters(trainable=True)}
    assert trainable == {id(t) for t in program.adapter.tensors.values()}


def test_default_sites_and_nodes_gpt2_conv1d():
    """HF's GPT-2 default (c_attn) is a Conv1D: the branch reads addmm's 2-D input and adds to addmm's output."""
    program, _ = captured(*GPT2)
    before = program.op_histogram()
    result = insertion_pipeline(LoHaConfig(r=4, alpha=6))(program)
    assert result.modified and program.history == ["LoHaPass"]
    assert set(program.sites) == set(GPT2_SITES)
    for name, (fin, fout) in GPT2_SITES.items():
        site = program.sites[name]
        assert (site.method, site.module_type, site.in_features, site.out_features) == ("LOHA", "Conv1D", fin, fout)
        assert site.rank == 4 and site.scale == 1.5 and site.fan_in_fan_out is True
        shapes = [tuple(t.shape) for t in _factors(program.adapter, name)]
        assert shapes == [(fout, 4), (4, fin), (fout, 4), (4, fin)]  # ΔW [out, in], as the equivalent nn.Linear
        assert program.graph_module.get_parameter(f"{MODEL_PREFIX}{name}.weight").shape == (fin, fout)  # untouched
    assert sorted(program.adapter.tensors) == sorted(peft_key(s, p) for s in GPT2_SITES for p in PARTS)
    n = len(GPT2_SITES)
    assert _roles(program) == {
        "param": 4 * n, "loha_w1": n, "loha_w2": n, "loha_hadamard": n, "loha_scale": n, "loha_linear": n,
        "loha_out": n,
    }  # fmt: skip
    after = program.op_histogram()
    assert after["addmm.default"] == before["addmm.default"]  # the Conv1D call itself is unchanged
    assert after["linear.default"] == before.get("linear.default", 0) + n
    assert after["mm.default"] == before.get("mm.default", 0) + 2 * n
    for node in program.graph.nodes:
        role = node.meta.get("peftc_role")
        if role == "loha_scale":
            assert tuple(node.meta["val"].shape) == GPT2_SITES[node.meta["peftc_site"]][::-1]  # ΔW [out, in]
        if role == "loha_linear":
            out = next(iter(node.users))
            base = out.args[0]
            assert out.meta["peftc_role"] == "loha_out" and base.target == aten.addmm.default
            assert node.args[0] is base.args[1] and node.args[0].meta["val"].dim() == 2  # addmm's x2d
            assert tuple(out.meta["val"].shape) == tuple(base.meta["val"].shape)
            assert [u.target for u in out.users] == [aten.view.default]  # then Conv1D's reshape


def test_conv1d_sites_warn_that_hf_peft_needs_linear_layers(caplog):
    program, _ = captured(*GPT2)
    with caplog.at_level(logging.WARNING, logger="peftc.passes.loha"):
        insertion_pipeline(LoHaConfig(target_modules=["c_attn", "c_fc", "lm_head"]))(program)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "Conv1D" in warned[0] and "converted to nn.Linear" in warned[0], warned
    caplog.clear()
    program, _ = captured(*GPT2)
    with caplog.at_level(logging.WARNING, logger="peftc.passes.loha"):
        insertion_pipeline(LoHaConfig(target_modules=["lm_head"]))(program)
        insertion_pipeline(LoHaConfig())(captured(*LLAMA)[0])
    assert not caplog.records  # nn.Linear sites: HF PEFT loads the adapter into the model as it is


def test_fresh_init_is_hf_peft_reset_and_the_identity():
    base, _ = captured(*LLAMA)
    inputs = batch_for(base)
    want = _run(base, inputs)
    program, _ = captured(*LLAMA)
    insertion_pipeline(LoHaConfig(r=4))(program)
    for name, site in program.sites.items():
        w1a, w1b, w2a, w2b = _factors(program.adapter, name)
        assert torch.count_nonzero(w2b) == 0
        for t, fan_in in ((w1a, 4), (w1b, site.in_features), (w2a, 4)):
            assert torch.count_nonzero(t) == t.numel() and t.abs().max() <= 1 / math.sqrt(fan_in)  # kaiming(a=√5)
    assert torch.equal(_run(program, inputs), want)  # w2b = 0: ΔW = 0, exactly the base model
    program, _ = captured(*LLAMA)
    insertion_pipeline(LoHaConfig(r=4, init_weights=False))(program)
    assert all(torch.count_nonzero(t) == t.numel() for t in program.adapter.tensors.values())
    assert (_run(program, inputs) - want).abs().max() > 1e-3


def test_matches_hooked_eager_model_with_patterns():
    cfg = dict(
        r=6, alpha=9, target_modules=ALL_LLAMA, rank_pattern={"down_proj": 2, "k_proj": 4},
        alpha_pattern={"up_proj": 3.0}, init_weights=False,
    )  # fmt: skip
    program = _loha_program(**cfg)
    sites = program.sites
    assert len(sites) == 14
    assert sites["model.layers.0.mlp.down_proj"].rank == 2 and sites["model.layers.0.mlp.down_proj"].scale == 4.5
    assert sites["model.layers.1.self_attn.k_proj"].rank == 4 and sites["model.layers.1.self_attn.k_proj"].scale == 2.25
    assert sites["model.layers.0.mlp.up_proj"].scale == 0.5 and sites["model.layers.0.self_attn.q_proj"].scale == 1.5
    assert _assert_close_to_reference(LLAMA, program) < 1e-5


def test_gpt2_conv1d_sites_match_hooked_eager_model():
    """Every Conv1D of GPT-2 plus the lm_head, per-module patterns: x·ΔWᵀ added as the equivalent nn.Linear's."""
    cfg = dict(
        r=4, alpha=8, target_modules=["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj", "lm_head"],
        rank_pattern={"c_fc": 2}, alpha_pattern={"mlp.c_proj": 3.0}, init_weights=False,
    )  # fmt: skip
    program = _loha_program(GPT2, **cfg)
    assert len(program.sites) == 9
    assert program.sites["transformer.h.1.mlp.c_fc"].rank == 2 and program.sites["transformer.h.1.mlp.c_fc"].scale == 4
    assert program.sites["transformer.h.0.mlp.c_proj"].scale == 0.75
    assert {s.module_type for s in program.sites.values()} == {"Conv1D", "Linear"}
    assert _assert_close_to_reference(GPT2, program) < 1e-5
    case = ("gpt2", "seq-cls")
    program = _loha_program(case, r=2, target_modules=["c_attn"], modules_to_save=["score"])
    assert set(program.sites) == set(GPT2_SITES)
    _assert_close_to_reference(case, program)


def test_gpt2_lm_head_and_seq_cls_head():
    """GPT-2's nn.Linear layers: the (tied) lm_head, and the seq-cls score next to a trained copy."""
    program = _loha_program(GPT2, r=4, alpha=8, target_modules=["lm_head"])
    assert set(program.sites) == {"lm_head"} and program.sites["lm_head"].module_type == "Linear"
    _assert_close_to_reference(GPT2, program)
    case = ("gpt2", "seq-cls")
    program = _loha_program(case, r=2, target_modules=["score"])
    assert set(program.sites) == {"score"}
    _assert_close_to_reference(case, program)
    program, _ = captured(*case)
    with pytest.raises(TargetNotFoundError, match="in modules_to_save"):
        insertion_pipeline(LoHaConfig(target_modules=["score"], modules_to_save=["score"]))(program)


def test_exclude_and_layers_to_transform():
    program, _ = captured(*LLAMA)
    insertion_pipeline(LoHaConfig(target_modules=["q_proj", "o_proj"], exclude_modules=["layers.1.self_attn.o_proj"]))(
        program
    )
    assert set(program.sites) == {f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)} | {
        "model.layers.0.self_attn.o_proj"
    }
    program, _ = captured(*LLAMA)
    insertion_pipeline(LoHaConfig(layers_to_transform=[1], layers_pattern="layers"))(program)
    assert set(program.sites) == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}
    decisions = {d.name: d for d in LoHaPass(LoHaConfig(layers_to_transform=0)).plan(program)}
    assert decisions["model.layers.1.self_attn.q_proj"].reason == "layer not in layers_to_transform=[0]"


# -- errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("targets", [["c_q"], "q_proj", ["layers.7.self_attn.q_proj"]])
def test_no_match_is_target_not_found(targets):
    program, _ = captured(*LLAMA)
    before = graph_fingerprint(program.graph)
    with pytest.raises(TargetNotFoundError) as info:
        insertion_pipeline(LoHaConfig(target_modules=targets))(program)
    msg = str(info.value)
    assert "\n" not in msg and f"target_modules={targets!r} matched no adaptable module" in msg
    assert "linear modules here: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head" in msg
    assert graph_fingerprint(program.graph) == before and program.adapter is None and not program.sites


def test_modules_loha_cannot_adapt_are_refused():
    """A container (HF PEFT 0.21 raises for it too) and a real convolution (HF adapts it, peftc does not)."""
    program, _ = captured(*LLAMA)
    before = graph_fingerprint(program.graph)
    with pytest.raises(ConfigError, match=r"self_attn: a LlamaAttention, not an nn\.Linear or Conv1D"):
        insertion_pipeline(LoHaConfig(target_modules=["self_attn"]))(program)
    assert graph_fingerprint(program.graph) == before and not program.sites
    program, _ = captured(*LLAMA)  # as capture records a model whose layer-0 q_proj is an nn.Conv1d
    program.module_types["model.layers.0.self_attn.q_proj"] = "Conv1d"
    with pytest.raises(
        ConfigError, match=r"layers\.0\.self_attn\.q_proj: a Conv1d: HF PEFT's LoHa adapts it but peftc's LoHa"
    ):
        insertion_pipeline(LoHaConfig())(program)
    assert graph_fingerprint(program.graph) == before and not program.sites


def test_hf_peft_refuses_gpt2_conv1d():
    """HF PEFT 0.21's LoHa raises on GPT-2's Conv1D, so peftc's is checked against the Linear-converted GPT-2.

    When this fails, HF PEFT adapts Conv1D itself: compare with it directly and drop peftc's warning.
    """
    from peft import LoHaConfig as HFLoHaConfig
    from peft import get_peft_model

    model = FAMILIES[GPT2]()
    with pytest.raises(TypeError, match="Conv1D"):
        get_peft_model(model, HFLoHaConfig(r=2))


def test_adapter_for_another_model_is_refused(tmp_path):
    program = _loha_program(r=4)
    program.adapter.save(tmp_path / "llama")

    state = AdapterState.load(tmp_path / "llama")  # as if made for a LLaMA with 4 KV heads: v_proj out 64, not 32
    for key in [k for k in state.tensors if ".v_proj.hada_w" in k and k.endswith("_a")]:
        state.tensors[key] = torch.nn.Parameter(torch.randn(64, 4))
    target, _ = captured(*LLAMA)
    with pytest.raises(
        AdapterMismatchError, match=r"v_proj\.hada_w1_a has shape \[64, 4\] but module .* needs \[32, 4\]"
    ):
        insertion_pipeline(state.config, state)(target)

    state = AdapterState.load(tmp_path / "llama")
    state.config.r = 2  # config and tensors disagree
    target, _ = captured(*LLAMA)
    with pytest.raises(AdapterMismatchError, match=r"needs \[64, 2\] \(r=2, in=64, out=64\)"):
        insertion_pipeline(state.config, state)(target)

    state = AdapterState.load(tmp_path / "llama")
    state.config.target_modules = ["q_proj"]  # the v_proj tensors find no site
    target, _ = captured(*LLAMA)
    with pytest.raises(AdapterMismatchError, match=r"v_proj\.hada_w1_a \(and 7 more\) matches no targeted module"):
        insertion_pipeline(state.config, state)(target)

    state = AdapterState.load(tmp_path / "llama")
    del state.tensors["base_model.model.model.layers.1.self_attn.v_proj.hada_w2_b"]
    target, _ = captured(*LLAMA)
    with pytest.raises(AdapterMismatchError, match=r"no tensor .*layers\.1\.self_attn\.v_proj\.hada_w2_b"):
        insertion_pipeline(state.config, state)(target)

    state = AdapterState.load(tmp_path / "llama")
    state.tensors["base_model.model.model.layers.0.self_attn.q_proj.hada_t1"] = torch.nn.Parameter(torch.zeros(4, 4))
    target, _ = captured(*LLAMA)
    with pytest.raises(AdapterMismatchError, match=r"hada_t1 is a LoHa conv kernel factor"):
        insertion_pipeline(state.config, state)(target)


# -- saved adapters, training programs -----------------------------------------------------------------


def test_bind_saved_adapter_state(tmp_path):
    first = _loha_program(r=4, alpha=2)
    first.adapter.save(tmp_path / "a")
    inputs = batch_for(first)
    want = _run(first, inputs)
    state = AdapterState.load(tmp_path / "a")
    assert state.config == first.adapter.config
    evl, _ = captured(*LLAMA)
    train, _ = captured(*LLAMA, mode="train")
    assert insertion_pipeline(state.config, state)(evl).modified
    insertion_pipeline(state.config, state)(train)
    assert torch.equal(_run(evl, inputs), want)
    assert torch.equal(_run(train, inputs), want)  # no LoHa dropout configured: the train program is deterministic
    assert not [n for n in train.graph.nodes if "rand" in str(n.target)]
    for key, t in state.tensors.items():  # both programs read the same Parameters: training one updates both
        path = MODEL_PREFIX + key.removeprefix("base_model.model.")
        assert evl.graph_module.get_parameter(path) is t and train.graph_module.get_parameter(path) is t


def test_dropouts_only_in_train_programs():
    cfg = LoHaConfig(r=4, rank_dropout=0.5, module_dropout=0.3)
    evl, _ = captured(*LLAMA)
    insertion_pipeline(cfg)(evl)
    assert not [r for r in _roles(evl) if "rand" in r or "dropout" in r]
    train, _ = captured(*LLAMA, mode="train")
    insertion_pipeline(cfg, evl.adapter)(train)
    roles = _roles(train)
    n = len(LLAMA_SITES)
    assert roles["loha_module_rand"] == roles["loha_rank_rand"] == roles["loha_module_dropout"] == n
    assert roles["loha_rank_dropout"] == n
    order = [n.meta["peftc_role"] for n in train.graph.nodes if n.meta.get("peftc_role", "").endswith("_rand")]
    assert order == ["loha_module_rand", "loha_rank_rand"] * n  # HF PEFT's order: gate, then the rows
    only_rank, _ = captured(*LLAMA, mode="train")
    insertion_pipeline(LoHaConfig(r=4, rank_dropout=0.5), evl.adapter)(only_rank)
    assert _roles(only_rank)["loha_module_rand"] == n  # HF draws the gate even at module_dropout=0

    _perturb(evl.adapter)
    inputs = batch_for(evl)
    want = _run(evl, inputs)
    outs = []
    for seed in range(3):
        torch.manual_seed(seed)
        outs.append(_run(train, inputs))
    assert all(torch.isfinite(o).all() for o in outs)
    assert (outs[0] - outs[1]).abs().max() > 1e-3 and (outs[0] - want).abs().max() > 1e-3


def test_module_dropout_skips_a_site_at_its_rate():
    """One site, module_dropout 0.5: the output is either the base or the adapted model, each about half the time."""
    cfg = LoHaConfig(r=4, target_modules=["layers.0.self_attn.q_proj"], module_dropout=0.5, init_weights=False)
    train, _ = captured(*LLAMA, mode="train")
    insertion_pipeline(cfg)(train)
    _perturb(train.adapter)
    base, _ = captured(*LLAMA)
    adapted, _ = captured(*LLAMA)
    insertion_pipeline(cfg, train.adapter)(adapted)
    inputs = batch_for(base, batch=2, seq=5)
    want_base, want_adapted = _run(base, inputs), _run(adapted, inputs)
    torch.manual_seed(0)
    skipped = 0
    for _ in range(60):
        got = _run(train, inputs)
        if (got - want_base).abs().max() < 1e-6:
            skipped += 1
        else:
            torch.testing.assert_close(got, want_adapted, atol=1e-6, rtol=0)
    assert 15 <= skipped <= 45, skipped


@pytest.mark.parametrize("case", [LLAMA, GPT2], ids=["llama", "gpt2-conv1d"])
def test_gradients_reach_every_factor(case):
    program = _loha_program(case, mode="train", r=4)
    inputs = batch_for(program)
    program(*inputs).float().pow(2).mean().backward()
    for key, t in program.adapter.tensors.items():
        assert t.grad is not None and t.grad.abs().max() > 0, key
    base_params = [p for n, p in program.graph_module.named_parameters() if "hada_" not in n]
    assert all(p.grad is None for p in base_params)


# -- merge -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case,targets",
    [(LLAMA, ALL_LLAMA), (GPT2, ["lm_head"]), (GPT2, ["c_attn", "mlp.c_fc"])],
    ids=["llama-all", "gpt2-lm_head", "gpt2-conv1d"],
)
def test_merge_equals_unmerged_and_the_base_graph(case, targets):
    base, _ = captured(*case)
    EvalModePass()(base)  # merge_pipeline starts with it: eval captures keep no-op dropouts
    base_hist = base.op_histogram()
    program = _loha_program(case, r=4, alpha=6, target_modules=targets, rank_pattern={"down_proj": 2, "c_fc": 2})
    inputs = batch_for(program)
    want = _run(program, inputs)
    sites = list(program.sites)
    deltas = {s: program.sites[s].scale for s in sites}
    transposed = {s: program.sites[s].fan_in_fan_out for s in sites}
    factors = {s: _factors(program.adapter, s) for s in sites}
    originals = {n: p.detach().clone() for n, p in base.graph_module.named_parameters(remove_duplicate=False)}
    result = merge_pipeline()(program)
    assert result.modified and "MergeLoHaPass" in program.history and not program.sites
    got = _run(program, inputs)
    sel = real_positions(program, inputs)
    assert (got - want)[sel].abs().max() <= 1e-5
    assert program.op_histogram() == base_hist  # op for op the base graph
    assert not [n for n, _ in program.graph_module.named_parameters() if "hada_" in n]
    assert not [n for n in program.graph.nodes if n.meta.get("peftc_site")]
    assert any(transposed.values()) == (targets != ["lm_head"] and case == GPT2)
    for s in sites:  # W + ((w1a@w1b)*(w2a@w2b))*s, exactly HF PEFT's merge (Conv1D's [in, out] weight: + ΔWᵀ)
        w1a, w1b, w2a, w2b = factors[s]
        folded = program.graph_module.get_parameter(f"{MODEL_PREFIX}{s}.weight")
        delta = ((w1a @ w1b) * (w2a @ w2b)) * deltas[s]
        expected = originals[f"{MODEL_PREFIX}{s}.weight"] + (delta.T if transposed[s] else delta)
        torch.testing.assert_close(folded, expected, atol=1e-6, rtol=0)
    for n, p in base.graph_module.named_parameters(remove_duplicate=False):  # the base is never changed
        assert torch.equal(p, originals[n]), n
    if targets == ["lm_head"]:  # lm_head is tied to wte: the embedding keeps the base value
        embedding = next(n for n in program.graph.nodes if n.target == aten.embedding.default)
        assert torch.equal(
            program.graph_module.get_parameter(embedding.args[0].target), originals["model.lm_head.weight"]
        )
    assert MergeLoHaPass()(program).modified is False  # nothing left to fold


def test_merge_of_a_program_without_loha_changes_nothing():
    program, _ = captured(*LLAMA)
    before = graph_fingerprint(program.graph)
    assert MergeLoHaPass()(program).modified is False
    assert graph_fingerprint(program.graph) == before


# -- lift to graph inputs ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [LLAMA, GPT2], ids=["llama", "gpt2-conv1d"])
def test_lift_makes_the_four_factors_inputs_with_a_rank_dim(case):
    program = _loha_program(case, r=4, alpha=6)
    assert {s.fan_in_fan_out for s in program.sites.values()} == {case == GPT2}
    inputs = batch_for(program)
    want = _run(program, inputs)
    base, _ = captured(*case)
    want_base = _run(base, inputs)
    assert (want - want_base).abs().max() > 1e-2
    values = lifted_tensors(program)
    sites = list(program.sites)
    gen = torch.Generator().manual_seed(5)  # a rank-8 adapter through the same graph
    other = {n: torch.randn(v.shape[0], 8, generator=gen) * 0.3 if n.endswith("_a") else
             torch.randn(8, v.shape[1], generator=gen) * 0.3 for n, v in values.items()}  # fmt: skip
    assert LiftAdaptersToInputsPass()(program).modified
    names = [f"{s}.{p}" for s in sites for p in PARTS]
    assert list(values) == names and program.input_names[-len(names) :] == names
    for s in sites:
        site = program.sites[s]
        w1a, w1b, w2a, w2b = _factors(program.adapter, s)
        torch.testing.assert_close(values[f"{s}.hada_w1_a"], w1a * site.scale)  # the scale folded into w1a
        assert torch.equal(values[f"{s}.hada_w2_b"], w2b)
        for p in PARTS:
            assert program.dynamic_dims[f"{s}.{p}"] == ({1: RANK_DIM} if p.endswith("_a") else {0: RANK_DIM})
            assert 0 in program.input_defaults[f"{s}.{p}"].shape  # rank-0 default
    assert "loha_scale" not in _roles(program)
    assert not [n for n, _ in program.graph_module.named_parameters() if "hada_" in n]
    with torch.no_grad():
        got = program(*inputs, *values.values())
        got_base = program(*inputs, *program.input_defaults.values())
        got_other = program(*inputs, *other.values())
        padded = [torch.cat([v, torch.zeros_like(v)], dim=1 if n.endswith("_a") else 0) for n, v in other.items()]
        want_other = program(*inputs, *padded)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_base, want_base, atol=1e-5, rtol=0)  # rank 0: ΔW = 0, the base model
    torch.testing.assert_close(got_other, want_other, atol=1e-5, rtol=0)  # zero-padding the rank changes nothing
    assert (got_other - got).abs().max() > 1e-2


def test_inspect_describes_loha_sites():
    from peftc.inspect import adapter_sites

    program = _loha_program(r=4)
    sites = {s["module"]: s for s in adapter_sites(program.adapter.tensors, program.adapter.config)}
    assert sites["model.layers.0.self_attn.v_proj"] == {
        "module": "model.layers.0.self_attn.v_proj", "method": "LOHA", "rank": 4, "in": 64, "out": 32,
    }  # fmt: skip
    assert set(sites) == set(LLAMA_SITES)
