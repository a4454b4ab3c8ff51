"""Artifacts load with optimum's ORTModel runtime classes and give HF PEFT's outputs.

Adapters are made with HF PEFT itself (non-identity LoRA, perturbed heads) and saved; peftc
exports them from the saved files, and optimum loads the artifact with no peftc code in the loop:

- seq-cls: ``ORTModelForSequenceClassification`` (BERT, GPT-2), logits on a padded batch;
- token-cls: ``ORTModelForTokenClassification`` (BERT), logits at real positions;
- seq2seq: ``ORTModelForSeq2SeqLM(use_cache=False)`` (T5, BART): the same greedy tokens as HF PEFT's
  ``generate``, encoder states and decoder logits within 1e-4.

Each export costs 20-60 s on two shared cores: artifacts are cached per module, the default suite
runs one case per task and the rest are ``slow``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_bart, tiny_bert, tiny_bert_token, tiny_gpt2, tiny_t5
from onnx_export_cases import save_tokenizer

from peftc.errors import AdapterMismatchError, ConfigError

ATOL = 1e-4
NEW_TOKENS = 8

#: family -> (model factory, HF PEFT task_type)
FACTORIES = {
    "bert-seq-cls": (lambda: tiny_bert(num_labels=3), "SEQ_CLS"),
    "gpt2-seq-cls": (lambda: tiny_gpt2(num_labels=3), "SEQ_CLS"),
    "bert-token-cls": (lambda: tiny_bert_token(num_labels=5), "TOKEN_CLS"),
    "t5": (tiny_t5, "SEQ_2_SEQ_LM"),
    "bart": (tiny_bart, "SEQ_2_SEQ_LM"),
}


def _hf_peft(export_cases, family: str):
    """(root, PeftModel): base ``root/base``, HF PEFT adapter ``root/adapter``, non-identity; once per session."""
    return export_cases.memo(("ortm-hf-peft", family), lambda: _make_hf_peft(export_cases, family))


def _make_hf_peft(export_cases, family: str):
    import peft

    factory, task_type = FACTORIES[family]
    root = export_cases.scratch(f"ortm-{family}")
    factory().save_pretrained(root / "base", safe_serialization=True)
    save_tokenizer(root / "base")
    torch.manual_seed(5)
    config = peft.LoraConfig(r=4, lora_alpha=8, task_type=task_type, init_lora_weights=False)  # B != 0
    model = peft.get_peft_model(factory(), config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:  # the trained copy of the head, away from the base head
                param.add_(torch.randn_like(param) * 0.2)
    model.save_pretrained(root / "adapter")
    return root, model


def _export(export_cases, family: str, merge: bool = False):
    def make():
        from peftc.exporting import export

        root, _ = _hf_peft(export_cases, family)
        seq2seq = FACTORIES[family][1] == "SEQ_2_SEQ_LM"  # two graphs, no cache (the KV-cache layout: test_seq2seq_kv)
        out = root / f"onnx-{merge}"
        return export(
            root / "adapter", model=str(root / "base"), merge=merge, out=out, with_past=False if seq2seq else None
        )

    return export_cases.memo(("ortm-export", family, merge), make)


def _padded_batch(pad_id: int, batch: int = 3, seq: int = 9, left: bool = True) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(9)
    ids = torch.randint(3, 128, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    pads = {0: 3, 2: 1}
    for row, n in pads.items():
        cols = slice(0, n) if left else slice(seq - n, seq)
        ids[row, cols], mask[row, cols] = pad_id, 0
    return {"input_ids": ids, "attention_mask": mask}


# -- seq-cls and token-cls ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family", ["bert-seq-cls", pytest.param("gpt2-seq-cls", marks=pytest.mark.slow), "bert-token-cls"]
)
def test_classifier_loads_with_ortmodel(export_cases, family):
    """ORTModelFor{Sequence,Token}Classification on the artifact == HF PEFT's logits (padded batch)."""
    from optimum.onnxruntime import ORTModelForSequenceClassification, ORTModelForTokenClassification

    root, peft_model = _hf_peft(export_cases, family)
    out = _export(export_cases, family)
    token = family.endswith("token-cls")
    ort_class = ORTModelForTokenClassification if token else ORTModelForSequenceClassification
    ort_model = ort_class.from_pretrained(out)
    inputs = _padded_batch(pad_id=0)
    if "bert" in family:
        inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    with torch.no_grad():
        expected = peft_model(**inputs).logits
        base = peft_model.get_base_model()
        with peft_model.disable_adapter():
            base_logits = base(**inputs).logits
    got = torch.as_tensor(ort_model(**inputs).logits)
    assert got.shape == expected.shape
    rows = inputs["attention_mask"].bool() if token else torch.ones(got.shape[0], dtype=torch.bool)
    diff = float((got - expected)[rows].abs().max())
    assert diff <= ATOL, f"{family}: ORT vs HF PEFT max diff {diff:.2e}"
    # the adapter (LoRA + trained head) is visible: the comparison above can fail
    assert float((expected - base_logits)[rows].abs().max()) > 1e-2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["task"] == ("token-cls" if token else "seq-cls")
    assert manifest["optimum_task"] == ("token-classification" if token else "text-classification")
    assert json.loads((out / "config.json").read_text())["architectures"][0].endswith(
        "ForTokenClassification" if token else "ForSequenceClassification"
    )


def test_token_cls_loss_matches_transformers():
    """The token-cls loss is HF's: per-token cross entropy, -100 (padding, sub-words) ignored."""
    from peftc.tasks import get_task

    model = tiny_bert_token(num_labels=5)
    inputs = _padded_batch(pad_id=0, left=False)
    labels = torch.randint(0, 5, inputs["input_ids"].shape, generator=torch.Generator().manual_seed(1))
    labels[inputs["attention_mask"] == 0] = -100
    labels[1, 4] = -100  # a continuation sub-word
    with torch.no_grad():
        out = model(**inputs, labels=labels)
    loss = get_task("token-cls").loss(out.logits, {"labels": labels})
    assert abs(float(loss) - float(out.loss)) < 1e-6
    unmasked = get_task("token-cls").loss(out.logits, {"labels": labels.clamp(min=0)})
    assert abs(float(unmasked) - float(out.loss)) > 1e-4  # the ignored positions matter


def test_token_cls_compares_real_positions_only():
    """verify's rule for token-cls: padded positions are not compared, real ones are."""
    from peftc.exporters.verify import VerifyCase, compare_outputs

    inputs = _padded_batch(pad_id=0)
    case = VerifyCase("padded", inputs)
    expected = np.random.default_rng(0).normal(size=(*inputs["input_ids"].shape, 5)).astype(np.float32)
    noisy = expected.copy()
    noisy[~inputs["attention_mask"].bool().numpy()] += 1.0
    report = compare_outputs([noisy], [expected], [case], "token-cls")
    assert report.passed and report.max_abs_diff == 0.0
    assert report.cases[0].compared == int(inputs["attention_mask"].sum())
    noisy[1, 4] += 1e-3
    assert not compare_outputs([noisy], [expected], [case], "token-cls").passed


@pytest.mark.slow
def test_token_cls_trains_exports_and_loads_in_optimum(tmp_path):
    """peftc train --task token-cls: the loss falls, HF PEFT loads the adapter, optimum runs the export."""
    from optimum.onnxruntime import ORTModelForTokenClassification
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForTokenClassification

    import peftc

    base = tmp_path / "base"
    tiny_bert_token(num_labels=2).save_pretrained(base, safe_serialization=True)
    save_tokenizer(base)
    gen = np.random.default_rng(0)
    rows = []
    for _ in range(48):  # a learnable rule: odd word ids are "ODD", even ones "EVEN"
        ids = gen.integers(5, 120, size=int(gen.integers(3, 9)))
        rows.append({"tokens": [f"w{i}" for i in ids], "labels": ["ODD" if i % 2 else "EVEN" for i in ids]})
    data = tmp_path / "ner.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = peftc.train(
        peftc.TrainConfig(
            model=str(base), task="token-cls", data=str(data), out=str(tmp_path / "run"), max_steps=24,
            batch_size=8, lr=2e-2, progress=False, log_every=4,
        )
    )  # fmt: skip
    losses = [
        m["loss"] for m in map(json.loads, (result.run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in m
    ]
    assert losses[-1] < losses[0]
    config = json.loads((result.run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "TOKEN_CLS" and "classifier" in config["modules_to_save"]

    out = peftc.export(result.run_dir, merge=True, out=tmp_path / "onnx")
    labelled = AutoConfig.from_pretrained(out)  # the artifact's config.json carries the label map
    hf = PeftModel.from_pretrained(
        AutoModelForTokenClassification.from_pretrained(base, config=labelled), result.run_dir / "adapter"
    ).eval()
    ort_model = ORTModelForTokenClassification.from_pretrained(out)
    ids = torch.tensor([[2, 7, 8, 9, 3, 0], [2, 11, 3, 0, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).logits
    got = ort_model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).logits
    real = mask.bool()
    assert (torch.as_tensor(got)[real] - want[real]).abs().max() <= ATOL


# -- seq2seq --------------------------------------------------------------------------------------

#: The no-cache layout on the (family, merge) pairs that test_seq2seq_kv's KV-cache layout does not take (it
#: exports the same HF PEFT LoRA unmerged on T5 and merged on BART): every family x merge pair is exported
#: once, each family and each merge choice in both layouts (~20 s an export on two shared cores).
SEQ2SEQ_PARAMS = [
    pytest.param("t5", True, id="t5-merged"),
    pytest.param("bart", False, id="bart"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("family", "merge"), SEQ2SEQ_PARAMS)
def test_seq2seq_generates_like_hf_peft(export_cases, family, merge):
    """ORTModelForSeq2SeqLM(use_cache=False).generate == HF PEFT generate; states and logits within 1e-4."""
    from optimum.onnxruntime import ORTModelForSeq2SeqLM

    root, peft_model = _hf_peft(export_cases, family)
    out = _export(export_cases, family, merge)
    assert (out / "encoder_model.onnx").is_file() and (out / "decoder_model.onnx").is_file()
    assert not (out / "model.onnx").exists()
    assert json.loads((out / "config.json").read_text())["use_cache"] is False
    assert (out / "generation_config.json").is_file() and (out / "adapter" / "adapter_model.safetensors").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["verified"] and report["max_abs_diff"] <= ATOL
    assert set(report["onnx_vs_torch"]) == {"encoder", "decoder"}
    assert (report["merged_vs_unmerged"] is not None) == merge

    ort_model = ORTModelForSeq2SeqLM.from_pretrained(out, use_cache=False)
    inputs = _padded_batch(pad_id=peft_model.config.pad_token_id, left=False)  # seq2seq pads on the right
    settings = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False}
    with torch.no_grad():
        expected_tokens = peft_model.generate(**inputs, **settings)
    tokens = ort_model.generate(**inputs, **settings)
    assert tokens.tolist() == expected_tokens.tolist()

    base = peft_model.get_base_model()
    with torch.no_grad():
        expected_states = base.get_encoder()(**inputs).last_hidden_state
        decoder_ids = expected_tokens[:, : NEW_TOKENS // 2 + 1]
        expected_logits = peft_model(**inputs, decoder_input_ids=decoder_ids).logits
        with peft_model.disable_adapter():
            base_logits = peft_model(**inputs, decoder_input_ids=decoder_ids).logits
    states = torch.as_tensor(ort_model.encoder(**inputs).last_hidden_state)
    real = inputs["attention_mask"].bool()
    assert float((states - expected_states)[real].abs().max()) <= ATOL
    logits = torch.as_tensor(ort_model(**inputs, decoder_input_ids=decoder_ids).logits)
    assert float((logits - expected_logits).abs().max()) <= ATOL
    assert float((expected_logits - base_logits).abs().max()) > 1e-2  # the adapter is visible in the logits


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_seq2seq_adapter_splits_into_encoder_and_decoder_parts(export_cases, family):
    """The HF PEFT state splits by the encoder's module name into a partition sharing the same tensors."""
    from peftc.adapters import AdapterState
    from peftc.exporting.seq2seq import encoder_prefix, split_state

    root, _ = _hf_peft(export_cases, family)
    state = AdapterState.load(root / "adapter")
    model = FACTORIES[family][0]()
    prefix = encoder_prefix(model)
    assert prefix == {"t5": "encoder", "bart": "model.encoder"}[family]
    encoder, decoder = split_state(state, model)
    assert encoder.tensors and decoder.tensors
    assert set(encoder.tensors) | set(decoder.tensors) == set(state.tensors)
    assert not set(encoder.tensors) & set(decoder.tensors)
    assert all(f".{prefix}." in k for k in encoder.tensors) and not any(".encoder." in k for k in decoder.tensors)
    key = next(iter(encoder.tensors))
    assert encoder.tensors[key] is state.tensors[key]  # a view, not a copy


@pytest.mark.slow
def test_seq2seq_whole_state_does_not_bind_into_one_graph(export_cases):
    """Why the split exists: the decoder graph refuses the encoder's keys (it calls no encoder module)."""
    from peftc.passes import insertion_pipeline

    from peftc.adapters import AdapterState
    from peftc.exporting.seq2seq import DecoderModule
    from peftc.program import capture

    root, _ = _hf_peft(export_cases, "t5")
    state = AdapterState.load(root / "adapter")
    program = capture(tiny_t5(), "seq2seq", mode="eval", transform=lambda m, _names: DecoderModule(m))
    with pytest.raises(AdapterMismatchError, match="encoder"):
        insertion_pipeline(state.config, state)(program)


@pytest.mark.parametrize(("options", "match"), [({"adapters_as_inputs": True}, "adapters-as-inputs")])
def test_seq2seq_refuses_unsupported_options(tmp_path, options, match):
    """Options the two-graph export does not have are refused in one line, before any model loads."""
    from peftc.exporting import export

    with pytest.raises(ConfigError, match=match):
        export(tmp_path / "missing", task="seq2seq", out=tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_seq2seq_refuses_a_decoder_only_prompt_layout():
    """A prompt adapter made for one transformer submodule (a decoder-only model) does not bind to T5's graphs."""
    from peftc.adapters import AdapterState
    from peftc.config import PromptTuningConfig
    from peftc.exporting.graphs import EncoderDecoder, bind

    cfg = PromptTuningConfig(num_virtual_tokens=2, num_transformer_submodules=1)
    state = AdapterState(cfg, {"prompt_embeddings": torch.nn.Parameter(torch.zeros(2, 64))}, loaded=True)
    with pytest.raises(ConfigError, match="num_transformer_submodules=1, but t5 is an encoder-decoder"):
        bind(EncoderDecoder().capture(tiny_t5(), state))
