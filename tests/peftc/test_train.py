"""peftc.train: the loop, the run directory, checkpoints/resume, and HF PEFT loading of the result.

Fast cases train tiny models saved into tmp dirs (with MiniLM's tokenizer); the slow case trains
the real MiniLM for a few steps and checks the adapter against HF PEFT.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_cases import SENTENCES, adapter_tensors, train_losses, write_jsonl

from peftc.errors import ConfigError, DataError, OutputExistsError, TargetNotFoundError
from peftc.training import TrainConfig, train


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return write_jsonl(root / "train.jsonl", [{"text": t, "label": y} for t, y in SENTENCES])


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    return write_jsonl(root / "train.jsonl", [{"text": t} for t, _ in SENTENCES])


#: Fields of metrics.jsonl that are measurements of the machine (throughput, memory), not of the training.
MEASURED = ("tokens_per_s", "peak_memory_mb")


def _records(run_dir):
    """metrics.jsonl without the measured fields: what a resumed run must reproduce exactly."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in MEASURED} for r in records]


def test_training_lowers_the_loss_on_a_fixed_batch(tmp_path, bert0_dir, cls_data):
    # batch_size = data size: every step sees the same 14 examples
    res = train(TrainConfig(model=bert0_dir, data=cls_data, eval_data=cls_data, out=str(tmp_path / "run"),
                            max_steps=12, batch_size=14, lr=1e-1, warmup_ratio=0.0, lora_dropout=0.0, log_every=1,
                            progress=False))  # fmt: skip
    losses = [r["loss"] for r in _records(res.run_dir) if r["type"] == "train"]
    assert len(losses) == 12
    assert losses[-1] < losses[0] - 0.05, losses
    assert res.eval_metrics["loss"] < losses[0]
    assert res.step == 12 and res.trainable_parameters > 0


def test_run_directory_string_labels_and_peft_parity(tmp_path, bert_dir, cls_data):
    peft = pytest.importorskip("peft")
    from peftc.passes import insertion_pipeline
    from transformers import AutoModelForSequenceClassification

    from peftc.adapters import AdapterState
    from peftc.dataset import collate, encode, read_jsonl
    from peftc.models import load_model
    from peftc.program import capture
    from peftc.runs import resolve_source

    out = tmp_path / "run"
    res = train(TrainConfig(model=bert_dir, data=cls_data, eval_data=cls_data, out=str(out), epochs=2, batch_size=4,
                            lr=5e-2, log_every=2, progress=False))  # fmt: skip
    # run.json: what export needs
    run = json.loads((out / "run.json").read_text())
    assert run["task"] == "seq-cls" and run["method"] == "lora"
    assert run["id2label"] == {"0": "neg", "1": "pos"} and res.id2label == {0: "neg", 1: "pos"}
    assert run["input_names"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert run["model"] == {"spec": bert_dir, "source": str(Path(bert_dir).resolve()), "preset": None}
    assert run["train_config"]["batch_size"] == 4 and run["metrics"]["eval"]["accuracy"] == res.eval_metrics["accuracy"]
    src = resolve_source(out)
    assert src.task == "seq-cls" and src.id2label == {0: "neg", 1: "pos"} and src.adapter_dir == out / "adapter"
    # metrics.jsonl: train records every log_every steps, one eval per epoch (4 steps/epoch)
    records = _records(out)
    train_recs = [r for r in records if r["type"] == "train"]
    eval_recs = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in train_recs] == [2, 4, 6, 8]
    assert all({"loss", "lr", "grad_norm", "epoch"} <= set(r) for r in train_recs)
    assert [(r["step"], r["epoch"]) for r in eval_recs] == [(4, 1.0), (8, 2.0)]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["loss"] > 0 for r in eval_recs)
    # one warmup step (ceil(0.06 * 8)), then linear decay: the lr used at steps 2, 4, 6, 8
    assert [r["lr"] for r in train_recs] == pytest.approx([5e-2 * f for f in (7 / 7, 5 / 7, 3 / 7, 1 / 7)])
    # the adapter: LoRA on query/value (not at identity after training) + the trained head
    tensors = adapter_tensors(out)
    assert tensors["base_model.model.classifier.weight"].shape == (2, 32)
    lora_b = [v for k, v in tensors.items() if "lora_B" in k]
    assert len(lora_b) == 4 and all(v.abs().max() > 0 for v in lora_b)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier", "score"]
    assert config["base_model_name_or_path"] == run["model"]["source"] and config["inference_mode"] is True

    # HF PEFT loads it and computes what peftc's eval program computes
    base = AutoModelForSequenceClassification.from_pretrained(bert_dir, num_labels=2).eval()
    ref = peft.PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    loaded = load_model(bert_dir, "seq-cls", id2label=src.id2label)
    prog = capture(loaded.model, "seq-cls", mode="eval")
    state = AdapterState.load(out / "adapter")
    insertion_pipeline(state.config, state)(prog)
    enc = encode(read_jsonl(cls_data, "seq-cls"), loaded.tokenizer, "seq-cls")
    batch = collate(enc, list(range(len(enc))), prog.input_names)
    with torch.no_grad():
        want = ref(**{k: batch[k] for k in prog.input_names}).logits
        got = prog.forward_batch(batch)
    assert (got - want).abs().max().item() < 1e-4
    assert (got.argmax(-1) == batch["labels"]).float().mean().item() == pytest.approx(res.eval_metrics["accuracy"])


@pytest.mark.parametrize("model", ["bert", "gpt2"])
def test_grad_accumulation_equals_the_big_batch(tmp_path, request, model, lm_data, cls_data):
    model_dir = request.getfixturevalue("bert0_dir" if model == "bert" else "gpt2_dir")
    data = cls_data if model == "bert" else lm_data
    lr = 1e-2
    common = dict(model=model_dir, data=data, max_steps=2, lr=lr, warmup_ratio=0.0, lora_dropout=0.0,
                  log_every=1, progress=False)  # fmt: skip
    big = train(TrainConfig(**common, batch_size=6, out=str(tmp_path / "big")))
    acc = train(TrainConfig(**common, batch_size=2, grad_accum=3, out=str(tmp_path / "acc")))
    # each step's loss is the mean over the same six examples: a wrongly weighted micro-batch shows here first
    losses = [train_losses(run.run_dir) for run in (big, acc)]
    assert len(losses[0]) == 2 and losses[1] == pytest.approx(losses[0], rel=1e-6)
    a, b = adapter_tensors(big.run_dir), adapter_tensors(acc.run_dir)
    assert a.keys() == b.keys()
    assert max(a[k].abs().max().item() for k in a if "lora_B" in k) > 1e-3  # B left zero: the steps did something
    # AdamW divides by sqrt(v): a near-zero gradient coordinate turns summation-order noise (1e-7 relative)
    # into update noise up to ~0.2 % of lr (2.1e-5 seen on CI's CPU); a real accumulation bug moves it by O(lr)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=lr * 1e-2), (k, (a[k] - b[k]).abs().max())
    if model == "gpt2":  # causal-lm: the run records a perplexity
        assert not big.eval_metrics  # no eval data given for a non-preset model


class _Crash(Exception):
    pass


def test_resume_reaches_the_uninterruptedadapter_tensors(tmp_path, bert_dir, cls_data, monkeypatch):
    import peftc.training.loop as train_mod

    # 14 examples, batch 4 -> 4 steps per epoch: checkpoints at step 3 (mid-epoch) and 6; dropout on
    common = dict(model=bert_dir, data=cls_data, eval_data=cls_data, max_steps=6, save_every=3, batch_size=4,
                  lr=3e-2, lora_dropout=0.2, log_every=1, progress=False)  # fmt: skip
    full = train(TrainConfig(**common, out=str(tmp_path / "full")))
    assert sorted(p.name for p in (full.run_dir / "checkpoints").iterdir()) == ["step-3", "step-6"]
    ckpt = full.run_dir / "checkpoints" / "step-3"
    assert {p.name for p in ckpt.iterdir()} == {
        "adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "rng.safetensors",
        "trainer_state.json",
    }  # fmt: skip
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["batch"]) == (3, 0, 3)
    assert any(k.endswith("::exp_avg_sq") for k in load_file(str(ckpt / "optimizer.safetensors")))

    # the same run, crashing right after its step-3 checkpoint...
    original = train_mod.save_checkpoint

    def save_then_crash(*args, **kwargs):
        path = original(*args, **kwargs)
        raise _Crash(path)

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_crash)
    out = tmp_path / "crashed"
    with pytest.raises(_Crash):
        train(TrainConfig(**common, out=str(out)))
    monkeypatch.setattr(train_mod, "save_checkpoint", original)
    assert not (out / "adapter").exists() and not (out / "run.json").exists()
    assert (out / "checkpoints" / "step-3").is_dir()
    with (out / "metrics.jsonl").open("a") as f:  # a crash can leave records past the checkpoint
        f.write(json.dumps({"type": "train", "step": 4, "loss": 9.0}) + "\n")
    # ...without --resume the directory is refused; with it, it reaches the same adapter
    with pytest.raises(OutputExistsError):
        train(TrainConfig(**common, out=str(out)))
    torch.manual_seed(1234)  # a new process: the global RNG (dropout) must come from the checkpoint
    resumed = train(TrainConfig(**common, out=str(out), resume=True))
    assert resumed.resumed_from == 3 and resumed.step == 6
    a, b = adapter_tensors(full.run_dir), adapter_tensors(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), (k, (a[k] - b[k]).abs().max())
    assert _records(out) == _records(full.run_dir)  # same losses, lrs, evals; the stale record is gone
    assert resumed.eval_metrics == pytest.approx(full.eval_metrics)
    # resuming with other trajectory options is refused
    with pytest.raises(ConfigError, match="--resume: lr="):
        train(TrainConfig(**{**common, "lr": 1e-3}, out=str(out), resume=True))


def test_non_empty_out_is_refused_before_any_work(tmp_path, bert_dir, cls_data):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not empty; pass --force"):
        train(TrainConfig(model=bert_dir, data=cls_data, out=str(out), progress=False))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    res = train(TrainConfig(model=bert_dir, data=cls_data, out=str(out), max_steps=1, force=True, progress=False))
    assert not (out / "keep.txt").exists() and (res.adapter_dir / "adapter_model.safetensors").is_file()


def test_errors_before_the_first_step_leave_nothing(tmp_path, bert_dir, cls_data):
    out = tmp_path / "never"
    bad = write_jsonl(tmp_path / "bad_eval.jsonl", [{"text": "ok", "label": "pos"}, {"text": "x", "label": "maybe"}])
    with pytest.raises(DataError, match=r"bad_eval.jsonl:2: label 'maybe' does not occur"):
        train(TrainConfig(model=bert_dir, data=cls_data, eval_data=bad, out=str(out), progress=False))
    with pytest.raises(TargetNotFoundError):
        train(TrainConfig(model=bert_dir, data=cls_data, target_modules=["nope"], out=str(out), progress=False))
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        train(TrainConfig(model=bert_dir, data=cls_data, batch_size=0, out=str(out), progress=False))
    with pytest.raises(DataError, match="no training data: pass --data"):
        train(TrainConfig(model=bert_dir, out=str(out), progress=False))
    with pytest.raises(ConfigError, match="--resume: .* holds no checkpoint"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "x").write_text("")
        train(TrainConfig(model=bert_dir, data=cls_data, out=str(tmp_path / "other"), resume=True, progress=False))
    assert not out.exists()


def test_config_file_and_flags(tmp_path, bert_dir, cls_data):
    cfg = tmp_path / "lora.json"
    cfg.write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["query", "key"]}))
    res = train(TrainConfig(model=bert_dir, data=cls_data, config_file=str(cfg), r=2, out=str(tmp_path / "run"),
                            max_steps=1, progress=False))  # fmt: skip
    saved = json.loads((res.adapter_dir / "adapter_config.json").read_text())
    assert saved["r"] == 2 and saved["lora_alpha"] == 8 and sorted(saved["target_modules"]) == ["key", "query"]
    assert (
        adapter_tensors(res.run_dir)["base_model.model.bert.encoder.layer.0.attention.self.key.lora_A.weight"].shape[0]
        == 2
    )
    with pytest.raises(ConfigError, match="unknown method 'bogus'"):
        train(TrainConfig(model=bert_dir, data=cls_data, method="bogus", out=str(tmp_path / "x"), progress=False))


@pytest.mark.slow
def test_tiny_gpt2_preset_saves_its_base(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from peftc.runs import resolve_source

    out = tmp_path / "run"
    res = train(TrainConfig(model="tiny-gpt2", out=str(out), max_steps=3, batch_size=8, progress=False))
    run = json.loads((out / "run.json").read_text())
    assert run["task"] == "causal-lm" and "id2label" not in run
    assert run["model"] == {"spec": "tiny-gpt2", "source": str((out / "base_model").resolve()), "preset": "tiny-gpt2"}
    assert res.eval_metrics["perplexity"] > 1
    src = resolve_source(out)
    assert src.base == run["model"]["source"] and src.task == "causal-lm"
    base = AutoModelForCausalLM.from_pretrained(src.base)
    model = peft.PeftModel.from_pretrained(base, str(res.adapter_dir))
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0


@pytest.mark.slow
def test_minilm_short_run_learns_and_matches_peft(tmp_path):
    peft = pytest.importorskip("peft")
    from peftc.passes import insertion_pipeline
    from transformers import AutoModelForSequenceClassification

    from peftc.adapters import AdapterState
    from peftc.dataset import collate, default_data, encode, read_jsonl
    from peftc.models import load_model, preset_path
    from peftc.program import capture

    try:
        path = preset_path("minilm")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"MiniLM unavailable: {e}")
    # 64 shipped training sentences, seen 5 times over 20 steps: the loss must fall well below ln 2 (the start)
    train_file, _ = default_data("minilm", "seq-cls")
    subset = tmp_path / "subset.jsonl"
    subset.write_text("".join(train_file.read_text().splitlines(keepends=True)[:64]))
    out = tmp_path / "run"
    res = train(TrainConfig(data=str(subset), eval_data=str(subset), out=str(out), max_steps=20, lr=1e-2, log_every=1,
                            progress=False))  # fmt: skip
    losses = [r["loss"] for r in _records(out) if r["type"] == "train"]
    assert sum(losses[:4]) / 4 > 0.6 and sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.2, losses
    assert res.eval_metrics["loss"] < 0.4 and res.eval_metrics["accuracy"] > 0.8, res.eval_metrics

    run = json.loads((out / "run.json").read_text())
    # the preset's name, not this machine's site-packages path: the adapter loads on another machine too
    assert json.loads((res.adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == "minilm"
    assert run["model"] == {"spec": "minilm", "source": "minilm", "preset": "minilm"}
    id2label = {int(k): v for k, v in run["id2label"].items()}
    base = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=2, id2label=id2label).eval()
    ref = peft.PeftModel.from_pretrained(base, str(res.adapter_dir)).eval()
    loaded = load_model("minilm", "seq-cls", id2label=id2label)
    prog = capture(loaded.model, "seq-cls", mode="eval")
    state = AdapterState.load(res.adapter_dir)
    insertion_pipeline(state.config, state)(prog)
    enc = encode(read_jsonl(subset, "seq-cls"), loaded.tokenizer, "seq-cls")
    batch = collate(enc, list(range(16)), prog.input_names)
    with torch.no_grad():
        want = ref(**{k: batch[k] for k in prog.input_names}).logits
        got = prog.forward_batch(batch)
    assert (got - want).abs().max().item() < 1e-4


def test_resume_check_compares_options_as_saved(tmp_path):
    """A tuple option (Python API) equals the list its run saved; another value is refused, naming it."""
    from peftc.training.checkpoints import check_resume

    saved = json.loads(json.dumps({"target_modules": ["query", "value"], "lr": 1e-3}))
    ckpt = tmp_path / "run" / "checkpoints" / "step-1"
    check_resume({"target_modules": ("query", "value"), "lr": 1e-3}, saved, ckpt)
    with pytest.raises(ConfigError, match=r"--resume: target_modules=\['query'\] but the run in .*run was started"):
        check_resume({"target_modules": ("query",), "lr": 1e-3}, saved, ckpt)
