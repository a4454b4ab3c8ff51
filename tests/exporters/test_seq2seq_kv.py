"""seq2seq KV-cache decoders: ``ORTModelForSeq2SeqLM(use_cache=True)`` generates HF PEFT's tokens.

Adapters are made with HF PEFT (LoRA with ``B != 0``; prefix tuning with its prefix perturbed away from
its init), saved, and exported by ``peftc export`` with its default for seq2seq and ONNX: three graphs
(``encoder_model.onnx``, ``decoder_model.onnx`` returning the caches, ``decoder_with_past_model.onnx``).
optimum loads the artifact with no peftc code in the loop; the references are HF PEFT's ``generate`` and
its decoder step over its own cache. Each export costs ~20 s on an idle core (60-70 s on the shared two),
so every export case is ``slow``; the fast tier checks the plan and the case construction.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from conftest import tiny_bart, tiny_t5
from onnx_export_cases import save_tokenizer

peft = pytest.importorskip("peft")

ATOL = 1e-4
NEW_TOKENS = 8
N_VT = 3
FACTORIES = {"t5": tiny_t5, "bart": tiny_bart}
CONFIGS = {
    "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, task_type="SEQ_2_SEQ_LM", init_lora_weights=False),
    "prefix": lambda: peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=N_VT),
}
#: (family, method, merge): T5 and BART, LoRA (unmerged on T5, merged on BART) and prefix tuning.
CASES = [
    pytest.param("t5", "lora", False, id="t5-lora"),
    pytest.param("bart", "lora", True, id="bart-lora-merged"),
    pytest.param("t5", "prefix", False, id="t5-prefix"),
    pytest.param("bart", "prefix", False, id="bart-prefix"),
]


def _hf_peft(export_cases, family: str, method: str):
    """(root, PeftModel): base ``root/base``, adapter ``root/adapter``, non-identity; once per session."""
    return export_cases.memo(("s2skv-hf", family, method), lambda: _make_hf_peft(export_cases, family, method))


def _make_hf_peft(export_cases, family: str, method: str):
    root = export_cases.scratch(f"s2skv-{family}-{method}")
    FACTORIES[family]().save_pretrained(root / "base", safe_serialization=True)
    save_tokenizer(root / "base")
    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(FACTORIES[family](), CONFIGS[method]()).eval()
    if method != "lora":  # LoRA is non-identity by init_lora_weights=False; a prefix moves away from its init
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.3 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(root / "adapter")
    return root, model


def _export(export_cases, family: str, method: str, merge: bool):
    def make():
        from peftc.exporting import export

        root, _ = _hf_peft(export_cases, family, method)
        return export(root / "adapter", model=str(root / "base"), merge=merge, out=root / f"onnx-{merge}")

    return export_cases.memo(("s2skv-export", family, method, merge), make)


def _batch(pad_id: int, left: bool) -> dict[str, torch.Tensor]:
    """Three sources of 9 tokens, rows 0 and 2 padded by 3 and 1 on the left or the right."""
    gen = torch.Generator().manual_seed(9)
    ids = torch.randint(3, 128, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    for row, n in {0: 3, 2: 1}.items():
        cols = slice(0, n) if left else slice(9 - n, 9)
        ids[row, cols], mask[row, cols] = pad_id, 0
    return {"input_ids": ids, "attention_mask": mask}


def _quiet(fn, *args, **kwargs):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize(("family", "method", "merge"), CASES)
def test_cached_generation_matches_hf_peft(export_cases, family, method, merge):
    """use_cache=True greedy tokens == HF PEFT's, per-step scores within 1e-4, left- and right-padded sources."""
    from optimum.onnxruntime import ORTModelForSeq2SeqLM

    from peftc.inspect.describe import inspect_path, render

    root, hf = _hf_peft(export_cases, family, method)
    out = _export(export_cases, family, method, merge)
    for name in ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx"):
        assert (out / name).is_file()
    assert json.loads((out / "config.json").read_text())["use_cache"] is True
    report = json.loads((out / "report.json").read_text())
    assert report["verified"] and report["max_abs_diff"] <= ATOL
    assert set(report["onnx_vs_torch"]) == {"encoder", "decoder", "decoder_with_past"}
    assert (report["merged_vs_unmerged"] is not None) == merge
    step_cases = report["onnx_vs_torch"]["decoder_with_past"]["cases"]
    assert any(c["padded"] for c in step_cases) and len(step_cases) >= 3
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["with_past"] is True
    assert manifest["model_files"]["decoder_with_past"] == "decoder_with_past_model.onnx"
    past_inputs = {i["name"] for i in manifest["inputs"] if i.get("graph") == "decoder_with_past"}
    assert {"past_key_values.0.decoder.key", "past_key_values.1.encoder.value"} <= past_inputs
    text = render(inspect_path(out))  # `peftc inspect` lists every graph
    assert "graphs: 3" in text and "decoder_with_past: decoder_with_past_model.onnx" in text
    assert "past_key_values.* (8) -> logits, present.* (4)" in text

    cached = ORTModelForSeq2SeqLM.from_pretrained(out, use_cache=True, use_merged=False)
    assert cached.decoder_with_past is not None and cached.can_use_cache
    plain = ORTModelForSeq2SeqLM.from_pretrained(out, use_cache=False)  # the first-step graph serves both
    settings = {
        "max_new_tokens": NEW_TOKENS,
        "min_new_tokens": NEW_TOKENS,
        "do_sample": False,
        "output_logits": True,
        "return_dict_in_generate": True,
    }
    for left in (True, False):
        inputs = _batch(hf.config.pad_token_id, left)
        tokens, logits = _reference(hf, method, inputs, settings)
        got = cached.generate(**inputs, **settings)
        assert got.sequences.tolist() == tokens.tolist(), "left" if left else "right"
        assert float((torch.stack([torch.as_tensor(x) for x in got.logits], 1) - logits).abs().max()) <= ATOL
        got = plain.generate(**inputs, **settings)  # decoder_model.onnx on the whole decoder prefix each step
        assert got.sequences.tolist() == tokens.tolist()
        assert float((torch.stack([torch.as_tensor(x) for x in got.logits], 1) - logits).abs().max()) <= ATOL
    with hf.disable_adapter():
        base = _quiet(hf.generate, **inputs, **settings)
    assert float((torch.stack(base.logits, 1) - logits).abs().max()) > 1e-2  # the adapter is visible


def _reference(hf, method: str, inputs: dict[str, torch.Tensor], settings: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """HF PEFT's greedy tokens and per-step logits ``[batch, steps, vocab]``.

    LoRA: ``generate``. Prefix tuning: greedy steps of HF PEFT's ``forward`` (the whole decoder prefix each
    step), the semantics it trains with: the decoder's positions start after the ``n`` prefix tokens. HF PEFT
    0.21's ``generate`` for seq2seq prefix tuning disagrees with its own ``forward`` (it leaves
    ``cache_position`` at 0 with ``n`` tokens in the cache, which its causal-LM path shifts by ``n``; its
    ``use_cache=False`` generate disagrees with both), so it is not the reference here.
    """
    if method == "lora":
        out = _quiet(hf.generate, **inputs, **settings)
        return out.sequences, torch.stack(out.logits, 1)
    decoder = torch.full((inputs["input_ids"].shape[0], 1), hf.config.decoder_start_token_id)
    steps = []
    for _ in range(NEW_TOKENS):
        last = _quiet(hf, **inputs, decoder_input_ids=decoder).logits[:, -1]
        steps.append(last)
        scores = last.clone()
        if len(steps) < NEW_TOKENS:  # min_new_tokens: EOS cannot come before the last step
            scores[:, hf.config.eos_token_id] = -float("inf")
        decoder = torch.cat([decoder, scores.argmax(-1, keepdim=True)], 1)
    return decoder, torch.stack(steps, 1)


@pytest.mark.slow
@pytest.mark.parametrize(("family", "method", "merge"), CASES[:1] + CASES[2:3])
def test_decoder_with_past_graph_matches_hf_peft_step(export_cases, family, method, merge):
    """ONNX Runtime on decoder_with_past_model.onnx, fed HF PEFT's own cache, == HF PEFT's next decoder step."""
    import onnxruntime as ort

    root, hf = _hf_peft(export_cases, family, method)
    out = _export(export_cases, family, method, merge)
    inputs = _batch(hf.config.pad_token_id, left=True)
    gen = torch.Generator().manual_seed(2)
    decoder = torch.randint(3, 128, (3, 5), generator=gen)
    decoder[:, 0] = hf.config.decoder_start_token_id
    first = _quiet(hf, **inputs, decoder_input_ids=decoder[:, :4], use_cache=True)  # HF PEFT: prefix in its cache
    cache = first.past_key_values
    states = first.encoder_last_hidden_state
    n = N_VT if method == "prefix" else 0  # the graph's past excludes the prefix (the graph adds it)
    feeds = {
        "input_ids": decoder[:, 4:].numpy(),
        "encoder_attention_mask": inputs["attention_mask"].numpy(),
        "encoder_hidden_states": states.numpy(),
    }
    for i, (self_layer, cross_layer) in enumerate(
        zip(cache.self_attention_cache.layers, cache.cross_attention_cache.layers, strict=True)
    ):
        feeds[f"past_key_values.{i}.decoder.key"] = self_layer.keys[:, :, n:].numpy()
        feeds[f"past_key_values.{i}.decoder.value"] = self_layer.values[:, :, n:].numpy()
        feeds[f"past_key_values.{i}.encoder.key"] = cross_layer.keys.numpy()
        feeds[f"past_key_values.{i}.encoder.value"] = cross_layer.values.numpy()
    session = ort.InferenceSession(str(out / "decoder_with_past_model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, feeds), strict=True))
    # HF PEFT's step: its model continues its own cache (the prefix stays in it)
    step = _quiet(
        hf.get_base_model(),
        encoder_outputs=(states,),
        attention_mask=inputs["attention_mask"],
        decoder_input_ids=decoder[:, 4:],
        past_key_values=cache,
        use_cache=True,
    )
    assert np.abs(outputs["logits"] - step.logits.numpy()).max() <= ATOL
    grown = step.past_key_values.self_attention_cache.layers[1].values[:, :, n:].numpy()
    assert outputs["present.1.decoder.value"].shape == grown.shape == (3, grown.shape[1], 5, grown.shape[3])
    assert np.abs(outputs["present.1.decoder.value"] - grown).max() <= ATOL
    full = _quiet(hf, **inputs, decoder_input_ids=decoder).logits[:, 4:]  # and the whole pass, no cache
    assert np.abs(outputs["logits"] - full.numpy()).max() <= ATOL


def test_seq2seq_plan_with_past_by_default():
    """ONNX seq2seq exports get the KV-cache decoders unless ``with_past=False``; roles name optimum's files."""
    from peftc.exporters import get_exporter

    from peftc.exporting.graphs import EncoderDecoder, EncoderDecoderWithPast, graph_plan

    onnx = get_exporter("onnx")
    plan = graph_plan("seq2seq", None)
    assert isinstance(plan, EncoderDecoderWithPast) and plan.with_past
    assert [onnx.model_file(r) for r in plan.roles] == [
        "encoder_model.onnx",
        "decoder_model.onnx",
        "decoder_with_past_model.onnx",
    ]
    assert type(graph_plan("seq2seq", False)) is EncoderDecoder


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_cache_wrappers_match_the_model_eagerly(family):
    """The first step + one cached step of the wrappers == one full decoder pass, left-padded sources (eager)."""
    from peftc.exporting.seq2seq import CacheDecoderModule, DecoderWithPastModule, seq2seq_past_names

    model = FACTORIES[family]().eval()
    inputs = _batch(model.config.pad_token_id, left=True)
    decoder = torch.randint(3, 128, (3, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        states = model.get_encoder()(**inputs).last_hidden_state
        full = model(**inputs, decoder_input_ids=decoder).logits
        first_wrapper = CacheDecoderModule(model)
        first = first_wrapper(decoder[:, :3], inputs["attention_mask"], states)
        step = DecoderWithPastModule(model)(decoder[:, 3:], inputs["attention_mask"], states, *first[1:])
    layers = first_wrapper.layers
    assert len(first) == 1 + 4 * layers and len(step) == 1 + 2 * layers
    assert len(seq2seq_past_names(layers)) == 4 * layers
    assert first[1].shape[2] == 3 and first[3].shape[2] == 9  # self cache: decoder tokens; cross: source tokens
    assert step[1].shape[2] == 5
    assert float((first[0] - full[:, :3]).abs().max()) <= 1e-5
    assert float((step[0] - full[:, 3:]).abs().max()) <= 1e-5
