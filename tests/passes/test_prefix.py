"""Prefix tuning in peftc: config, prefix module (vs HF PEFT), the pass, training, ``peftc train``, ONNX export.

Numerical parity with HF PEFT on GPT-2, LLaMA (grouped-query) and BERT is in tests/parity/test_prefix_parity.py.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings

import pytest
import torch
from conftest import FAMILIES, batch_for, captured, real_positions, tiny_bert, tiny_gpt2
from peftc.passes import PrefixPass, insertion_pipeline, prefix_key_values
from peftc.passes.prefix import PrefixModule
from safetensors.torch import load_file

from peftc.adapters import AdapterState
from peftc.config import LoraConfig, PrefixTuningConfig, config_from_dict, load_config
from peftc.errors import AdapterMismatchError, ConfigError
from peftc.methods import get_method

N_VT = 5

# -- config ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_virtual_tokens": 0},
        {"num_virtual_tokens": -2},
        {"num_virtual_tokens": "5"},
        {"encoder_hidden_size": 0},
        {"prefix_projection": "yes"},
        {"init_weights": "ones"},
        {"token_dim": 30, "num_attention_heads": 4},
        {"num_transformer_submodules": 3},
    ],
)
def test_bad_configs_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        PrefixTuningConfig(**kwargs)


def test_hf_peft_config_json_loads_both_ways(tmp_path):
    peft = pytest.importorskip("peft")
    hf = peft.PrefixTuningConfig(
        num_virtual_tokens=7, task_type="CAUSAL_LM", prefix_projection=True, encoder_hidden_size=48
    )
    hf.save_pretrained(tmp_path / "hf")
    ours = load_config(tmp_path / "hf" / "adapter_config.json")
    assert isinstance(ours, PrefixTuningConfig) and ours.prefix_projection and ours.encoder_hidden_size == 48
    assert ours.num_virtual_tokens == 7 and ours.init_weights is None
    hf_keys = set(json.loads((tmp_path / "hf" / "adapter_config.json").read_text()))
    assert hf_keys <= set(ours.to_dict())  # every HF PEFT field written back (unknown ones kept in extra)
    assert config_from_dict(ours.to_dict()).to_dict() == ours.to_dict()

    (tmp_path / "ours").mkdir()
    PrefixTuningConfig(num_virtual_tokens=3, token_dim=64, num_layers=2, num_attention_heads=4).save(tmp_path / "ours")
    back = peft.PeftConfig.from_pretrained(tmp_path / "ours")
    assert type(back).__name__ == "PrefixTuningConfig"
    assert (back.num_virtual_tokens, back.token_dim, back.prefix_projection) == (3, 64, False)
    assert get_method("PREFIX_TUNING").config_class is PrefixTuningConfig


# -- the prefix module vs HF PEFT's PrefixEncoder ------------------------------------------------------


def _module(cfg: PrefixTuningConfig, model) -> torch.nn.Module:
    from peftc.passes.prompt import fill_model_fields

    fill_model_fields(cfg, model.config)
    return PrefixPass(cfg)._prompt_module(cfg, AdapterState(cfg), model)


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_module_matches_hf_prefix_encoder(projection):
    peft = pytest.importorskip("peft")
    from peft.tuners.prefix_tuning.model import PrefixEncoder

    cfg = PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=projection, encoder_hidden_size=16)
    ours = _module(cfg, tiny_gpt2())
    assert isinstance(ours, PrefixModule) == projection
    hf = PrefixEncoder(peft.PrefixTuningConfig(**{k: v for k, v in cfg.to_dict().items() if k != "peft_type"}))
    assert {k: v.shape for k, v in ours.named_parameters()} == {k: v.shape for k, v in hf.named_parameters()}
    hf.load_state_dict(dict(ours.named_parameters()))
    tokens = torch.arange(4).unsqueeze(0)
    expected = hf(tokens)
    assert expected.shape == (1, 4, 2 * 2 * 64)  # [1, n, layers·2·token_dim]
    torch.testing.assert_close(ours.encode(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("projection", [False, True])
def test_zero_init_gives_a_zero_prefix(projection):
    cfg = PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=projection, init_weights="zero")
    prefix = _module(cfg, tiny_gpt2()).encode()
    assert prefix.shape == (1, 3, 256) and not prefix.any()


# -- the pass --------------------------------------------------------------------------------------------


def test_pass_structure_gpt2():
    program, model = captured("gpt2", "causal-lm")
    names, base_hist, placeholders = list(program.input_names), program.op_histogram(), _placeholders(program)
    cfg = PrefixTuningConfig(num_virtual_tokens=N_VT, task_type="CAUSAL_LM")
    result = insertion_pipeline(cfg)(program)
    assert result.modified and program.history[0] == "PrefixPass"
    assert program.input_names == names == ["input_ids", "attention_mask", "position_ids"]
    assert _placeholders(program) == placeholders  # no KV-cache inputs: the prefix is part of the graph
    assert (cfg.token_dim, cfg.num_layers, cfg.num_attention_heads, cfg.num_transformer_submodules) == (64, 2, 4, 1)
    trainable = {n for n, p in program.graph_module.named_parameters() if p.requires_grad}
    assert trainable == {"prompt.embedding.weight"}
    assert program.parameter_counts()["trainable"] == N_VT * 2 * 2 * 64
    site = program.sites["prefix_encoder"]
    assert (site.method, site.in_features, site.out_features) == ("PREFIX_TUNING", N_VT, 256)
    hist = program.op_histogram()
    # the mask's n ones; per layer, keys and values: the DynamicCache filled with the prefix (HF PEFT's
    # DynamicCache(prefix) concatenates onto an empty cache), then the layer's own keys/values appended
    assert hist["cat.default"] - base_hist.get("cat.default", 0) == 1 + 2 * (2 + 2)
    assert program.max_positions() == 64 - N_VT  # the prefix takes the first n positions
    saved = program.adapter.state_dict()
    assert list(saved) == ["prompt_embeddings"] and saved["prompt_embeddings"].shape == (N_VT, 256)
    inputs = batch_for(program, batch=2, seq=64 - N_VT)  # the longest sequence the graph takes
    assert program(*inputs).shape == (2, 64 - N_VT, 128)


def _placeholders(program) -> list[str]:
    return [n.name for n in program.graph.nodes if n.op == "placeholder"]


def test_pass_structure_bert_projection_with_head():
    program, _ = captured("bert", "seq-cls")
    cfg = PrefixTuningConfig(
        num_virtual_tokens=N_VT, task_type="SEQ_CLS", prefix_projection=True, modules_to_save=["classifier", "score"]
    )
    insertion_pipeline(cfg)(program)
    assert program.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    trainable = {n for n, p in program.graph_module.named_parameters() if p.requires_grad}
    assert trainable == {
        "prompt.embedding.weight",
        *(f"prompt.transform.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")),
        "model.classifier.weight",
        "model.classifier.bias",
    }
    assert cfg.encoder_hidden_size == 64  # default: token_dim, as HF PEFT
    state = program.adapter
    assert {k for k in state.tensors if k.startswith("prompt_encoder.")} == {
        "prompt_encoder.embedding.weight",
        *(f"prompt_encoder.transform.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")),
    }
    # a checkpoint (inference_mode False) keeps the encoder; the final adapter holds only its output
    assert {"prompt_embeddings", "prompt_encoder.transform.2.weight"} <= set(state.state_dict())
    final = AdapterState(dataclasses.replace(cfg, inference_mode=True), state.tensors, to_saved=state.to_saved)
    assert set(final.state_dict()) == {
        "prompt_embeddings",
        "base_model.classifier.weight",
        "base_model.classifier.bias",
    }
    assert final.state_dict()["prompt_embeddings"].shape == (N_VT, 2 * 2 * 64)


def test_negative_cases():
    cfg = PrefixTuningConfig(num_virtual_tokens=N_VT, task_type="CAUSAL_LM")
    program, _ = captured("gpt2", "causal-lm")
    insertion_pipeline(LoraConfig(r=2, target_modules=["c_attn"]))(program)
    with pytest.raises(ConfigError, match="first pass"):  # it re-captures, so it must come first
        PrefixPass(cfg)(program)

    other, _ = captured("gpt2", "causal-lm")
    bad = AdapterState(cfg, {"prompt_embeddings": torch.nn.Parameter(torch.zeros(N_VT, 100))}, loaded=True)
    with pytest.raises(AdapterMismatchError, match=r"needs \[5, 256\]"):
        PrefixPass(cfg, bad)(other)
    with pytest.raises(AdapterMismatchError, match="prompt_embeddings"):
        PrefixPass(cfg, AdapterState(cfg, {}, loaded=True))(other)
    heads = PrefixTuningConfig(num_virtual_tokens=N_VT, token_dim=64, num_attention_heads=8)  # GPT-2 here has 4
    with pytest.raises(AdapterMismatchError, match="4 key/value heads of size 16"):
        PrefixPass(heads)(other)
    assert not other.history and other.adapter is None  # nothing happened

    with pytest.raises(ConfigError, match="PREFIX_TUNING adapter"):
        prefix_key_values(AdapterState(LoraConfig()), other.model_config)


def test_model_without_past_key_values_is_refused():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from peftc.program import capture

    torch.manual_seed(0)
    cfg = DistilBertConfig(n_layers=1, dim=32, hidden_dim=64, n_heads=2, vocab_size=128, max_position_embeddings=32)
    cfg._attn_implementation = "eager"  # its SDPA path does not capture (a long mask); irrelevant here
    model = DistilBertForSequenceClassification(cfg).eval()
    program = capture(model, "seq-cls", mode="eval")
    with pytest.raises(ConfigError, match="takes no past_key_values"):
        insertion_pipeline(PrefixTuningConfig(num_virtual_tokens=2, task_type="SEQ_CLS"))(program)


def test_prefix_key_values_shapes_and_errors():
    cfg = PrefixTuningConfig(num_virtual_tokens=N_VT, task_type="CAUSAL_LM")
    model = tiny_gpt2()
    state = AdapterState(cfg, {"prompt_embeddings": torch.nn.Parameter(torch.randn(N_VT, 256))}, loaded=True)
    kv = prefix_key_values(state, model.config)
    assert len(kv) == 2 and all(k.shape == v.shape == (1, 4, N_VT, 16) for k, v in kv)
    p = state.tensors["prompt_embeddings"].view(N_VT, 4, 4, 16)  # [n, 2·layers, heads, head_dim]
    assert torch.equal(kv[1][0][0], p[:, 2].transpose(0, 1)) and torch.equal(kv[1][1][0], p[:, 3].transpose(0, 1))
    assert prefix_key_values(state, model.config, dtype=torch.float16)[0][0].dtype == torch.float16
    short = AdapterState(cfg, {"prompt_embeddings": torch.nn.Parameter(torch.randn(N_VT, 128))}, loaded=True)
    with pytest.raises(AdapterMismatchError, match="another model"):
        prefix_key_values(short, model.config)


# -- training ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fam,task,projection", [("gpt2", "causal-lm", False), ("bert", "seq-cls", True)])
def test_training_lowers_the_loss_on_a_fixed_batch(fam, task, projection):
    program, _ = captured(fam, task)
    cfg = PrefixTuningConfig(
        num_virtual_tokens=N_VT,
        task_type="CAUSAL_LM" if task == "causal-lm" else "SEQ_CLS",
        prefix_projection=projection,
        modules_to_save=["classifier", "score"] if task == "seq-cls" else None,
    )
    insertion_pipeline(cfg)(program)
    inputs = batch_for(program, batch=4, seq=8)
    batch = dict(zip(program.input_names, inputs, strict=True))
    ids = batch["input_ids"]
    batch["labels"] = ids.masked_fill(~real_positions(program, inputs), -100) if task == "causal-lm" else ids[:, 0] % 3
    params = program.parameters(trainable=True)
    opt = torch.optim.Adam(params, lr=1e-1)
    losses = []
    for _ in range(20):
        loss = program.task.loss(program.forward_batch(batch), batch)
        opt.zero_grad()
        loss.backward()
        if not losses:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)  # gradients reach the prefix
        opt.step()
        losses.append(float(loss))
    print(f"{fam}/{task} prefix_projection={projection}: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < losses[0] - 0.1 and max(losses[1:]) < losses[0], losses


# -- peftc train and ONNX export ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    """Tiny GPT-2 (causal-lm) and BERT (seq-cls) model dirs with a local word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("prefix")
    words = ["[UNK]", "[PAD]"] + [f"w{i}" for i in range(100)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    out = {}
    for name, model in (("gpt2", tiny_gpt2()), ("bert", tiny_bert(num_labels=2))):
        model.save_pretrained(root / name, safe_serialization=True)
        tokenizer.save_pretrained(root / name)
        out[name] = root / name
    lines = [" ".join(f"w{(3 * i + j) % 20}" for j in range(6)) for i in range(8)]
    (root / "lm.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    rows = [{"text": t, "label": ["neg", "pos"][i % 2]} for i, t in enumerate(lines)]
    (root / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out["root"] = root
    return out


@pytest.mark.parametrize("task", ["causal-lm", "seq-cls"])
def test_peftc_train_cli_trains_and_saves_hf_format(base_dirs, task, capsys):
    peft = pytest.importorskip("peft")
    from peftc.cli import main

    root = base_dirs["root"]
    model_dir = base_dirs["gpt2" if task == "causal-lm" else "bert"]
    data = root / ("lm.jsonl" if task == "causal-lm" else "cls.jsonl")
    if task == "causal-lm":
        conf = root / f"{task}.json"
        conf.write_text(json.dumps({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4, "prefix_projection": True}))
    else:  # --config with the adapter_config.json HF PEFT writes
        peft.PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True).save_pretrained(root / "hf-config")
        conf = root / "hf-config" / "adapter_config.json"
    run = root / f"run-{task}"
    argv = ["train", "--model", str(model_dir), "--task", task, "--method", "prefix-tuning", "--config", str(conf),
            "--data", str(data), "--out", str(run), "--max-steps", "20", "--batch-size", "8", "--lr", "3e-2",
            "--warmup-ratio", "0", "--no-progress"]  # fmt: skip
    with warnings.catch_warnings(), pytest.raises(SystemExit) as exc:
        warnings.simplefilter("ignore")
        main(argv)
    assert exc.value.code in (0, None), capsys.readouterr().err
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["type"] == "train"]
    print(f"peftc train prefix-tuning {task}: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert len(losses) == 2 and losses[1] < losses[0], losses  # mean loss of steps 1-10, then 11-20
    adapter = run / "adapter"
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    assert saved["prompt_embeddings"].shape == (4, 2 * 2 * 64)
    assert not any(k.startswith("prompt_encoder.") for k in saved)  # the final adapter holds the encoder's output
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["inference_mode"] is True and config["prefix_projection"]
    # HF PEFT loads what peftc train saved
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    hf = peft.PeftModel.from_pretrained(auto.from_pretrained(model_dir), adapter)
    assert torch.equal(hf.prompt_encoder["default"].embedding.weight, saved["prompt_embeddings"])


@pytest.mark.parametrize(
    "fam,task",
    [
        ("gpt2", "causal-lm"),
        pytest.param("llama", "causal-lm", marks=pytest.mark.slow),
        pytest.param("bert", "seq-cls", marks=pytest.mark.slow),
    ],
)
def test_onnx_export_of_an_hf_peft_adapter_verifies(fam, task, tmp_path):
    """``peftc.export(<dir saved by HF PEFT>, model=...)``: no KV-cache inputs, checked against ONNX Runtime."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    from peftc.exporting import export

    model = FAMILIES[(fam, task)]()
    model.save_pretrained(tmp_path / "base", safe_serialization=True)
    hf_cfg = peft.PrefixTuningConfig(
        num_virtual_tokens=N_VT, task_type="CAUSAL_LM" if task == "causal-lm" else "SEQ_CLS", prefix_projection=True
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.get_peft_model(copy.deepcopy(model), hf_cfg)
    with torch.no_grad():
        for p in hf.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))  # away from the random init, and the head too
    hf.save_pretrained(tmp_path / "hf")
    out = export(tmp_path / "hf", model=tmp_path / "base", task=task, out=tmp_path / "onnx", with_past=False)
    report = json.loads((out / "report.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    print(f"{fam}/{task} prefix-tuning ONNX export: ONNX Runtime vs torch max diff {report['max_abs_diff']:.3g}")
    assert report["verified"] and report["max_abs_diff"] <= 1e-4
    expected = ["input_ids", "attention_mask"] + (["position_ids"] if task == "causal-lm" else ["token_type_ids"])
    assert [i["name"] for i in manifest["inputs"]] == expected
    # independent reference: ONNX Runtime on the artifact vs HF PEFT on the adapter it saved, left-padded batch
    program, _ = captured(fam, task)
    inputs = batch_for(program)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(["logits"], {n: t.numpy() for n, t in zip(expected, inputs, strict=True)})[0])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = hf.eval()(**dict(zip(expected, inputs, strict=True))).logits
    rows = real_positions(program, inputs)
    diff = float((got - want)[rows].abs().max())
    print(f"  ONNX Runtime vs HF PEFT: max diff {diff:.3g}")
    assert diff <= 1e-4
    with pytest.raises(ConfigError, match="merge"):
        export(tmp_path / "hf", model=tmp_path / "base", task=task, out=tmp_path / "merged", merge=True)


def test_roberta_seq_cls_prefix_feeds_its_head_every_position():
    """RoBERTa's backbone has no pooler (its head pools ``<s>``): the head gets the sequence output.

    HF PEFT 0.21 hands it ``outputs[1]`` (the cache) and fails, so the reference is the same math written
    eagerly: the backbone with the prefix as a ``DynamicCache`` and the extended mask, then the head.
    """
    from transformers import DynamicCache, RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    cfg = RobertaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        vocab_size=128,
        max_position_embeddings=66,
        pad_token_id=1,
        type_vocab_size=1,
        num_labels=3,
    )
    from peftc.program import capture

    model = RobertaForSequenceClassification(cfg).eval()
    program = capture(model, "seq-cls", mode="eval")
    insertion_pipeline(PrefixTuningConfig(num_virtual_tokens=N_VT, task_type="SEQ_CLS"))(program)
    with torch.no_grad():
        program.adapter.tensors["prompt_embeddings"].normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(3, 128, (3, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    ids[0, -2:], mask[0, -2:] = 1, 0  # right-padded row
    kv = prefix_key_values(program, model.config)
    with torch.no_grad():
        ours = program.forward_batch(
            {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
        )
        cache = DynamicCache([(k.expand(3, -1, -1, -1), v.expand(3, -1, -1, -1)) for k, v in kv])
        full_mask = torch.cat([torch.ones(3, N_VT, dtype=mask.dtype), mask], dim=1)
        hidden = model.roberta(ids, attention_mask=full_mask, past_key_values=cache).last_hidden_state
        expected = model.classifier(hidden)
        base = model(ids, attention_mask=mask).logits
    assert (ours - base).abs().max() > 1e-2
    assert (ours - expected).abs().max() <= 1e-5
