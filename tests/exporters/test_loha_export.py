"""LoHa through ``peftc.exporting.export``: ONNX unmerged and merged, and swappable adapters (``.onnx_adapter``).

Bases are the tiny LLaMA (HF's default targets q_proj, v_proj: nn.Linear) and the tiny GPT-2 (HF's default
c_attn: a Conv1D, which peftc adapts as the equivalent nn.Linear). Run directories hold perturbed LoHa adapters
written by peftc's passes (every factor away from its init); the reference is HF PEFT (``PeftModel.from_pretrained``
on the saved adapter; for GPT-2 into the base with its Conv1D layers converted to nn.Linear, as HF PEFT 0.21's
LoHa refuses Conv1D) and the plain HF base model.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import linearise_conv1d
from onnx_export_cases import (
    ATOL,
    SPECS,
    TEST_SHAPES,
    make_inputs,
    onnx_input_names,
    ort_logits,
    save_tokenizer,
    scratch,
)

pytestmark = pytest.mark.usefixtures("export_cases")  # the module-level helpers use this session's cases

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


#: family -> sites of HF's default LoHa targets (what the run directories adapt)
SITES = {
    "llama": [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")],
    "gpt2": [f"transformer.h.{i}.attn.c_attn" for i in (0, 1)],
}


@functools.cache
def _base_dir(family: str) -> Path:
    base = scratch(f"loha-{family}") / "base"
    SPECS[family][1]().save_pretrained(base, safe_serialization=True)
    save_tokenizer(base)
    return base


def _run_dir(family: str, name: str, seed: int, **config) -> Path:
    """A run directory over the tiny ``family`` base holding a perturbed LoHa adapter."""
    from peftc.passes import insertion_pipeline
    from peftc.passes.loha import LoHaConfig

    from peftc.program import capture

    program = capture(SPECS[family][1](), "causal-lm", mode="eval")
    insertion_pipeline(LoHaConfig(task_type="CAUSAL_LM", **config))(program)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, t in sorted(program.adapter.tensors.items()):
            t.copy_(torch.randn(t.shape, generator=gen) * 0.3)
    run_dir = _base_dir(family).parent / name
    program.adapter.save(run_dir / "adapter")
    base = str(_base_dir(family))
    (run_dir / "run.json").write_text(json.dumps({"task": "causal-lm", "model": {"spec": base, "source": base}}))
    return run_dir


@functools.cache
def _run(family: str, name: str) -> Path:
    configs = {
        "loha-a": dict(seed=1, r=4, alpha=6),
        "loha-b": dict(
            seed=2, r=4, alpha=2, alpha_pattern={"llama": {"v_proj": 8}, "gpt2": {"h.1.attn.c_attn": 8}}[family]
        ),
        "loha-r2": dict(seed=3, r=2, alpha=4),
    }
    return _run_dir(family, name, **configs[name])


def _hf_peft(family: str, run_dir: Path) -> torch.nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(linearise_conv1d(_hf_base(family)), run_dir / "adapter").eval()


def _hf_base(family: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(_base_dir(family), use_safetensors=True).eval()


def _logits(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> np.ndarray:
    with torch.no_grad():
        return model(**x).logits.numpy()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gpt2"], ids=["llama", "gpt2-conv1d"])
def test_onnx_export_unmerged_and_merged_verify_and_match_hf_peft(family):
    from peftc.exporting import export

    run = _run(family, "loha-a")
    outs = {
        merge: export(run, format="onnx", merge=merge, out=scratch(f"loha-export-{family}") / "art", with_past=False)
        for merge in (False, True)
    }
    matmuls = {}
    for merge, out in outs.items():
        report = json.loads((out / "report.json").read_text())
        manifest = json.loads((out / "manifest.json").read_text())
        assert report["verified"] is True and manifest["merged"] is merge and manifest["adapter"]["peft_type"] == "LOHA"
        model = onnx.load(str(out / "model.onnx"))
        matmuls[merge] = sum(n.op_type in ("MatMul", "Gemm") for n in model.graph.node)
    # unmerged: one x·ΔWᵀ per site (the exporter folds ΔW's constant factors); merged: the base graph's matmuls
    assert matmuls[False] == matmuls[True] + len(SITES[family])
    reference, base = _hf_peft(family, run), _hf_base(family)
    names = onnx_input_names(outs[False] / "model.onnx")
    for batch, seq, pads in TEST_SHAPES:
        x = make_inputs("causal-lm", names, batch, seq, pads, seed=batch)
        rows = x["attention_mask"].bool().numpy()
        want = _logits(reference, x)
        assert np.abs(want - _logits(base, x))[rows].max() > 1e-2  # the adapter is not the identity
        for out in outs.values():
            np.testing.assert_allclose(ort_logits(out / "model.onnx", x)[rows], want[rows], atol=ATOL, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gpt2"], ids=["llama", "gpt2-conv1d"])
def test_swappable_loha_adapters_match_hf_peft_and_base(family):
    """Three adapters in one export: two of rank 4 (one with an alpha_pattern) and one of rank 2."""
    from peftc.exporting import export

    runs = [_run(family, "loha-a"), _run(family, "loha-b"), _run(family, "loha-r2")]
    out = export(runs, adapters_as_inputs=True, out=scratch(f"loha-swappable-{family}") / "art", with_past=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "LOHA" and manifest["adapters_as_inputs"] is True
    assert [a["rank"] for a in manifest["adapters"]] == [4, 4, 2]  # ranks differ: one symbolic rank dim serves both
    assert json.loads((out / "report.json").read_text())["verified"] is True
    inputs = {i["name"]: i for i in manifest["adapter_inputs"]}
    assert set(inputs) == {f"{s}.hada_w{k}_{ab}" for s in SITES[family] for k in (1, 2) for ab in "ab"}
    assert all(0 in i["default_shape"] for i in inputs.values())  # rank-0 defaults: the base model
    rank_dims = {str(d) for i in inputs.values() for d in i["shape"] if isinstance(d, str)}
    assert rank_dims and all(d.startswith("lora_rank") for d in rank_dims)  # a symbolic rank dim

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs() if i.name not in inputs]
    adapters = []
    for a in manifest["adapters"]:
        adapter = ort.LoraAdapter()
        adapter.Load(str(out / a["file"]))
        adapters.append(adapter)
    references = [_hf_peft(family, run) for run in runs]
    base = _hf_base(family)
    for batch, seq, pads in TEST_SHAPES:
        x = make_inputs("causal-lm", names, batch, seq, pads, seed=batch)
        rows = x["attention_mask"].bool().numpy()
        feeds = {k: v.numpy() for k, v in x.items()}
        want_base = _logits(base, x)
        np.testing.assert_allclose(session.run(["logits"], feeds)[0][rows], want_base[rows], atol=ATOL, rtol=0)
        for adapter, reference in zip(adapters * 2, references * 2, strict=True):  # alternate in one live session
            options = ort.RunOptions()
            options.add_active_adapter(adapter)
            want = _logits(reference, x)
            assert np.abs(want - want_base)[rows].max() > 1e-2
            np.testing.assert_allclose(session.run(["logits"], feeds, options)[0][rows], want[rows], atol=ATOL, rtol=0)
