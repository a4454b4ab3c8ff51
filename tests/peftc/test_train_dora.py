"""``peftc train --method dora``: the registry's ``dora`` name presets ``use_dora``, the loop trains A, B and m.

The run goes through the CLI on the ``tiny-gpt2`` preset (MiniLM's tokenizer) over a fixed batch, so
the logged loss must fall; the saved adapter must load in HF PEFT and give the peftc program's logits.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "we like green tea",
    "it rains in the north",
    "birds sing at dawn",
    "the sun is warm today",
    "he reads old books",
    "she paints the sea",
]


@pytest.fixture(scope="module")
def tiny_gpt2_available():
    from peftc.models import preset_path

    try:
        preset_path("minilm")  # tiny-gpt2 uses MiniLM's tokenizer
    except Exception as e:  # noqa: BLE001 - the MiniLM package is optional
        pytest.skip(f"MiniLM tokenizer unavailable: {e}")


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    from peftc.cli import main

    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


@pytest.mark.slow
def test_train_method_dora_lowers_the_loss_and_loads_in_hf_peft(tmp_path, capsys, tiny_gpt2_available):
    import peft
    from peftc.passes import insertion_pipeline
    from transformers import AutoModelForCausalLM

    from peftc.adapters import AdapterState
    from peftc.dataset import collate, encode, read_jsonl
    from peftc.models import load_model
    from peftc.program import capture
    from peftc.runs import resolve_source

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))
    run = tmp_path / "run"
    code, out, err = _cli(
        capsys, "train", "--method", "dora", "--model", "tiny-gpt2", "--data", str(data), "--eval-data", str(data),
        "--out", str(run), "--max-steps", "20", "--batch-size", str(len(SENTENCES)), "--lr", "0.02",
        "--warmup-ratio", "0", "--lora-dropout", "0", "--target-modules", "c_attn,c_fc", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    # every step sees the same 8 sentences: the mean loss of steps 11-20 is below that of steps 1-10
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["type"] == "train"]
    print(f"\nDoRA training losses (mean of steps 1-10, 11-20): {losses}")
    assert len(losses) == 2 and losses[1] < losses[0] - 0.1, losses

    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["use_dora"] is True
    tensors = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    sites = [f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("attn.c_attn", "mlp.c_fc")]
    parts = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
    assert sorted(tensors) == sorted(f"base_model.model.{s}.{part}" for s in sites for part in parts)

    src = resolve_source(run)
    loaded = load_model(src.base, "causal-lm")
    program = capture(loaded.model, "causal-lm", mode="eval")
    state = AdapterState.load(run / "adapter")
    insertion_pipeline(state.config, state)(program)
    for s in sites:  # m trained away from its init ‖W‖ (B = 0 at the start)
        m = tensors[f"base_model.model.{s}.lora_magnitude_vector"]
        w = loaded.model.get_parameter(f"{s}.weight").detach()
        assert (m - torch.linalg.norm(w.T, dim=1)).abs().max() > 1e-3
        assert tensors[f"base_model.model.{s}.lora_B.weight"].abs().max() > 1e-3

    base = AutoModelForCausalLM.from_pretrained(src.base).eval()
    hf = peft.PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    assert hf.peft_config["default"].use_dora is True
    enc = encode(read_jsonl(data, "causal-lm"), loaded.tokenizer, "causal-lm")
    batch = collate(enc, list(range(len(SENTENCES))), program.input_names)
    with torch.no_grad():
        want = hf(**{k: batch[k] for k in program.input_names}).logits
        got = program.forward_batch(batch)
    mask = batch["attention_mask"].bool()
    assert (got - want)[mask].abs().max().item() <= 1e-5
