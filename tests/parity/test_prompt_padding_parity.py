"""Prompt methods vs HF PEFT 0.21 on padded batches, for the families that number positions from the mask.

OPT numbers positions ``cumsum(mask)·mask - 1`` and Bloom builds its ALiBi bias from the same cumsum: a
padded row's tokens are numbered from its first real token, so prompt programs must leave the numbering to
the model (as HF PEFT does: it drops ``position_ids``) and hand it the mask with the ``n`` virtual-token ones.
Each case runs prompt tuning, P-tuning or prefix tuning with random (perturbed) prompts, checks that the
adapter changes the base logits, and compares with ``peft.get_peft_model`` holding the same tensors on a
left-padded and a right-padded batch (rows 0 and 2 padded by 3 tokens), at real positions (and, for prompt
methods, the virtual ones), plus a one-row batch. The with-past (KV-cache) graphs of the same methods run a
prefill and a decode step and are compared with HF PEFT's one pass over the whole sequence. fp32, atol 1e-5.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import batch_for, real_positions
from peftc.passes import insertion_pipeline
from test_families import build

from peftc.adapters import AdapterState
from peftc.config import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from peftc.program import capture

peft = pytest.importorskip("peft")

ATOL = 1e-5
N_VT = 5
PAD = 3

_CONFIGS = {
    "prompt-tuning": lambda task: PromptTuningConfig(num_virtual_tokens=N_VT, task_type=task),
    "p-tuning": lambda task: PromptEncoderConfig(num_virtual_tokens=N_VT, task_type=task, encoder_hidden_size=32),
    "prefix": lambda task: PrefixTuningConfig(
        num_virtual_tokens=N_VT, task_type=task, prefix_projection=True, encoder_hidden_size=24
    ),
}
_HF_CONFIGS = {"PROMPT_TUNING": "PromptTuningConfig", "P_TUNING": "PromptEncoderConfig", "PREFIX_TUNING": None}
#: (family, task, method): every prompt method on each family whose positions come from the mask.
CASES = [
    ("opt", "causal-lm", "prompt-tuning"),
    ("opt", "causal-lm", "p-tuning"),
    ("opt", "causal-lm", "prefix"),
    ("opt", "seq-cls", "prompt-tuning"),
    ("bloom", "causal-lm", "prompt-tuning"),  # ALiBi from cumsum(mask)
    ("bloom", "causal-lm", "p-tuning"),
    ("bloom", "causal-lm", "prefix"),
    # positions from the cache, not the mask; its table-size guard reads ``n + sequence != 64`` here
    ("gpt_neo", "causal-lm", "prompt-tuning"),
]


def _hf_model(model, cfg, state: AdapterState):
    """HF PEFT around a copy of ``model`` with the peftc adapter's tensors (prompt or encoder, head) copied in."""
    data = {k: v for k, v in cfg.to_dict().items() if k != "peft_type"}
    hf_cls = getattr(peft, _HF_CONFIGS[cfg.peft_type] or "PrefixTuningConfig")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.get_peft_model(copy.deepcopy(model), hf_cls(**data)).eval()
    direct = cfg.peft_type == "PROMPT_TUNING" or (cfg.peft_type == "PREFIX_TUNING" and not cfg.prefix_projection)
    with torch.no_grad():
        for name, param in hf.prompt_encoder["default"].named_parameters():
            param.copy_(state.tensors["prompt_embeddings" if direct else f"prompt_encoder.{name}"])
        for name, param in hf.named_parameters():
            if ".modules_to_save.default." in name:
                key = "base_model.model." + name.removeprefix("base_model.").replace(".modules_to_save.default", "")
                param.copy_(state.tensors[key])
    return hf


def _batch(program, padding: str) -> tuple:
    """Three rows of 9 tokens; rows 0 and 2 padded by ``PAD`` tokens on the ``padding`` side."""
    inputs = dict(zip(program.input_names, batch_for(program, left_pad=False), strict=True))
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    pads = slice(0, PAD) if padding == "left" else slice(-PAD, None)
    for row in (0, 2):
        ids[row, pads], mask[row, pads] = 0, 0
    if "position_ids" in inputs:  # what transformers' generate feeds: numbered from the first real token
        inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return tuple(inputs[n] for n in program.input_names)


def _rows(program, inputs, logits: torch.Tensor) -> torch.Tensor:
    """Real positions; prompt methods' causal-lm logits also have the ``n`` virtual rows in front."""
    rows = real_positions(program, inputs)
    if program.task.name == "causal-lm" and logits.shape[1] == rows.shape[1] + N_VT:
        rows = torch.cat([torch.ones(rows.shape[0], N_VT, dtype=torch.bool), rows], dim=1)
    return rows


def _logits(module, program, inputs) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return module(**dict(zip(program.input_names, inputs, strict=True))).logits


def _perturb(state: AdapterState, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in state.tensors.values():
            t.add_(0.5 * torch.randn(t.shape, generator=gen))


@pytest.mark.parametrize("fam,task,method", CASES, ids=[f"{f}-{t}-{m}" for f, t, m in CASES])
def test_padded_batches_match_hf_peft(fam, task, method):
    model = build(fam, task)
    program = capture(model, task, mode="eval")
    cfg = _CONFIGS[method]("CAUSAL_LM" if task == "causal-lm" else "SEQ_CLS")
    if task == "seq-cls":
        cfg.modules_to_save = ["score"]
    insertion_pipeline(cfg)(program)
    _perturb(program.adapter)
    hf = _hf_model(model, cfg, program.adapter)
    for padding in ("left", "right"):
        inputs = _batch(program, padding)
        ours = program(*inputs).detach()
        expected = _logits(hf, program, inputs)
        assert ours.shape == expected.shape
        rows = _rows(program, inputs, ours)
        if ours.shape == (base := _logits(model, program, inputs)).shape:
            assert (ours - base)[rows].abs().max() > 1e-2  # the adapter is not a no-op
        else:  # prompt methods, causal-lm: compare the real tokens' rows with the base model's
            assert (ours[:, N_VT:] - base)[real_positions(program, inputs)].abs().max() > 1e-2
        diff = float((ours - expected)[rows].abs().max())
        padded = float((ours - expected)[0][rows[0]].abs().max())
        print(f"{fam}/{task}/{method} {padding}-padded: peftc vs HF PEFT max diff {diff:.3g} (padded row {padded:.3g})")
        assert diff <= ATOL, padding
    one = batch_for(program, batch=1, seq=4, left_pad=False)  # size-1 batch: no dim specialised by the capture
    ours, expected = program(*one).detach(), _logits(hf, program, one)
    assert float((ours - expected)[_rows(program, one, ours)].abs().max()) <= ATOL


def _tokens(program, ids, mask, positions) -> tuple:
    """A with-past program's token inputs (``position_ids`` where the model takes them)."""
    given = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    return tuple(given[n] for n in program.input_names if n in given)


#: With-past (KV-cache) graphs: the methods whose positions the graph handles differently (drop / shift).
KV_CASES = [
    ("opt", "prompt-tuning"),
    ("opt", "p-tuning"),
    ("opt", "prefix"),
    ("bloom", "prompt-tuning"),
    ("bloom", "prefix"),
]


@pytest.mark.parametrize("fam,method", KV_CASES, ids=[f"{f}-{m}" for f, m in KV_CASES])
def test_with_past_steps_match_hf_peft_full_pass(fam, method, tmp_path):
    """Prefill + one decode step of the with-past graph equal HF PEFT's pass over the whole padded sequence."""
    from peftc.exporting.kv import cache_geometry, cache_prefix, with_past

    model = build(fam, "causal-lm")
    program = capture(model, "causal-lm", mode="eval")
    cfg = _CONFIGS[method]("CAUSAL_LM")
    insertion_pipeline(cfg)(program)
    state = program.adapter
    _perturb(state)
    hf = _hf_model(model, cfg, state)
    saved = AdapterState.load(state.save(tmp_path / "adapter"))  # what an export reads
    prefix = cache_prefix(model, saved)
    past = capture(model, "causal-lm", mode="eval", transform=with_past(prefix, saved.config.cache_positions))
    layers, kv_heads, head_dim = cache_geometry(model.config)
    empty = [torch.zeros(3, kv_heads, 0, head_dim)] * (2 * layers)
    for padding in ("left", "right"):
        ids, mask = _batch(program, padding)[:2]
        seq = ids.shape[1]
        full = torch.cat([ids, torch.tensor([[5, 9]] * 3)], dim=1)
        full_mask = torch.cat([mask, torch.ones(3, 2, dtype=torch.long)], dim=1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = hf(input_ids=full, attention_mask=full_mask, position_ids=positions).logits
            first = past(*_tokens(past, ids, mask, positions[:, :seq]), *empty)
            second = past(*_tokens(past, full[:, seq:], full_mask, positions[:, seq:]), *first[1:])
        expected = expected[:, -full.shape[1] :]  # prompt methods' logits also cover the virtual tokens
        diff = max(
            float((first[0] - expected[:, :seq])[mask.bool()].abs().max()),
            float((second[0] - expected[:, seq:]).abs().max()),
        )
        print(f"{fam}/{method} with past, {padding}-padded: peftc vs HF PEFT max diff {diff:.3g}")
        assert diff <= ATOL, padding
