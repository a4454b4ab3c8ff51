"""``text-to-image``: a Stable Diffusion UNet (diffusers ``UNet2DConditionModel``) with an adapter.

Bases are diffusers directories: a UNet directory (``config.json`` whose ``_class_name`` is
``UNet2DConditionModel``, as ``unet.save_pretrained`` writes it) or a pipeline directory
(``model_index.json`` with ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``, as
``StableDiffusionPipeline.save_pretrained`` writes it). Only the UNet is captured and adapted; its graph is
``sample, timestep, encoder_hidden_states -> out_sample`` (optimum's UNet names), with a dynamic batch and
a fixed latent size (the config's ``sample_size``). The exported graph takes a scalar ``timestep`` (what
optimum's ``ORTUnet`` feeds); training captures one timestep per row.

Training is diffusers' ``train_text_to_image_lora`` recipe and needs a pipeline directory: the VAE encodes
each image (resized and centre-cropped to ``sample_size × vae_scale_factor``, scaled to [-1, 1]) to
latents ``z ~ N(mean, std) × scaling_factor``; the text encoder embeds the prompt (padded to the
tokenizer's ``model_max_length``); a batch draws noise ``ε`` and timesteps ``t ~ U{0, T-1}``, and the loss
is ``MSE(UNet(add_noise(z, ε, t), t, emb), target)`` with ``target = ε`` (``prediction_type: epsilon``) or
the velocity (``v_prediction``). The VAE moments and the prompt embeddings are computed once, when the data
is encoded (the VAE and text encoder are frozen). Evaluation is the same loss on held-out rows with noise,
latent sample and timestep drawn from a generator seeded by the row's index, so it is the same every time.

diffusers is an extra: ``pip install 'peftc[diffusion]'``; without it the task says so in one line.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftc.errors import ConfigError, DataError, ModelLoadError

__all__ = [
    "TASK",
    "UNET_TARGETS",
    "DiffusionData",
    "DiffusionEncoded",
    "MissingExtraError",
    "UNetModule",
    "diffusion_data",
    "diffusion_kind",
    "diffusion_task",
    "load_unet",
    "per_sample_timesteps",
    "read_prompts",
    "save_tiny_pipeline",
    "tiny_unet",
    "require_diffusers",
    "unet_dir",
    "write_pipeline_files",
]

logger = logging.getLogger(__name__)

TASK = "text-to-image"
_UNET_CLASS = "UNet2DConditionModel"
#: HF PEFT's Stable Diffusion LoRA recipe: the UNet attention's projections.
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
#: Text length of a UNet directory's example input when no tokenizer says otherwise (CLIP's 77 tokens).
_TEXT_LENGTH = 77


class MissingExtraError(ConfigError):
    """An optional dependency of the task is not installed (exit 2, like a usage error)."""

    exit_code = 2


def require_diffusers() -> Any:
    """The ``diffusers`` module, or a one-line error naming the extra that installs it."""
    try:
        import diffusers
    except ImportError as e:
        raise MissingExtraError(
            "task text-to-image needs diffusers, which is not installed: pip install 'peftc[diffusion]'"
        ) from e
    return diffusers


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def diffusion_kind(path: str | Path) -> str | None:
    """``"unet"`` for a diffusers UNet directory, ``"pipeline"`` for a pipeline directory with a UNet, else ``None``."""
    path = Path(path).expanduser()
    if _read_json(path / "config.json").get("_class_name") == _UNET_CLASS:
        return "unet"
    index = _read_json(path / "model_index.json")
    if "unet" in index and _read_json(path / "unet" / "config.json").get("_class_name") == _UNET_CLASS:
        return "pipeline"
    return None


def diffusion_task(path: str | Path) -> str | None:
    """``text-to-image`` when ``path`` is a diffusers UNet or pipeline directory, else ``None``."""
    return TASK if diffusion_kind(path) else None


def unet_dir(path: str | Path) -> Path:
    """The directory holding the UNet's ``config.json`` and weights (``path`` itself, or its ``unet/``)."""
    path = Path(path).expanduser()
    return path / "unet" if diffusion_kind(path) == "pipeline" else path


def load_unet(path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """The UNet of a UNet or pipeline directory (safetensors only), in eval mode.

    Raises:
        ModelLoadError: not a diffusers UNet or pipeline directory, or unreadable weights.
    """
    from peftc.models import _check_model_dir, _first_line

    diffusers = require_diffusers()
    path = Path(path).expanduser()
    if diffusion_kind(path) is None:
        raise ModelLoadError(
            f"{path} is not a diffusers UNet directory (config.json with _class_name {_UNET_CLASS}) or a pipeline "
            "directory (model_index.json and unet/)"
        )
    directory = unet_dir(path)
    _check_model_dir(directory)
    kwargs: dict[str, Any] = {"use_safetensors": True}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    try:
        unet = diffusers.UNet2DConditionModel.from_pretrained(str(directory), **kwargs)
    except Exception as e:  # diffusers raises OSError/ValueError/EnvironmentError for broken directories
        raise ModelLoadError(f"cannot load a UNet from {directory}: {type(e).__name__}: {_first_line(e)}") from e
    return unet.eval()


def _sample_size(config: Any) -> tuple[int, int]:
    size = config.sample_size
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class UNetModule(nn.Module):
    """Wraps a UNet so its forward takes ``sample, timestep, encoder_hidden_states`` and returns the noise prediction.

    The UNet is the attribute ``model``, so parameter names in the graph are ``model.<diffusers name>`` and HF
    PEFT's keys ``base_model.model.<diffusers name>``, as for :class:`~peftc.tasks.TaskModule`.

    Args:
        model: a diffusers ``UNet2DConditionModel``.
        per_sample_timesteps: ``timestep`` is ``[batch]`` (training: one timestep per row) instead of a scalar
            (the exported graph, what optimum's ``ORTUnet`` feeds).
    """

    output_names = ["out_sample"]
    #: diffusers' ``Upsample2D`` branches on ``batch >= 64`` (a ``contiguous()`` that changes no value): torch.export
    #: captures the ``batch < 64`` branch, so the graph's batch dim is bounded (ONNX Runtime runs any batch).
    max_batch = 63

    def __init__(self, model: nn.Module, per_sample_timesteps: bool = False):
        super().__init__()
        self.model = model
        self.per_sample_timesteps = per_sample_timesteps
        self.input_names = ["sample", "timestep", "encoder_hidden_states"]
        self.dynamic_dims = {
            "sample": {0: "batch"},
            "timestep": {0: "batch"} if per_sample_timesteps else {},
            "encoder_hidden_states": {0: "batch", 1: "sequence"},
        }

    def example_inputs(self, batch: int = 2, text_length: int = 8) -> tuple[torch.Tensor, ...]:
        cfg = self.model.config
        gen = torch.Generator().manual_seed(0)
        dtype = next(self.model.parameters()).dtype
        device = next(self.model.parameters()).device
        sample = torch.randn(batch, cfg.in_channels, *_sample_size(cfg), generator=gen)
        timestep = torch.tensor([10.0, 500.0][:batch] if self.per_sample_timesteps else 500.0)
        if self.per_sample_timesteps and batch > 2:
            timestep = torch.linspace(10.0, 900.0, batch)
        states = torch.randn(batch, text_length, _cross_attention_dim(cfg), generator=gen)
        return tuple(t.to(device) for t in (sample.to(dtype), timestep, states.to(dtype)))

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        sample, timestep, encoder_hidden_states = inputs  # positional, as TaskModule takes them
        return self.model(sample, timestep, encoder_hidden_states, return_dict=False)[0]


def _cross_attention_dim(cfg: Any) -> int:
    dim = cfg.cross_attention_dim
    return int(dim if isinstance(dim, int) else dim[0])


def per_sample_timesteps(model: nn.Module, _names: list[str]) -> UNetModule:
    """The capture transform of training: one timestep per row (``capture(..., transform=per_sample_timesteps)``)."""
    return UNetModule(model, per_sample_timesteps=True)


# -- data ----------------------------------------------------------------------------------------


@dataclass
class DiffusionData:
    """``{"image": path, "prompt": text}`` rows of a JSON-lines file (image paths relative to the file)."""

    path: Path
    images: list[Path]
    prompts: list[str]
    task: str = TASK

    def __len__(self) -> int:
        return len(self.images)

    def eval_kwargs(self) -> dict[str, Any]:
        return {}


def read_prompts(path: str | Path) -> DiffusionData:
    """Read and check ``{"image": path, "prompt": "..."}`` JSON lines (every image opened once to check it).

    Raises:
        DataError: a missing file, a line that is not such an object, an unreadable image, no rows.
    """
    from peftc.images import _pil

    Image = _pil()
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; text-to-image data is JSON lines {{'image': path, 'prompt': text}}")
    images: list[Path] = []
    prompts: list[str] = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path}:{lineno}: not JSON ({e})") from e
        if not isinstance(obj, dict) or not isinstance(obj.get("image"), str) or not isinstance(obj.get("prompt"), str):
            raise DataError(
                f"{path}:{lineno}: text-to-image rows are {{'image': path, 'prompt': text}}, got {line[:80]!r}"
            )
        image = (path.parent / obj["image"]).resolve()
        try:
            with Image.open(image) as im:
                im.verify()
        except Exception as e:  # Pillow raises OSError, SyntaxError, … for broken files
            raise DataError(f"{path}:{lineno}: cannot read image {image}: {type(e).__name__}: {e}") from e
        images.append(image)
        prompts.append(obj["prompt"])
    if not images:
        raise DataError(f"{path} holds no rows; text-to-image data is JSON lines {{'image': path, 'prompt': text}}")
    return DiffusionData(path, images, prompts)


@dataclass
class Pipeline:
    """The frozen parts of a Stable Diffusion pipeline that training uses besides the UNet."""

    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    scheduler: Any

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def load_pipeline_parts(path: str | Path) -> Pipeline:
    """The VAE, text encoder, tokenizer and noise scheduler of a pipeline directory (DDPMScheduler from its config).

    Raises:
        ConfigError: ``path`` is a UNet directory (training needs the VAE and the text encoder).
        ModelLoadError: a part is missing or unreadable.
    """
    from peftc.models import _first_line

    diffusers = require_diffusers()
    import transformers

    path = Path(path).expanduser()
    if diffusion_kind(path) != "pipeline":
        raise ConfigError(
            f"{path} is a UNet directory; training text-to-image needs a pipeline directory (unet/, vae/, "
            "text_encoder/, tokenizer/, scheduler/ as StableDiffusionPipeline.save_pretrained writes it) to encode "
            "images (VAE) and prompts (text encoder)"
        )
    try:
        vae = diffusers.AutoencoderKL.from_pretrained(str(path / "vae"), use_safetensors=True).eval()
        text_encoder = transformers.CLIPTextModel.from_pretrained(str(path / "text_encoder"), use_safetensors=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path / "tokenizer"))
        scheduler = diffusers.DDPMScheduler.from_pretrained(str(path / "scheduler"))
    except Exception as e:  # transformers / diffusers raise OSError, ValueError, … for missing or broken parts
        raise ModelLoadError(f"cannot load the pipeline in {path}: {type(e).__name__}: {_first_line(e)}") from e
    vae.requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    return Pipeline(vae, text_encoder, tokenizer, scheduler)


@dataclass
class DiffusionEncoded:
    """Examples encoded once by the frozen VAE and text encoder; :meth:`collate` draws noise and timesteps.

    Attributes:
        mean, std: the VAE's latent distribution per image ``[n, c, h, w]`` (before ``scaling_factor``).
        embeddings: the text encoder's last hidden state per prompt ``[n, tokens, dim]``.
        scaling_factor: the VAE's latent scale.
        scheduler: the pipeline's noise scheduler (``add_noise``, ``get_velocity``, ``num_train_timesteps``).
        seed: ``None`` draws from torch's global RNG (training); an int seeds each row's draw by ``seed + index``
            (evaluation: the same noise every time).
    """

    mean: torch.Tensor
    std: torch.Tensor
    embeddings: torch.Tensor
    scaling_factor: float
    scheduler: Any
    seed: int | None = None
    task: str = TASK

    def __len__(self) -> int:
        return int(self.mean.shape[0])

    def collate(self, indices: Sequence[int], input_names: Sequence[str]) -> dict[str, torch.Tensor]:
        """``sample`` (noisy latents), ``timestep`` ``[b]``, ``encoder_hidden_states`` and ``labels`` (the target)."""
        if list(input_names) != ["sample", "timestep", "encoder_hidden_states"]:
            raise DataError(
                f"text-to-image data feeds sample, timestep, encoder_hidden_states, not {list(input_names)}"
            )
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        steps = int(self.scheduler.config.num_train_timesteps)
        if self.seed is None:
            eps_z = torch.randn_like(self.mean[idx])
            noise = torch.randn_like(eps_z)
            timesteps = torch.randint(0, steps, (len(idx),))
        else:
            draws = []
            for i in indices:
                gen = torch.Generator().manual_seed(self.seed + int(i))
                shape = self.mean.shape[1:]
                draws.append(
                    (
                        torch.randn(shape, generator=gen),
                        torch.randn(shape, generator=gen),
                        torch.randint(0, steps, (1,), generator=gen),
                    )
                )
            eps_z, noise, timesteps = (torch.stack(d) for d in zip(*draws, strict=True))
            timesteps = timesteps.view(-1)
        latents = (self.mean[idx] + self.std[idx] * eps_z) * self.scaling_factor
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        prediction = self.scheduler.config.prediction_type
        if prediction == "epsilon":
            target = noise
        elif prediction == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ConfigError(f"scheduler prediction_type {prediction!r}: training supports epsilon and v_prediction")
        return {
            "sample": noisy,
            "timestep": timesteps.float(),
            "encoder_hidden_states": self.embeddings[idx],
            "labels": target,
        }


def _pixels(image: Path, size: tuple[int, int]) -> torch.Tensor:
    """An image as ``[3, h, w]`` in [-1, 1]: resized (shorter side, bilinear) and centre-cropped (diffusers' recipe)."""
    import numpy as np

    from peftc.images import _pil

    Image = _pil()
    height, width = size
    with Image.open(image) as im:
        im = im.convert("RGB")
        scale = max(height / im.height, width / im.width)
        im = im.resize((max(width, round(im.width * scale)), max(height, round(im.height * scale))), Image.BILINEAR)
        left, top = (im.width - width) // 2, (im.height - height) // 2
        im = im.crop((left, top, left + width, top + height))
        pixels = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0)
    return pixels.permute(2, 0, 1)


@torch.no_grad()
def encode_prompts(parts: Pipeline, prompts: Sequence[str]) -> torch.Tensor:
    """The text encoder's last hidden state for ``prompts`` padded to the tokenizer's ``model_max_length``."""
    ids = parts.tokenizer(
        list(prompts),
        max_length=parts.tokenizer.model_max_length,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return parts.text_encoder(ids, return_dict=False)[0]


@torch.no_grad()
def encode_diffusion(
    data: DiffusionData, parts: Pipeline, sample_size: tuple[int, int], seed: int | None = None, batch: int = 8
) -> DiffusionEncoded:
    """VAE moments and prompt embeddings of every row (in batches of ``batch``)."""
    factor = parts.vae_scale_factor
    size = (sample_size[0] * factor, sample_size[1] * factor)
    means, stds, embs = [], [], []
    for start in range(0, len(data), batch):
        pixels = torch.stack([_pixels(p, size) for p in data.images[start : start + batch]])
        dist = parts.vae.encode(pixels).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
        embs.append(encode_prompts(parts, data.prompts[start : start + batch]))
    return DiffusionEncoded(
        torch.cat(means),
        torch.cat(stds),
        torch.cat(embs),
        float(parts.vae.config.scaling_factor),
        parts.scheduler,
        seed,
    )


def diffusion_data(model: str, data_path: str, eval_path: str | None, dtype: torch.dtype | None = None):
    """What the training loop needs for ``text-to-image``: ``(train_enc, eval_enc, train_data, None, loaded)``.

    Raises:
        ConfigError: ``model`` is a UNet directory (training needs the whole pipeline) or diffusers is missing.
    """
    from peftc.models import LoadedModel

    parts = load_pipeline_parts(model)
    train_data = read_prompts(data_path)
    eval_data = read_prompts(eval_path) if eval_path else None
    unet = load_unet(model, dtype)
    size = _sample_size(unet.config)
    train_enc = encode_diffusion(train_data, parts, size)
    eval_enc = encode_diffusion(eval_data, parts, size, seed=0) if eval_data else None
    loaded = LoadedModel(unet, None, source=str(Path(model).expanduser().resolve()))
    return train_enc, eval_enc, train_data, None, loaded


# -- artifact ------------------------------------------------------------------------------------


class TextEncoderModule(nn.Module):
    """A CLIP text encoder as optimum exports it: ``input_ids -> last_hidden_state, pooler_output``."""

    output_names = ["last_hidden_state", "pooler_output"]

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.input_names = ["input_ids"]
        self.dynamic_dims = {"input_ids": {0: "batch", 1: "sequence"}}

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        vocab = int(self.model.config.vocab_size)
        return (torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0)),)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(inputs[0], return_dict=True)
        return out.last_hidden_state, out.pooler_output


class VaeDecoderModule(nn.Module):
    """A VAE's decoder as optimum exports it: ``latent_sample -> sample`` (fixed latent size, dynamic batch)."""

    output_names = ["sample"]
    max_batch = UNetModule.max_batch  # the same Upsample2D branch on the batch

    def __init__(self, model: nn.Module, latent_size: tuple[int, int]):
        super().__init__()
        self.model = model
        self.latent_size = latent_size
        self.input_names = ["latent_sample"]
        self.dynamic_dims = {"latent_sample": {0: "batch"}}

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        channels = int(self.model.config.latent_channels)
        return (torch.randn(2, channels, *self.latent_size, generator=torch.Generator().manual_seed(0)),)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model.decode(inputs[0], return_dict=False)[0]


def write_pipeline_files(
    directory: Path, loaded: Any, exporter: Any = None, options: Any = None, tolerance: Any = None
) -> dict[str, Any]:
    """The artifact's files beside ``unet/model.onnx``: the UNet's ``config.json`` (optimum's ``ORTUnet`` reads it);
    from a pipeline directory exported to ONNX, the rest of the pipeline in optimum's layout.

    The rest is ``text_encoder/model.onnx`` (``input_ids -> last_hidden_state, pooler_output``) and
    ``vae_decoder/model.onnx`` (``latent_sample -> sample``), each captured and written by peftc's ONNX exporter
    and verified like the UNet against its torch module on held-out inputs, with its ``config.json``; the
    ``tokenizer/`` and ``scheduler/`` folders and ``model_index.json`` are copied. Optimum's
    ``ORTStableDiffusionPipeline.from_pretrained`` loads the folder. These parts carry no adapter.

    Returns:
        ``report.json`` entries: ``components``, each part's verification report (empty for a UNet directory).

    Raises:
        ExportVerificationError: a part's ONNX outputs differ from torch's by more than ``tolerance``
            (a :class:`~peftc.exporters.verify.Tolerance`; float32's default when None).
    """
    import shutil

    loaded.model.save_config(directory / "unet")
    source = Path(loaded.source)
    if diffusion_kind(source) != "pipeline" or exporter is None or exporter.name != "onnx":
        return {}
    import transformers

    from peftc.exporters.verify import Tolerance, make_cases, run_torch, verify_artifact
    from peftc.program import capture

    tolerance = tolerance or Tolerance()
    diffusers = require_diffusers()
    text_encoder = transformers.CLIPTextModel.from_pretrained(str(source / "text_encoder"), use_safetensors=True)
    vae = diffusers.AutoencoderKL.from_pretrained(str(source / "vae"), use_safetensors=True)
    latent = _sample_size(loaded.model.config)
    parts = {
        "text_encoder": (text_encoder, lambda m, _names: TextEncoderModule(m)),
        "vae_decoder": (vae, lambda m, _names, size=latent: VaeDecoderModule(m, size)),
    }
    reports = {}
    for role, (module, transform) in parts.items():
        program = capture(module.eval(), TASK, mode="eval", transform=transform)
        path = directory / exporter.model_file(role)
        path.parent.mkdir(parents=True, exist_ok=True)
        exporter.write(program, path, {"peftc.task": TASK, "peftc.graph": role}, options)
        cases = make_cases(program)
        reference = run_torch(program, cases, program.input_names)
        report = verify_artifact(
            exporter, path, program, cases, reference, atol=tolerance.atol, rtol=tolerance.rtol,
            reference_name=f"torch {role}",
        )  # fmt: skip
        report.raise_if_failed(hint="nothing was written")
        reports[role] = report.to_dict()
        save_config = module.save_config if hasattr(module, "save_config") else module.config.save_pretrained
        save_config(path.parent)  # diffusers' or transformers' config.json
    for folder in ("tokenizer", "scheduler"):
        if (source / folder).is_dir():
            shutil.copytree(source / folder, directory / folder)
    shutil.copy2(source / "model_index.json", directory / "model_index.json")
    return {"components": reports}


# -- tiny bases (tests, the support matrix, the README's example) --------------------------------


def tiny_unet(seed: int = 0) -> nn.Module:
    """A random ``UNet2DConditionModel`` small enough for tests: latents 4×8×8, channels (32, 64), text dim 32."""
    diffusers = require_diffusers()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        ).eval()  # fmt: skip


def save_tiny_pipeline(directory: str | Path, seed: int = 0) -> Path:
    """Write a random tiny ``StableDiffusionPipeline`` (16×16 images, 8×8 latents, a 2-layer CLIP text encoder,
    prompts of 16 tokens) as ``save_pretrained`` does, without downloading anything.

    The tokenizer is a ``CLIPTokenizer`` over a byte-level vocabulary (every byte, alone and word-final) with
    no merges: each character is a token.
    """
    diffusers = require_diffusers()
    import transformers
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    tok_dir = directory / "_tokenizer_files"
    tok_dir.mkdir(exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(
        str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=16, pad_token="<|endoftext|>"
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        text_encoder = transformers.CLIPTextModel(
            transformers.CLIPTextConfig(
                vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, projection_dim=32,
                bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"],
            )
        ).eval()  # fmt: skip
        vae = diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32), layers_per_block=1,
            norm_num_groups=32, sample_size=16,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        ).eval()  # fmt: skip
    # DDIM (eta 0) is deterministic, so a fixed latent gives the same images in any runtime; training reads its
    # config into a DDPMScheduler, as diffusers' recipe does with any Stable Diffusion scheduler
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=tiny_unet(seed), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(directory, safe_serialization=True)
    import shutil

    shutil.rmtree(tok_dir)
    return directory
