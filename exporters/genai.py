"""onnxruntime-genai's ``genai_config.json`` for a KV-cache ``model.onnx``: ``og.Model(artifact_dir)`` generates.

onnxruntime-genai (``pip install onnxruntime-genai``) runs the generation loop — cache bookkeeping,
search, sampling — around a decoder ONNX file that a ``genai_config.json`` beside it describes: its
input and output names, the cache geometry (layers, key/value heads, head size), the context
length, the special token ids, and the search defaults. peftc's KV-cache graphs
(:mod:`peftc.exporting.kv`) have the layout of its generic decoder, ``"type": "decoder"``: one
past and one present tensor per layer and kind, ``[batch, kv_heads, past_sequence, head_size]``,
named ``past_key_values.%d.key|value`` / ``present.%d.key|value``, and a present that is the past
followed by the new tokens (so ``past_present_share_buffer`` is off). The architecture-named types
are not the same: ``"gpt2"`` selects a runtime that expects one stacked ``past_%d`` per layer and
fails to load such a file ("Model input was not found").

The search defaults come from the artifact's ``generation_config.json`` (written before this file);
``max_length`` is capped at the context length; ``eos_token_id`` is a list of the end ids inside the
vocabulary (the runtime refuses others; an id outside it is never generated).

Swappable exports need nothing more here: the runtime loads each ``adapters/<name>.onnx_adapter`` with
``og.Adapters(model).load(file, name)`` and ``generator.set_active_adapter(adapters, name)``
activates one (``manifest.json`` lists each adapter's ``name`` and ``file``); none active is the base.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peftc.program import Program, is_with_past

__all__ = ["DECODER_TYPE", "GENAI_CONFIG_FILE", "GenaiConfig", "genai_config"]

GENAI_CONFIG_FILE = "genai_config.json"
#: onnxruntime-genai's generic decoder-only model type: any names, any layout of separate key/value caches.
DECODER_TYPE = "decoder"
#: Search options onnxruntime-genai reads, with their defaults when ``generation_config.json`` says nothing.
_SEARCH_DEFAULTS: dict[str, Any] = {
    "diversity_penalty": 0.0,
    "do_sample": False,
    "early_stopping": True,
    "length_penalty": 1.0,
    "max_length": 20,
    "min_length": 0,
    "no_repeat_ngram_size": 0,
    "num_beams": 1,
    "num_return_sequences": 1,
    "repetition_penalty": 1.0,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
}


def genai_config(program: Program, model_file: str, generation: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``genai_config.json`` of a KV-cache ``program`` written to ``model_file``.

    Args:
        program: a with-past causal-LM program (:func:`~peftc.program.is_with_past`).
        model_file: the ONNX file's name in the artifact (``model.onnx``).
        generation: the model's generation config as ``generation_config.json`` holds it (search defaults,
            token ids); ``None``: transformers' defaults.

    Raises:
        ValueError: ``program`` takes no KV cache.
    """
    if not is_with_past(program):
        raise ValueError("onnxruntime-genai generates with a KV-cache graph; this program takes no past")
    config = program.model_config
    text = getattr(config, "text_config", None) or config
    generation = generation or {}
    heads = int(getattr(text, "num_attention_heads", None) or text.n_head)
    hidden = int(getattr(text, "hidden_size", None) or text.n_embd)
    layers = sum(name.endswith(".key") for name in program.input_names if name.startswith("past_key_values."))
    past = program.input_names.index("past_key_values.0.key")
    kv_heads, head_size = (int(s) for s in program.example_inputs[past].shape[1:4:2])
    context = int(program.max_positions() or generation.get("max_length") or _SEARCH_DEFAULTS["max_length"])

    def token(name: str) -> Any:
        value = generation.get(name, getattr(text, name, None))
        return value if value is not None else getattr(config, name, None)

    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if "position_ids" in program.input_names:
        inputs["position_ids"] = "position_ids"
    inputs.update(past_key_names="past_key_values.%d.key", past_value_names="past_key_values.%d.value")
    search = {k: generation.get(k, v) if generation.get(k) is not None else v for k, v in _SEARCH_DEFAULTS.items()}
    search["max_length"] = min(int(search["max_length"]), context)
    search["past_present_share_buffer"] = False  # the graph concatenates: present = past + new tokens
    vocab = int(text.vocab_size)
    eos = token("eos_token_id")
    # The runtime refuses an end id outside the vocabulary; such an id is never generated, so dropping
    # it changes nothing (HF's generate runs to max_length just the same).
    eos = [int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None and 0 <= int(i) < vocab]
    pad = token("pad_token_id")
    pad = int(pad) if pad is not None else (eos[0] if eos else 0)
    bos = token("bos_token_id")
    return {
        "model": {
            "bos_token_id": int(bos) if bos is not None else pad,  # a number is required; appended ids carry theirs
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": model_file,
                "head_size": head_size,
                "hidden_size": hidden,
                "inputs": inputs,
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": heads,
                "num_hidden_layers": layers,
                "num_key_value_heads": kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": DECODER_TYPE,
            "vocab_size": vocab,
        },
        "search": search,
    }


class GenaiConfig:
    """Writes ``genai_config.json`` beside a KV-cache ONNX file (the ONNX exporter's ``runtime_config``)."""

    file = GENAI_CONFIG_FILE

    def write(self, directory: Path, model_file: str, program: Program) -> Path:
        """``directory/genai_config.json`` for ``program`` in ``model_file`` (reads ``generation_config.json``)."""
        generation_file = directory / "generation_config.json"
        generation = json.loads(generation_file.read_text()) if generation_file.is_file() else None
        path = directory / self.file
        path.write_text(json.dumps(genai_config(program, model_file, generation), indent=2) + "\n")
        return path
