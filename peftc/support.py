"""The support matrix: every cell of HF PEFT's documented support table, checked with peftc.

HF PEFT's README ("Models support matrix", the table its docs carried as "Supported models") lists
107 model × task × method cells (:data:`TABLES`). For each cell this module builds a tiny model of
that family from its transformers config (2 layers, hidden 64, seeded; nothing downloaded), wraps
it with HF PEFT (adapter away from its no-op init: every trainable tensor perturbed, so LoRA's B,
IA3's l and the prompts are random), saves it in the HF PEFT format and checks, with peftc:

``load``   HF PEFT's files → peftc (capture + bind) equal HF PEFT's logits on a right- and a
           left-padded batch (rows 0 and 2 padded by 3), at real positions (atol 1e-4);
``train``  one AdamW step on the train-mode capture lowers the task loss on a fixed batch (the
           building blocks ``peftc train`` runs: ``capture(mode="train")``, the bound adapter, the
           task's loss, the method's hooks);
``save``   the trained adapter saved by peftc loads into HF PEFT with the same logits;
``merge``  where the method merges: the merged graph equals the unmerged one;
``onnx``   ``peftc.export`` writes an ONNX artifact and its verification against the torch program passes.

OPT and GPT-J token classification, which transformers has no class for, are built with peftc's own head
(:mod:`peftc.heads`); their reference is HF PEFT on that same class, and the cell's ``load`` check says so.

A cell is ✅ when every check passes, ❌ with the first failing check's one-line reason, or
"no HF PEFT reference" when HF PEFT itself cannot build the cell (peftc then inserts a fresh adapter
of the same config and runs train, save, merge and onnx). Cells whose task peftc has no entry for in
:data:`peftc.tasks.TASKS` are ❌ "task not implemented"; they start running when the task is registered.

Run it with ``python -m peftc.support --out docs/support.md [--only PATTERN] [--jobs N]``; each cell
runs in a worker process under a time limit, so a crash or a hang fails that cell only.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import hashlib
import json
import re
import signal
import sys
import tempfile
import time
import traceback
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

__all__ = ["TABLES", "Cell", "CellResult", "cells", "check_cell", "main", "render", "run_cells"]

SOURCE = (
    'HF PEFT\'s README, section "Models support matrix" (huggingface/peft, the table also published as '
    '"Supported models" in docs/source/index.mdx, PEFT 0.5–0.6)'
)
METHODS = ("LoRA", "Prefix Tuning", "P-Tuning", "Prompt Tuning", "IA3")
ATOL = 1e-4
BATCH, SEQ, PAD = 3, 9, 3
N_VIRTUAL = 4

_ALL = METHODS
_NO_IA3 = METHODS[:4]
_NO_PREFIX_IA3 = ("LoRA", "P-Tuning", "Prompt Tuning")
_LORA_PREFIX = ("LoRA", "Prefix Tuning")
_LORA = ("LoRA",)

#: (section title, peftc task, [(model label, family, methods HF PEFT lists)]), in HF PEFT's order.
TABLES: list[tuple[str, str, list[tuple[str, str, tuple[str, ...]]]]] = [
    (
        "Causal Language Modeling",
        "causal-lm",
        [
            ("GPT-2", "gpt2", _ALL),
            ("Bloom", "bloom", _ALL),
            ("OPT", "opt", _ALL),
            ("GPT-Neo", "gpt_neo", _ALL),
            ("GPT-J", "gptj", _ALL),
            ("GPT-NeoX-20B", "gpt_neox", _ALL),
            ("LLaMA", "llama", _ALL),
            ("ChatGLM", "chatglm", _ALL),
        ],
    ),
    ("Conditional Generation", "seq2seq", [("T5", "t5", _ALL), ("BART", "bart", _ALL)]),
    (
        "Sequence Classification",
        "seq-cls",
        [
            ("BERT", "bert", _ALL),
            ("RoBERTa", "roberta", _ALL),
            ("GPT-2", "gpt2", _NO_IA3),
            ("Bloom", "bloom", _NO_IA3),
            ("OPT", "opt", _NO_IA3),
            ("GPT-Neo", "gpt_neo", _NO_IA3),
            ("GPT-J", "gptj", _NO_IA3),
            ("Deberta", "deberta", _NO_PREFIX_IA3),
            ("Deberta-v2", "deberta-v2", _NO_PREFIX_IA3),
        ],
    ),
    (
        "Token Classification",
        "token-cls",
        [
            ("BERT", "bert", _LORA_PREFIX),
            ("RoBERTa", "roberta", _LORA_PREFIX),
            ("GPT-2", "gpt2", _LORA_PREFIX),
            ("Bloom", "bloom", _LORA_PREFIX),
            ("OPT", "opt", _LORA_PREFIX),
            ("GPT-Neo", "gpt_neo", _LORA_PREFIX),
            ("GPT-J", "gptj", _LORA_PREFIX),
            ("Deberta", "deberta", _LORA),
            ("Deberta-v2", "deberta-v2", _LORA),
        ],
    ),
    ("Text-to-Image Generation", "text-to-image", [("Stable Diffusion", "stable_diffusion", _LORA)]),
    ("Image Classification", "image-cls", [("ViT", "vit", _LORA), ("Swin", "swin", _LORA)]),
    ("Image to text (Multi-modal models)", "image-to-text", [("Blip-2", "blip2", _LORA)]),
    ("Semantic Segmentation", "semantic-segmentation", [("SegFormer", "segformer", _LORA)]),
]

_BERT_LIKE = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, vocab_size=128)
_LLAMA_LIKE = dict(
    num_hidden_layers=2,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=128,
    pad_token_id=0,
)
#: family -> (transformers config class, config kwargs, {peftc task: model class}).
FAMILIES: dict[str, tuple[str, dict[str, Any], dict[str, str]]] = {
    "gpt2": (
        "GPT2Config",
        dict(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64, pad_token_id=0),
        {
            "causal-lm": "GPT2LMHeadModel",
            "seq-cls": "GPT2ForSequenceClassification",
            "token-cls": "GPT2ForTokenClassification",
        },
    ),
    "bloom": (
        "BloomConfig",
        dict(n_layer=2, hidden_size=64, n_head=4, vocab_size=128, pad_token_id=0),
        {
            "causal-lm": "BloomForCausalLM",
            "seq-cls": "BloomForSequenceClassification",
            "token-cls": "BloomForTokenClassification",
        },
    ),
    "opt": (
        "OPTConfig",
        dict(
            num_hidden_layers=2,
            hidden_size=64,
            ffn_dim=128,
            num_attention_heads=4,
            vocab_size=128,
            max_position_embeddings=64,
            word_embed_proj_dim=64,
            pad_token_id=0,
        ),
        {"causal-lm": "OPTForCausalLM", "seq-cls": "OPTForSequenceClassification", "token-cls": None},
    ),
    "gpt_neo": (
        "GPTNeoConfig",
        dict(
            num_layers=2,
            hidden_size=64,
            num_heads=4,
            vocab_size=128,
            max_position_embeddings=64,
            attention_types=[[["global", "local"], 1]],
            window_size=4,
            pad_token_id=0,
        ),
        {
            "causal-lm": "GPTNeoForCausalLM",
            "seq-cls": "GPTNeoForSequenceClassification",
            "token-cls": "GPTNeoForTokenClassification",
        },
    ),
    "gptj": (
        "GPTJConfig",
        dict(n_layer=2, n_embd=64, n_head=4, rotary_dim=8, vocab_size=128, n_positions=64, pad_token_id=0),
        {"causal-lm": "GPTJForCausalLM", "seq-cls": "GPTJForSequenceClassification", "token-cls": None},
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        dict(
            num_hidden_layers=2,
            hidden_size=64,
            num_attention_heads=4,
            intermediate_size=128,
            vocab_size=128,
            max_position_embeddings=64,
            pad_token_id=0,
        ),
        {"causal-lm": "GPTNeoXForCausalLM"},
    ),
    "llama": ("LlamaConfig", _LLAMA_LIKE, {"causal-lm": "LlamaForCausalLM"}),
    # ChatGLM's own modelling code is remote code (trust_remote_code), never downloaded here;
    # transformers' ``glm`` (GLM-4, ChatGLM's successor architecture) stands in for it.
    "chatglm": ("GlmConfig", dict(_LLAMA_LIKE, head_dim=16), {"causal-lm": "GlmForCausalLM"}),
    "t5": (
        "T5Config",
        dict(
            num_layers=2,
            num_decoder_layers=2,
            d_model=64,
            d_kv=16,
            d_ff=128,
            num_heads=4,
            vocab_size=128,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
            tie_word_embeddings=False,
        ),
        {"seq2seq": "T5ForConditionalGeneration"},
    ),
    "bart": (
        "BartConfig",
        dict(
            encoder_layers=2,
            decoder_layers=2,
            d_model=64,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            vocab_size=128,
            max_position_embeddings=64,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
        ),
        {"seq2seq": "BartForConditionalGeneration"},
    ),
    "bert": (
        "BertConfig",
        dict(_BERT_LIKE, max_position_embeddings=64),
        {"seq-cls": "BertForSequenceClassification", "token-cls": "BertForTokenClassification"},
    ),
    "roberta": (
        "RobertaConfig",
        dict(_BERT_LIKE, max_position_embeddings=66, pad_token_id=1, type_vocab_size=1),
        {"seq-cls": "RobertaForSequenceClassification", "token-cls": "RobertaForTokenClassification"},
    ),
    "deberta": (
        "DebertaConfig",
        dict(
            _BERT_LIKE,
            max_position_embeddings=64,
            relative_attention=True,
            pos_att_type=["p2c", "c2p"],
            max_relative_positions=32,
            type_vocab_size=0,
            pad_token_id=0,
        ),
        {"seq-cls": "DebertaForSequenceClassification", "token-cls": "DebertaForTokenClassification"},
    ),
    "deberta-v2": (
        "DebertaV2Config",
        dict(
            _BERT_LIKE,
            max_position_embeddings=64,
            relative_attention=True,
            pos_att_type=["p2c", "c2p"],
            position_buckets=16,
            max_relative_positions=32,
            type_vocab_size=0,
            pad_token_id=0,
        ),
        {"seq-cls": "DebertaV2ForSequenceClassification", "token-cls": "DebertaV2ForTokenClassification"},
    ),
    "vit": (
        "ViTConfig",
        dict(_BERT_LIKE, image_size=32, patch_size=8, num_channels=3),
        {"image-cls": "ViTForImageClassification"},
    ),
    "swin": (
        "SwinConfig",
        dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4),
        {"image-cls": "SwinForImageClassification"},
    ),
    "segformer": (
        "SegformerConfig",
        dict(
            num_encoder_blocks=2,
            depths=[1, 1],
            sr_ratios=[2, 1],
            hidden_sizes=[16, 32],
            num_attention_heads=[1, 2],
            decoder_hidden_size=32,
            image_size=32,
        ),
        {"semantic-segmentation": "SegformerForSemanticSegmentation"},
    ),
    "blip2": (
        "Blip2Config",
        dict(
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=32,
                patch_size=8,
            ),
            qformer_config=dict(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                encoder_hidden_size=32,
                vocab_size=128,
            ),
            text_config=dict(
                model_type="opt",
                vocab_size=128,
                hidden_size=64,
                num_hidden_layers=2,
                ffn_dim=128,
                num_attention_heads=4,
                max_position_embeddings=64,
                word_embed_proj_dim=64,
                pad_token_id=1,
            ),
            num_query_tokens=2,
            image_token_index=127,  # the last id: _batch puts num_query_tokens of them after the left padding
        ),
        {"image-to-text": "Blip2ForConditionalGeneration"},
    ),
    "stable_diffusion": ("diffusers.UNet2DConditionModel", {}, {"text-to-image": "diffusers.UNet2DConditionModel"}),
}
#: HF PEFT's LoRA targets where it has no default for the model type (vision models, as its image guides set them).
_LORA_TARGETS = {
    "vit": ["query", "value"],
    "swin": ["query", "value"],
    "segformer": ["query", "value"],
    "stable_diffusion": ["to_q", "to_k", "to_v", "to_out.0"],  # HF PEFT's Stable Diffusion recipe
    "chatglm": ["q_proj", "v_proj"],  # HF PEFT's ``chatglm`` default (query_key_value) names ChatGLM's fused layer
}
#: IA3 (targets, feed-forward modules) where HF PEFT has no default for the model type.
_IA3_TARGETS = {"chatglm": (["q_proj", "v_proj", "down_proj"], ["down_proj"])}
_TASK_TYPES = {"causal-lm": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM", "seq-cls": "SEQ_CLS", "token-cls": "TOKEN_CLS"}
_NUM_LABELS = 3
#: ``modules_to_save`` of the tasks without an HF PEFT task type (their heads).
_HEADS = {"image-cls": ["classifier"], "semantic-segmentation": ["decode_head"], "image-to-text": None}


@dataclass(frozen=True)
class Cell:
    """One model × task × method cell of HF PEFT's table."""

    section: str
    task: str
    model: str  # HF PEFT's label
    family: str
    method: str

    @property
    def key(self) -> str:
        """``task/family/method`` (lower case, ``-`` for spaces): what ``--only`` matches."""
        return f"{self.task}/{self.family}/{self.method.lower().replace(' ', '-')}"


@dataclass
class CellResult:
    """``status``: ``pass``, ``fail`` or ``noref`` (HF PEFT cannot build it; peftc's own checks passed)."""

    cell: Cell
    status: str
    reason: str = ""
    checks: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


class _CheckFailed(Exception):
    """A check's own verdict (not an exception from the code under test)."""


class _TimeLimit(BaseException):
    """The cell's time is up (a BaseException, so no ``except Exception`` in the code under test swallows it)."""


def cells() -> list[Cell]:
    """Every cell of :data:`TABLES`, in table order."""
    return [
        Cell(section, task, label, family, method)
        for section, task, rows in TABLES
        for label, family, methods in rows
        for method in methods
    ]


def first_line(e: BaseException) -> str:
    """``Type: first line of the message`` (what a cell's reason shows)."""
    text = str(e).strip()
    line = text.splitlines()[0].strip() if text else ""
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


# -- models and inputs --------------------------------------------------------------------------


def build_model(family: str, task: str) -> torch.nn.Module:
    """A fresh, seeded tiny model of ``family`` for ``task`` (same weights on every call)."""
    import transformers

    from peftc.heads import needs_token_classification_head, token_classification_class

    cfg_cls, kwargs, classes = FAMILIES[family]
    cls_name = classes.get(task)
    if cls_name is None and task == "token-cls" and needs_token_classification_head(getattr(transformers, cfg_cls)()):
        # transformers has none (OPT, GPT-J): peftc's own head (peftc.heads), which HF PEFT wraps like any module
        torch.manual_seed(0)
        cfg = getattr(transformers, cfg_cls)(**kwargs, num_labels=_NUM_LABELS)
        return token_classification_class(cfg)(cfg).eval()
    if cls_name is None:
        raise _CheckFailed(f"transformers {transformers.__version__} has no {task} model class for {family}")
    if cls_name.startswith("diffusers."):
        from peftc.diffusion import MissingExtraError, tiny_unet

        try:
            return tiny_unet()
        except MissingExtraError as e:
            raise _CheckFailed("needs diffusers (not installed): pip install 'peftc[diffusion]'") from e
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**kwargs)
    if task in ("seq-cls", "token-cls", "image-cls"):
        cfg.num_labels = _NUM_LABELS
    return getattr(transformers, cls_name)(cfg).eval()


def _batch(names: list[str], config: Any, padding: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """Inputs by name: ``BATCH`` rows of ``SEQ`` tokens, rows 0 and 2 padded by ``PAD`` on ``padding``'s side."""
    gen = torch.Generator().manual_seed(seed)
    vocab = int(getattr(config, "vocab_size", 128) or 128)
    ids = torch.randint(3, vocab, (BATCH, SEQ), generator=gen)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    if padding in ("left", "right"):
        pads = slice(0, PAD) if padding == "left" else slice(SEQ - PAD, SEQ)
        pad_id = getattr(config, "pad_token_id", None) or 0
        for row in (0, 2):
            ids[row, pads], mask[row, pads] = pad_id, 0
    image = getattr(config, "image_token_id", None)
    if image is not None:  # image-to-text: the query embeddings' tokens after the left padding, none elsewhere
        ids[ids == image] = image - 1
        ids[:, PAD : PAD + int(config.num_query_tokens)] = image
    out: dict[str, torch.Tensor] = {}
    for name in names:
        if name == "input_ids":
            out[name] = ids
        elif name == "attention_mask":
            out[name] = mask
        elif name == "position_ids":
            out[name] = (mask.cumsum(-1) - 1).clamp(min=0)
        elif name == "decoder_input_ids":
            out[name] = torch.randint(3, vocab, (BATCH, 4), generator=gen)
            out[name][:, 0] = int(getattr(config, "decoder_start_token_id", None) or 0)
        elif name == "sample":  # a diffusion UNet: latents, a scalar timestep, prompt embeddings
            out[name] = torch.randn(BATCH, config.in_channels, config.sample_size, config.sample_size, generator=gen)
        elif name == "timestep":
            out[name] = torch.tensor(321.0)
        elif name == "encoder_hidden_states":
            out[name] = torch.randn(BATCH, SEQ, config.cross_attention_dim, generator=gen)
        elif name == "pixel_values":
            size = int(getattr(config, "image_size", 32))
            out[name] = torch.randn(BATCH, int(getattr(config, "num_channels", 3)), size, size, generator=gen)
        else:
            out[name] = torch.zeros_like(ids)
    return out


def _labels(task: Any, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Fixed random labels shaped for ``task``'s loss (-100 on padding for per-position tasks)."""
    gen = torch.Generator().manual_seed(7)
    classes = logits.shape[1] if logits.dim() == 4 else logits.shape[-1]
    if task.name == "text-to-image":  # the noise a UNet predicts
        return torch.randn(logits.shape, generator=gen)
    if task.name in ("causal-lm", "image-to-text"):
        return batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    if "decoder_input_ids" in batch:  # seq2seq: one label per decoder position (all real)
        return torch.randint(0, classes, logits.shape[:2], generator=gen)
    if task.per_token:
        labels = torch.randint(0, classes, batch["input_ids"].shape, generator=gen)
        return labels.masked_fill(batch["attention_mask"] == 0, -100)
    if logits.dim() == 4:  # [batch, classes, h, w] segmentation maps
        return torch.randint(0, classes, (logits.shape[0], *logits.shape[2:]), generator=gen)
    return torch.randint(0, classes, (logits.shape[0],), generator=gen)


def _rows(task: Any, batch: dict[str, torch.Tensor], logits: torch.Tensor) -> torch.Tensor | None:
    """Which logits to compare: real positions (plus virtual-token rows in front), or all (``None``)."""
    mask = batch.get("attention_mask")
    if mask is None or logits.dim() != 3 or not (task.name == "causal-lm" or task.per_token):
        return None
    rows = mask.bool()
    if logits.shape[1] < rows.shape[1]:  # seq2seq: decoder positions, all real
        return None
    if logits.shape[1] > rows.shape[1]:
        extra = logits.shape[1] - rows.shape[1]
        rows = torch.cat([torch.ones(rows.shape[0], extra, dtype=torch.bool), rows], dim=1)
    return rows


def _max_diff(task: Any, batch: dict[str, torch.Tensor], ours: torch.Tensor, theirs: torch.Tensor) -> float:
    if ours.shape != theirs.shape:
        raise _CheckFailed(f"logits shape {tuple(ours.shape)} != HF PEFT's {tuple(theirs.shape)}")
    rows = _rows(task, batch, ours)
    diff = (ours - theirs).abs()
    return float((diff[rows] if rows is not None else diff).max())


def _hf_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(**batch)
        return out.logits if hasattr(out, "logits") else out.sample  # a diffusers UNet predicts ``sample``


# -- HF PEFT side -------------------------------------------------------------------------------


def hf_config(cell: Cell) -> Any:
    """The HF PEFT config of ``cell``: the method's defaults, a few virtual tokens, HF's default targets."""
    import peft

    kwargs: dict[str, Any] = {}
    if cell.task in _TASK_TYPES:
        kwargs["task_type"] = _TASK_TYPES[cell.task]
    elif cell.method == "LoRA":  # the head, as HF PEFT's image guides save it
        # one name per task: SegFormer's decode_head holds a ``classifier`` too, and HF PEFT would wrap both
        # (the nested copy a second, separately trained head)
        kwargs["modules_to_save"] = _HEADS.get(cell.task)
    if cell.method == "LoRA":
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=_LORA_TARGETS.get(cell.family), **kwargs)
    if cell.method == "IA3":
        targets, feedforward = _IA3_TARGETS.get(cell.family, (None, None))
        return peft.IA3Config(target_modules=targets, feedforward_modules=feedforward, **kwargs)
    if cell.method == "Prompt Tuning":
        return peft.PromptTuningConfig(num_virtual_tokens=N_VIRTUAL, **kwargs)
    if cell.method == "P-Tuning":
        return peft.PromptEncoderConfig(num_virtual_tokens=N_VIRTUAL, encoder_hidden_size=32, **kwargs)
    return peft.PrefixTuningConfig(num_virtual_tokens=N_VIRTUAL, **kwargs)


def _perturb(tensors: Any, seed: int = 3) -> None:
    """Move every tensor away from its init (LoRA B = 0, IA3 l = 1): the comparison then proves something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tensors:
            if t.is_floating_point():
                t.add_(0.1 * torch.randn(t.shape, generator=gen))


def _hf_reference(model: torch.nn.Module, cell: Cell, directory: Path) -> Any:
    """HF PEFT around a copy of ``model`` with a perturbed adapter, saved to ``directory``."""
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.get_peft_model(copy.deepcopy(model), hf_config(cell)).eval()
        _perturb(p for p in hf.parameters() if p.requires_grad)
        hf.save_pretrained(str(directory), safe_serialization=True)
    return hf


def _hf_load(model: torch.nn.Module, directory: Path) -> Any:
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(model), str(directory)).eval()


# -- the checks ---------------------------------------------------------------------------------


def _copy_program(program: Any) -> Any:
    """A copy of ``program`` whose graph is new but whose base tensors are shared (no weight copy)."""
    gm = program.graph_module
    memo = {id(t): t for t in [*gm.parameters(), *gm.buffers()]}
    memo[id(program.model_config)] = program.model_config
    return copy.deepcopy(program, memo)


def _train_step(model: torch.nn.Module, cell: Cell, state: Any, batch: dict[str, torch.Tensor]) -> str:
    from peftc.methods import get_method
    from peftc.passes import insertion_pipeline
    from peftc.program import capture

    program = capture(model, cell.task, mode="train")
    state.trainable_(True)
    insertion_pipeline(state.config, state)(program)
    hooks = get_method(state.config).hooks(state.config, state, total_steps=1)
    params = [p for p in program.parameters() if p.requires_grad]
    if not params:
        raise _CheckFailed("nothing to train")
    opt = torch.optim.AdamW(params, lr=1e-2)

    def loss_at(step_seed: int) -> torch.Tensor:
        torch.manual_seed(step_seed)  # the same dropout masks before and after the step
        logits = program.forward_batch(batch)
        return program.task.loss(logits, {**batch, "labels": _labels(program.task, logits, batch)})

    loss = loss_at(0)
    (loss + hooks.regularization()).backward()
    opt.step()
    hooks.after_step(1)
    with torch.no_grad():
        before, after = loss.item(), loss_at(0).item()
    state.trainable_(False)
    if not after < before:
        raise _CheckFailed(f"loss did not decrease ({before:.4g} -> {after:.4g})")
    return f"loss {before:.4g} → {after:.4g}"


def _onnx(saved: Path, model_dir: Path, cell: Cell, merge: bool, out: Path) -> str:
    from peftc.exporting import export

    path = export(
        saved,
        format="onnx",
        merge=merge,
        model=model_dir,
        task=cell.task,
        out=out,
        with_past=False if cell.task in ("causal-lm", "seq2seq") else None,
    )
    report = json.loads((Path(path) / "report.json").read_text())
    diffs = [
        float(v)
        for k, v in _walk(report)
        if isinstance(v, int | float) and "max" in k and "diff" in k and not isinstance(v, bool)
    ]
    return f"verified{' (merged)' if merge else ''}" + (f", max |Δ| {max(diffs):.2g}" if diffs else "")


def _walk(obj: Any, prefix: str = ""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{prefix}.{i}")
    else:
        yield prefix, obj


def check_cell(cell: Cell, workdir: str | Path | None = None) -> CellResult:
    """Run every check of ``cell``; never raises (a failure is the result's reason)."""
    start = time.monotonic()
    checks: dict[str, str] = {}
    try:
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            status, reason = _run_checks(cell, Path(tmp), checks)
    except _TimeLimit:
        status, reason = "fail", f"{checks.get('_step', 'setup')}: time limit reached"
    except _CheckFailed as e:
        status, reason = "fail", f"{checks.get('_step', 'setup')}: {e}"
    except Exception as e:  # every exception is a finding of the cell, reported in one line
        status, reason = "fail", f"{checks.get('_step', 'setup')}: {first_line(e)}"
    checks.pop("_step", None)
    return CellResult(cell, status, reason, checks, time.monotonic() - start)


class _EncoderDecoder:
    """A seq2seq export's encoder and decoder programs run as one model: tokens + decoder tokens -> logits."""

    def __init__(self, encoder: Any, decoder: Any):
        self.encoder, self.decoder = encoder, decoder
        self.task = decoder.task
        self.input_names = ["input_ids", "attention_mask", "decoder_input_ids"]

    def forward_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        states = self.encoder(batch["input_ids"], batch["attention_mask"])
        return self.decoder(batch["decoder_input_ids"], batch["attention_mask"], states)


def _bound_programs(model: torch.nn.Module, cell: Cell, state: Any) -> list[Any]:
    """The export pipeline's own capture and bind stages (one program, or a seq2seq encoder and decoder)."""
    from peftc.exporting.graphs import bind, graph_plan

    programs = [g.program for g in bind(graph_plan(cell.task, with_past=False).capture(model, state))]
    return programs[:1] if cell.task == "image-to-text" else programs  # its whole forward (the others: export)


def _as_model(programs: list[Any]) -> Any:
    return programs[0] if len(programs) == 1 else _EncoderDecoder(*programs)


def _run_checks(cell: Cell, tmp: Path, checks: dict[str, str]) -> tuple[str, str]:
    from peftc.adapters import AdapterState
    from peftc.config import config_from_dict
    from peftc.methods import get_method
    from peftc.passes import insertion_pipeline, merge_pipeline
    from peftc.program import capture
    from peftc.tasks import TASKS
    from peftc.training.options import TRAINABLE_TASKS

    if cell.task not in TASKS:
        checks["_step"] = "task"
        raise _CheckFailed(f"task not implemented (peftc has no {cell.task!r} task; tasks: {', '.join(TASKS)})")
    checks["_step"] = "build"
    model = build_model(cell.family, cell.task)
    model_dir = tmp / "base"
    model.save_pretrained(model_dir, safe_serialization=True)

    checks["_step"] = "reference"
    hf_dir = tmp / "hf-adapter"
    noref = ""
    try:
        hf = _hf_reference(model, cell, hf_dir)
    except Exception as e:  # HF PEFT cannot build this cell: peftc's own checks only
        hf, noref = None, f"no HF PEFT reference ({first_line(e)})"

    checks["_step"] = "load"
    if hf is not None:
        state = AdapterState.load(hf_dir)
        programs = _bound_programs(model, cell, state)
        program = _as_model(programs)
        diffs = []
        for padding in ("right", "left"):
            batch = _batch(program.input_names, model.config, padding)
            with torch.no_grad():
                ours = program.forward_batch(batch)
            base = _hf_logits(model, batch)
            if ours.shape == base.shape and float((ours - base).abs().max()) < 1e-3:
                raise _CheckFailed("the adapter does not change the logits")
            try:
                theirs = _hf_logits(hf, batch)
            except Exception as e:  # HF PEFT builds and saves the cell but cannot run it: nothing to compare with
                noref = f"no HF PEFT reference (its forward fails: {first_line(e)})"
                break
            diff = _max_diff(program.task, batch, ours, theirs)
            if diff > ATOL:
                raise _CheckFailed(f"{padding}-padded batch differs from HF PEFT by {diff:.3g}")
            diffs.append(diff)
        if noref:
            checks["load"] = "peftc binds HF PEFT's files and the adapter changes the logits"
            hf = None
        else:
            checks["load"] = f"max |Δ| vs HF PEFT {max(diffs):.2g} (right- and left-padded)"
            if type(model).__module__ == "peftc.heads":  # the reference runs on peftc's head, not a transformers class
                checks["load"] += f", HF PEFT on peftc's {type(model).__name__} (transformers has none)"
    else:
        data = json.loads(json.dumps(hf_config(cell).to_dict(), default=lambda v: sorted(v)))
        config = config_from_dict(data)
        program = capture(model, cell.task, mode="eval")
        torch.manual_seed(0)
        insertion_pipeline(config)(program)
        programs, state = [program], program.adapter
        _perturb(state.tensors.values())
        checks["load"] = "fresh peftc adapter (no HF PEFT files to load)"

    failures: list[str] = []

    def attempt(name: str, check: Any) -> None:
        checks["_step"] = name
        try:
            checks[name] = check()
        except _CheckFailed as e:
            checks[name] = f"❌ {e}"
            failures.append(f"{name}: {e}")
        except Exception as e:  # a failing check does not stop the others
            checks[name] = f"❌ {first_line(e)}"
            failures.append(f"{name}: {first_line(e)}")

    def train() -> str:
        if cell.task not in TRAINABLE_TASKS:
            raise _CheckFailed(f"peftc train does not take task {cell.task!r} (it trains {', '.join(TRAINABLE_TASKS)})")
        return _train_step(model, cell, state, _batch(program.input_names, model.config, "left", seed=2))

    attempt("train", train)

    saved = tmp / "peftc-adapter"

    def save() -> str:
        state.save(saved)
        if hf is None:
            AdapterState.load(saved)
            return "saved and read back (no HF PEFT reference to load it into)"
        reloaded = _hf_load(model, saved)
        batch = _batch(program.input_names, model.config, "left")
        with torch.no_grad():
            ours = program.forward_batch(batch)
        diff = _max_diff(program.task, batch, ours, _hf_logits(reloaded, batch))
        if diff > ATOL:
            raise _CheckFailed(f"HF PEFT loads peftc's adapter with logits {diff:.3g} away")
        trained = "train" in checks and not checks["train"].startswith("❌")
        if trained and _max_diff(program.task, batch, ours, _hf_logits(hf, batch)) <= 0:
            raise _CheckFailed("the saved adapter is the untrained one (training did not reach the saved tensors)")
        return f"HF PEFT loads the {'trained ' if trained else ''}adapter, max |Δ| {diff:.2g}"

    attempt("save", save)
    method = get_method(state.config)

    def merge() -> str:
        if method.merge_pass is None:
            return "— (does not merge)"
        merged = [_copy_program(p) for p in programs]
        for p in merged:
            merge_pipeline()(p)
        batch = _batch(program.input_names, model.config, "left")
        with torch.no_grad():
            diff = float((_as_model(merged).forward_batch(batch) - program.forward_batch(batch)).abs().max())
        if diff > ATOL:
            raise _CheckFailed(f"merged differs from unmerged by {diff:.3g}")
        return f"max |Δ| {diff:.2g}"

    attempt("merge", merge)
    if saved.is_dir():
        attempt("onnx", lambda: _onnx(saved, model_dir, cell, method.merge_pass is not None, tmp / "onnx"))
    if failures:
        return "fail", failures[0]
    return ("noref", noref) if hf is None else ("pass", "")


# -- running and reporting ----------------------------------------------------------------------


def _alarm(signum: int, frame: Any) -> None:
    raise _TimeLimit


def _worker(cell: Cell, timeout: int, workdir: str | None) -> CellResult:
    torch.set_num_threads(1)
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        return check_cell(cell, workdir)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run_cells(
    selected: list[Cell], jobs: int = 1, timeout: int = 600, workdir: str | None = None, log: Any = None
) -> list[CellResult]:
    """Check ``selected`` in ``jobs`` worker processes; results in the order of ``selected``."""
    results: dict[Cell, CellResult] = {}
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(_worker, c, timeout, workdir): c for c in selected}
        for future in futures:
            cell = futures[future]
            try:
                result = future.result()
            except Exception as e:  # the worker died (a crash in native code): that cell fails, not the run
                result = CellResult(cell, "fail", f"worker: {first_line(e)}")
            results[cell] = result
            if log is not None:
                mark = {"pass": "ok", "fail": "FAIL", "noref": "noref"}[result.status]
                print(f"{mark:5} {cell.key} ({result.seconds:.0f} s) {result.reason}", file=log, flush=True)
    return [results[c] for c in selected]


_MARK = {"pass": "✅", "fail": "❌", "noref": "⚪"}


def _local(text: str) -> str:
    """Reasons without this machine's folders: ``…/site-packages/transformers/x.py`` → ``transformers/x.py``."""
    text = re.sub(r"/\S*/site-packages/", "", text)
    return text.replace(str(Path(__file__).resolve().parents[1]) + "/", "")


def _versions() -> str:
    import onnxruntime
    import peft
    import transformers

    import peftc

    return (
        f"peftc {peftc.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}, onnxruntime {onnxruntime.__version__}"
    )


def runner_digest() -> str:
    """sha256 of this module's source: ``docs/support.md`` records it, and a test fails when the cells change
    (this file is edited) but the matrix was not generated again."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def recorded_digest(markdown: str) -> str | None:
    """The runner digest a generated ``docs/support.md`` records, or None (an older file)."""
    found = re.search(r"<!-- runner sha256: ([0-9a-f]{64}) -->", markdown)
    return found.group(1) if found else None


def render(results: list[CellResult], command: str, when: datetime | None = None) -> str:
    """The Markdown of ``docs/support.md`` for ``results``."""
    when = when or datetime.now(timezone.utc)
    counts = {s: sum(r.status == s for r in results) for s in _MARK}
    by_cell = {(r.cell.task, r.cell.family, r.cell.method): r for r in results}
    lines = [
        "# Support matrix",
        "",
        f"<!-- Generated by `{command}`; never edit by hand: rerun the command. -->",
        f"<!-- runner sha256: {runner_digest()} -->",
        "",
        f"Generated {when:%Y-%m-%d %H:%M} UTC by `{command}` with {_versions()}.",
        "",
        f"Cells: {SOURCE}. Each cell is a tiny model of the family built from its transformers config (2 layers,",
        "hidden 64, seeded, nothing downloaded) with an HF PEFT adapter moved away from its no-op init; peftc loads",
        "HF PEFT's files and must match its logits on right- and left-padded batches (atol 1e-4), one training",
        "step must lower the loss on a fixed batch, HF PEFT must load the adapter peftc saves with the same logits,",
        "the merged graph must equal the unmerged one (methods that merge), and the ONNX export must pass its",
        "verification. ✅ every check passed · ❌ a check failed (reason below) · ⚪ HF PEFT cannot build the cell",
        "(reason below; peftc's own checks passed) · blank: not in HF PEFT's table.",
        "",
        f"**{len(results)} cells: {counts['pass']} ✅, {counts['fail']} ❌, {counts['noref']} ⚪.**",
        "",
    ]
    for section, task, rows in TABLES:
        present = [(label, fam, ms) for label, fam, ms in rows if any((task, fam, m) in by_cell for m in ms)]
        if not present:
            continue
        lines += [f"## {section} (`{task}`)", "", "| Model | " + " | ".join(METHODS) + " |"]
        lines.append("|---" * (len(METHODS) + 1) + "|")
        notes = []
        for label, fam, _methods in present:
            marks = []
            for m in METHODS:
                r = by_cell.get((task, fam, m))
                marks.append(_MARK[r.status] if r else "")
                if r is not None:
                    checks = " · ".join(f"{k}: {v}" for k, v in r.checks.items())
                    shown = r.reason and r.reason.split(": ", 1)[-1] in checks
                    text = _local("; ".join(t for t in ("" if shown else r.reason, checks) if t))
                    notes.append(f"- {label} × {m}: {_MARK[r.status]} {text} ({r.seconds:.0f} s)")
            lines.append(f"| {label} | " + " | ".join(marks) + " |")
        lines += ["", *notes, ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peftc.support", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="Markdown file to write (e.g. docs/support.md); default: stdout")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        help="check only cells whose TASK/FAMILY/METHOD key matches this glob (repeatable), "
        "e.g. 'causal-lm/opt/*' or '*/prompt-tuning'",
    )
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell (default 600)")
    parser.add_argument("--list", action="store_true", help="print the cell keys and exit")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    selected = [c for c in cells() if not args.only or any(fnmatch.fnmatch(c.key, p) for p in args.only)]
    if args.list:
        print("\n".join(c.key for c in selected))
        return 0
    if not selected:
        print(f"error: --only {' '.join(args.only)} matched no cell (see --list)", file=sys.stderr)
        return 2
    command = "python -m peftc.support" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    results = run_cells(selected, jobs=args.jobs, timeout=args.timeout, log=sys.stderr)
    text = render(results, command)
    if args.out:
        from peftc.files import write_atomic

        write_atomic(args.out, text)
    else:
        sys.stdout.write(text)
    if args.json:
        from peftc.files import write_atomic

        write_atomic(args.json, json.dumps([{**asdict(r), "cell": asdict(r.cell)} for r in results], indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        traceback.print_exc(limit=0)
        sys.exit(130)
