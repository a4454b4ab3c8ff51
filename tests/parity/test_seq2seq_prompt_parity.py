"""Prompt methods on encoder-decoder LMs (T5, BART) vs HF PEFT 0.21's ``PeftModelForSeq2SeqLM``.

HF PEFT's layout for two transformer submodules: prompt tuning and P-tuning keep ``2n`` prompt rows and
prepend the first ``n`` to the encoder's input embeddings (the decoder sees them through the encoder
states, its encoder mask ``n`` ones longer); prefix tuning feeds the decoder's self-attention a cache laid
out by ``get_prompt`` (the cross-attention cache emptied). Each case makes the adapter with HF PEFT
(prompts / prefix perturbed away from their init), saves it, and binds the saved files into the seq2seq
export's own encoder and decoder programs (:class:`peftc.exporting.graphs.EncoderDecoder`), which must
give HF PEFT's logits on a left- and a right-padded batch and differ from the base model's. The slow
cases export both graphs to ONNX (verified by the export) and compare ONNX Runtime with HF PEFT.
fp32, atol 1e-5 (torch), 1e-4 (ONNX Runtime).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import tiny_bart, tiny_t5

from peftc.adapters import AdapterState
from peftc.errors import ConfigError
from peftc.exporting.graphs import EncoderDecoder, bind

peft = pytest.importorskip("peft")

ATOL = 1e-5
N_VT = 3
FACTORIES = {"t5": tiny_t5, "bart": tiny_bart}
HF_CONFIGS = {
    "prompt-tuning": lambda: peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=N_VT),
    "p-tuning": lambda: peft.PromptEncoderConfig(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=N_VT, encoder_hidden_size=32
    ),
    "prefix-tuning": lambda: peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=N_VT),
}
#: One case in the default run (each costs four captures, ~15 s); the rest are slow.
CASES = [
    pytest.param(f, m, id=f"{f}-{m}", marks=[] if (f, m) == ("t5", "prompt-tuning") else [pytest.mark.slow])
    for f in FACTORIES
    for m in HF_CONFIGS
]


def _hf(family: str, method: str, directory):
    """(base model, HF PEFT model with perturbed prompts, saved to ``directory``)."""
    base = FACTORIES[family]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.get_peft_model(copy.deepcopy(base), HF_CONFIGS[method]()).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in hf.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    hf.save_pretrained(directory)
    return base, hf


def _batch(model, padding: str) -> dict[str, torch.Tensor]:
    """Three rows of 9 tokens (rows 0 and 2 padded by 3 on ``padding``'s side) and 4 decoder tokens."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    pads = slice(0, 3) if padding == "left" else slice(6, 9)
    for row in (0, 2):
        ids[row, pads], mask[row, pads] = model.config.pad_token_id, 0
    decoder = torch.randint(3, 128, (3, 4), generator=gen)
    decoder[:, 0] = model.config.decoder_start_token_id
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder}


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(**batch).logits


def _ours(graphs, batch) -> torch.Tensor:
    encoder, decoder = (g.program for g in graphs)
    with torch.no_grad():
        states = encoder(batch["input_ids"], batch["attention_mask"])
        return decoder(batch["decoder_input_ids"], batch["attention_mask"], states)


@pytest.mark.parametrize(("family", "method"), CASES)
def test_seq2seq_prompt_methods_match_hf_peft(tmp_path, family, method):
    base, hf = _hf(family, method, tmp_path / "adapter")
    state = AdapterState.load(tmp_path / "adapter")
    assert state.config.num_transformer_submodules == 2
    graphs = bind(EncoderDecoder().capture(base, state))
    encoder, decoder = (g.program for g in graphs)
    assert encoder.adapter is state and decoder.adapter is state
    for padding in ("left", "right"):
        batch = _batch(base, padding)
        ours, expected = _ours(graphs, batch), _logits(hf, batch)
        assert (ours - _logits(base, batch)).abs().max() > 1e-2  # the prompt changes the model
        diff = float((ours - expected).abs().max())
        print(f"{family}/{method} {padding}-padded: peftc vs HF PEFT max diff {diff:.3g}")
        assert diff <= ATOL, padding
    left = _batch(base, "left")
    with torch.no_grad():
        states = encoder(left["input_ids"], left["attention_mask"])
    virtual = 0 if method == "prefix-tuning" else N_VT
    assert states.shape[1] == 9 + virtual  # the encoder states hold the virtual tokens (not for a prefix)


def test_prompt_layout_must_match_the_model(tmp_path):
    """An encoder-decoder layout (2 submodules) does not bind to a decoder-only model, nor 1 to T5."""
    from conftest import tiny_gpt2
    from peftc.passes import insertion_pipeline

    from peftc.config import PromptTuningConfig
    from peftc.program import capture

    program = capture(tiny_gpt2(), "causal-lm", mode="eval")
    cfg = PromptTuningConfig(num_virtual_tokens=2, num_transformer_submodules=2)
    with pytest.raises(ConfigError, match="num_transformer_submodules=2, but gpt2 is not an encoder-decoder"):
        insertion_pipeline(cfg)(program)
    cfg = PromptTuningConfig(num_virtual_tokens=2, num_transformer_submodules=1)
    state = AdapterState(cfg, {"prompt_embeddings": torch.nn.Parameter(torch.zeros(2, 64))}, loaded=True)
    with pytest.raises(ConfigError, match="num_transformer_submodules=1, but t5 is an encoder-decoder"):
        bind(EncoderDecoder().capture(tiny_t5(), state))


@pytest.mark.slow
@pytest.mark.parametrize(("family", "method"), [("t5", "prompt-tuning")], ids=["t5-prompt"])
def test_seq2seq_prompt_export_runs_like_hf_peft(tmp_path, family, method):
    """The exported encoder_model.onnx + decoder_model.onnx (verified by the export) give HF PEFT's logits.

    BART prefix tuning's export: tests/exporters/test_seq2seq_kv.py (every step's logits, both paddings).
    """
    import onnxruntime as ort

    from peftc.exporting import export

    base, hf = _hf(family, method, tmp_path / "adapter")
    base.save_pretrained(tmp_path / "base", safe_serialization=True)
    out = export(tmp_path / "adapter", model=tmp_path / "base", task="seq2seq", out=tmp_path / "onnx")
    encoder = ort.InferenceSession(str(out / "encoder_model.onnx"), providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(str(out / "decoder_model.onnx"), providers=["CPUExecutionProvider"])
    for padding in ("left", "right"):
        batch = _batch(base, padding)
        ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy()
        (states,) = encoder.run(None, {"input_ids": ids, "attention_mask": mask})
        feeds = {
            "input_ids": batch["decoder_input_ids"].numpy(),
            "encoder_attention_mask": mask,
            "encoder_hidden_states": states,
        }
        (logits,) = decoder.run(["logits"], feeds)  # the first step also returns the caches
        diff = float((torch.from_numpy(logits) - _logits(hf, batch)).abs().max())
        print(f"{family}/{method} ONNX Runtime vs HF PEFT ({padding}-padded): {diff:.3g}")
        assert diff <= 1e-4
