"""AdaLoraPass / MergeAdaLoraPass / AdaLoRA training hooks: structure, numerics, negatives, config validation.

The numerical references are an eager re-computation of HF PEFT's ``SVDLinear`` formula on the base
model's own layers (HF PEFT itself is compared in tests/parity/test_adalora_parity.py).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import batch_for, captured, real_positions, tiny_gpt2
from peftc.passes import MergeAdaLoraPass, insertion_pipeline, merge_pipeline
from peftc.passes.adalora import ranknum_denominator
from peftc.passes.adalora_training import AdaLoraTraining, resize_by_rank_pattern
from torch import nn

from peftc.adapters import AdapterState
from peftc.config import AdaLoraConfig, LoraConfig, config_from_dict
from peftc.errors import AdapterMismatchError, ConfigError, TargetNotFoundError

ATOL = 1e-4
ROLES = ["lora_AE", "lora_A", "lora_B", "lora_scale", "lora_ranknum", "lora_out"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread avoids oversubscription on shared CPUs (measured 50x faster backward)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _perturb(state: AdapterState, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in state.tensors.values():
            t.add_(0.3 * torch.randn(t.shape, generator=gen))


def _roles(program, site: str) -> list[str]:
    return [
        n.meta["peftc_role"]
        for n in program.graph.nodes
        if n.meta.get("peftc_site") == site and n.op == "call_function"
    ]


@pytest.mark.parametrize(
    "case,sites,module_type",
    [
        (("gpt2", "causal-lm"), ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"], "Conv1D"),
        (("llama", "causal-lm"), [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qv"], "Linear"),
    ],
    ids=["gpt2-conv1d", "llama-linear"],
)
def test_structure_and_fresh_init(case, sites, module_type):
    program, _ = captured(*case)
    result = insertion_pipeline(AdaLoraConfig(init_r=5, target_r=2, task_type="CAUSAL_LM"))(program)
    assert result.modified
    assert sorted(program.sites) == sorted(sites)
    state = program.adapter
    assert len(state.tensors) == 3 * len(sites)
    for name, site in program.sites.items():
        assert (site.method, site.module_type, site.rank, site.scale) == ("ADALORA", module_type, 5, 8.0)
        assert _roles(program, name) == ROLES  # eval program: no dropout
        a, b, e = (state.tensors[f"base_model.model.{name}.{p}"] for p in ("lora_A", "lora_B", "lora_E"))
        assert a.shape == (5, site.in_features) and b.shape == (site.out_features, 5) and e.shape == (5, 1)
        assert torch.count_nonzero(e) == 0 and 0.01 < float(a.std()) < 0.03 and 0.01 < float(b.std()) < 0.03
        assert a.requires_grad and b.requires_grad and e.requires_grad
    div = next(n for n in program.graph.nodes if n.meta.get("peftc_role") == "lora_ranknum")
    assert div.args[1] == ranknum_denominator(5) != 5 + 1e-5  # HF's float32 ranknum + 1e-5


def test_dropout_only_in_train_programs():
    cfg = AdaLoraConfig(init_r=4, target_r=2, lora_dropout=0.1, task_type="CAUSAL_LM")
    train, _ = captured("gpt2", "causal-lm", mode="train")
    insertion_pipeline(cfg)(train)
    assert _roles(train, "transformer.h.0.attn.c_attn") == ["lora_dropout", *ROLES]


@pytest.mark.parametrize("case", [("gpt2", "causal-lm"), ("llama", "causal-lm"), ("bert", "seq-cls")])
def test_matches_eager_svd_formula_and_merge(case):
    fam, task = case
    targets = {"gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "down_proj"], "bert": ["query", "output.dense"]}[fam]
    cfg = AdaLoraConfig(init_r=4, target_r=2, lora_alpha=6, target_modules=targets, task_type="CAUSAL_LM")
    base, _ = captured(*case)
    assert not merge_pipeline()(base).modified or not base.sites  # eval-mode cleanup only
    base_hist = base.op_histogram()
    program, model = captured(*case)
    insertion_pipeline(cfg)(program)
    _perturb(program.adapter)
    inputs = batch_for(program)
    with torch.no_grad():
        ours = program(*inputs)
    # eager reference: forward hooks adding HF's SVDLinear branch on the model's own modules
    hooks = []
    for name in program.sites:
        module = model.get_submodule(name)
        a, b, e = (program.adapter.tensors[f"base_model.model.{name}.{p}"] for p in ("lora_A", "lora_B", "lora_E"))

        def hook(mod, args, out, a=a, b=b, e=e):
            return out + (args[0] @ (a * e).T @ b.T) * 6.0 / (torch.tensor([4.0]) + 1e-5)

        hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            ref = model(**dict(zip(program.input_names, inputs, strict=True))).logits
    finally:
        for h in hooks:
            h.remove()
    sel = real_positions(program, inputs)
    torch.testing.assert_close(ours[sel], ref[sel], atol=ATOL, rtol=0)

    assert merge_pipeline()(program).modified
    assert program.sites == {} and program.op_histogram() == base_hist
    with torch.no_grad():
        merged = program(*inputs)
    torch.testing.assert_close(merged[sel], ours[sel], atol=ATOL, rtol=0)


def test_negative_cases():
    program, _ = captured("gpt2", "causal-lm")
    with pytest.raises(TargetNotFoundError, match="c_attn"):
        insertion_pipeline(AdaLoraConfig(target_modules=["nope"]))(program)
    insertion_pipeline(LoraConfig(r=2))(program)
    assert not MergeAdaLoraPass()(program).modified  # LoRA sites are not AdaLoRA's to fold


def test_mismatched_adapters_are_refused():
    cfg = AdaLoraConfig(init_r=4, target_r=2)
    program, _ = captured("gpt2", "causal-lm")
    insertion_pipeline(cfg)(program)
    good = program.adapter
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_A"

    wrong_rank = AdapterState(cfg, {**good.tensors, key: nn.Parameter(torch.zeros(3, 64))})
    with pytest.raises(AdapterMismatchError, match="rank 3"):
        insertion_pipeline(cfg, wrong_rank)(captured("gpt2", "causal-lm")[0])
    wrong_in = AdapterState(cfg, {**good.tensors, key: nn.Parameter(torch.zeros(4, 32))})
    with pytest.raises(AdapterMismatchError, match="shape"):
        insertion_pipeline(cfg, wrong_in)(captured("gpt2", "causal-lm")[0])
    extra = AdapterState(cfg, {**good.tensors, "base_model.model.transformer.h.0.mlp.c_fc.lora_A": good.tensors[key]})
    with pytest.raises(AdapterMismatchError, match="matches no targeted module"):
        insertion_pipeline(cfg, extra)(captured("gpt2", "causal-lm")[0])
    missing = AdapterState(cfg, {k: v for k, v in good.tensors.items() if not k.endswith("h.1.attn.c_attn.lora_E")})
    with pytest.raises(AdapterMismatchError, match="no tensor"):
        insertion_pipeline(cfg, missing)(captured("gpt2", "causal-lm")[0])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(r=0), "r must be"),
        (dict(init_r=0, target_r=0), "init_r must be"),
        (dict(target_r=0), "target_r must be"),
        (dict(init_r=4, target_r=8), "target_r=8 exceeds init_r=4"),
        (dict(total_step=10, tinit=5, tfinal=5), "no budgeting phase"),
        (dict(total_step=0), "total_step must be"),
        (dict(beta1=1.0), "beta1"),
        (dict(orth_reg_weight=-1.0), "orth_reg_weight"),
        (dict(deltaT=0), "deltaT"),
        (dict(init_r=2, target_r=1, rank_pattern={"x.lora_E": [True, False, True]}), "init_r=2"),
        (dict(target_r="4"), "must be int"),
    ],
)
def test_bad_configs_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        AdaLoraConfig(**kwargs)


def test_config_reads_and_writes_hf_peft_json():
    peft = pytest.importorskip("peft")
    hf = peft.AdaLoraConfig(init_r=6, target_r=3, tinit=1, tfinal=2, total_step=20, target_modules=["c_attn"])
    data = json.loads(json.dumps(hf.to_dict(), default=sorted))
    cfg = config_from_dict(data)
    assert isinstance(cfg, AdaLoraConfig)
    assert (cfg.init_r, cfg.target_r, cfg.tinit, cfg.tfinal, cfg.total_step, cfg.beta1) == (6, 3, 1, 2, 20, 0.85)
    back = peft.AdaLoraConfig(**{k: v for k, v in cfg.to_dict().items() if k != "peft_type"})
    assert back.to_dict() == hf.to_dict()
    default = AdaLoraConfig()
    assert (default.init_r, default.target_r, default.lora_alpha, default.orth_reg_weight) == (12, 8, 8, 0.5)
    assert default.rank_pattern is None and default.total_step is None


def _train_fixture(init_r=12, target_r=4, total=20, **kw):
    cfg = AdaLoraConfig(
        init_r=init_r, target_r=target_r, lora_alpha=16, target_modules=["c_attn", "c_fc"], task_type="CAUSAL_LM", **kw
    )
    program, _ = captured("gpt2", "causal-lm", mode="train")
    insertion_pipeline(cfg)(program)
    return cfg, program, AdaLoraTraining(cfg, program.adapter, total_steps=total)


def test_training_prunes_to_target_and_lowers_the_loss():
    torch.manual_seed(0)
    cfg, program, hooks = _train_fixture(tinit=3, tfinal=4, deltaT=2)
    assert cfg.total_step == 20  # filled from the run's step count
    inputs = batch_for(program, batch=4, seq=12, left_pad=False)
    batch = dict(zip(program.input_names, inputs, strict=True))
    batch["labels"] = batch["input_ids"]
    params = [t for t in program.adapter.tensors.values() if t.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for step in range(1, 21):
        loss = program.task.loss(program.forward_batch(batch), batch) + hooks.regularization()
        loss.backward()
        opt.step()
        hooks.after_step(step)
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.1, losses
    kept = {k: sum(v) for k, v in cfg.rank_pattern.items()}
    assert len(kept) == 4 and sum(kept.values()) == 4 * len(kept)
    for key, rank in kept.items():  # pruned triplets are zero in E
        e = program.adapter.tensors[f"base_model.model.{key}"]
        assert int(torch.count_nonzero(e)) <= rank

    final = resize_by_rank_pattern(program.adapter)
    for key, rank in kept.items():
        prefix = f"base_model.model.{key.removesuffix('.lora_E')}"
        assert final.tensors[f"{prefix}.lora_E"].shape == (rank, 1)
        assert final.tensors[f"{prefix}.lora_A"].shape[0] == rank and final.tensors[f"{prefix}.lora_B"].shape[1] == rank
    # the cut adapter computes what the masked full-size one does
    full_eval, _ = captured("gpt2", "causal-lm")
    insertion_pipeline(cfg, program.adapter)(full_eval)
    cut_eval, _ = captured("gpt2", "causal-lm")
    insertion_pipeline(cfg, final)(cut_eval)
    assert {s.rank for s in cut_eval.sites.values()} == set(kept.values())
    with torch.no_grad():
        torch.testing.assert_close(cut_eval(*inputs), full_eval(*inputs), atol=ATOL, rtol=0)


def test_allocator_state_survives_a_checkpoint(tmp_path):
    kw = dict(tinit=1, tfinal=3, deltaT=1)
    cfg, program, hooks = _train_fixture(init_r=6, target_r=2, total=12, **kw)
    state = program.adapter
    gen = torch.Generator().manual_seed(9)

    def grads(*states):
        for key in sorted(states[0].tensors):
            g = torch.randn(states[0].tensors[key].shape, generator=gen)
            for st in states:
                st.tensors[key].grad = g.clone()

    _perturb(state)
    for step in range(1, 6):
        grads(state)
        hooks.after_step(step)
    hooks.save_state(tmp_path)
    cfg2 = AdaLoraConfig(init_r=6, target_r=2, lora_alpha=16, target_modules=["c_attn", "c_fc"], **kw)
    state2 = AdapterState(cfg2, {k: nn.Parameter(v.detach().clone()) for k, v in state.tensors.items()})
    hooks2 = AdaLoraTraining(cfg2, state2, total_steps=12)
    hooks2.load_state(tmp_path)
    assert cfg2.rank_pattern == cfg.rank_pattern is not None
    for step in range(6, 13):
        grads(state, state2)
        hooks.after_step(step)
        hooks2.after_step(step)
        assert cfg2.rank_pattern == cfg.rank_pattern
        for key, t in state.tensors.items():
            assert torch.equal(t.detach(), state2.tensors[key].detach()), (step, key)
    assert sum(sum(m) for m in cfg.rank_pattern.values()) == 2 * 4
    with pytest.raises(ConfigError, match="adalora_allocator"):
        hooks2.load_state(tmp_path / "nothing")


def test_schedule_that_leaves_no_pruning_phase_is_refused():
    cfg = AdaLoraConfig(init_r=4, target_r=2, tinit=5, tfinal=5)
    with pytest.raises(ConfigError, match="no pruning phase"):
        AdaLoraTraining(cfg, AdapterState(cfg), total_steps=8)


@pytest.mark.slow
def test_peftc_train_adalora_end_to_end(tmp_path):
    """``peftc train --method adalora``: the saved adapter has HF PEFT's cut shapes and loads in HF PEFT."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from peftc.program import capture
    from peftc.training import TrainConfig, train

    (tmp_path / "c.json").write_text(
        json.dumps(
            {
                "peft_type": "ADALORA",
                "init_r": 12,
                "target_r": 4,
                "tinit": 2,
                "tfinal": 2,
                "deltaT": 1,
                "target_modules": ["c_attn", "c_fc"],
            }
        )  # fmt: skip
    )
    config_file, out = str(tmp_path / "c.json"), str(tmp_path / "run")
    res = train(
        TrainConfig(
            model="tiny-gpt2",
            method="adalora",
            config_file=config_file,
            out=out,
            max_steps=8,
            batch_size=8,
            progress=False,
            lr=5e-3,
        )  # fmt: skip
    )
    state = AdapterState.load(res.adapter_dir)
    assert state.config.total_step == 8
    kept = {k: sum(v) for k, v in state.config.rank_pattern.items()}
    assert len(kept) == 4 and sum(kept.values()) == 16
    for key, rank in kept.items():
        assert state.tensors[f"base_model.model.{key}"].shape == (rank, 1)
    src = state.config.base_model_name_or_path
    hf = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(src), str(res.adapter_dir)).eval()
    program = capture(AutoModelForCausalLM.from_pretrained(src), "causal-lm", mode="eval")
    insertion_pipeline(state.config, state)(program)
    inputs = batch_for(program)
    with torch.no_grad():
        ours = program(*inputs)
        theirs = hf(**dict(zip(program.input_names, inputs, strict=True))).logits
    sel = real_positions(program, inputs)
    torch.testing.assert_close(ours[sel], theirs[sel], atol=ATOL, rtol=0)


def test_lift_makes_a_e_and_scaled_b_graph_inputs_and_rank_zero_is_the_base():
    """Swappable AdaLoRA: A, E and B·s/(ranknum+1e-5) become inputs; the scale and ranknum ops go."""
    from peftc.passes.lift import LiftAdaptersToInputsPass, lifted_inputs

    from peftc.program import capture

    model = tiny_gpt2()
    program = capture(model, "causal-lm", mode="eval")
    insertion_pipeline(AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, total_step=10, task_type="CAUSAL_LM"))(program)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for tensor in program.adapter.tensors.values():  # away from init (E = 0 would be the base model)
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.2)
    x = [torch.randint(1, 100, (2, 7), generator=gen), torch.ones(2, 7, dtype=torch.long)]
    x.append(torch.arange(7).expand(2, 7).contiguous())
    lifted = lifted_inputs(program)
    with torch.no_grad():
        want = program(*x)
        want_base = capture(model, "causal-lm", mode="eval")(*x)
    assert (want - want_base).abs().max() > 1e-2
    assert LiftAdaptersToInputsPass()(program).modified
    roles = {n.meta.get("peftc_role") for n in program.graph.nodes}
    assert not roles & {"lora_scale", "lora_ranknum"}
    assert [t.input_name for _, t in lifted] == program.input_names[3:]
    with torch.no_grad():
        got = program(*x, *(t.value for _, t in lifted))
        got_base = program(*x, *(t.default for _, t in lifted))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_base, want_base, atol=1e-5, rtol=0)
