"""LoKrPass, MergeLoKrPass and LoKr's lift rule: which sites, what nodes, what init, what errors, what numbers.

HF PEFT 0.21's own code is the reference for the factorisation, the factor layouts and the fresh init; the
forward against HF PEFT is in tests/parity/test_lokr_parity.py.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import batch_for, captured, hf_base, linearise_conv1d, real_positions
from lokr_cases import LAYOUTS, perturb
from peftc.passes import EvalModePass, LiftAdaptersToInputsPass, insertion_pipeline, merge_pipeline
from peftc.passes.base import graph_fingerprint
from peftc.passes.lift import RANK_DIM, lifted_inputs, lifted_tensors
from peftc.passes.lokr import LoKrPass, MergeLoKrPass, _init_lokr, factorization, kron_layout, lokr_delta
from torch import nn

from peftc.adapters import AdapterState, peft_key
from peftc.config import LoKrConfig, LoraConfig, config_from_dict
from peftc.errors import AdapterMismatchError, ConfigError, TargetNotFoundError
from peftc.methods import get_method, method_by_name, method_of_tensor
from peftc.program import MODEL_PREFIX

peft = pytest.importorskip("peft")
ATOL = 1e-5
GPT2, LLAMA = ("gpt2", "causal-lm"), ("llama", "causal-lm")


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run(program, inputs):
    with torch.no_grad():
        return program(*inputs)


def _roles(program) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in program.graph.nodes:
        role = node.meta.get("peftc_role")
        if role:
            counts[role] = counts.get(role, 0) + 1
    return counts


def _site_tensors(state, name):
    return {k.rsplit(".", 1)[1]: v.detach() for k, v in state.tensors.items() if k.startswith(peft_key(name, ""))}


# -- HF PEFT's shapes and init -----------------------------------------------------------------------


def test_factorization_is_hf_peft_s():
    from peft.tuners.lokr.layer import factorization as hf_factorization

    for dim in range(1, 300):
        for factor in (-1, 0, 1, 2, 3, 4, 8, 16, 100, -3):
            assert factorization(dim, factor) == hf_factorization(dim, factor), (dim, factor)
    assert factorization(192) == (12, 16) and factorization(64, 16) == (16, 4)  # the divisor branch is not sorted


@pytest.mark.parametrize(
    "fin,fout,r,both,factor",
    [(64, 192, 8, False, -1), (64, 192, 4, False, -1), (64, 192, 2, True, -1), (64, 32, 2, True, -1),
     (256, 64, 6, True, 4), (64, 64, 8, False, 16), (127, 64, 1, True, -1), (96, 40, 3, False, 5)],
)  # fmt: skip
def test_layouts_and_init_are_hf_peft_s(fin, fout, r, both, factor):
    """Same parameter names, shapes and, at the same seed, values as HF PEFT's LoKr Linear, for each init."""
    from peft.tuners.lokr.layer import Linear as HFLinear

    layout = kron_layout(fin, fout, r, both, factor)
    for init in (True, "lycoris", False):
        base = nn.Linear(fin, fout)
        hf_cfg = peft.LoKrConfig(r=r, alpha=r, decompose_both=both, decompose_factor=factor, init_weights=init)
        torch.manual_seed(5)
        hf = HFLinear(base, "default", config=hf_cfg, r=r, alpha=r)
        theirs = {n.removesuffix(".default"): p.detach() for n, p in hf.named_parameters() if "lokr_" in n}
        assert {k: tuple(v.shape) for k, v in theirs.items()} == layout.shapes()

        torch.manual_seed(5)
        ours = _init_lokr(LoKrConfig(r=r, alpha=r, decompose_both=both, init_weights=init), layout, torch.float32)
        for part, t in theirs.items():
            assert torch.equal(ours[part].detach(), t), (init, part)
        delta = lokr_delta(ours, 1.0)
        assert bool(delta.abs().max() == 0) is (init is not False)  # w1 or w2 starts at zero, unless init False


# -- structure -------------------------------------------------------------------------------------


def test_default_targets_and_structure():
    program, _ = captured(*GPT2)
    result = insertion_pipeline(LoKrConfig(r=4, task_type="CAUSAL_LM"))(program)
    assert result.modified and result.program is program
    assert set(program.sites) == {f"transformer.h.{i}.attn.c_attn" for i in (0, 1)}  # HF's LoRA table
    for name, site in program.sites.items():
        assert (site.method, site.module_type, site.in_features, site.out_features) == ("LOKR", "Conv1D", 64, 192)
        assert site.fan_in_fan_out and site.rank == 4 and site.scale == 2.0
        shapes = {k: tuple(v.shape) for k, v in _site_tensors(program.adapter, name).items()}
        assert shapes == {"lokr_w1": (12, 8), "lokr_w2_a": (16, 4), "lokr_w2_b": (4, 8)}
    roles = _roles(program)
    assert roles == {"param": 6, "lokr_w2": 2, "lokr_kron": 2, "lokr_scale": 2, "lokr_linear": 2, "lokr_out": 2}
    assert "LoKrPass" in program.history
    kron = next(n for n in program.graph.nodes if n.meta.get("peftc_role") == "lokr_kron")
    assert kron.target == torch.ops.aten.kron.default and tuple(kron.meta["val"].shape) == (192, 64)
    linear = next(n for n in program.graph.nodes if n.meta.get("peftc_role") == "lokr_linear")
    assert linear.args[0].target == torch.ops.aten.view.default  # Conv1D's 2-D input, beside its addmm
    out = next(n for n in program.graph.nodes if n.meta.get("peftc_role") == "lokr_out")
    assert out.args[0].target == torch.ops.aten.addmm.default


@pytest.mark.parametrize("kind", ["full", "w2_decomposed", "decompose_both"])
def test_layouts_per_site(kind):
    program, _ = captured(*LLAMA)
    cfg = LoKrConfig(task_type="CAUSAL_LM", **LAYOUTS[("llama", kind)])
    decisions = {d.name: d for d in LoKrPass(cfg).plan(program)}
    insertion_pipeline(cfg)(program)
    assert len(program.sites) == 2 * len(cfg.target_modules)
    mm = 0
    for name, site in program.sites.items():
        layout = kron_layout(site.in_features, site.out_features, cfg.rank_for(name), cfg.decompose_both,
                             cfg.decompose_factor)  # fmt: skip
        held = {k: tuple(v.shape) for k, v in _site_tensors(program.adapter, name).items()}
        assert held == layout.shapes()
        assert decisions[name].details["kron"] == layout.describe()
        mm += (not layout.full_w1) + (not layout.full_w2)
    roles = _roles(program)
    assert roles.get("lokr_w1", 0) + roles.get("lokr_w2", 0) == mm
    assert {"full": 0, "w2_decomposed": 6, "decompose_both": 8}[kind] == mm


def test_fresh_adapter_is_the_base_model_and_perturbed_it_is_kron():
    """Fresh: ΔW = 0 exactly. Perturbed: the eager model with ΔW = kron(w1, w2)·s added by hand."""
    program, _ = captured(*LLAMA)
    cfg = LoKrConfig(task_type="CAUSAL_LM", **LAYOUTS[("llama", "decompose_both")])
    insertion_pipeline(cfg)(program)
    inputs = batch_for(program)
    base, _ = captured(*LLAMA)
    torch.testing.assert_close(_run(program, inputs), _run(base, inputs), atol=0, rtol=0)

    perturb(program.adapter.tensors.values(), seed=4)
    model = hf_base(lambda: __import__("conftest").tiny_llama())
    modules = dict(model.named_modules())
    for name, site in program.sites.items():
        delta = torch.kron(*_factors(_site_tensors(program.adapter, name))) * site.scale
        modules[name].weight.data += delta
    with torch.no_grad():
        want = model(**dict(zip(program.input_names, inputs, strict=True))).logits
    sel = real_positions(program, inputs)
    got = _run(program, inputs)
    torch.testing.assert_close(got[sel], want[sel], atol=ATOL, rtol=0)
    assert (got - _run(base, inputs))[sel].abs().max() > 1e-2


def _factors(parts):
    w1 = parts["lokr_w1"] if "lokr_w1" in parts else parts["lokr_w1_a"] @ parts["lokr_w1_b"]
    w2 = parts["lokr_w2"] if "lokr_w2" in parts else parts["lokr_w2_a"] @ parts["lokr_w2_b"]
    return w1, w2


def test_gradients_reach_every_factor():
    program, _ = captured(*GPT2, mode="train")
    insertion_pipeline(LoKrConfig(task_type="CAUSAL_LM", **LAYOUTS[("gpt2", "decompose_both")]))(program)
    state = program.adapter.trainable_()
    perturb(state.tensors.values(), seed=5)
    inputs = batch_for(program, left_pad=False)
    program(*inputs).float().pow(2).mean().backward()
    assert len(state.tensors) == 16
    for key, t in state.tensors.items():
        assert t.grad is not None and t.grad.abs().max() > 0, key
    assert not [p for p in program.parameters(trainable=True) if "lokr_" not in _name_of(program, p)]


def _name_of(program, param):
    return next(n for n, p in program.graph_module.named_parameters() if p is param)


def test_conv1d_sites_warn_that_hf_peft_needs_linear_layers(caplog):
    program, _ = captured(*GPT2)
    with caplog.at_level(logging.WARNING, logger="peftc.passes.lokr"):
        insertion_pipeline(LoKrConfig(target_modules=["c_attn", "c_fc"]))(program)
    warned = [r for r in caplog.records if "Conv1D" in r.getMessage()]
    assert len(warned) == 1 and "nn.Linear" in warned[0].getMessage()
    caplog.clear()
    program, _ = captured(*LLAMA)
    with caplog.at_level(logging.WARNING, logger="peftc.passes.lokr"):
        insertion_pipeline(LoKrConfig())(program)
    assert not caplog.records


# -- train-mode dropouts ---------------------------------------------------------------------------


def test_dropouts_only_in_train_programs():
    cfg = LoKrConfig(r=2, rank_dropout=0.4, module_dropout=0.2, rank_dropout_scale=True, target_modules=["q_proj"])
    program, _ = captured(*LLAMA)
    insertion_pipeline(cfg)(program)
    assert not [r for r in _roles(program) if "dropout" in r or "draw" in r]
    train, _ = captured(*LLAMA, mode="train")
    insertion_pipeline(cfg)(train)
    roles = _roles(train)
    for role in ("lokr_module_draw", "lokr_rank_draw", "lokr_rank_mean", "lokr_rank_dropout", "lokr_module_dropout"):
        assert roles[role] == 2, role
    draws = [n for n in train.graph.nodes if str(n.meta.get("peftc_role", "")).endswith("_draw")]
    assert [n.meta["peftc_role"] for n in draws[:2]] == ["lokr_module_draw", "lokr_rank_draw"]  # HF's order
    plain, _ = captured(*LLAMA, mode="train")
    insertion_pipeline(LoKrConfig(r=2, target_modules=["q_proj"]))(plain)
    assert not [r for r in _roles(plain) if "draw" in r]  # no dropout configured: no random ops


def test_rank_dropout_masks_rows_of_the_update():
    """Each output row of ΔW is kept whole (scaled by 1/kept fraction) or zeroed; module dropout zeroes ΔW."""
    cfg = LoKrConfig(r=2, rank_dropout=0.5, rank_dropout_scale=True, target_modules=["0.self_attn.q_proj"])
    train, _ = captured(*LLAMA, mode="train")
    insertion_pipeline(cfg)(train)
    perturb(train.adapter.tensors.values(), seed=6)
    inputs = batch_for(train)
    seen = _record(train, inputs, ("lokr_scale", "lokr_module_dropout"))
    full, used = seen["lokr_scale"], seen["lokr_module_dropout"]
    kept = (used.abs().sum(1) > 0).float()
    assert 0 < kept.sum() < kept.numel()
    torch.testing.assert_close(used, full * (kept / kept.mean())[:, None], atol=1e-6, rtol=1e-6)

    cfg = LoKrConfig(r=2, module_dropout=0.5, target_modules=["0.self_attn.q_proj"])
    train, _ = captured(*LLAMA, mode="train")
    insertion_pipeline(cfg)(train)
    perturb(train.adapter.tensors.values(), seed=6)
    outcomes = set()
    for seed in range(8):
        torch.manual_seed(seed)
        seen = _record(train, inputs, ("lokr_scale", "lokr_module_dropout"))
        zero = bool(seen["lokr_module_dropout"].abs().max() == 0)
        if not zero:
            assert torch.equal(seen["lokr_module_dropout"], seen["lokr_scale"])  # kept: not rescaled (as HF)
        outcomes.add(zero)
    assert outcomes == {True, False}


def _record(program, inputs, roles) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.meta.get("peftc_role") in roles:
                seen[n.meta["peftc_role"]] = out.detach().clone()
            return out

    with torch.no_grad():
        Recorder(program.graph_module).run(*inputs)
    return seen


# -- merge ---------------------------------------------------------------------------------------


def _base_histogram(case):
    base, _ = captured(*case)
    EvalModePass()(base)
    return base.op_histogram()


@pytest.mark.parametrize("fam", ["gpt2", "llama"])
@pytest.mark.parametrize("kind", ["full", "w2_decomposed", "decompose_both"])
def test_merged_equals_unmerged_and_base_graph(fam, kind):
    case = (fam, "causal-lm")
    program, model = captured(*case)
    originals = {k: v.detach().clone() for k, v in model.state_dict().items()}
    insertion_pipeline(LoKrConfig(task_type="CAUSAL_LM", **LAYOUTS[(fam, kind)]))(program)
    perturb(program.adapter.tensors.values(), seed=7)
    site = next(iter(program.sites.values()))
    w_path = f"{MODEL_PREFIX}{site.name}.weight"
    w = program.graph_module.get_parameter(w_path).detach().clone()
    assert [d.name for d in MergeLoKrPass().plan(program)] == list(program.sites)
    inputs = batch_for(program)
    unmerged = _run(program, inputs)

    result = merge_pipeline()(program)
    assert result.modified and "MergeLoKrPass" in program.history
    sel = real_positions(program, inputs)
    torch.testing.assert_close(_run(program, inputs)[sel], unmerged[sel], atol=ATOL, rtol=0)
    assert program.op_histogram() == _base_histogram(case)
    assert not any(n.meta.get("peftc_site") for n in program.graph.nodes)
    assert not any("lokr_" in name for name, _ in program.graph_module.named_parameters())
    assert program.sites == {}
    delta = torch.kron(*_factors(_site_tensors(program.adapter, site.name))) * site.scale
    want = w + (delta.T if site.fan_in_fan_out else delta)
    torch.testing.assert_close(program.graph_module.get_parameter(w_path).detach(), want, atol=1e-6, rtol=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, originals[k]), k


def test_merge_without_lokr_sites_changes_nothing():
    program, _ = captured(*GPT2)
    insertion_pipeline(LoraConfig(r=2))(program)
    before = graph_fingerprint(program.graph)
    assert not MergeLoKrPass()(program).modified
    assert graph_fingerprint(program.graph) == before


# -- lift (swappable) ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["full", "w2_decomposed", "decompose_both"])
def test_lift_makes_the_factors_graph_inputs(kind):
    program, _ = captured(*GPT2)
    insertion_pipeline(LoKrConfig(task_type="CAUSAL_LM", **LAYOUTS[("gpt2", kind)]))(program)
    perturb(program.adapter.tensors.values(), seed=8)
    inputs = batch_for(program)
    want = _run(program, inputs)
    base, _ = captured(*GPT2)
    want_base = _run(base, inputs)
    lifted = [t for _, t in lifted_inputs(program)]
    values = lifted_tensors(program)
    sites = dict(program.sites)
    assert LiftAdaptersToInputsPass()(program).modified

    uniform = len({s.rank for s in sites.values()}) == 1
    for t in lifted:
        site_name, part = t.input_name.rsplit(".", 1)
        site = sites[site_name]
        raw = program.adapter.tensors[peft_key(site_name, part)].detach()
        scaled = part in ("lokr_w2", "lokr_w2_b")
        torch.testing.assert_close(t.value, raw * site.scale if scaled else raw)  # s folded into w2 / w2_b
        if part in ("lokr_w1", "lokr_w2"):
            assert t.rank_dim is None and program.dynamic_dims[t.input_name] == {}
            assert torch.equal(t.default, torch.zeros_like(raw))
        else:
            dim = {"lokr_w1_a": 1, "lokr_w2_a": 1, "lokr_w1_b": 0, "lokr_w2_b": 0}[part]
            assert t.rank_dim == dim and t.default.shape[dim] == 0
            assert program.dynamic_dims[t.input_name] == {dim: RANK_DIM if uniform else f"{RANK_DIM}.{site_name}"}
    assert "lokr_scale" not in _roles(program)
    assert not [k for k, _ in program.graph_module.named_parameters() if "lokr_" in k]
    sel = real_positions(program, inputs)
    got = _run_lifted(program, inputs, values)
    torch.testing.assert_close(got[sel], want[sel], atol=ATOL, rtol=0)
    got_base = _run_lifted(program, inputs, program.input_defaults)
    torch.testing.assert_close(got_base[sel], want_base[sel], atol=ATOL, rtol=0)  # defaults: the base model


def _run_lifted(program, inputs, values):
    names = program.input_names[len(inputs) :]
    with torch.no_grad():
        return program(*inputs, *(values[n] for n in names))


def test_lifted_rank_is_symbolic():
    """Another adapter of a different rank through the same lifted graph (symbolic rank, zero-padded rank)."""
    cfg = LoKrConfig(task_type="CAUSAL_LM", **LAYOUTS[("gpt2", "decompose_both")])
    program, _ = captured(*GPT2)
    insertion_pipeline(cfg)(program)
    perturb(program.adapter.tensors.values(), seed=9)
    other, _ = captured(*GPT2)
    insertion_pipeline(LoKrConfig(**_with(cfg, r=3)))(other)
    perturb(other.adapter.tensors.values(), seed=10)
    inputs = batch_for(other)
    want = _run(other, inputs)
    values = lifted_tensors(other)
    LiftAdaptersToInputsPass()(program)
    got = _run_lifted(program, inputs, values)
    sel = real_positions(program, inputs)
    torch.testing.assert_close(got[sel], want[sel], atol=ATOL, rtol=0)
    padded = {
        n: torch.cat([v, torch.zeros_like(v)], dim=1 if n.endswith("_a") else 0) if n.endswith(("_a", "_b")) else v
        for n, v in values.items()
    }
    torch.testing.assert_close(_run_lifted(program, inputs, padded)[sel], want[sel], atol=ATOL, rtol=0)


def _with(cfg: LoKrConfig, **changes) -> dict:
    data = {k: v for k, v in cfg.to_dict().items() if k != "peft_type"}
    return {**data, **changes}


# -- negatives -------------------------------------------------------------------------------------


def test_targets_matching_nothing():
    program, _ = captured(*GPT2)
    before = graph_fingerprint(program.graph)
    with pytest.raises(TargetNotFoundError, match=r"target_modules=\['q_proj'\].*c_attn, c_proj, c_fc"):
        insertion_pipeline(LoKrConfig(target_modules=["q_proj"]))(program)
    assert graph_fingerprint(program.graph) == before
    program.model_config.model_type = "mystery"
    try:
        with pytest.raises(ConfigError, match="no default target_modules for model type 'mystery'.*c_attn"):
            insertion_pipeline(LoKrConfig())(program)
    finally:
        program.model_config.model_type = "gpt2"


def _saved(case, **kw) -> AdapterState:
    program, _ = captured(*case)
    insertion_pipeline(LoKrConfig(task_type="CAUSAL_LM", **kw))(program)
    perturb(program.adapter.tensors.values(), seed=11)
    return program.adapter


def test_adapter_for_another_model_is_refused(tmp_path):
    gpt2 = _saved(GPT2, r=4)
    gpt2.save(tmp_path / "gpt2")
    loaded = AdapterState.load(tmp_path / "gpt2")
    with pytest.raises(AdapterMismatchError, match="no LoKr tensor for targeted module model.layers.0"):
        insertion_pipeline(loaded.config, loaded)(captured(*LLAMA)[0])  # LLaMA's default targets
    deeper = {**gpt2.tensors, **{k.replace(".h.1.", ".h.2."): v for k, v in gpt2.tensors.items() if ".h.1." in k}}
    with pytest.raises(AdapterMismatchError, match=r"transformer\.h\.2\.attn.* matches no targeted module"):
        insertion_pipeline(gpt2.config, AdapterState(gpt2.config, deeper, loaded=True))(captured(*GPT2)[0])
    wider = {k: nn.Parameter(torch.zeros(v.shape[0], 2 * v.shape[1])) if k.endswith("w1") else v
             for k, v in gpt2.tensors.items()}  # fmt: skip
    with pytest.raises(AdapterMismatchError, match=r"lokr_w1 has shape \[12, 16\] but .* needs \[12, 8\]"):
        insertion_pipeline(gpt2.config, AdapterState(gpt2.config, wider, loaded=True))(captured(*GPT2)[0])


def test_layout_that_disagrees_with_the_config_is_refused():
    """The tensors say w2 = w2_a·w2_b (r=4) but a config with r=8 makes HF build a full w2."""
    state = _saved(GPT2, r=4)
    cfg = LoKrConfig(r=8, task_type="CAUSAL_LM")
    with pytest.raises(AdapterMismatchError, match=r"lokr_w2_a.*w2 = w2_a·w2_b.*r=8.*w2 \[16, 8\]"):
        insertion_pipeline(cfg, AdapterState(cfg, dict(state.tensors), loaded=True))(captured(*GPT2)[0])
    torn = {k: v for k, v in state.tensors.items() if not k.endswith("h.1.attn.c_attn.lokr_w2_b")}
    with pytest.raises(AdapterMismatchError, match="lokr_w1, lokr_w2_a"):
        insertion_pipeline(state.config, AdapterState(state.config, torn, loaded=True))(captured(*GPT2)[0])
    conv = {**state.tensors, peft_key("transformer.h.0.attn.c_attn", "lokr_t2"): nn.Parameter(torch.zeros(4, 4, 3, 1))}
    with pytest.raises(AdapterMismatchError, match="lokr_t2 is a conv kernel core"):
        insertion_pipeline(state.config, AdapterState(state.config, conv, loaded=True))(captured(*GPT2)[0])
    missing = {k: v for k, v in state.tensors.items() if "h.1." not in k}
    with pytest.raises(AdapterMismatchError, match="no LoKr tensor for targeted module transformer.h.1.attn.c_attn"):
        insertion_pipeline(state.config, AdapterState(state.config, missing, loaded=True))(captured(*GPT2)[0])


# -- config and registry ---------------------------------------------------------------------------


def test_config_reads_and_writes_hf_peft_json():
    hf = peft.LoKrConfig(
        r=4, alpha=16, rank_dropout=0.1, module_dropout=0.2, decompose_both=True, decompose_factor=8,
        rank_dropout_scale=True, target_modules=["c_attn", "c_fc"], init_weights="lycoris",
        rank_pattern={"c_fc": 2}, alpha_pattern={"c_fc": 4}, use_effective_conv2d=True, task_type="CAUSAL_LM",
    )  # fmt: skip
    data = json.loads(json.dumps(hf.to_dict(), default=sorted))
    cfg = config_from_dict(data)
    assert isinstance(cfg, LoKrConfig) and get_method("LOKR").config_class is LoKrConfig
    assert (cfg.r, cfg.alpha, cfg.decompose_factor, cfg.init_weights) == (4, 16, 8, "lycoris")
    assert cfg.target_modules == ["c_attn", "c_fc"] and cfg.rank_for("transformer.h.0.mlp.c_fc") == 2
    assert cfg.scale_for("transformer.h.0.mlp.c_fc") == 2.0 and cfg.scale_for("transformer.h.0.attn.c_attn") == 4.0
    assert cfg.to_dict() == data
    back = peft.LoKrConfig(**{k: v for k, v in cfg.to_dict().items() if k != "peft_type"})
    assert json.loads(json.dumps(back.to_dict(), default=sorted)) == data
    default = LoKrConfig()
    hf_default = peft.LoKrConfig()
    names = ["r", "alpha", "rank_dropout", "module_dropout", "use_effective_conv2d", "decompose_both"]
    names += ["decompose_factor", "rank_dropout_scale", "init_weights", "rank_pattern", "alpha_pattern"]
    for name in names:
        assert getattr(default, name) == getattr(hf_default, name), name
    assert all(LoKrConfig.field_help().values())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(r=0), "r must be"),
        (dict(rank_dropout=1.5), "rank_dropout"),
        (dict(module_dropout=-0.1), "module_dropout"),
        (dict(init_weights="gaussian"), "init_weights"),
        (dict(layers_pattern="h"), "layers_to_transform"),
        (dict(rank_pattern={"c_fc": 0}), "rank_pattern"),
        (dict(decompose_factor="4"), "must be int"),
    ],
)
def test_bad_configs_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LoKrConfig(**kwargs)


def test_registry():
    method = method_by_name("lokr")
    assert method is get_method("LOKR") is get_method(LoKrConfig())
    assert method.label == "LoKr" and method.merge_pass is MergeLoKrPass and method.lift is not None
    assert method_of_tensor("base_model.model.x.lokr_w2_a") is method
    assert method_of_tensor("x.lora_A") is not method
    assert [type(p).__name__ for p in insertion_pipeline(LoKrConfig())] == ["LoKrPass", "ModulesToSavePass"]
    assert "MergeLoKrPass" in [type(p).__name__ for p in merge_pipeline()]
    facts = method.describe_site({"lokr_w1": [12, 8], "lokr_w2_a": [16, 4], "lokr_w2_b": [4, 8]})
    assert facts == {"rank": 4, "in": 64, "out": 192, "kron": "[12, 8] ⊗ [16, 8]"}


def test_linearised_reference_is_the_same_model():
    """The GPT-2 reference HF PEFT adapts (Conv1D as nn.Linear) computes the base model's logits."""
    from conftest import tiny_gpt2

    program, _ = captured(*GPT2)
    inputs = batch_for(program)
    kwargs = dict(zip(program.input_names, inputs, strict=True))
    with torch.no_grad():
        a, b = tiny_gpt2()(**kwargs).logits, linearise_conv1d(tiny_gpt2())(**kwargs).logits
    sel = real_positions(program, inputs)
    torch.testing.assert_close(a[sel], b[sel], atol=1e-5, rtol=0)


# -- training ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_peftc_train_lokr_on_tiny_gpt2_lowers_the_loss_and_hf_peft_loads_it(tmp_path):
    """``peftc train --method lokr`` on the tiny-gpt2 preset; HF PEFT loads the adapter (Conv1D as nn.Linear)."""
    from transformers import AutoModelForCausalLM

    from peftc.program import capture
    from peftc.training import TrainConfig, train

    texts = ["the food was lovely", "a dull and boring story", "great phone, fast and light", "never again"]
    texts += ["friendly staff and tasty food", "rude waiter, cold soup", "i loved every minute", "so comfortable"]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    res = train(
        TrainConfig(model="tiny-gpt2", method="lokr", data=str(data), out=str(tmp_path / "run"), max_steps=10,
                    batch_size=len(texts), lr=1e-1, warmup_ratio=0.0, r=4, options={"alpha": 8, "decompose_both": True},
                    log_every=1, progress=False)
    )  # fmt: skip
    records = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["type"] == "train"]
    assert len(losses) == 10 and losses[-1] < losses[0] - 0.1, losses  # measured 10.29 -> 10.09
    print(f"TRAIN tiny-gpt2 lokr losses {losses[0]:.4f} -> {losses[-1]:.4f} in {res.seconds:.1f}s")

    state = AdapterState.load(res.adapter_dir)
    assert isinstance(state.config, LoKrConfig) and state.config.decompose_both and state.config.r == 4
    assert {k.rsplit(".", 1)[1] for k in state.tensors} == {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}
    src = state.config.base_model_name_or_path
    linear_base = linearise_conv1d(AutoModelForCausalLM.from_pretrained(src))
    hf = peft.PeftModel.from_pretrained(linear_base, str(res.adapter_dir))
    program = capture(AutoModelForCausalLM.from_pretrained(src), "causal-lm", mode="eval")
    insertion_pipeline(state.config, state)(program)
    inputs = batch_for(program)
    with torch.no_grad():
        ours = program(*inputs)
        theirs = hf.eval()(**dict(zip(program.input_names, inputs, strict=True))).logits
        base = AutoModelForCausalLM.from_pretrained(src)(**dict(zip(program.input_names, inputs, strict=True))).logits
    sel = real_positions(program, inputs)
    torch.testing.assert_close(ours[sel], theirs[sel], atol=ATOL, rtol=0)
    assert (theirs - base)[sel].abs().max() > 1e-3  # training moved the adapter off ΔW = 0
