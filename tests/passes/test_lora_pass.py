"""LoraPass + ModulesToSavePass: which sites, what nodes, what numbers, and the errors a user can cause.

The numerical reference is the eager transformers model with a forward hook adding ``s·B(A(x))`` on
each targeted module (independent of the graph rewrite); parity with HF PEFT itself is in
tests/parity/test_lora_parity.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, batch_for, captured, real_positions
from peftc.passes import LoraPass, ModulesToSavePass, insertion_pipeline
from peftc.passes.base import graph_fingerprint

from peftc.adapters import AdapterState, peft_key
from peftc.config import LoraConfig
from peftc.errors import AdapterMismatchError, TargetNotFoundError
from peftc.program import MODEL_PREFIX

aten = torch.ops.aten
HEADS = ["classifier", "score"]
GPT2 = ("gpt2", "causal-lm")

#: Default targets per family: (site -> (module type, in, out, fan_in_fan_out)).
DEFAULT_SITES = {
    "gpt2": {f"transformer.h.{i}.attn.c_attn": ("Conv1D", 64, 192, True) for i in (0, 1)},
    "llama": {
        **{f"model.layers.{i}.self_attn.q_proj": ("Linear", 64, 64, False) for i in (0, 1)},
        **{f"model.layers.{i}.self_attn.v_proj": ("Linear", 64, 32, False) for i in (0, 1)},  # GQA: 2 KV heads
    },
    "bert": {
        f"bert.encoder.layer.{i}.attention.self.{m}": ("Linear", 64, 64, False)
        for i in (0, 1)
        for m in ("query", "value")
    },
}
CASES = sorted(FAMILIES)
IDS = [f"{f}-{t}" for f, t in CASES]


def _config(task: str, **kwargs) -> LoraConfig:
    if task == "seq-cls":
        kwargs.setdefault("modules_to_save", HEADS)
        return LoraConfig(task_type="SEQ_CLS", **kwargs)
    return LoraConfig(task_type="CAUSAL_LM", **kwargs)


def _perturb(state: AdapterState, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in state.tensors.values():
            t.add_(0.1 * torch.randn(t.shape, generator=gen))


def _run(program, inputs):
    with torch.no_grad():
        return program(*inputs)


def _reference(case, program, inputs):
    """Eager model with the adapter's tensors applied by hand: LoRA by forward hooks, copies by assignment."""
    model = FAMILIES[case]()
    state, modules = program.adapter, dict(model.named_modules())
    params = dict(model.named_parameters())
    for key, t in state.tensors.items():
        name = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        if "lora_" not in key:
            params[name].data.copy_(t.detach())
    for site in program.sites.values():
        a = state.tensors[peft_key(site.name, "lora_A.weight")].detach()
        b = state.tensors[peft_key(site.name, "lora_B.weight")].detach()

        def hook(mod, args, out, a=a, b=b, s=site.scale):
            return out + s * F.linear(F.linear(args[0], a), b)

        modules[site.name].register_forward_hook(hook)
    kwargs = dict(zip(program.input_names, inputs, strict=True))
    if case[1] == "causal-lm":
        kwargs["use_cache"] = False
    with torch.no_grad():
        return model(**kwargs).logits


def _assert_close_to_reference(case, program, atol=1e-5):
    inputs = batch_for(program)
    got, want = _run(program, inputs), _reference(case, program, inputs)
    sel = real_positions(program, inputs)
    torch.testing.assert_close(got[sel], want[sel], atol=atol, rtol=0)
    return got


def _roles(program) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in program.graph.nodes:
        role = node.meta.get("peftc_role")
        if role:
            counts[role] = counts.get(role, 0) + 1
    return counts


# -- structure -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_default_sites_per_family(case):
    program, _ = captured(*case)
    before = program.op_histogram()
    result = insertion_pipeline(_config(case[1]))(program)
    assert result.modified and result.program is program
    expected = DEFAULT_SITES[case[0]]
    assert set(program.sites) == set(expected)
    for name, (cls, fin, fout, ffo) in expected.items():
        site = program.sites[name]
        assert (site.method, site.module_type, site.in_features, site.out_features) == ("LORA", cls, fin, fout)
        assert site.fan_in_fan_out is ffo and site.rank == 8 and site.scale == 1.0
        a = program.adapter.tensors[peft_key(name, "lora_A.weight")]
        b = program.adapter.tensors[peft_key(name, "lora_B.weight")]
        assert a.shape == (8, fin) and b.shape == (fout, 8)
        assert program.graph_module.get_parameter(f"{MODEL_PREFIX}{name}.lora_A.weight") is a
    n = len(expected)
    assert _roles(program) == {"param": 2 * n, "lora_A": n, "lora_B": n, "lora_scale": n, "lora_out": n}
    after = program.op_histogram()
    assert after["linear.default"] == before.get("linear.default", 0) + 2 * n
    assert after["mul.Tensor"] == before.get("mul.Tensor", 0) + n
    for node in program.graph.nodes:  # new nodes are healthy: value metadata and the owning module
        if node.op == "call_function" and node.meta.get("peftc_site"):
            assert isinstance(node.meta["val"], torch.Tensor)
            assert node.meta["nn_module_stack"]
            if node.meta["peftc_role"] == "lora_A":
                assert node.meta["val"].shape[-1] == 8
    trainable = {id(p) for p in program.parameters(trainable=True)}
    assert trainable == {id(t) for t in program.adapter.tensors.values()}
    heads = sorted(k.removeprefix("base_model.model.") for k in program.adapter.tensors if "lora_" not in k)
    assert (
        heads == {"causal-lm": [], "seq-cls": ["score.weight"]}[case[1]]
        if case[0] != "bert"
        else heads
        == [
            "classifier.bias",
            "classifier.weight",
        ]
    )
    assert program.history == (["LoraPass"] if case[1] == "causal-lm" else ["LoraPass", "ModulesToSavePass"])
    if case[1] == "causal-lm":
        before = graph_fingerprint(program.graph)
        assert ModulesToSavePass(None, "none")(program).modified is False  # nothing to copy: no change
        assert graph_fingerprint(program.graph) == before


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_lora_matches_hooked_eager_model(case):
    program, _ = captured(*case)
    insertion_pipeline(_config(case[1], init_lora_weights=False))(program)
    _perturb(program.adapter)  # B and the head away from their initial values
    _assert_close_to_reference(case, program)


@pytest.mark.parametrize(
    "targets,expected",
    [
        (["c_attn"], {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}),
        (["h.0.attn.c_attn"], {"transformer.h.0.attn.c_attn"}),  # a '.name' suffix
        (["transformer.h.1.mlp.c_fc"], {"transformer.h.1.mlp.c_fc"}),  # a whole name
        (["attn.c_proj"], {"transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"}),
        (["c_proj"], {f"transformer.h.{i}.{m}.c_proj" for i in (0, 1) for m in ("attn", "mlp")}),
        (r"transformer\.h\.1\.attn\.c_attn", {"transformer.h.1.attn.c_attn"}),  # a string is a full regex
        (r".*\.c_(attn|fc)", {f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("attn.c_attn", "mlp.c_fc")}),
    ],
)
def test_target_modules_list_and_regex(targets, expected):
    program, _ = captured(*GPT2)
    insertion_pipeline(LoraConfig(target_modules=targets))(program)
    assert set(program.sites) == expected


@pytest.mark.parametrize(
    "targets", ["c_attn", ["q_proj"], ["attn"], ["h.0"]], ids=["regex-not-full", "other-model", "parent", "block"]
)
def test_target_not_found_lists_linear_modules(targets):
    program, _ = captured(*GPT2)
    before = graph_fingerprint(program.graph)
    with pytest.raises(TargetNotFoundError) as info:
        insertion_pipeline(LoraConfig(target_modules=targets))(program)
    msg = str(info.value)
    assert "\n" not in msg
    assert f"target_modules={targets!r} matched no adaptable module" in msg
    assert "linear modules here: c_attn, c_proj, c_fc, lm_head" in msg
    assert graph_fingerprint(program.graph) == before and program.adapter is None and not program.sites


def test_exclude_modules():
    program, _ = captured(*GPT2)
    insertion_pipeline(LoraConfig(target_modules=["c_attn", "c_proj"], exclude_modules=["mlp.c_proj"]))(program)
    assert set(program.sites) == {f"transformer.h.{i}.attn.{m}" for i in (0, 1) for m in ("c_attn", "c_proj")}
    program, _ = captured(*GPT2)
    insertion_pipeline(LoraConfig(target_modules=["c_attn", "c_fc"], exclude_modules=r".*\.h\.0\..*"))(program)
    assert set(program.sites) == {"transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_fc"}
    program, _ = captured(*GPT2)
    with pytest.raises(TargetNotFoundError, match="listed in exclude_modules"):
        insertion_pipeline(LoraConfig(target_modules=["c_attn"], exclude_modules=["c_attn"]))(program)


@pytest.mark.parametrize(
    "case,kwargs,expected",
    [
        (GPT2, dict(layers_to_transform=[1]), {"transformer.h.1.attn.c_attn"}),
        (GPT2, dict(layers_to_transform=0, layers_pattern="h"), {"transformer.h.0.attn.c_attn"}),
        (
            ("llama", "causal-lm"),
            dict(layers_to_transform=[0], layers_pattern="layers"),
            {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"},
        ),
        (
            ("bert", "seq-cls"),
            dict(layers_to_transform=[1]),
            {"bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.value"},
        ),
    ],
    ids=["gpt2-list", "gpt2-int-pattern", "llama", "bert"],
)
def test_layers_to_transform(case, kwargs, expected):
    program, _ = captured(*case)
    insertion_pipeline(_config(case[1], **kwargs))(program)
    assert set(program.sites) == expected


def test_layers_pattern_that_names_nothing_is_an_error():
    program, _ = captured(*GPT2)
    with pytest.raises(TargetNotFoundError, match=r"layer not in layers_to_transform=\[0\]"):
        insertion_pipeline(LoraConfig(layers_to_transform=[0], layers_pattern="blocks"))(program)


def test_rank_pattern_alpha_pattern_rslora():
    program, _ = captured(*GPT2)
    cfg = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["c_attn", "c_proj", "c_fc"],
        rank_pattern={"c_fc": 4, "h.1.attn.c_attn": 2},
        alpha_pattern={"mlp.c_proj": 32},
        use_rslora=True,
        init_lora_weights=False,
    )
    insertion_pipeline(cfg)(program)
    expected = {  # name -> (rank, alpha)
        "transformer.h.0.attn.c_attn": (8, 16),
        "transformer.h.1.attn.c_attn": (2, 16),
        "transformer.h.0.attn.c_proj": (8, 16),
        "transformer.h.0.mlp.c_fc": (4, 16),
        "transformer.h.1.mlp.c_fc": (4, 16),
        "transformer.h.1.mlp.c_proj": (8, 32),
    }
    assert len(program.sites) == 8
    for name, (r, alpha) in expected.items():
        site = program.sites[name]
        assert site.rank == r and site.scale == pytest.approx(alpha / math.sqrt(r))
        assert program.adapter.tensors[peft_key(name, "lora_A.weight")].shape == (r, site.in_features)
        assert program.adapter.tensors[peft_key(name, "lora_B.weight")].shape == (site.out_features, r)
        (mul,) = [
            n for n in program.graph.nodes if n.meta.get("peftc_site") == name and n.meta["peftc_role"] == "lora_scale"
        ]
        assert mul.args[1] == pytest.approx(alpha / math.sqrt(r))
    _assert_close_to_reference(GPT2, program)
    program, _ = captured(*GPT2)
    insertion_pipeline(LoraConfig(r=8, lora_alpha=16, use_rslora=False))(program)
    assert {s.scale for s in program.sites.values()} == {2.0}


def test_lora_dropout_only_in_train_programs():
    cfg = LoraConfig(lora_dropout=0.1, target_modules=["c_attn", "c_fc"])
    train, _ = captured(*GPT2, mode="train")
    evl, _ = captured(*GPT2, mode="eval")
    insertion_pipeline(cfg)(train)
    insertion_pipeline(cfg)(evl)
    drops = [n for n in train.graph.nodes if n.meta.get("peftc_role") == "lora_dropout"]
    assert len(drops) == 4
    for node in drops:
        assert node.target == aten.dropout.default and node.args[1:] == (0.1, True)
        assert all(u.meta.get("peftc_role") == "lora_A" for u in node.users)  # dropout feeds A only
    assert "lora_dropout" not in _roles(evl)
    train2, _ = captured(*GPT2, mode="train")
    insertion_pipeline(LoraConfig(lora_dropout=0.0))(train2)
    assert "lora_dropout" not in _roles(train2)


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_bias_and_modules_to_save_copies(bias):
    case = ("gpt2", "seq-cls")
    program, model = captured(*case)
    originals = {k: v.detach().clone() for k, v in model.state_dict().items()}
    insertion_pipeline(_config("seq-cls", bias=bias, target_modules=["c_attn", "c_fc"], init_lora_weights=False))(
        program
    )
    copies = sorted(k for k in program.adapter.tensors if "lora_" not in k)
    site_biases = [
        f"base_model.model.transformer.h.{i}.{m}.base_layer.bias" for i in (0, 1) for m in ("attn.c_attn", "mlp.c_fc")
    ]
    if bias == "none":
        assert copies == ["base_model.model.score.weight"]
    elif bias == "lora_only":
        assert copies == sorted(["base_model.model.score.weight", *site_biases])
    else:
        n_bias = sum(1 for n, _ in model.named_parameters() if n.endswith("bias"))
        assert len(copies) == 1 + n_bias == 14 and set(site_biases) <= set(copies)
        assert "base_model.model.transformer.h.0.attn.c_proj.bias" in copies  # not a site: no base_layer
    gm = program.graph_module
    for key in copies:
        path = MODEL_PREFIX + key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        copy = program.adapter.tensors[key]
        assert gm.get_parameter(path) is copy and copy.requires_grad
        assert copy is not model.get_parameter(path.removeprefix(MODEL_PREFIX))
    _perturb(program.adapter)
    _assert_close_to_reference(case, program)
    for k, v in model.state_dict().items():  # the base model is untouched
        assert torch.equal(v, originals[k]), k


def test_modules_to_save_that_matches_nothing_is_an_error():
    program, _ = captured("gpt2", "seq-cls")
    with pytest.raises(TargetNotFoundError, match=r"modules_to_save=\['head'\] matched no module"):
        insertion_pipeline(LoraConfig(modules_to_save=["head"]))(program)


def test_init_lora_weights():
    base, _ = captured(*GPT2)
    inputs = batch_for(base)
    want = _run(base, inputs)
    program, _ = captured(*GPT2)
    insertion_pipeline(LoraConfig(init_lora_weights=True))(program)
    for name, site in program.sites.items():
        a = program.adapter.tensors[peft_key(name, "lora_A.weight")]
        b = program.adapter.tensors[peft_key(name, "lora_B.weight")]
        assert torch.count_nonzero(b) == 0 and torch.count_nonzero(a) == a.numel()
        assert a.abs().max() <= 1 / math.sqrt(site.in_features)  # kaiming-uniform(a=√5) bound
    assert torch.equal(_run(program, inputs), want)  # B = 0: exactly the base model
    program, _ = captured(*GPT2)
    insertion_pipeline(LoraConfig(init_lora_weights=False))(program)
    assert all(torch.count_nonzero(t) == t.numel() for t in program.adapter.tensors.values())
    assert (_run(program, inputs) - want).abs().max() > 1e-3
    program, _ = captured(*GPT2)
    insertion_pipeline(LoraConfig(r=16, init_lora_weights="gaussian", target_modules=["c_attn", "c_fc"]))(program)
    a_all = torch.cat([t.detach().flatten() for k, t in program.adapter.tensors.items() if "lora_A" in k])
    assert a_all.std().item() == pytest.approx(1 / 16, rel=0.1)
    assert all(torch.count_nonzero(t) == 0 for k, t in program.adapter.tensors.items() if "lora_B" in k)
    assert torch.equal(_run(program, inputs), want)


def test_plan_is_a_dry_run_with_reasons():
    program, _ = captured("gpt2", "seq-cls")
    before = graph_fingerprint(program.graph)
    n_params = len(list(program.graph_module.parameters()))
    cfg = LoraConfig(
        target_modules=["c_attn", "ln_1", "c_proj", "score"],
        exclude_modules=["h.1.attn.c_proj"],
        modules_to_save=["score"],
    )
    decisions = {d.name: d for d in LoraPass(cfg).plan(program)}
    rewrite = {n for n, d in decisions.items() if d.action == "rewrite"}
    assert rewrite == {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn", "transformer.h.0.attn.c_proj"} | {
        f"transformer.h.{i}.mlp.c_proj" for i in (0, 1)
    }
    assert decisions["transformer.h.0.attn.c_attn"].details == {"in": 64, "out": 192, "rank": 8, "scale": 1.0}
    assert decisions["transformer.h.0.ln_1"].reason == "LayerNorm is not a Linear or Conv1D layer"
    assert decisions["transformer.h.1.attn.c_proj"].reason == "listed in exclude_modules"
    assert decisions["score"].reason == "in modules_to_save (trained in full instead)"
    assert all(d.action == "skip" and d.reason for n, d in decisions.items() if n not in rewrite)
    mts = ModulesToSavePass(["score"]).plan(program)
    assert [(d.name, d.details) for d in mts] == [("score", {"param": "score.weight"})]
    assert graph_fingerprint(program.graph) == before  # nothing changed
    assert len(list(program.graph_module.parameters())) == n_params
    assert program.adapter is None and not program.sites and program.history == []
    assert insertion_pipeline(cfg).plan(program)["LoraPass"]


def test_bind_saved_adapter_state(tmp_path):
    first, _ = captured(*GPT2)
    cfg = LoraConfig(r=4, target_modules=["c_attn", "mlp.c_proj"])
    insertion_pipeline(cfg)(first)
    _perturb(first.adapter)
    first.adapter.save(tmp_path / "a")
    inputs = batch_for(first)
    want = _run(first, inputs)
    state = AdapterState.load(tmp_path / "a")
    train, _ = captured(*GPT2, mode="train")
    evl, _ = captured(*GPT2)
    assert insertion_pipeline(state.config, state)(evl).modified
    insertion_pipeline(state.config, state)(train)
    assert evl.adapter is state and set(evl.sites) == set(first.sites)
    assert torch.equal(_run(evl, inputs), want)
    for key, t in state.tensors.items():  # both programs read the same Parameters: training one updates both
        path = MODEL_PREFIX + key.removeprefix("base_model.model.")
        assert evl.graph_module.get_parameter(path) is t and train.graph_module.get_parameter(path) is t
    with torch.no_grad():
        state.tensors[peft_key("transformer.h.0.attn.c_attn", "lora_B.weight")].mul_(2)
    assert (_run(evl, inputs) - want).abs().max() > 1e-4


def _lora_state(cfg, shapes: dict[str, tuple[int, ...]], **extra) -> AdapterState:
    tensors = {k: torch.nn.Parameter(torch.zeros(s), requires_grad=False) for k, s in {**shapes, **extra}.items()}
    return AdapterState(cfg, tensors, loaded=True)


def _gpt2_shapes(r=8, hidden=64):
    shapes = {}
    for i in (0, 1):
        shapes[peft_key(f"transformer.h.{i}.attn.c_attn", "lora_A.weight")] = (r, hidden)
        shapes[peft_key(f"transformer.h.{i}.attn.c_attn", "lora_B.weight")] = (3 * hidden, r)
    return shapes


def _mismatch(program, cfg, state, *fragments):
    with pytest.raises(AdapterMismatchError) as info:
        insertion_pipeline(cfg, state)(program)
    msg = str(info.value)
    assert "\n" not in msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


def test_adapter_for_another_hidden_size_or_rank_is_refused():
    cfg = LoraConfig()
    program, _ = captured(*GPT2)
    _mismatch(
        program,
        cfg,
        _lora_state(cfg, _gpt2_shapes(hidden=32)),
        "adapter tensor base_model.model.transformer.h.0.attn.c_attn.lora_A.weight has shape [8, 32]",
        "needs [8, 64]",
    )
    program, _ = captured(*GPT2)
    _mismatch(
        program,
        cfg,
        _lora_state(LoraConfig(r=4), _gpt2_shapes(r=4)),
        "h.0.attn.c_attn.lora_A.weight has shape [4, 64] but module transformer.h.0.attn.c_attn needs [8, 64] (r=8",
    )


def test_adapter_for_other_num_labels_is_refused():
    program, _ = captured("gpt2", "seq-cls")
    cfg = LoraConfig(modules_to_save=["score"])
    state = _lora_state(cfg, _gpt2_shapes(), **{"base_model.model.score.weight": (5, 64)})
    _mismatch(
        program,
        cfg,
        state,
        "adapter tensor base_model.model.score.weight has shape [5, 64]",
        "score.weight is [3, 64]",
        "num_labels",
    )
    program, _ = captured("gpt2", "seq-cls")
    _mismatch(program, cfg, _lora_state(cfg, _gpt2_shapes()), "adapter has no tensor base_model.model.score.weight")


def test_tensors_of_an_unrelated_model_are_refused():
    llama = {
        peft_key(f"model.layers.{i}.self_attn.{m}", f"lora_{ab}.weight"): (8, 64)
        for i in (0, 1)
        for m in ("q_proj", "v_proj")
        for ab in "AB"
    }
    program, _ = captured(*GPT2)
    _mismatch(
        program,
        LoraConfig(target_modules=["c_attn"]),
        _lora_state(LoraConfig(), llama),
        "adapter has no tensor base_model.model.transformer.h.0.attn.c_attn.lora_A.weight",
    )
    program, _ = captured(*GPT2)
    with pytest.raises(TargetNotFoundError, match="linear modules here: c_attn"):
        insertion_pipeline(LoraConfig(target_modules=["q_proj", "v_proj"]), _lora_state(LoraConfig(), llama))(program)
    extra = {peft_key("model.layers.0.self_attn.q_proj", "lora_A.weight"): (8, 64)}
    program, _ = captured(*GPT2)
    _mismatch(
        program,
        LoraConfig(),
        _lora_state(LoraConfig(), {**_gpt2_shapes(), **extra}),
        "adapter tensor base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight (and 0 more)",
        "matches no targeted module",
    )
    program, _ = captured(*GPT2)
    _mismatch(
        program,
        LoraConfig(),
        _lora_state(LoraConfig(), {**_gpt2_shapes(), "base_model.model.transformer.wte.weight": (128, 64)}),
        "adapter tensor base_model.model.transformer.wte.weight matches no parameter this adapter trains here",
    )
