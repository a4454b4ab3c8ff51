"""A tiny BLIP-2 (OPT language model) with a locally built tokenizer and processor, saved as a model directory."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["a", "red", "green", "blue", "square", "circle", "on", "the", "white", "black", "small", "big", "photo", "of"]
NUM_QUERY_TOKENS = 4
IMAGE_SIZE = 32


def tiny_tokenizer():
    """A word-level OPT-like tokenizer: ``<pad>`` 1, ``</s>`` 2 (start and end), ``<unk>`` 3; ``<s>`` prefixed."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3} | {w: 4 + i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>", bos_token="</s>",
        padding_side="right",
    )  # fmt: skip


def tiny_blip2(seed: int = 0):
    """``(model, processor)``: vision 2 layers hidden 32 at 32x32 pixels, Q-Former 2 layers, OPT 2 layers, 4 queries."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor, OPTConfig

    tok = tiny_tokenizer()
    processor = Blip2Processor(
        BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}), tok, num_query_tokens=NUM_QUERY_TOKENS
    )  # adds <image> as the last token
    image_id = tok.convert_tokens_to_ids("<image>")
    text = OPTConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=32, bos_token_id=2, eos_token_id=2, pad_token_id=1,
    )  # fmt: skip
    cfg = Blip2Config(
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=IMAGE_SIZE, patch_size=8,
        ),
        qformer_config=dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            encoder_hidden_size=32, vocab_size=len(tok),
        ),
        text_config=text.to_dict(),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=image_id,
    )  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Blip2ForConditionalGeneration(cfg).eval()
    return model, processor


def save_tiny_blip2(directory: Path) -> Path:
    model, processor = tiny_blip2()
    model.save_pretrained(directory, safe_serialization=True)
    processor.save_pretrained(directory)
    return directory


def write_images(directory: Path, captions: list[str]) -> Path:
    """Solid-colour PNGs with a shape, one per caption, and ``data.jsonl`` pointing at them (relative paths)."""
    import json

    from PIL import Image, ImageDraw

    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "images").mkdir(exist_ok=True)
    lines = []
    for i, caption in enumerate(captions):
        colour = next((c for w, c in colours.items() if w in caption), (128, 128, 128))
        im = Image.new("RGB", (40, 40), (255, 255, 255))
        draw = ImageDraw.Draw(im)
        (draw.ellipse if "circle" in caption else draw.rectangle)((8, 8, 32, 32), fill=colour)
        im.save(directory / "images" / f"{i}.png")
        lines.append(json.dumps({"image": f"images/{i}.png", "text": caption}))
    (directory / "data.jsonl").write_text("\n".join(lines) + "\n")
    return directory / "data.jsonl"
