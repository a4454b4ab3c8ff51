"""Image tasks: ``image-cls`` (ViT, Swin) and ``semantic-segmentation`` (SegFormer) with LoRA.

Tiny models from transformers config classes (image 32x32, hidden 16-32, 2 layers or stages; seeded,
no downloads) and tiny PNGs written here, whose class is their colour so a step can learn it. For
each model: LoRA on HF PEFT's targets for these models (``query``, ``value``) with the head in
``modules_to_save`` (``classifier``; SegFormer's ``decode_head``, BatchNorm statistics included),
perturbed away from identity, equals ``peft.PeftModel`` both ways (HF PEFT's saved adapter loaded by
peftc; peftc's saved adapter loaded by HF PEFT) within 1e-5; merged, exported to ONNX, verified, and
loaded by optimum's ORTModelForImageClassification / ORTModelForSemanticSegmentation with the same
logits. Training: a step lowers the loss on a fixed batch; a ``peftc train`` run writes the task's
metrics (accuracy; mean IoU) and its adapter exports.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import peft
import pytest
import torch

from peftc.config import LoraConfig
from peftc.errors import DataError
from peftc.program import capture

PARITY_ATOL = 1e-5
EXPORT_ATOL = 1e-4
pytest.importorskip("PIL", reason="image tasks need Pillow (pip install 'peftc[vision]')")


def _vit(num_labels: int = 3):
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=num_labels,
    )  # fmt: skip
    torch.manual_seed(0)
    return ViTForImageClassification(cfg).eval()


def _swin(num_labels: int = 3):
    from transformers import SwinConfig, SwinForImageClassification

    cfg = SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4,
        num_labels=num_labels,
    )  # fmt: skip
    torch.manual_seed(0)
    return SwinForImageClassification(cfg).eval()


def _segformer(num_labels: int = 3):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    cfg = SegformerConfig(
        image_size=32, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
        num_attention_heads=[1, 2], decoder_hidden_size=32, patch_sizes=[7, 3], strides=[4, 2],
        num_labels=num_labels,
    )  # fmt: skip
    torch.manual_seed(0)
    return SegformerForSemanticSegmentation(cfg).eval()


#: name -> (builder, task, modules_to_save, optimum class)
MODELS = {
    "vit": (_vit, "image-cls", ["classifier"], "ORTModelForImageClassification"),
    "swin": (_swin, "image-cls", ["classifier"], "ORTModelForImageClassification"),
    "segformer": (_segformer, "semantic-segmentation", ["decode_head"], "ORTModelForSemanticSegmentation"),
}


def _hf_config(name: str) -> peft.LoraConfig:
    return peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=MODELS[name][2], init_lora_weights=False
    )


def _hf_model(name: str):
    """HF PEFT's LoRA model, every tensor random (lora_B non-zero, the head and BatchNorm statistics moved)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        hf = peft.get_peft_model(MODELS[name][0](), _hf_config(name))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        for n, b in hf.named_buffers():
            if "modules_to_save" in n and b.is_floating_point():
                b.add_(0.1 * torch.rand(b.shape, generator=gen))  # running stats stay positive
    return hf.eval()


def _pixels(batch: int = 3, seed: int = 5) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def hf_adapters(tmp_path_factory):
    """name -> (base model dir, HF PEFT adapter dir, HF PEFT model) for every model."""
    root = tmp_path_factory.mktemp("vision")
    out = {}
    for name, (build, *_rest) in MODELS.items():
        build().save_pretrained(root / name)
        hf = _hf_model(name)
        hf.save_pretrained(root / f"{name}-hf")
        out[name] = (root / name, root / f"{name}-hf", hf)
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_capture_takes_pixel_values_with_dynamic_batch(name):
    build, task, *_ = MODELS[name]
    model = build()
    program = capture(model, task, mode="eval")
    assert program.input_names == ["pixel_values"] and program.dynamic_dims == {"pixel_values": {0: "batch"}}
    for batch in (1, 3):
        x = _pixels(batch)
        with torch.no_grad():
            assert torch.allclose(program(x), model(pixel_values=x).logits, atol=PARITY_ATOL)


@pytest.mark.parametrize("name", list(MODELS))
def test_lora_parity_with_hf_peft_both_ways_and_merge(name, hf_adapters, tmp_path):
    from peftc.passes import insertion_pipeline, merge_pipeline

    from peftc.adapters import AdapterState

    build, task, *_ = MODELS[name]
    _, hf_dir, hf = hf_adapters[name]
    x = _pixels()
    with torch.no_grad():
        expected = hf(pixel_values=x).logits
        base = build()(pixel_values=x).logits
    assert (expected - base).abs().max() > 1e-2  # the adapter does something

    # HF PEFT's adapter (task_type unset, as HF PEFT's image guides leave it) into peftc's program
    state = AdapterState.load(hf_dir)
    program = capture(build(), task, mode="eval")
    insertion_pipeline(state.config, state)(program)
    assert len(program.sites) == 4
    with torch.no_grad():
        ours = program(x)
    assert (ours - expected).abs().max().item() <= PARITY_ATOL

    # peftc's saved adapter into HF PEFT
    state.save(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(build(), tmp_path / "ours").eval()
    with torch.no_grad():
        assert (back(pixel_values=x).logits - ours).abs().max().item() <= PARITY_ATOL

    merge_pipeline()(program)
    assert not program.sites
    with torch.no_grad():
        assert (program(x) - expected).abs().max().item() <= EXPORT_ATOL


@pytest.mark.parametrize(
    "name", [n if n == "vit" else pytest.param(n, marks=pytest.mark.slow) for n in MODELS]
)  # one family in the quick tier
def test_merged_onnx_export_loads_in_optimum(name, hf_adapters, tmp_path, capsys):
    """peftc export of HF PEFT's adapter: the task comes from the base's architecture; optimum runs the artifact."""
    import optimum.onnxruntime as ort

    from peftc.exporting import export

    base_dir, hf_dir, hf = hf_adapters[name]
    out = export(hf_dir, model=base_dir, out=tmp_path / "onnx", merge=True)
    report = json.loads((out / "report.json").read_text())
    assert report["verified"] and report["max_abs_diff"] <= EXPORT_ATOL
    assert (out / "preprocessor_config.json").is_file() and (out / "config.json").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["task"] == MODELS[name][1]
    model = getattr(ort, MODELS[name][3]).from_pretrained(out)
    assert [i.name for i in model.session.get_inputs()] == ["pixel_values"]
    assert [o.name for o in model.session.get_outputs()] == ["logits"]
    x = _pixels(2, seed=9)
    with torch.no_grad():
        expected = hf(pixel_values=x).logits
    got = torch.as_tensor(np.asarray(model(pixel_values=x).logits))
    assert (got - expected).abs().max().item() <= EXPORT_ATOL

    from peftc.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["inspect", "--json", str(out)])
    assert exc.value.code == 0
    info = json.loads(capsys.readouterr().out)
    assert [i["name"] for i in info["inputs"]] == ["pixel_values"] and info["inputs"][0]["shape"][1:] == [3, 32, 32]


# -- data and training ---------------------------------------------------------------------------

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}


def _image(path, colour, seed, size=(40, 36)):
    """A noisy image of ``colour`` (a size unlike the model's 32x32: the processor resizes it)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _cls_data(root, n=6):
    """The same images as a JSON-lines file and as a folder of class subfolders."""
    lines = []
    for i in range(n):
        for label, colour in COLOURS.items():
            rel = f"{label}/{i}.png"
            _image(root / "folder" / rel, colour, seed=i * 7 + len(label))
            lines.append({"image": f"folder/{rel}", "label": label})
    (root / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root / "train.jsonl", root / "folder"


def _seg_data(root, n=6):
    """Images whose left part is red (class 1), the rest blue (class 2), a black top band (class 0);
    the mask's last row is 255 (ignored)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        split = int(rng.integers(8, 28))
        mask = np.full((32, 32), 2, dtype=np.uint8)
        mask[:, :split] = 1
        mask[:6] = 0
        colours = np.array([(0, 0, 0), COLOURS["red"], COLOURS["blue"]], dtype=np.float64)
        pixels = np.clip(colours[mask] + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
        mask[-1] = 255
        (root / "img").mkdir(parents=True, exist_ok=True)
        (root / "mask").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / "img" / f"{i}.png")
        Image.fromarray(mask, mode="L").save(root / "mask" / f"{i}.png")
        lines.append({"image": f"img/{i}.png", "mask": f"mask/{i}.png"})
    (root / "seg.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root / "seg.jsonl"


def test_image_folder_and_jsonl_read_the_same(tmp_path):
    from peftc.images import read_images

    jsonl, folder = _cls_data(tmp_path, n=2)
    a, b = read_images(jsonl, "image-cls"), read_images(folder, "image-cls")
    assert a.id2label == b.id2label == {0: "blue", 1: "red"}
    assert sorted(zip(a.images, a.labels, strict=True)) == sorted(zip(b.images, b.labels, strict=True))


def test_bad_image_data_is_one_clear_error(tmp_path):
    from peftc.images import read_images

    jsonl, _ = _cls_data(tmp_path, n=1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "folder/nope.png", "label": "red"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: image .*nope.png does not exist"):
        read_images(bad, "image-cls")
    bad.write_text(json.dumps({"picture": "x.png"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: missing field 'image'"):
        read_images(bad, "image-cls")
    (tmp_path / "folder" / "red" / "broken.png").write_text("not a png")
    with pytest.raises(DataError, match="cannot read image"):
        read_images(tmp_path / "folder", "image-cls")
    (tmp_path / "folder" / "red" / "broken.png").unlink()
    (tmp_path / "folder" / "green").mkdir()
    _image(tmp_path / "folder" / "green" / "0.png", (30, 220, 30), seed=0)
    with pytest.raises(DataError, match="class folder 'green' is not a class of the training data"):
        read_images(tmp_path / "folder", "image-cls", label2id={"blue": 0, "red": 1})
    seg = _seg_data(tmp_path / "seg", n=1)
    with pytest.raises(DataError, match="is a folder"):
        read_images(seg.parent, "semantic-segmentation")
    with pytest.raises(DataError, match="holds class 2 but the training masks have classes 0..1"):
        read_images(seg, "semantic-segmentation", num_labels=2)


def test_cli_bad_image_data_is_one_line_and_writes_nothing(tmp_path, capsys):
    from peftc.cli import main

    _vit(2).save_pretrained(tmp_path / "base")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "nope.png", "label": "red"}) + "\n")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--model", str(tmp_path / "base"), "--data", str(bad), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exc.value.code != 0 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: ") and "bad.jsonl:1: image" in lines[0] and "does not exist" in lines[0]
    assert not (tmp_path / "run").exists()


def test_without_pillow_the_task_names_the_extra(tmp_path, monkeypatch):
    import sys

    from peftc.images import read_images

    jsonl, _ = _cls_data(tmp_path, n=1)
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(DataError, match=r"pip install 'peftc\[vision\]'"):
        read_images(jsonl, "image-cls")


def test_mean_iou_against_hand_counts():
    from peftc.tasks import get_task

    labels = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 1]]])  # [batch 1, 2, 4]
    pred = torch.tensor([[[0, 1, 1, 1], [2, 0, 0, 1]]])
    logits = torch.nn.functional.one_hot(pred, 3).permute(0, 3, 1, 2).float() * 10
    metric = get_task("semantic-segmentation").metric()
    metric.update(logits, {"labels": labels})
    result = metric.result(0.0)
    # flat: class 0 true {0,1} pred {0,5} (pixel 6 ignored, though predicted 0): 1/3; class 1: 3/4; class 2: 1/2
    assert result["mean_iou"] == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert result["pixel_accuracy"] == pytest.approx(5 / 7)


@pytest.mark.parametrize("name", list(MODELS))
def test_a_step_lowers_the_loss_on_a_fixed_batch(name, tmp_path):
    from peftc.passes import insertion_pipeline

    from peftc.images import encode_images, read_images
    from peftc.models import image_processor

    build, task, mts, _ = MODELS[name]
    data_path = _seg_data(tmp_path) if task == "semantic-segmentation" else _cls_data(tmp_path)[0]
    data = read_images(data_path, task)
    model = build(len(data.id2label))
    enc = encode_images(data, image_processor(None, model.config, task))
    batch = enc.collate(list(range(min(8, len(enc)))), ["pixel_values"])
    assert batch["pixel_values"].shape[1:] == (3, 32, 32)
    program = capture(model, task, mode="train")
    torch.manual_seed(0)
    insertion_pipeline(LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=mts))(program)
    params = program.parameters(trainable=True)
    opt = torch.optim.AdamW(params, lr=1e-2)
    torch.manual_seed(0)
    before = program.task.loss(program.forward_batch(batch), batch)
    before.backward()
    opt.step()
    opt.zero_grad()
    torch.manual_seed(0)
    with torch.no_grad():
        after = program.task.loss(program.forward_batch(batch), batch)
    assert float(after) < float(before)
    if name == "segformer":  # train mode updated the adapter's BatchNorm statistics, not the base model's
        key = "base_model.model.decode_head.batch_norm.running_mean"
        assert not torch.equal(program.adapter.tensors[key], model.decode_head.batch_norm.running_mean)
        assert torch.equal(model.decode_head.batch_norm.running_mean, torch.zeros(32))
        assert int(program.adapter.tensors[key.replace("running_mean", "num_batches_tracked")]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit", "segformer"])
def test_train_run_metrics_and_export(name, tmp_path, capsys):
    """``peftc train`` on image data (the task from the base's architecture), then ``peftc export`` of the run."""
    from peftc.cli import main
    from peftc.exporting import export

    build, task, *_ = MODELS[name]
    if task == "semantic-segmentation":
        data, labels = _seg_data(tmp_path / "data"), 3
    else:  # the folder layout; the base's head has 5 classes (a pretraining head): a new one is made for 2
        data, labels = _cls_data(tmp_path / "data")[1], 5
    build(labels).save_pretrained(tmp_path / "base")
    args = ["train", "--model", str(tmp_path / "base"), "--data", str(data), "--eval-data", str(data),
            "--out", str(tmp_path / "run"), "--max-steps", "6", "--batch-size", "4", "--lr", "0.01",
            "--no-progress"]  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 0, capsys.readouterr().err
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["task"] == task
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if m["type"] == "eval"]
    assert len(evals) >= 2 and evals[-1]["loss"] < evals[0]["loss"], evals
    key = "mean_iou" if task == "semantic-segmentation" else "accuracy"
    assert 0.5 < evals[-1][key] <= 1.0, evals[-1]  # colours are easy: better than chance after 6 steps
    out = export(tmp_path / "run", out=tmp_path / "onnx")
    assert json.loads((out / "report.json").read_text())["verified"]
    config = json.loads((out / "config.json").read_text())
    if task == "image-cls":
        assert config["label2id"] == {"blue": 0, "red": 1}


@pytest.mark.slow
def test_swappable_and_float16_exports_of_segformer(hf_adapters, tmp_path):
    """The decode head's BatchNorm statistics become graph inputs beside the LoRA tensors (swappable), and
    survive the float16 conversion; each export is verified by the pipeline against its torch references."""
    import onnx

    from peftc.exporting import export

    base_dir, hf_dir, _ = hf_adapters["segformer"]
    swap = export(hf_dir, model=base_dir, out=tmp_path / "swap", adapters_as_inputs=True)
    report = json.loads((swap / "report.json").read_text())
    assert report["verified"] and report["max_abs_diff"] <= EXPORT_ATOL
    inputs = [i.name for i in onnx.load(swap / "model.onnx", load_external_data=False).graph.input]
    assert any(n.endswith("batch_norm.running_mean") for n in inputs), inputs
    assert not any(n.endswith("num_batches_tracked") for n in inputs)
    half = export(hf_dir, model=base_dir, out=tmp_path / "half", dtype="float16")
    assert json.loads((half / "report.json").read_text())["verified"]


def test_a_nested_module_to_save_alone_matches_hf_peft(tmp_path):
    """``modules_to_save=["classifier"]`` on SegFormer selects ``decode_head.classifier``: HF PEFT's plain case."""
    from peftc.passes import insertion_pipeline

    from peftc.adapters import AdapterState

    config = peft.LoraConfig(r=4, target_modules=["query"], modules_to_save=["classifier"], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.get_peft_model(_segformer(), config).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
    hf.save_pretrained(tmp_path)
    state = AdapterState.load(tmp_path)
    assert {k for k in state.tensors if "lora" not in k} == {
        "base_model.model.decode_head.classifier.weight",
        "base_model.model.decode_head.classifier.bias",
    }
    program = capture(_segformer(), "semantic-segmentation", mode="eval")
    insertion_pipeline(state.config, state)(program)
    x = _pixels()
    with torch.no_grad():
        expected, base = hf(pixel_values=x).logits, _segformer()(pixel_values=x).logits
        assert (program(x) - expected).abs().max().item() <= PARITY_ATOL
    assert (expected - base).abs().max() > 1e-2


def test_nested_modules_to_save_are_refused_in_one_line(tmp_path, capsys):
    """``["decode_head", "classifier"]`` selects a module inside another: HF PEFT saves two copies under one key."""
    from peftc.passes import insertion_pipeline

    from peftc.cli import main
    from peftc.errors import ConfigError

    program = capture(_segformer(), "semantic-segmentation", mode="train")
    config = LoraConfig(target_modules=["query"], modules_to_save=["decode_head", "classifier"])
    with pytest.raises(ConfigError, match=r"selects decode_head\.classifier inside decode_head"):
        insertion_pipeline(config).plan(program)  # what `peftc inspect plan` shows, nothing changed
    with pytest.raises(ConfigError, match=r"selects decode_head\.classifier inside decode_head") as e:
        insertion_pipeline(config)(program)
    assert 'modules_to_save=["decode_head"]' in str(e.value)

    _segformer().save_pretrained(tmp_path / "base")
    data = _seg_data(tmp_path / "seg", n=2)
    with pytest.raises(SystemExit) as exc:
        main(["train", "--model", str(tmp_path / "base"), "--data", str(data), "--out", str(tmp_path / "run"),
              "--set", 'modules_to_save=["decode_head", "classifier"]', "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exc.value.code == ConfigError.exit_code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: ") and "--set 'modules_to_save=[\"decode_head\"]'" in lines[0], lines[0]
    assert not (tmp_path / "run").exists()
