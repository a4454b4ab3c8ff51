"""AdaptionPromptPass (LLaMA-Adapter): which layers and nodes, gate 0 == base, gradients, training, errors.

Programs come from the cached tiny captures in conftest (deep-copied per test). Numerical parity
with HF PEFT is in tests/parity/test_adaption_prompt_parity.py; here the references are the base
program itself (gate 0) and the loss on a fixed batch.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import batch_for, captured, real_positions
from peftc.passes import AdaptionPromptPass, insertion_pipeline, merge_pipeline
from peftc.passes.adaption_prompt import attention_modules, is_adaption_prompt_node
from peftc.passes.base import graph_fingerprint
from safetensors.torch import load_file

from peftc.adapters import AdapterState
from peftc.config import AdaptionPromptConfig, LoraConfig, config_from_dict
from peftc.errors import AdapterMismatchError, ConfigError, TargetNotFoundError
from peftc.methods import get_method

aten = torch.ops.aten
PROMPT, GATE = "adaption_prompt", "adaption_gate"


def _cfg(**kwargs) -> AdaptionPromptConfig:
    kwargs.setdefault("adapter_len", 4)
    return AdaptionPromptConfig(task_type="CAUSAL_LM", **kwargs)


def _key(module: str, name: str) -> str:
    return f"base_model.model.{module}.{name}"


def _roles(program) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in program.graph.nodes:
        role = node.meta.get("peftc_role")
        if role:
            counts[role] = counts.get(role, 0) + 1
    return counts


def _perturb(state: AdapterState, seed: int = 0) -> None:
    """Gate away from 0, prompt away from its init: the adapter is not the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in state.tensors.items():
            t.add_((0.5 if key.endswith(GATE) else 0.3) * torch.randn(t.shape, generator=gen) + 0.2)


# -- structure ----------------------------------------------------------------------------------


def test_llama_gqa_structure_top_layer_only():
    prog, _ = captured("llama", "causal-lm")
    cfg = _cfg(adapter_layers=1)
    result = AdaptionPromptPass(cfg)(prog)
    assert result.modified and result.program is prog
    site = "model.layers.1.self_attn"
    assert list(prog.sites) == [site] and prog.sites[site].method == "ADAPTION_PROMPT"
    assert {k: tuple(v.shape) for k, v in prog.adapter.tensors.items()} == {
        _key(site, PROMPT): (1, 4, 64),
        _key(site, GATE): (1,),
    }
    assert torch.equal(prog.adapter.tensors[_key(site, GATE)], torch.zeros(1))  # zero-init gate
    assert cfg.target_modules == "self_attn" and cfg.adapter_layers == 1  # filled in, as HF's prepare_config
    roles = _roles(prog)
    # one adapted layer: k, v, o projections of P, one softmax, two matmuls, GQA repeat (2 kv heads -> 4) on k and v
    assert roles["adaption_k"] == roles["adaption_v"] == roles["adaption_o"] == 1
    assert roles["adaption_softmax"] == roles["adaption_scores"] == roles["adaption_mixed"] == 1
    assert roles["adaption_k_gqa"] == roles["adaption_v_gqa"] == 3
    assert roles["param"] == 2 and "adaption_cast" not in roles  # fp32: no casts
    tagged = [n for n in prog.graph.nodes if n.meta.get("peftc_site")]
    assert tagged and all(n.meta["peftc_site"] == site for n in tagged)
    assert all("val" in n.meta for n in tagged if n.op == "call_function")
    # the query is the layer's own post-RoPE query (the SDPA's first argument), and K/V/O use its weights
    sdpa = next(n for n in prog.graph.nodes if n.target == aten.scaled_dot_product_attention.default
                and "layers.1." in str(n.meta["nn_module_stack"]))  # fmt: skip
    scores = next(n for n in tagged if n.meta["peftc_role"] == "adaption_scores")
    assert scores.args[0] is sdpa.args[0]
    weights = {str(n.args[1].target) for n in tagged if n.target == aten.linear.default}
    assert weights == {f"model.model.layers.1.self_attn.{p}.weight" for p in ("k_proj", "v_proj", "o_proj")}
    # the sum replaces the attention output everywhere (the residual add uses it)
    out = next(n for n in tagged if n.meta["peftc_role"] == "adaption_out")
    base_out = out.args[0]
    assert base_out.target == aten.linear.default and "o_proj" in str(base_out.args[1].target)
    assert list(base_out.users) == [out] and len(out.users) == 1
    counts = prog.parameter_counts()
    assert counts["trainable"] == 4 * 64 + 1


def test_gpt2_structure_every_layer_by_default():
    prog, _ = captured("gpt2", "causal-lm")
    cfg = _cfg()
    AdaptionPromptPass(cfg)(prog)
    assert cfg.adapter_layers == 2 and cfg.target_modules == "attn"
    assert list(prog.sites) == ["transformer.h.0.attn", "transformer.h.1.attn"]
    roles = _roles(prog)
    # c_attn(P) is one addmm with c_attn's own bias and weight; no output projection, no GQA
    assert roles["adaption_kv"] == 2 and "adaption_o" not in roles and "adaption_k_gqa" not in roles
    for node in (n for n in prog.graph.nodes if n.meta.get("peftc_role") == "adaption_kv"):
        layer = node.meta["peftc_site"]
        assert [str(a.target) for a in (node.args[0], node.args[2])] == [
            f"model.{layer}.c_attn.bias",
            f"model.{layer}.c_attn.weight",
        ]
    assert roles["param"] == 4 and prog.parameter_counts()["trainable"] == 2 * (4 * 64 + 1)


def test_gpt2_train_program_adds_after_resid_dropout():
    """HF wraps the whole attention module, so the adapter output is added after its resid_dropout."""
    prog, _ = captured("gpt2", "causal-lm", mode="train")
    AdaptionPromptPass(_cfg(adapter_layers=1))(prog)
    out = next(n for n in prog.graph.nodes if n.meta.get("peftc_role") == "adaption_out")
    assert out.args[0].target == aten.dropout.default
    assert not any(n.target == aten.dropout.default for n in prog.graph.nodes if n.meta.get("peftc_site"))


def test_plan_reasons_and_no_change():
    prog, _ = captured("llama", "causal-lm")
    before = graph_fingerprint(prog.graph)
    decisions = AdaptionPromptPass(_cfg(adapter_layers=1)).plan(prog)
    assert graph_fingerprint(prog.graph) == before and not prog.sites
    assert [(d.name, d.action) for d in decisions] == [
        ("model.layers.0.self_attn", "skip"),
        ("model.layers.1.self_attn", "rewrite"),
    ]
    assert "adapter_layers=1" in decisions[0].reason
    assert decisions[1].details == {"adapter_len": 4, "hidden": 64, "heads": 4, "kv_heads": 2, "head_dim": 16}
    assert attention_modules(prog) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]


# -- numerics -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fam,task", [("llama", "causal-lm"), ("gpt2", "causal-lm"), ("llama", "seq-cls")])
def test_gate_zero_is_the_base_model_exactly(fam, task):
    base, _ = captured(fam, task)
    prog, _ = captured(fam, task)
    insertion_pipeline(_cfg(adapter_len=3))(prog)
    inputs = batch_for(prog)
    sel = real_positions(prog, inputs)
    with torch.no_grad():
        expected = base(*inputs)
        assert torch.equal(prog(*inputs)[sel], expected[sel])  # fresh: P ~ N(0, 1), gate 0
        for key, t in prog.adapter.tensors.items():  # a trained prompt with a closed gate changes nothing either
            if key.endswith(PROMPT):
                t.mul_(3.0)
        assert torch.equal(prog(*inputs)[sel], expected[sel])
        _perturb(prog.adapter)
        assert (prog(*inputs) - expected)[sel].abs().max() > 1e-3


def test_only_adapted_layers_change_hidden_states():
    """With adapter_layers=1 on LLaMA, layer 0's output is untouched and layer 1's changes."""
    base, _ = captured("llama", "causal-lm")
    prog, _ = captured("llama", "causal-lm")
    insertion_pipeline(_cfg(adapter_layers=1))(prog)
    _perturb(prog.adapter)

    def layer_outputs(program) -> list[torch.Tensor]:
        """Each decoder layer's output: the last node computed inside ``model.layers.<i>``."""
        last = {}
        for node in program.graph.nodes:
            for path, _ in node.meta.get("nn_module_stack", {}).values():
                if path in ("model.model.layers.0", "model.model.layers.1"):
                    last[path] = node
        interp = torch.fx.Interpreter(program.graph_module, garbage_collect_values=False)
        with torch.no_grad():
            interp.run(*inputs)
        return [interp.env[last[f"model.model.layers.{i}"]] for i in (0, 1)]

    inputs = batch_for(prog)
    got = {"base": layer_outputs(base), "adapted": layer_outputs(prog)}
    assert torch.equal(got["base"][0], got["adapted"][0])
    assert (got["base"][1] - got["adapted"][1]).abs().max() > 1e-3


def test_gradients_reach_only_the_prompt_and_gate():
    prog, model = captured("llama", "causal-lm", mode="train")
    insertion_pipeline(_cfg())(prog)
    inputs = batch_for(prog)
    batch = dict(zip(prog.input_names, inputs, strict=True))
    batch["labels"] = inputs[0].masked_fill(inputs[1] == 0, -100)
    prog.task.loss(prog.forward_batch(batch), batch).backward()
    grads = {k: t.grad for k, t in prog.adapter.tensors.items()}
    # zero-init: the gate gets a gradient, the prompts (behind a closed gate) get exactly zero
    assert all(g is not None for g in grads.values())
    assert all(float(g.abs().max()) > 0 for k, g in grads.items() if k.endswith(GATE))
    assert all(float(g.abs().max()) == 0 for k, g in grads.items() if k.endswith(PROMPT))
    assert all(p.grad is None for p in model.parameters())


def test_training_lowers_the_loss_on_a_fixed_batch():
    prog, _ = captured("llama", "causal-lm", mode="train")
    torch.manual_seed(0)
    insertion_pipeline(_cfg(adapter_len=4))(prog)
    inputs = batch_for(prog)
    batch = dict(zip(prog.input_names, inputs, strict=True))
    batch["labels"] = inputs[0].masked_fill(inputs[1] == 0, -100)
    params = prog.parameters(trainable=True)
    assert {id(p) for p in params} == {id(t) for t in prog.adapter.tensors.values()}
    opt = torch.optim.AdamW(params, lr=5e-2)
    losses = []
    for _ in range(25):
        loss = prog.task.loss(prog.forward_batch(batch), batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    gates = [float(t) for k, t in prog.adapter.tensors.items() if k.endswith(GATE)]
    print(f"adaption prompt fixed-batch loss {losses[0]:.4f} -> {losses[-1]:.4f}, gates {gates}")
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(g != 0 for g in gates)


def test_merge_leaves_the_adapter_in_place():
    prog, _ = captured("gpt2", "causal-lm")
    insertion_pipeline(_cfg())(prog)
    before = [(n.name, str(n.target)) for n in prog.graph.nodes if is_adaption_prompt_node(n)]
    assert len(before) > 20
    merge_pipeline()(prog)  # (its EvalModePass may drop inert dropout nodes; nothing of the adapter changes)
    assert [(n.name, str(n.target)) for n in prog.graph.nodes if is_adaption_prompt_node(n)] == before
    assert {s.method for s in prog.sites.values()} == {"ADAPTION_PROMPT"}  # what export's --merge refuses


# -- errors -------------------------------------------------------------------------------------


def test_unsupported_model_type_lists_supported():
    prog, _ = captured("bert", "seq-cls")
    with pytest.raises(ConfigError, match=r"'bert'.*gpt2, llama, mistral"):
        AdaptionPromptPass(_cfg())(prog)


@pytest.mark.parametrize(
    "target,match",
    [
        ("q_attn", r"target_modules='q_attn' matched no module.*attention modules here: attn"),
        ("mlp", r"transformer\.h\.1\.mlp.*0 scaled_dot_product_attention calls.*attention modules here: attn"),
        ("c_proj", r"0 scaled_dot_product_attention calls.*attention modules here: attn"),
    ],
)
def test_nothing_to_target_lists_attention_modules(target, match):
    prog, _ = captured("gpt2", "causal-lm")
    before = graph_fingerprint(prog.graph)
    with pytest.raises(TargetNotFoundError, match=match):
        AdaptionPromptPass(_cfg(target_modules=target, adapter_layers=1))(prog)
    assert graph_fingerprint(prog.graph) == before and not prog.sites


@pytest.mark.parametrize("layers", [3, 50])
def test_adapter_layers_above_the_layer_count(layers):
    prog, _ = captured("llama", "causal-lm")
    with pytest.raises(ConfigError, match=rf"adapter_layers={layers} exceeds the 2 'self_attn' modules.*<= 2"):
        AdaptionPromptPass(_cfg(adapter_layers=layers))(prog)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"adapter_len": 0}, "adapter_len=0"),
        ({"adapter_len": -3}, "adapter_len=-3"),
        ({"adapter_layers": 0}, "adapter_layers=0"),
        ({"adapter_layers": -1}, "adapter_layers=-1"),
        ({"adapter_len": "8"}, "adapter_len"),
        ({"adapter_len": None}, "adapter_len"),
        ({"adapter_layers": 1.5}, "adapter_layers"),
        ({"target_modules": ""}, "target_modules"),
        ({"target_modules": ["self_attn", "mlp"]}, "target_modules"),
    ],
)
def test_bad_configs(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        AdaptionPromptConfig(**kwargs)


def test_config_json_round_trip_and_registry():
    hf_json = {  # what HF PEFT 0.21.2 writes (save_pretrained of get_peft_model(llama, AdaptionPromptConfig(...)))
        "adapter_layers": 1,
        "adapter_len": 4,
        "auto_mapping": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "peft_type": "ADAPTION_PROMPT",
        "peft_version": "0.21.2",
        "revision": None,
        "target_modules": "self_attn",
        "task_type": "CAUSAL_LM",
    }
    cfg = config_from_dict(hf_json)
    assert isinstance(cfg, AdaptionPromptConfig) and (cfg.adapter_len, cfg.adapter_layers) == (4, 1)
    assert cfg.to_dict() == hf_json
    assert get_method("ADAPTION_PROMPT").config_class is AdaptionPromptConfig
    assert AdaptionPromptConfig(target_modules=["self_attn"]).target_modules == "self_attn"  # --target-modules


def test_bind_mismatches():
    prog, _ = captured("llama", "causal-lm")
    insertion_pipeline(_cfg(adapter_layers=2))(prog)
    state = prog.adapter
    # shape: saved with adapter_len=4, config says 6
    other, _ = captured("llama", "causal-lm")
    with pytest.raises(AdapterMismatchError, match=r"adaption_prompt has shape \[1, 4, 64\].*\[1, 6, 64\]"):
        insertion_pipeline(_cfg(adapter_len=6, adapter_layers=2), state)(other)
    # extra: tensors for layer 0 but the config adapts only the top layer
    other, _ = captured("llama", "causal-lm")
    with pytest.raises(AdapterMismatchError, match="layers.0.self_attn.adaption_"):
        insertion_pipeline(_cfg(adapter_layers=1), state)(other)
    # missing: a gate left out
    partial = AdapterState(state.config, {k: v for k, v in state.tensors.items() if not k.endswith(GATE)})
    other, _ = captured("llama", "causal-lm")
    with pytest.raises(AdapterMismatchError, match="adaption_gate"):
        insertion_pipeline(_cfg(adapter_layers=2), partial)(other)


def test_refuses_stacking_and_mixing():
    prog, _ = captured("llama", "causal-lm")
    insertion_pipeline(_cfg(adapter_layers=1))(prog)
    with pytest.raises(ConfigError, match="already has an adaption prompt"):
        insertion_pipeline(_cfg(adapter_layers=1))(prog)
    lora, _ = captured("llama", "causal-lm")
    insertion_pipeline(LoraConfig(r=2))(lora)
    with pytest.raises(ConfigError, match="cannot be combined with LORA"):
        insertion_pipeline(_cfg())(lora)


# -- peftc train, end to end --------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """The tiny LLaMA (GQA) saved with a 128-token word-level tokenizer, and toy data."""
    from conftest import tiny_llama
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("adaption")
    tiny_llama().save_pretrained(root / "base", safe_serialization=True)
    words = ["[UNK]", "[PAD]"] + [f"w{i}" for i in range(100)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(root / "base")
    lines = [" ".join(f"w{(3 * i + j) % 20}" for j in range(6)) for i in range(8)]
    (root / "data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return root


def test_peftc_train_cli_with_an_hf_config(llama_dir):
    """``peftc train --method adaption-prompt --config FILE.json`` (an HF PEFT config) trains and saves HF format."""
    from click.testing import CliRunner

    from peftc.cli import cli

    conf = llama_dir / "adaption.json"
    conf.write_text(json.dumps({"peft_type": "ADAPTION_PROMPT", "adapter_len": 3, "adapter_layers": 1,
                                "target_modules": "self_attn", "task_type": "CAUSAL_LM"}))  # fmt: skip
    out = llama_dir / "run"
    args = ["train", "--model", str(llama_dir / "base"), "--task", "causal-lm", "--method", "adaption-prompt",
            "--config", str(conf), "--data", str(llama_dir / "data.jsonl"), "--out", str(out), "--max-steps", "12",
            "--batch-size", "8", "--lr", "0.05", "--warmup-ratio", "0", "--no-progress"]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    losses = [
        r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"
    ]
    print(f"peftc train adaption-prompt (LLaMA GQA): loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < losses[0], losses
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    site = "base_model.model.model.layers.1.self_attn"
    assert {k: tuple(v.shape) for k, v in saved.items()} == {f"{site}.adaption_prompt": (1, 3, 64),
                                                            f"{site}.adaption_gate": (1,)}  # fmt: skip
    assert float(saved[f"{site}.adaption_gate"].abs()) > 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADAPTION_PROMPT" and config["adapter_layers"] == 1 and config["adapter_len"] == 3
    assert json.loads((out / "run.json").read_text())["method"] == "adaption-prompt"
    bad = [*args, "--r", "4", "--force"]
    result = CliRunner().invoke(cli, bad)
    assert isinstance(result.exception, ConfigError) and "--r does not apply" in str(result.exception)
