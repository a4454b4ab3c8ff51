"""``text-to-image``: a Stable Diffusion UNet with LoRA (peftc.diffusion).

A tiny random pipeline (:func:`peftc.diffusion.save_tiny_pipeline`: 16×16 images, 8×8 latents, a 2-layer
CLIP text encoder, a byte-level CLIP tokenizer; no downloads) and tiny PNGs written here. LoRA on HF PEFT's
Stable Diffusion targets (``to_q, to_k, to_v, to_out.0``), initialised away from identity
(``init_lora_weights=False``), equals ``peft.PeftModel`` on the UNet both ways and merged; a training step
lowers the noise-prediction loss on a fixed batch; a bare UNet directory is refused for training; the CLI
trains on a pipeline directory and exports ``unet/model.onnx``, which optimum's ``ORTUnet`` layout takes.
"""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="text-to-image needs diffusers (pip install 'peftc[diffusion]')")
pytest.importorskip("PIL", reason="text-to-image data needs Pillow (pip install 'peftc[diffusion]')")

import peft  # noqa: E402

from peftc.diffusion import UNET_TARGETS, MissingExtraError, require_diffusers, save_tiny_pipeline  # noqa: E402

PARITY_ATOL = 1e-5
EXPORT_ATOL = 1e-4


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("sd") / "pipe")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """Six ``{"image", "prompt"}`` rows: red and blue noisy squares (images of another size than the VAE's)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("sd-data")
    rng = np.random.default_rng(0)
    rows = []
    for i, (name, colour) in enumerate([("red", (220, 30, 30)), ("blue", (30, 30, 220))] * 3):
        pixels = np.clip(np.array(colour) + rng.normal(0, 20, (24, 20, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{i}.png")
        rows.append({"image": f"{i}.png", "prompt": f"a {name} square"})
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "data.jsonl"


def _unet(pipe_dir):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(pipe_dir / "unet").eval()


@pytest.fixture(scope="module")
def hf_adapter(pipe_dir, tmp_path_factory):
    """HF PEFT's LoRA on the UNet (lora_B random: ``init_lora_weights=False``), saved; (dir, model)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS, init_lora_weights=False)
        hf = peft.get_peft_model(_unet(pipe_dir), cfg).eval()
    out = tmp_path_factory.mktemp("sd-hf") / "hf"
    hf.save_pretrained(out)
    return out, hf


def _inputs(batch: int = 3, seed: int = 5):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=gen), torch.tensor(321.0), torch.randn(batch, 16, 32, generator=gen)


def test_task_is_inferred_from_unet_and_pipeline_directories(pipe_dir, hf_adapter):
    from peftc.runs import resolve_source
    from peftc.training.options import infer_task

    assert infer_task(str(pipe_dir)) == infer_task(str(pipe_dir / "unet")) == "text-to-image"
    assert resolve_source(hf_adapter[0], model=str(pipe_dir / "unet")).task == "text-to-image"  # no task_type
    assert infer_task(str(pipe_dir / "vae")) != "text-to-image"


def test_lora_parity_with_hf_peft_both_ways_and_merge(pipe_dir, hf_adapter, tmp_path):
    from peftc.passes import insertion_pipeline, merge_pipeline

    from peftc.adapters import AdapterState
    from peftc.program import capture

    hf_dir, hf = hf_adapter
    x = _inputs()
    with torch.no_grad():
        expected = hf(*x).sample
        assert (expected - _unet(pipe_dir)(*x).sample).abs().max() > 1e-2  # the adapter does something

    program = capture(_unet(pipe_dir), "text-to-image", mode="eval")
    assert program.input_names == ["sample", "timestep", "encoder_hidden_states"]
    assert program.output_names == ["out_sample"] and program.dynamic_dims["timestep"] == {}
    state = AdapterState.load(hf_dir)
    insertion_pipeline(state.config, state)(program)
    assert len(program.sites) == 32  # 8 attention blocks × 4 projections
    with torch.no_grad():
        ours = program(*x)
        assert (ours - expected).abs().max().item() <= PARITY_ATOL
        assert program(*_inputs(1, seed=7)).shape == (1, 4, 8, 8)  # dynamic batch

    state.save(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(_unet(pipe_dir), tmp_path / "ours").eval()
    with torch.no_grad():
        assert (back(*x).sample - ours).abs().max().item() <= PARITY_ATOL

    merge_pipeline()(program)
    assert not program.sites
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = peft.PeftModel.from_pretrained(_unet(pipe_dir), hf_dir).merge_and_unload().eval()
    with torch.no_grad():
        assert (program(*x) - merged(*x).sample).abs().max().item() <= PARITY_ATOL


def test_a_step_lowers_the_noise_prediction_loss_on_a_fixed_batch(pipe_dir, data_file):
    from peftc.passes import insertion_pipeline

    from peftc.config import LoraConfig
    from peftc.diffusion import diffusion_data, per_sample_timesteps
    from peftc.program import capture
    from peftc.tasks import get_task

    train_enc, eval_enc, data, _, loaded = diffusion_data(str(pipe_dir), str(data_file), str(data_file))
    assert len(data) == 6 and train_enc.embeddings.shape == (6, 16, 32) and train_enc.mean.shape == (6, 4, 8, 8)
    a, b = (
        eval_enc.collate([0, 1], ["sample", "timestep", "encoder_hidden_states"]),
        eval_enc.collate([1], ["sample", "timestep", "encoder_hidden_states"]),
    )
    assert torch.equal(a["sample"][1], b["sample"][0])  # evaluation noise is fixed per row
    program = capture(loaded.model, "text-to-image", mode="train", transform=per_sample_timesteps)
    assert program.dynamic_dims["timestep"] == {0: "batch"}
    torch.manual_seed(0)
    insertion_pipeline(LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS, lora_dropout=0.0))(program)
    task = get_task("text-to-image")
    batch = eval_enc.collate(range(6), program.input_names)
    params = program.parameters(trainable=True)
    opt = torch.optim.AdamW(params, lr=1e-2)
    before = task.loss(program.forward_batch(batch), batch)
    before.backward()
    opt.step()
    with torch.no_grad():
        after = task.loss(program.forward_batch(batch), batch)
    assert after.item() < before.item()


def test_training_refuses_a_unet_directory_and_writes_nothing(pipe_dir, data_file, tmp_path, capsys):
    from peftc.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "--model", str(pipe_dir / "unet"), "--data", str(data_file), "--out", str(tmp_path / "run")])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a pipeline directory" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "run").exists()


def test_without_diffusers_the_task_names_the_extra(monkeypatch, pipe_dir, data_file, tmp_path, capsys):
    from peftc.cli import main

    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers raises ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'peftc\[diffusion\]'"):
        require_diffusers()
    with pytest.raises(SystemExit) as exc:
        main(["train", "--model", str(pipe_dir), "--data", str(data_file), "--out", str(tmp_path / "run")])
    assert exc.value.code == 2
    assert "peftc[diffusion]" in capsys.readouterr().err


@pytest.mark.slow
def test_export_from_a_unet_directory_is_the_unet_folder(pipe_dir, hf_adapter, tmp_path):
    """HF PEFT's adapter on a bare UNet directory, unmerged: ``unet/model.onnx`` + ``unet/config.json`` only, and ONNX
    Runtime's noise prediction equals HF PEFT's on a batch and timestep unlike the capture example's."""
    import onnxruntime as ort

    from peftc.exporting import export

    hf_dir, hf = hf_adapter
    out = export(hf_dir, model=pipe_dir / "unet", out=tmp_path / "onnx")  # task from the base: text-to-image
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "manifest.json", "report.json", "unet"]
    assert sorted(p.name for p in (out / "unet").iterdir()) == ["config.json", "model.onnx"]
    report = json.loads((out / "report.json").read_text())
    assert report["verified"] and report["max_abs_diff"] <= EXPORT_ATOL and "components" not in report
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model_file"] == "unet/model.onnx" and manifest["task"] == "text-to-image"
    session = ort.InferenceSession(str(out / "unet" / "model.onnx"))
    sample, timestep, states = _inputs(batch=5, seed=11)
    (got,) = session.run(
        None, {"sample": sample.numpy(), "timestep": timestep.numpy(), "encoder_hidden_states": states.numpy()}
    )
    with torch.no_grad():
        expected = hf(sample, timestep, states).sample.numpy()
    assert np.abs(got - expected).max() <= EXPORT_ATOL


@pytest.mark.slow
def test_cli_train_then_export_the_pipeline_for_optimum(pipe_dir, data_file, tmp_path, capsys):
    """``peftc train`` on a pipeline directory, ``peftc export --merge`` of the run: the whole pipeline in optimum's
    layout, which ``ORTStableDiffusionPipeline`` runs to the latents and images of diffusers' pipeline with HF
    PEFT's LoRA (the run's adapter) on the UNet, from the same latents (DDIM: no noise is drawn while sampling)."""
    from diffusers import StableDiffusionPipeline
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    from peftc.cli import main

    run = tmp_path / "run"
    args = ["train", "--model", str(pipe_dir), "--data", str(data_file), "--eval-data", str(data_file)]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--max-steps", "2", "--batch-size", "3", "--lr", "1e-2", "--set", "init_lora_weights=false",
              "--out", str(run)])  # fmt: skip
    assert exc.value.code == 0, capsys.readouterr().err
    assert json.loads((run / "run.json").read_text())["task"] == "text-to-image"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(m["type"] == "eval" and m["loss"] > 0 for m in metrics)  # the held-out noise-prediction loss
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(UNET_TARGETS) and config["task_type"] is None
    out = tmp_path / "onnx"
    with pytest.raises(SystemExit) as exc:
        main(["export", str(run), "--merge", "--out", str(out)])
    assert exc.value.code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["verified"] and report["max_abs_diff"] <= EXPORT_ATOL
    assert all(c["passed"] for c in report["components"].values())  # text_encoder, vae_decoder
    for part in ("unet", "text_encoder", "vae_decoder"):
        assert (out / part / "model.onnx").is_file() and (out / part / "config.json").is_file()
    assert (out / "model_index.json").is_file() and (out / "tokenizer").is_dir() and (out / "scheduler").is_dir()
    capsys.readouterr()  # what train and export printed
    with pytest.raises(SystemExit) as exc:
        main(["inspect", "--json", str(out)])
    assert exc.value.code == 0
    info = json.loads(capsys.readouterr().out)  # the manifest's unet/model.onnx
    assert [i["name"] for i in info["inputs"]] == ["sample", "timestep", "encoder_hidden_states"]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ort = ORTStableDiffusionPipeline.from_pretrained(out)
        reference = StableDiffusionPipeline.from_pretrained(pipe_dir, safety_checker=None)
        reference.unet = peft.PeftModel.from_pretrained(reference.unet, run / "adapter")
    assert [i.name for i in ort.unet.session.get_inputs()] == ["sample", "timestep", "encoder_hidden_states"]
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = {"prompt": "a red square", "num_inference_steps": 2, "height": 16, "width": 16, "latents": latents}
    with torch.no_grad():
        ours = np.asarray(ort(output_type="latent", **kwargs).images)
        expected = reference(output_type="latent", **kwargs).images.numpy()
        assert np.abs(expected).max() > 1  # latents of scale ~1-7: the tolerance below is relative to that
        assert np.abs(ours - expected).max() <= 1e-4
        images = np.asarray(ort(output_type="np", **kwargs).images)
        assert np.abs(images - reference(output_type="np", **kwargs).images).max() <= 1e-4


def test_an_adapter_on_conv2d_layers_is_refused_by_name():
    """HF PEFT adapts a UNet's Conv2d layers (``conv1``, ``proj_in``); peftc's LoRA pass takes Linear/Conv1D only."""
    from types import SimpleNamespace

    from peftc.passes.targets import check_all_used

    from peftc.errors import AdapterMismatchError

    key = "base_model.model.down_blocks.0.resnets.0.conv1.lora_A.weight"
    state = SimpleNamespace(tensors={key: torch.zeros(1)})
    with pytest.raises(AdapterMismatchError, match=r"adapts down_blocks\.0\.resnets\.0\.conv1, a Conv2d; .*Linear"):
        check_all_used(state, set(), "lora_", {"down_blocks.0.resnets.0.conv1": "Conv2d"})
    with pytest.raises(AdapterMismatchError, match="matches no targeted module"):  # a module the model lacks
        check_all_used(state, set(), "lora_", {})


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_batches_follow_the_noise_schedule(prediction):
    """``sample = √ᾱ_t·z + √(1-ᾱ_t)·ε`` and the target ``ε`` or ``v = √ᾱ_t·ε - √(1-ᾱ_t)·z``, computed here from the
    scheduler's ``alphas_cumprod`` with the draws an evaluation batch makes (a generator seeded per row)."""
    from diffusers import DDPMScheduler

    from peftc.diffusion import DiffusionEncoded

    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction)
    gen = torch.Generator().manual_seed(0)
    mean, std, emb = (
        torch.randn(3, 4, 8, 8, generator=gen),
        torch.rand(3, 4, 8, 8, generator=gen),
        torch.randn(3, 5, 32),
    )
    enc = DiffusionEncoded(mean, std, emb, scaling_factor=0.5, scheduler=scheduler, seed=10)
    batch = enc.collate([2, 0], ["sample", "timestep", "encoder_hidden_states"])
    for row, i in enumerate([2, 0]):
        draw = torch.Generator().manual_seed(10 + i)
        eps_z, noise = torch.randn(4, 8, 8, generator=draw), torch.randn(4, 8, 8, generator=draw)
        t = int(torch.randint(0, 1000, (1,), generator=draw))
        z = (mean[i] + std[i] * eps_z) * 0.5
        a = scheduler.alphas_cumprod[t]
        assert batch["timestep"][row] == t
        torch.testing.assert_close(batch["sample"][row], a.sqrt() * z + (1 - a).sqrt() * noise)
        target = noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * z
        torch.testing.assert_close(batch["labels"][row], target)
        assert torch.equal(batch["encoder_hidden_states"][row], emb[i])


def test_bad_rows_are_one_line_data_errors(tmp_path):
    from peftc.diffusion import read_prompts
    from peftc.errors import DataError

    bad = tmp_path / "bad.jsonl"
    for text, match in [
        ('{"image": "x.png"}\n', r"bad\.jsonl:1: text-to-image rows are"),
        ('{"image": "missing.png", "prompt": "p"}\n', r"bad\.jsonl:1: cannot read image"),
        ("\n", "holds no rows"),
    ]:
        bad.write_text(text)
        with pytest.raises(DataError, match=match) as exc:
            read_prompts(bad)
        assert "\n" not in str(exc.value)
