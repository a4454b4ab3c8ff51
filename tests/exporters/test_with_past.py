"""KV-cache ("with past") export: optimum's ORTModelForCausalLM generates the same tokens as HF PEFT.

The reference is HF PEFT's own ``generate()`` on the same saved adapter (greedy, left-padded
batch), never peftc; the artifact is loaded by optimum with no peftc code in the loop.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from onnx_export_cases import save_tokenizer

from peftc.errors import ConfigError
from peftc.exporting.kv import cache_geometry, with_past
from peftc.program import capture, past_names, present_names

NEW_TOKENS = 8
FACTORIES = {"gpt2": tiny_gpt2, "llama": tiny_llama}


def _prompt_batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 128, (3, 6), generator=gen)
    mask = torch.ones(3, 6, dtype=torch.long)
    ids[0, :2], mask[0, :2] = 0, 0  # left-padded row
    ids[2, :1], mask[2, :1] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


def _peft_config(method: str):
    import peft

    if method == "lora":
        return peft.LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", init_lora_weights=False)
    if method == "adalora":
        return peft.AdaLoraConfig(init_r=6, target_r=4, total_step=10, task_type="CAUSAL_LM")
    if method == "ia3":
        return peft.IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False)
    if method == "prompt-tuning":
        return peft.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
    if method == "p-tuning":
        return peft.PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=32, task_type="CAUSAL_LM")
    if method == "adaption-prompt":
        return peft.AdaptionPromptConfig(adapter_len=4, adapter_layers=2, task_type="CAUSAL_LM")
    if method == "prefix-tuning":
        return peft.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
    if method == "prefix-projection":
        return peft.PrefixTuningConfig(
            num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=32, task_type="CAUSAL_LM"
        )
    raise ValueError(method)


def _hf_peft(export_cases, family: str, method: str):
    """A base dir and an HF PEFT adapter dir with non-identity weights, plus the PeftModel itself (once per session)."""
    return export_cases.memo(("past-hf-peft", family, method), lambda: _make_hf_peft(export_cases, family, method))


def _make_hf_peft(export_cases, family: str, method: str):
    import peft

    root = export_cases.scratch(f"past-{family}-{method}")
    factory = FACTORIES[family]
    factory().save_pretrained(root / "base", safe_serialization=True)
    save_tokenizer(root / "base")
    torch.manual_seed(11)
    model = peft.get_peft_model(factory(), _peft_config(method)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(k in name for k in ("prompt_encoder", "ia3_l", "adaption_", "lora_E")):  # E, gates: zero at init
                param.add_(torch.randn_like(param))  # away from HF's init (IA3 ones, small prompts)
    model.save_pretrained(root / "adapter")
    return root, model


def _generate(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens and the logits of every step (``[steps, batch, vocab]``)."""
    out = model.generate(
        **batch,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences[:, -NEW_TOKENS:], torch.stack([s.float() for s in out.logits])


def _export(export_cases, family: str, method: str, merge: bool = False):
    def make():
        from peftc.exporting import export

        root, _ = _hf_peft(export_cases, family, method)
        return export(root / "adapter", model=str(root / "base"), merge=merge, out=root / f"onnx-{merge}")

    return export_cases.memo(("past-export", family, method, merge), make)


def plain_export(export_cases) -> Path:
    """The GPT-2 LoRA adapter exported with ``with_past=False`` (the plain graph), once per session."""

    def make():
        from peftc.exporting import export

        root, _ = _hf_peft(export_cases, "gpt2", "lora")
        return export(root / "adapter", model=str(root / "base"), with_past=False, out=root / "plain")

    return export_cases.memo(("past-export-plain", "gpt2", "lora"), make)


#: LLaMA-Adapter's KV-cache export generates under optimum in tests/parity/test_adaption_prompt_parity.py.
CASES = [
    pytest.param("gpt2", "lora", True, id="gpt2-lora-merged"),
    pytest.param("llama", "lora", False, id="llama-gqa-lora"),
    pytest.param("gpt2", "prompt-tuning", False, id="gpt2-prompt-tuning"),
    pytest.param("llama", "ia3", True, id="llama-gqa-ia3-merged", marks=pytest.mark.slow),
    pytest.param("llama", "p-tuning", False, id="llama-gqa-p-tuning", marks=pytest.mark.slow),
    pytest.param("llama", "prefix-tuning", False, id="llama-gqa-prefix-tuning"),
    pytest.param("gpt2", "adalora", True, id="gpt2-adalora-merged", marks=pytest.mark.slow),
    pytest.param("gpt2", "prefix-projection", False, id="gpt2-prefix-projection", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("family", "method", "merge"), CASES)
def test_optimum_generates_the_tokens_hf_peft_generates(export_cases, family, method, merge):
    from optimum.onnxruntime import ORTModelForCausalLM

    out = _export(export_cases, family, method, merge)
    _, peft_model = _hf_peft(export_cases, family, method)
    ort_model = ORTModelForCausalLM.from_pretrained(out)
    assert ort_model.can_use_cache
    batch = _prompt_batch()
    tokens, logits = _generate(peft_model, batch)
    got_tokens, got_logits = _generate(ort_model, batch)
    assert torch.equal(got_tokens, tokens)
    assert (got_logits - logits).abs().max() < 1e-4  # every step: prefill and 7 cached decode steps
    _, base_logits = _generate(FACTORIES[family](), batch)  # the adapter matters
    assert (base_logits[0] - logits[0]).abs().max() > 1e-3


def test_with_past_artifact_has_optimums_signature(export_cases):
    out = _export(export_cases, "llama", "lora", False)
    manifest = json.loads((out / "manifest.json").read_text())
    layers, kv_heads, head_dim = cache_geometry(tiny_llama().config)
    inputs = {i["name"]: i for i in manifest["inputs"]}
    outputs = {o["name"]: o for o in manifest["outputs"]}
    assert list(inputs) == ["input_ids", "attention_mask", "position_ids", *past_names(layers)]
    assert list(outputs) == ["logits", *present_names(layers)]
    assert inputs["past_key_values.1.value"]["shape"] == ["batch", kv_heads, "past_sequence", head_dim]
    assert inputs["attention_mask"]["shape"] == ["batch", "past_sequence + sequence"]
    assert outputs["present.0.key"]["shape"] == ["batch", kv_heads, "past_sequence + sequence", head_dim]
    assert manifest["with_past"] is True and manifest["optimum_task"] == "text-generation-with-past"
    report = json.loads((out / "report.json").read_text())
    assert {c["name"] for c in report["cases"]} >= {"left-padded", "decode"}
    assert json.loads((out / "config.json").read_text())["use_cache"] is True


def test_cache_steps_equal_one_full_pass():
    """Prefill + decode through the cache give the logits of one pass over the whole sequence."""
    model = tiny_llama()
    program = capture(model, "causal-lm", mode="eval", transform=with_past())
    layers, kv_heads, head_dim = cache_geometry(model.config)
    batch = _prompt_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    full = torch.cat([ids, torch.tensor([[5, 9]] * 3)], dim=1)
    full_mask = torch.cat([mask, torch.ones(3, 2, dtype=torch.long)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = model(input_ids=full, attention_mask=full_mask, position_ids=positions).logits
        empty = [torch.zeros(3, kv_heads, 0, head_dim)] * (2 * layers)
        first = program(ids, mask, positions[:, :6], *empty)
        second = program(full[:, 6:], full_mask, positions[:, 6:], *first[1:])
    assert first[1].shape == (3, kv_heads, 6, head_dim) and second[1].shape == (3, kv_heads, 8, head_dim)
    real = mask.bool()
    assert (first[0][real] - expected[:, :6][real]).abs().max() < 1e-5
    assert (second[0] - expected[:, 6:]).abs().max() < 1e-5


def test_no_past_gives_the_plain_graph_and_seq_cls_refuses_past(export_cases, tmp_path):
    from peftc.exporting import export

    root, _ = _hf_peft(export_cases, "gpt2", "lora")
    out = plain_export(export_cases)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [i["name"] for i in manifest["inputs"]] == ["input_ids", "attention_mask", "position_ids"]
    assert manifest["with_past"] is False and json.loads((out / "config.json").read_text())["use_cache"] is False
    with pytest.raises(ConfigError, match="--with-past is for causal-lm"):
        export(root / "adapter", model=str(root / "base"), task="seq-cls", with_past=True, out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_swappable_adapters_with_past(export_cases, tmp_path):
    """One KV-cache graph, LoRA tensors as inputs: each adapter verified on prefill and decode steps."""
    import peft

    from peftc.exporting import export

    root, _ = _hf_peft(export_cases, "gpt2", "lora")
    other = root / "adapter-r8"
    torch.manual_seed(12)
    model = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=8, task_type="CAUSAL_LM", init_lora_weights=False))
    model.save_pretrained(other)
    out = export([root / "adapter", other], model=str(root / "base"), adapters_as_inputs=True, out=tmp_path / "s")
    manifest = json.loads((out / "manifest.json").read_text())
    names = [i["name"] for i in manifest["inputs"]]
    assert names[:4] == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key"]
    assert manifest["with_past"] is True and [a["rank"] for a in manifest["adapters"]] == [4, 8]
    report = json.loads((out / "report.json").read_text())
    for figures in [*report["adapters_vs_torch"].values(), report["base_vs_torch"]]:
        assert figures["passed"] and {c["name"] for c in figures["cases"]} >= {"decode", "decode-chunk"}
