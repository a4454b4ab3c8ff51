"""``image-to-text``: BLIP-2 (OPT language model) with LoRA — capture, HF PEFT parity, training, export, generation.

A tiny BLIP-2 built here (vision 2 layers at 32x32, Q-Former 2 layers, OPT 2 layers, 4 query tokens) with a
word-level tokenizer and a ``Blip2Processor`` made locally (tests/blip2_tiny.py). References are independent:
the eager transformers model, HF PEFT's ``get_peft_model`` / ``PeftModel.from_pretrained`` /
``merge_and_unload`` on the same weights (LoRA B random, not identity), transformers' own loss with
``labels``, and HF PEFT's ``generate`` for the greedy tokens of the ONNX loop.
"""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch

pytest.importorskip("PIL", reason="image-to-text reads images with Pillow (pip install 'peftc[vision]')")

from blip2_tiny import save_tiny_blip2, tiny_blip2, write_images

from peftc.adapters import AdapterState
from peftc.program import capture

PARITY_ATOL = 1e-5
TARGETS = {
    "opt": ["q_proj", "k_proj"],  # HF PEFT's BLIP-2 recipe: the language model's attention
    "qformer": ["query", "value", "q_proj"],  # the Q-Former's attention too
}
CAPTIONS = ["a red square", "a blue circle", "a green square on the white", "a big red circle", "a small blue square"]


def _batch(processor, texts=("a red square", "a blue big circle on the white", "a green circle"), side="right"):
    """Images and captions through the processor, padded on ``side`` (left: between image tokens and text)."""
    from PIL import Image

    colours = [(220, 30, 30), (30, 30, 220), (30, 200, 30)]
    images = [Image.new("RGB", (40, 36), c) for c in colours[: len(texts)]]
    processor.tokenizer.padding_side = side
    return processor(images=images, text=list(texts), padding=True, return_tensors="pt")


def _hf_model(targets: list[str], seed: int = 1):
    """HF PEFT's LoRA model on a fresh tiny BLIP-2, every LoRA tensor random (B non-zero)."""
    model, _ = tiny_blip2()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        return peft.get_peft_model(model, cfg).eval()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_blip2(tmp_path_factory.mktemp("blip2") / "base")


@pytest.fixture(scope="module")
def hf_adapters(tmp_path_factory):
    """name -> (HF PEFT adapter dir, HF PEFT model) for each target set."""
    root = tmp_path_factory.mktemp("blip2-hf")
    out = {}
    for name, targets in TARGETS.items():
        hf = _hf_model(targets)
        hf.save_pretrained(root / name)
        out[name] = (root / name, hf)
    return out


@pytest.mark.parametrize("name", list(TARGETS))
def test_lora_parity_with_hf_peft_both_ways_and_merge(name, hf_adapters, tmp_path):
    from peftc.passes import insertion_pipeline, merge_pipeline

    hf_dir, hf = hf_adapters[name]
    _, processor = tiny_blip2()
    batches = [_batch(processor, side=side) for side in ("right", "left")]
    assert (batches[1]["attention_mask"][:, 4] == 0).any()  # left padding sits after the image tokens
    with torch.no_grad():
        expected = [hf(**b).logits for b in batches]
        base = tiny_blip2()[0](**batches[0]).logits
    assert (expected[0] - base).abs().max() > 1e-2  # the adapter does something

    def run(program):
        with torch.no_grad():
            return [program(b["pixel_values"], b["input_ids"], b["attention_mask"]) for b in batches]

    def worst(xs, ys):
        return max((x - y).abs().max().item() for x, y in zip(xs, ys, strict=True))

    # HF PEFT's adapter into peftc's program
    state = AdapterState.load(hf_dir)
    program = capture(tiny_blip2()[0], "image-to-text", mode="eval")
    assert program.input_names == ["pixel_values", "input_ids", "attention_mask"]
    assert program.dynamic_dims["input_ids"] == {0: "batch", 1: "sequence"}
    assert (batches[0]["input_ids"][:, :4] == hf.config.image_token_id).all()  # the processor's image tokens
    insertion_pipeline(state.config, state)(program)
    assert len(program.sites) == len(state.tensors) // 2
    if name == "qformer":
        assert any(s.startswith("qformer.") for s in program.sites)
    ours = run(program)
    assert worst(ours, expected) <= PARITY_ATOL

    # peftc's saved adapter into HF PEFT
    state.save(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(tiny_blip2()[0], tmp_path / "ours").eval()
    with torch.no_grad():
        assert worst([back(**b).logits for b in batches], ours) <= PARITY_ATOL

    # merged vs HF PEFT's merge_and_unload
    merge_pipeline()(program)
    assert not program.sites
    merged_hf = copy.deepcopy(hf).merge_and_unload()
    with torch.no_grad():
        assert worst(run(program), [merged_hf(**b).logits for b in batches]) <= PARITY_ATOL


# -- data and training ---------------------------------------------------------------------------


def test_caption_batches_and_loss_match_transformers(tmp_path):
    """The collated labels are the ids with -100 on image tokens and padding; the task's loss on the program's
    logits is ``Blip2ForConditionalGeneration(..., labels=...)``'s loss."""
    from peftc.blip2 import CaptionEncoded, read_captions
    from peftc.tasks import get_task

    model, processor = tiny_blip2()
    data = read_captions(write_images(tmp_path, CAPTIONS))
    assert len(data) == 5 and data.images[0].is_file() and data.texts[1] == "a blue circle"
    batch = CaptionEncoded(data, processor).collate([0, 2, 3], ["pixel_values", "input_ids", "attention_mask"])
    ids, labels = batch["input_ids"], batch["labels"]
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert (ids[:, :4] == model.config.image_token_id).all() and (labels[:, :4] == -100).all()
    assert (labels[batch["attention_mask"] == 0] == -100).all() and (batch["attention_mask"] == 0).any()
    eos = processor.tokenizer.eos_token_id
    assert [int(row[row != -100][-1]) for row in labels] == [eos] * 3  # each caption ends with the end token
    program = capture(model, "image-to-text", mode="eval")
    with torch.no_grad():
        ours = get_task("image-to-text").loss(program.forward_batch(batch), batch)
        theirs = model(**{k: v for k, v in batch.items() if k != "labels"}, labels=labels).loss
    assert abs(float(ours) - float(theirs)) <= 1e-5


def test_bad_caption_data_is_one_clear_error(tmp_path):
    from peftc.blip2 import read_captions
    from peftc.errors import DataError

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "nope.png", "text": "a red square"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: image .*nope.png does not exist"):
        read_captions(bad)
    write_images(tmp_path, ["a red square"])
    bad.write_text(json.dumps({"image": "images/0.png"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: missing field 'text'"):
        read_captions(bad)


def test_a_step_lowers_the_loss_on_a_fixed_batch(tmp_path):
    from peftc.passes import insertion_pipeline

    from peftc.blip2 import CaptionEncoded, read_captions
    from peftc.config import LoraConfig

    model, processor = tiny_blip2()
    enc = CaptionEncoded(read_captions(write_images(tmp_path, CAPTIONS)), processor)
    batch = enc.collate(list(range(len(enc))), ["pixel_values", "input_ids", "attention_mask"])
    program = capture(model, "image-to-text", mode="train")
    torch.manual_seed(0)
    insertion_pipeline(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"]))(program)
    opt = torch.optim.AdamW(program.parameters(trainable=True), lr=1e-2)
    losses = []
    for _ in range(3):
        torch.manual_seed(0)  # the same dropout masks each time
        loss = program.task.loss(program.forward_batch(batch), batch)
        losses.append(float(loss))
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0], losses


@pytest.mark.slow
def test_train_export_and_onnx_greedy_generation_equal_hf_peft(base_dir, tmp_path, capsys):
    """``peftc train`` (task from the base's class), ``peftc export`` of the run (every graph verified), then the
    greedy loop over the ONNX graphs with ONNX Runtime gives HF PEFT's ``generate`` tokens for the trained adapter."""
    from PIL import Image

    from peftc.blip2 import generate
    from peftc.cli import main

    data = write_images(tmp_path / "data", CAPTIONS)
    args = ["train", "--model", str(base_dir), "--data", str(data), "--eval-data", str(data),
            "--out", str(tmp_path / "run"), "--max-steps", "4", "--batch-size", "5", "--lr", "0.02",
            "--target-modules", "q_proj,k_proj,query", "--no-progress"]  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 0, capsys.readouterr().err
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["task"] == "image-to-text"
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if m["type"] == "eval"]
    assert evals and evals[-1]["loss"] < evals[0]["loss"] and "perplexity" in evals[-1], evals

    with pytest.raises(SystemExit) as exc:
        main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "onnx")])
    assert exc.value.code == 0, capsys.readouterr().err
    out = tmp_path / "onnx"
    report = json.loads((out / "report.json").read_text())
    assert report["verified"] and report["max_abs_diff"] <= 1e-4
    assert set(report["onnx_vs_torch"]) == {"model", "vision_encoder", "embed_tokens", "decoder"}
    for name in ("model", "vision_encoder_model", "embed_tokens_model", "decoder_model"):
        assert (out / f"{name}.onnx").is_file()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.PeftModel.from_pretrained(tiny_blip2()[0], tmp_path / "run" / "adapter").eval()
    _, processor = tiny_blip2()
    lengths = []
    for i, prompt in ((0, ""), (1, "a"), (3, "a big")):
        image = Image.open(tmp_path / "data" / "images" / f"{i}.png").convert("RGB")
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        with torch.no_grad():
            expected = hf.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1] :]
        tokens = generate(out, image, prompt, max_new_tokens=8)
        assert tokens == expected.tolist(), prompt
        lengths.append(len(tokens))
    assert max(lengths) > 2, lengths  # the decoder ran several steps on its own cache


def test_refusals_are_one_clear_error(tmp_path, capsys):
    """A BLIP-2 dir without its processor cannot train (one line, nothing written); export refuses what the
    graphs cannot hold (a prompt-learning adapter, adapters as inputs) before capturing anything."""
    from peftc.cli import main
    from peftc.errors import ConfigError
    from peftc.exporting import export

    model, _ = tiny_blip2()
    model.save_pretrained(tmp_path / "bare", safe_serialization=True)  # no tokenizer, no processor
    data = write_images(tmp_path / "data", CAPTIONS[:2])
    with pytest.raises(SystemExit) as exc:
        main(["train", "--model", str(tmp_path / "bare"), "--data", str(data), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exc.value.code != 0 and len(lines) == 1 and "Traceback" not in err, err
    assert "has no tokenizer" in lines[0] and "processor.save_pretrained" in lines[0]
    assert not (tmp_path / "run").exists()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prompt = peft.get_peft_model(model, peft.PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"))
    prompt.save_pretrained(tmp_path / "prompt")
    with pytest.raises(ConfigError, match="PROMPT_TUNING adapters are not supported for image-to-text"):
        export(tmp_path / "prompt", model=tmp_path / "bare", task="image-to-text", out=tmp_path / "o1")
    with pytest.raises(ConfigError, match="--adapters-as-inputs is not supported for image-to-text"):
        export(tmp_path / "prompt", model=tmp_path / "bare", task="image-to-text", out=tmp_path / "o2",
               adapters_as_inputs=True)  # fmt: skip
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
