"""IA3Pass and MergeIA3Pass: which nodes, where, merge == unmerged, plan reasons, and errors.

Every program comes from one capture per family (deep-copied per test); the (IA)³ vectors are
perturbed away from 1 before any numerical comparison.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch_for, real_positions, tiny_bert, tiny_gpt2, tiny_llama
from peftc.passes import EvalModePass, IA3Pass, MergeIA3Pass, insertion_pipeline, merge_pipeline
from peftc.passes.base import graph_fingerprint
from peftc.passes.ia3 import is_feedforward

from peftc.adapters import AdapterState
from peftc.config import IA3Config, config_from_dict
from peftc.errors import AdapterMismatchError, ConfigError, TargetNotFoundError
from peftc.methods import get_method

aten = torch.ops.aten
FAMILIES = {"gpt2": (tiny_gpt2, "causal-lm"), "llama": (tiny_llama, "causal-lm"), "bert": (tiny_bert, "seq-cls")}


@pytest.fixture(scope="module")
def base_program():
    """``base_program(family)``: a fresh deep copy of that family's eval capture."""
    from peftc.program import capture

    cache = {}

    def get(family: str):
        if family not in cache:
            make, task = FAMILIES[family]
            cache[family] = capture(make(), task, mode="eval")
        return copy.deepcopy(cache[family])

    return get


def _cfg(family: str, **kwargs) -> IA3Config:
    if family == "bert":
        kwargs.setdefault("modules_to_save", ["classifier", "score"])
    return IA3Config(task_type="SEQ_CLS" if family == "bert" else "CAUSAL_LM", **kwargs)


def _perturb(state: AdapterState, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in state.tensors.values():
            t.add_(0.5 * torch.randn(t.shape, generator=gen))


def _role(program, role: str) -> list:
    return [n for n in program.graph.nodes if n.meta.get("peftc_role") == role]


def _calls(program) -> list[str]:
    return [str(n.target) for n in program.graph.nodes if n.op == "call_function"]


# -- structure ---------------------------------------------------------------------------------


def test_gpt2_conv1d_structure(base_program):
    prog = base_program("gpt2")
    n_before = len(prog.graph.nodes)
    result = IA3Pass(_cfg("gpt2"))(prog)
    assert result.modified and result.program is prog
    outs, ins = _role(prog, "ia3_out"), _role(prog, "ia3_in")
    assert len(outs) == 2 and len(ins) == 2
    for mul in outs:  # after addmm(b, x2d, W) of c_attn, before Conv1D's reshape
        base, flat = mul.args
        assert mul.meta["peftc_site"].endswith("attn.c_attn") and base.target == aten.addmm.default
        assert list(base.users) == [mul]
        assert flat.meta["peftc_role"] == "ia3_flat" and flat.args[0].target.endswith("attn.c_attn.ia3_l")
        assert tuple(mul.meta["val"].shape[1:]) == (192,)
    for mul in ins:  # on the addmm's input of mlp.c_proj
        (user,) = mul.users
        assert mul.meta["peftc_site"].endswith("mlp.c_proj") and user.target == aten.addmm.default
        assert user.args[1] is mul
    # per attention site: get_attr, reshape, mul; per feed-forward site: get_attr, mul
    assert len(prog.graph.nodes) == n_before + 2 * 3 + 2 * 2
    shapes = {k: list(v.shape) for k, v in prog.adapter.tensors.items()}
    assert shapes == {
        "base_model.model.transformer.h.0.attn.c_attn.ia3_l": [192, 1],
        "base_model.model.transformer.h.1.attn.c_attn.ia3_l": [192, 1],
        "base_model.model.transformer.h.0.mlp.c_proj.ia3_l": [1, 256],
        "base_model.model.transformer.h.1.mlp.c_proj.ia3_l": [1, 256],
    }
    assert all(torch.equal(t, torch.ones_like(t)) for t in prog.adapter.tensors.values())  # init_ia3_weights
    assert prog.parameter_counts()["trainable"] == 2 * 192 + 2 * 256
    assert {s.method for s in prog.sites.values()} == {"IA3"} and len(prog.sites) == 4
    assert all(s.fan_in_fan_out for s in prog.sites.values())


@pytest.mark.parametrize(
    "family, expected",
    [
        (
            "llama",  # GQA: k/v project to 2 heads x 16 = 32
            {"self_attn.k_proj": [32, 1], "self_attn.v_proj": [32, 1], "mlp.down_proj": [1, 128]},
        ),
        (
            "bert",  # HF's feed-forward rule is a plain endswith: attention.output.dense is feed-forward too
            {
                "attention.self.key": [64, 1],
                "attention.self.value": [64, 1],
                "attention.output.dense": [1, 64],
                "intermediate.dense": None,
                "layer.0.output.dense": [1, 128],
            },
        ),
    ],
)
def test_linear_structure(base_program, family, expected):
    prog = base_program(family)
    insertion_pipeline(_cfg(family))(prog)
    for suffix, shape in expected.items():
        keys = [k for k in prog.adapter.tensors if k.endswith(suffix + ".ia3_l")]
        if shape is None:
            assert not keys, f"{suffix} must not be adapted"
            continue
        assert keys and all(list(prog.adapter.tensors[k].shape) == shape for k in keys), suffix
    for mul in _role(prog, "ia3_out"):
        assert mul.args[0].target == aten.linear.default and list(mul.args[0].users) == [mul]
    for mul in _role(prog, "ia3_in"):
        (user,) = mul.users
        assert user.target == aten.linear.default and user.args[0] is mul
    n_ff = sum(1 for k in prog.adapter.tensors if k.endswith(".ia3_l") and prog.adapter.tensors[k].shape[0] == 1)
    assert len(_role(prog, "ia3_in")) == n_ff > 0
    assert len(_role(prog, "ia3_out")) == sum(1 for k in prog.adapter.tensors if k.endswith(".ia3_l")) - n_ff


def test_plan_reasons_change_nothing(base_program):
    prog = base_program("gpt2")
    before = graph_fingerprint(prog.graph)
    cfg = _cfg(
        "gpt2",
        target_modules=r".*\.(attn|c_attn|c_fc)|lm_head",
        exclude_modules=["h.1.mlp.c_fc"],
        modules_to_save=["lm_head"],
    )
    plan = {d.name: d for d in IA3Pass(cfg).plan(prog)}
    assert graph_fingerprint(prog.graph) == before
    assert plan["transformer.h.0.attn"].action == "skip" and "not a Linear" in plan["transformer.h.0.attn"].reason
    assert plan["transformer.h.1.mlp.c_fc"].reason == "listed in exclude_modules"
    assert "modules_to_save" in plan["lm_head"].reason
    assert plan["transformer.h.0.mlp.c_fc"].details == {"in": 64, "out": 256, "feedforward": False, "shape": [256, 1]}
    assert sorted(d.name for d in plan.values() if d.action == "rewrite") == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.mlp.c_fc",
        "transformer.h.1.attn.c_attn",
    ]


def test_gradients_reach_only_l(base_program):
    prog = base_program("gpt2")
    insertion_pipeline(_cfg("gpt2"))(prog)
    _perturb(prog.adapter)
    prog(*batch_for(prog)).square().mean().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in prog.adapter.tensors.values())
    assert all(p.grad is None for p in prog.parameters(trainable=False))


# -- merge -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_merge_equals_unmerged_and_base_graph(base_program, family):
    base = base_program(family)
    EvalModePass()(base)
    prog = base_program(family)
    insertion_pipeline(_cfg(family))(prog)
    _perturb(prog.adapter)
    inputs = batch_for(prog)
    sel = real_positions(prog, inputs)
    with torch.no_grad():
        unmerged = prog(*inputs)
        assert (unmerged - base(*inputs))[sel].abs().max() > 1e-2  # the adapter does something
    result = merge_pipeline()(prog)
    assert result.modified
    with torch.no_grad():
        merged = prog(*inputs)
    diff = (merged - unmerged)[sel].abs().max().item()
    assert diff <= 1e-5, diff
    assert _calls(prog) == _calls(base)
    assert prog.op_histogram() == base.op_histogram()
    assert not prog.sites and not _role(prog, "ia3_in") and not _role(prog, "ia3_out")
    assert not [n for n, _ in prog.graph_module.named_parameters() if "ia3_" in n]
    assert MergeIA3Pass()(prog).modified is False


def test_merge_folds_bias_only_for_output_scaling(base_program):
    prog = base_program("gpt2")
    insertion_pipeline(_cfg("gpt2"))(prog)
    _perturb(prog.adapter)
    gm = prog.graph_module
    w_attn, b_attn, w_ff, b_ff = (
        gm.get_parameter(f"model.transformer.h.0.{name}").detach().clone()
        for name in ("attn.c_attn.weight", "attn.c_attn.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")
    )
    l_attn = prog.adapter.tensors["base_model.model.transformer.h.0.attn.c_attn.ia3_l"].detach().clone()
    l_ff = prog.adapter.tensors["base_model.model.transformer.h.0.mlp.c_proj.ia3_l"].detach().clone()
    MergeIA3Pass()(prog)
    gm = prog.graph_module
    # Conv1D stores W as [in, out]: l is transposed before the product (HF's transpose(l, fan_in_fan_out)).
    assert torch.equal(gm.get_parameter("model.transformer.h.0.attn.c_attn.weight"), w_attn * l_attn.T)
    assert torch.equal(gm.get_parameter("model.transformer.h.0.attn.c_attn.bias"), b_attn * l_attn.reshape(-1))
    assert torch.equal(gm.get_parameter("model.transformer.h.0.mlp.c_proj.weight"), w_ff * l_ff.T)
    assert torch.equal(gm.get_parameter("model.transformer.h.0.mlp.c_proj.bias"), b_ff)


@pytest.mark.parametrize("feedforward", [[], ["lm_head"]])
def test_merge_unties_shared_weight(base_program, feedforward):
    """GPT-2's lm_head and wte share one tensor: merging lm_head must leave the embedding alone."""
    prog = base_program("gpt2")
    shared = prog.graph_module.get_parameter("model.lm_head.weight").detach().clone()
    insertion_pipeline(_cfg("gpt2", target_modules=["lm_head"], feedforward_modules=feedforward))(prog)
    _perturb(prog.adapter)
    inputs = batch_for(prog)
    sel = real_positions(prog, inputs)
    with torch.no_grad():
        unmerged = prog(*inputs)
        MergeIA3Pass()(prog)
        diff = (prog(*inputs) - unmerged)[sel].abs().max().item()
    assert diff <= 1e-5, diff
    (embedding,) = [n for n in prog.graph.nodes if n.target == aten.embedding.default and "wte" in str(n.meta)]
    assert embedding.args[0].target != "model.lm_head.weight"  # moved to the tensor's other name
    assert torch.equal(prog.graph_module.get_parameter(embedding.args[0].target), shared)
    assert not torch.equal(prog.graph_module.get_parameter("model.lm_head.weight"), shared)


# -- negatives ---------------------------------------------------------------------------------


def test_targets_matching_nothing(base_program):
    prog = base_program("gpt2")
    before = graph_fingerprint(prog.graph)
    with pytest.raises(TargetNotFoundError, match=r"target_modules=\['q_proj'\].*c_attn, c_proj, c_fc"):
        IA3Pass(_cfg("gpt2", target_modules=["q_proj"], feedforward_modules=[]))(prog)
    assert graph_fingerprint(prog.graph) == before


def test_feedforward_must_be_subset():
    with pytest.raises(ConfigError, match=r"feedforward_modules must be a subset.*\['mlp.c_proj'\]"):
        IA3Config(target_modules=["c_attn"], feedforward_modules=["mlp.c_proj"])
    with pytest.raises(ConfigError, match="subset"):
        config_from_dict({"peft_type": "IA3", "target_modules": ["k"], "feedforward_modules": ["wo"]})
    IA3Config(target_modules=["c_attn", "c_proj"], feedforward_modules=".*mlp.c_proj")  # regex: not checked, as HF


def test_no_default_feedforward_for_unknown_model_type(base_program):
    prog = base_program("gpt2")
    prog.model_config.model_type = "mystery"
    with pytest.raises(ConfigError, match="no default feedforward_modules for model type 'mystery'"):
        IA3Pass(_cfg("gpt2", target_modules=["c_attn"]))(prog)
    with pytest.raises(ConfigError, match="no default target_modules"):
        IA3Pass(_cfg("gpt2"))(prog)


def test_bind_mismatched_shape(base_program):
    prog = base_program("gpt2")
    cfg = _cfg("gpt2", target_modules=["c_attn"], feedforward_modules=[])
    key = "base_model.model.transformer.h.0.attn.c_attn.ia3_l"
    tensors = {
        key: torch.nn.Parameter(torch.ones(1, 64)),  # saved as if c_attn were feed-forward
        "base_model.model.transformer.h.1.attn.c_attn.ia3_l": torch.nn.Parameter(torch.ones(192, 1)),
    }
    state = AdapterState(cfg, tensors, loaded=True)
    with pytest.raises(AdapterMismatchError, match=rf"{key} has shape \[1, 64\] .* needs \[192, 1\]"):
        insertion_pipeline(cfg, state)(prog)


def test_bind_missing_and_extra_tensors(base_program):
    cfg = _cfg("gpt2", target_modules=["c_attn"], feedforward_modules=[])
    good = {f"base_model.model.transformer.h.{i}.attn.c_attn.ia3_l": torch.ones(192, 1) for i in (0, 1)}
    missing = AdapterState(cfg, {k: torch.nn.Parameter(v) for k, v in list(good.items())[:1]}, loaded=True)
    with pytest.raises(AdapterMismatchError, match="no tensor base_model.model.transformer.h.1.attn.c_attn.ia3_l"):
        insertion_pipeline(cfg, missing)(base_program("gpt2"))
    extra_key = "base_model.model.transformer.h.7.attn.c_attn.ia3_l"
    extra = AdapterState(
        cfg, {k: torch.nn.Parameter(v) for k, v in {**good, extra_key: torch.ones(192, 1)}.items()}, loaded=True
    )
    with pytest.raises(AdapterMismatchError, match=extra_key.replace(".", r"\.")):
        insertion_pipeline(cfg, extra)(base_program("gpt2"))


# -- config and registry -----------------------------------------------------------------------


def test_config_round_trip_and_registry():
    hf_json = {  # what HF PEFT 0.21 writes for GPT-2
        "auto_mapping": None,
        "base_model_name_or_path": None,
        "exclude_modules": None,
        "fan_in_fan_out": True,
        "feedforward_modules": ["mlp.c_proj"],
        "inference_mode": True,
        "init_ia3_weights": True,
        "modules_to_save": None,
        "peft_type": "IA3",
        "peft_version": "0.21.2",
        "revision": None,
        "target_modules": ["mlp.c_proj", "c_attn"],
        "task_type": "CAUSAL_LM",
    }
    cfg = config_from_dict(hf_json)
    assert isinstance(cfg, IA3Config) and get_method("IA3").config_class is IA3Config
    assert cfg.to_dict() == hf_json
    assert IA3Config(target_modules={"v", "k"}).target_modules == ["k", "v"]
    assert all(IA3Config.field_help().values())
    with pytest.raises(ConfigError, match="init_ia3_weights"):
        IA3Config(init_ia3_weights="yes")
    assert [type(p).__name__ for p in insertion_pipeline(IA3Config())] == ["IA3Pass", "ModulesToSavePass"]
    assert "MergeIA3Pass" in [type(p).__name__ for p in merge_pipeline()]


def test_feedforward_rule_is_hf_endswith():
    assert is_feedforward("bert.encoder.layer.0.attention.output.dense", ["output.dense"])
    assert is_feedforward("model.layers.0.mlp.down_proj", ["proj"])  # plain endswith, as HF PEFT
    assert not is_feedforward("model.layers.0.mlp.up_proj", ["down_proj"])
    assert is_feedforward("model.layers.0.mlp.down_proj", r".*\.mlp\.down_proj")
    assert not is_feedforward("model.layers.0.mlp.down_proj", r"down_proj")  # a string is a full match
