"""onnxruntime-genai: ``og.Model(artifact_dir)`` generates what HF PEFT generates, swaps adapters as HF PEFT does.

The config tests run without onnxruntime-genai; the runtime tests skip without it
(``pip install 'peftc[genai]'``). References are HF PEFT's own models on the saved adapters (greedy
``generate``, or one forward pass), never peftc. Token ids are fed directly
(``generator.append_tokens``): the runtime's tokenizer is not peftc's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_gpt2
from peftc.exporters import GENAI_CONFIG_FILE, genai_config, get_exporter
from test_with_past import FACTORIES, _export, _hf_peft, plain_export

from peftc.exporting.kv import cache_geometry, with_past
from peftc.program import capture, past_names

ATOL = 1e-4
NEW_TOKENS = 10
PROMPT = [5, 17, 33, 9, 60, 77, 41]
_SKIP = "onnxruntime-genai is not installed (pip install 'peftc[genai]')"


# -- the config (no runtime needed) ---------------------------------------------------------------
def test_kv_cache_export_writes_genai_config_from_the_model_and_its_generation_config(export_cases):
    from peftc.exporters.manifest import check_manifest

    out = _export(export_cases, "llama", "lora")
    config = json.loads((out / GENAI_CONFIG_FILE).read_text())
    model, decoder = config["model"], config["model"]["decoder"]
    layers, kv_heads, head_dim = cache_geometry(FACTORIES["llama"]().config)
    assert model["type"] == "decoder"  # the generic decoder: "gpt2"/"llama" expect other layouts or ops
    assert decoder["filename"] == "model.onnx"
    assert (decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"]) == (2, 2, 16)
    assert (layers, kv_heads, head_dim) == (2, 2, 16)
    assert (decoder["num_attention_heads"], decoder["hidden_size"]) == (4, 64)  # grouped-query: 4 heads, 2 kv heads
    assert (model["vocab_size"], model["context_length"]) == (128, 128)
    assert (model["bos_token_id"], model["eos_token_id"], model["pad_token_id"]) == (1, [2], 0)
    manifest = json.loads((out / "manifest.json").read_text())
    inputs = [i["name"] for i in manifest["inputs"]]
    outputs = [o["name"] for o in manifest["outputs"]]
    named = decoder["inputs"]
    assert [named["input_ids"], named["attention_mask"], named["position_ids"]] == inputs[:3]
    assert [named["past_key_names"] % 1, named["past_value_names"] % 1] == inputs[5:7] == past_names(2)[2:]
    assert decoder["outputs"]["logits"] == outputs[0]
    assert [decoder["outputs"]["present_key_names"] % 0, decoder["outputs"]["present_value_names"] % 0] == outputs[1:3]
    generation = json.loads((out / "generation_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is False  # the graph concatenates past and new
    assert config["search"]["max_length"] == generation.get("max_length", 20)
    assert config["search"]["do_sample"] is False and config["search"]["num_beams"] == 1
    assert manifest["runtime_config"] == GENAI_CONFIG_FILE and check_manifest(out) == []  # listed and hashed


def test_genai_config_takes_search_defaults_and_drops_ids_outside_the_vocabulary():
    program = capture(tiny_gpt2(), "causal-lm", mode="eval", transform=with_past())
    generation = {
        "do_sample": True,
        "top_k": 7,
        "top_p": 0.9,
        "temperature": 0.7,
        "max_length": 4096,
        "eos_token_id": 9,
    }
    config = genai_config(program, "model.onnx", generation)
    search = config["search"]
    assert (search["do_sample"], search["top_k"], search["top_p"], search["temperature"]) == (True, 7, 0.9, 0.7)
    assert search["max_length"] == config["model"]["context_length"] == 64  # capped at n_positions
    assert config["model"]["eos_token_id"] == [9]
    assert "position_ids" in config["model"]["decoder"]["inputs"]
    default = genai_config(program, "model.onnx")
    assert default["model"]["eos_token_id"] == []  # GPT-2's 50256 is outside the tiny vocabulary of 128
    assert default["model"]["pad_token_id"] == 0 and default["search"]["max_length"] == 20


def test_no_genai_config_without_a_cache(export_cases):
    with pytest.raises(ValueError, match="takes no past"):
        genai_config(capture(tiny_gpt2(), "causal-lm", mode="eval"), "model.onnx")
    out = plain_export(export_cases)  # test_with_past's
    assert not (out / GENAI_CONFIG_FILE).exists() and "runtime_config" not in json.loads(
        (out / "manifest.json").read_text()
    )
    assert get_exporter("onnx").runtime_config.file == GENAI_CONFIG_FILE
    assert get_exporter("torchscript").runtime_config is None and get_exporter("aoti").runtime_config is None


# -- the runtime ----------------------------------------------------------------------------------
def _og_generate(og, out, max_length: int) -> list[int]:
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(PROMPT)
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)]


@pytest.mark.parametrize(
    ("family", "method", "merge"),
    [
        pytest.param("gpt2", "lora", True, id="gpt2-lora-merged"),
        pytest.param("llama", "lora", False, id="llama-gqa-lora"),
        pytest.param("llama", "prefix-tuning", False, id="llama-gqa-prefix-tuning"),  # a constant cache prefix
    ],
)
def test_genai_generates_the_tokens_hf_peft_generates(export_cases, family, method, merge):
    og = pytest.importorskip("onnxruntime_genai", reason=_SKIP)
    out = _export(export_cases, family, method, merge)
    _, peft_model = _hf_peft(export_cases, family, method)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        want = peft_model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )[0].tolist()  # one sequence: stops at an end id, as the runtime does
        adapted_logits = peft_model(input_ids=ids).logits
        base_logits = FACTORIES[family]()(input_ids=ids).logits
    assert (adapted_logits - base_logits).abs().max() > 1e-3  # the adapter matters
    assert _og_generate(og, out, len(PROMPT) + NEW_TOKENS) == want


def _swappable_with_past(export_cases):
    """The GPT-2 LoRA of test_with_past and a rank-8 one, exported swappable with a KV cache (once per session)."""

    def make():
        import peft

        from peftc.exporting import export

        root, _ = _hf_peft(export_cases, "gpt2", "lora")
        other = root / "adapter-genai-r8"
        torch.manual_seed(12)
        model = peft.get_peft_model(
            tiny_gpt2(), peft.LoraConfig(r=8, lora_alpha=4, task_type="CAUSAL_LM", init_lora_weights=False)
        )
        model.save_pretrained(other)
        out = export([root / "adapter", other], model=str(root / "base"), adapters_as_inputs=True, out=root / "genai-s")
        return out, root, [root / "adapter", other]

    return export_cases.memo(("genai-swappable",), make)


def test_genai_swaps_adapters_as_hf_peft_does(export_cases):
    og = pytest.importorskip("onnxruntime_genai", reason=_SKIP)
    from peft import PeftModel

    out, root, adapter_dirs = _swappable_with_past(export_cases)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["runtime_config"] == GENAI_CONFIG_FILE
    model = og.Model(str(out))
    adapters = og.Adapters(model)
    for entry in manifest["adapters"]:  # what the README tells a user to do
        adapters.load(str(out / entry["file"]), entry["name"])

    step = 88  # one cached decode step after the prompt
    ids = torch.tensor([[*PROMPT, step]])

    def hf_logits(module) -> np.ndarray:
        with torch.no_grad():
            return module(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].numpy()

    def og_logits(name: str | None) -> np.ndarray:
        generator = og.Generator(model, og.GeneratorParams(model))
        if name is not None:
            generator.set_active_adapter(adapters, name)
        generator.append_tokens(PROMPT)
        prefill = np.asarray(generator.get_output("logits"))[0]
        generator.append_tokens([step])
        decode = np.asarray(generator.get_output("logits"))[0]
        return np.concatenate([prefill.reshape(-1, prefill.shape[-1]), decode.reshape(-1, decode.shape[-1])])

    base = hf_logits(FACTORIES["gpt2"]().eval())
    np.testing.assert_allclose(og_logits(None), base, atol=ATOL, rtol=0)
    base_model = FACTORIES["gpt2"]()
    for entry, adapter_dir in zip(manifest["adapters"] * 2, adapter_dirs * 2, strict=True):  # alternate: one model
        want = hf_logits(PeftModel.from_pretrained(base_model, adapter_dir).eval())
        base_model = FACTORIES["gpt2"]()
        assert np.abs(want - base).max() > 1e-2  # not the identity
        np.testing.assert_allclose(og_logits(entry["name"]), want, atol=ATOL, rtol=0)
