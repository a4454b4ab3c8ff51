"""``peftc train --method loha``: the loop trains LoHa on the tiny-gpt2 preset and HF PEFT loads the result.

With the preset's default targets (HF's table: ``c_attn``, a GPT-2 Conv1D, which HF PEFT 0.21's LoHa refuses)
peftc adapts c_attn as the equivalent nn.Linear and warns; HF PEFT loads that adapter into the tiny-gpt2 base
with its Conv1D layers converted to nn.Linear. The tied lm_head (an nn.Linear) is trained in a longer run.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from peftc.training import TrainConfig, train

TEXTS = [
    "what a wonderful film", "a dull and boring story", "the food was lovely", "the room was dirty",
    "great phone, fast and light", "it broke after a week", "friendly staff and tasty food", "rude waiter, cold soup",
]  # fmt: skip


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory):
    from peftc.models import preset_path

    try:
        preset_path("minilm")  # the tiny-gpt2 preset uses MiniLM's tokenizer
    except Exception as e:  # noqa: BLE001 - the MiniLM package is optional
        pytest.skip(f"MiniLM tokenizer unavailable: {e}")
    path = tmp_path_factory.mktemp("lm") / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return str(path)


@pytest.mark.slow
def test_loha_on_tiny_gpt2_lowers_the_loss_and_hf_peft_loads_it(tmp_path, lm_data):
    peft = pytest.importorskip("peft")
    from peftc.passes import insertion_pipeline
    from transformers import AutoModelForCausalLM

    from peftc.adapters import AdapterState
    from peftc.dataset import collate, encode, read_jsonl
    from peftc.models import load_tokenizer
    from peftc.program import capture
    from peftc.runs import resolve_source

    out = tmp_path / "run"
    # batch_size = data size: every step sees the same 8 texts
    res = train(TrainConfig(model="tiny-gpt2", method="loha", target_modules=["lm_head"], data=lm_data,
                            eval_data=lm_data, out=str(out), max_steps=8, batch_size=8, lr=5e-2, warmup_ratio=0.0,
                            log_every=1, progress=False, options={"alpha": 16}))  # fmt: skip
    losses = [
        r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"
    ]
    assert len(losses) == 8 and losses[-1] < losses[0] - 1.0, losses  # measured: 10.29 -> 7.62
    config = json.loads((res.adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LOHA" and config["r"] == 8 and config["alpha"] == 16
    assert config["target_modules"] == ["lm_head"] and config["task_type"] == "CAUSAL_LM"
    state = AdapterState.load(res.adapter_dir)
    assert sorted(k.rsplit(".", 1)[-1] for k in state.tensors) == ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
    assert torch.count_nonzero(state.tensors["base_model.model.lm_head.hada_w2_b"]) > 0  # trained away from zero

    src = resolve_source(out)
    base = AutoModelForCausalLM.from_pretrained(src.base).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lm_head is tied to the embedding
        hf = peft.PeftModel.from_pretrained(base, str(res.adapter_dir)).eval()
    assert sum(p.numel() for n, p in hf.named_parameters() if "hada_" in n) == state.num_parameters()
    program = capture(AutoModelForCausalLM.from_pretrained(src.base).eval(), "causal-lm", mode="eval")
    insertion_pipeline(state.config, state)(program)
    enc = encode(read_jsonl(lm_data, "causal-lm"), load_tokenizer(src.base), "causal-lm")
    batch = collate(enc, list(range(len(TEXTS))), program.input_names)
    with torch.no_grad():
        want = hf(**{k: batch[k] for k in program.input_names}).logits
        got = program.forward_batch(batch)
        plain = AutoModelForCausalLM.from_pretrained(src.base).eval()(**{k: batch[k] for k in program.input_names})
    rows = batch["attention_mask"].bool()
    assert (want - plain.logits)[rows].abs().max().item() > 1e-3  # the trained adapter is not the identity
    assert (got - want)[rows].abs().max().item() <= 1e-5


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    from peftc.cli import main

    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_cli_default_gpt2_targets_train_conv1d_and_load_in_hf_peft_on_linear_gpt2(tmp_path, capsys, caplog, lm_data):
    """``peftc train --model tiny-gpt2 --method loha --max-steps 5``: HF's default c_attn (Conv1D) is adapted."""
    import peft
    from conftest import linearise_conv1d
    from peftc.passes import insertion_pipeline
    from transformers import AutoModelForCausalLM

    from peftc.adapters import AdapterState
    from peftc.dataset import collate, encode, read_jsonl
    from peftc.models import load_tokenizer
    from peftc.program import capture
    from peftc.runs import resolve_source

    out = tmp_path / "run"
    with caplog.at_level("WARNING", logger="peftc.passes.loha"):
        code, _, err = _cli(
            capsys, "train", "--model", "tiny-gpt2", "--method", "loha", "--max-steps", "5", "--data", lm_data,
            "--out", str(out), "--no-progress",
        )  # fmt: skip
    assert code == 0, err
    assert any("Conv1D" in r.getMessage() and "converted to nn.Linear" in r.getMessage() for r in caplog.records)
    losses = [
        r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"
    ]
    assert losses and all(map(math.isfinite, losses)), losses
    assert json.loads((out / "run.json").read_text())["metrics"]["step"] == 5
    state = AdapterState.load(out / "adapter")
    assert state.config.peft_type == "LOHA" and state.config.target_modules is None  # HF's table, as HF PEFT reads it
    sites = [f"transformer.h.{i}.attn.c_attn" for i in (0, 1)]
    parts = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    assert sorted(state.tensors) == sorted(f"base_model.model.{s}.{p}" for s in sites for p in parts)
    assert state.tensors[f"base_model.model.{sites[0]}.hada_w1_a"].shape == (192, 8)  # ΔW [out, in] = [192, 64]
    assert all(torch.count_nonzero(state.tensors[f"base_model.model.{s}.hada_w2_b"]) > 0 for s in sites)  # trained

    src = resolve_source(out)
    linear_base = linearise_conv1d(AutoModelForCausalLM.from_pretrained(src.base))
    hf = peft.PeftModel.from_pretrained(linear_base, str(out / "adapter")).eval()
    assert sum(p.numel() for n, p in hf.named_parameters() if "hada_" in n) == state.num_parameters()
    program = capture(AutoModelForCausalLM.from_pretrained(src.base).eval(), "causal-lm", mode="eval")
    insertion_pipeline(state.config, state)(program)
    assert {s.module_type for s in program.sites.values()} == {"Conv1D"}
    enc = encode(read_jsonl(lm_data, "causal-lm"), load_tokenizer(src.base), "causal-lm")
    batch = collate(enc, list(range(len(TEXTS))), program.input_names)
    with torch.no_grad():
        want = hf(**{k: batch[k] for k in program.input_names}).logits
        got = program.forward_batch(batch)
        plain = AutoModelForCausalLM.from_pretrained(src.base).eval()(**{k: batch[k] for k in program.input_names})
    rows = batch["attention_mask"].bool()
    assert (want - plain.logits)[rows].abs().max().item() > 1e-4  # five steps moved the adapter off ΔW = 0
    assert (got - want)[rows].abs().max().item() <= 1e-5
