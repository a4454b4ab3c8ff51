"""DoRA exports: unmerged and merged ONNX, and swappable adapters (A, pre-scaled B and m as graph inputs).

Two GPT-2 DoRA adapters (ranks 4 and 8, other targets than plain LoRA's default, B random and m off
‖W‖ by ±20 %) over the shared tiny GPT-2 base of onnx_export_cases. The reference is HF PEFT
(``PeftModel.from_pretrained`` on the saved adapter) and the plain HF model, never peftc itself.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx_export_cases import (
    TEST_SHAPES,
    base_onnx,
    build,
    hf_logits,
    make_inputs,
    max_diff,
    onnx_input_names,
    ort_logits,
    scratch,
)

from peftc.errors import AdapterMismatchError

pytestmark = pytest.mark.usefixtures("export_cases")  # the module-level helpers use this session's cases

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("peft", reason="HF PEFT is the reference for these tests")

ATOL = 1e-5
TARGETS = ["c_attn", "c_fc"]
MAGNITUDE = "lora_magnitude_vector"


@functools.cache
def _run(name: str, r: int, alpha: float, seed: int) -> Path:
    """A run directory holding a DoRA adapter over ``build("gpt2")``'s base, away from its init."""
    from peftc.passes import insertion_pipeline

    from peftc.config import LoraConfig
    from peftc.models import load_model
    from peftc.program import capture

    built = build("gpt2")
    program = capture(load_model(built.base_dir, "causal-lm").model, "causal-lm", mode="eval")
    config = LoraConfig(r=r, lora_alpha=alpha, use_dora=True, target_modules=TARGETS, task_type="CAUSAL_LM")
    insertion_pipeline(config)(program)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in sorted(program.adapter.tensors.items()):
            if "lora_B" in key:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.1)
            elif MAGNITUDE in key:
                tensor.mul_(1 + 0.2 * torch.randn(tensor.shape, generator=gen))
    run_dir = scratch(f"dora-{name}") / name
    program.adapter.save(run_dir / "adapter")
    (run_dir / "run.json").write_text((built.run_dir / "run.json").read_text())
    return run_dir


def _runs() -> list[Path]:
    return [_run("dora-r4", r=4, alpha=8, seed=7), _run("dora-r8", r=8, alpha=4, seed=11)]


@functools.cache
def _export(mode: str) -> Path:
    from peftc.exporting import export

    out = scratch(f"dora-export-{mode}") / "art"
    if mode == "swappable":
        return export(_runs(), format="onnx", adapters_as_inputs=True, out=out, with_past=False)
    return export(_runs()[0], format="onnx", merge=mode == "merged", out=out, with_past=False)


def _hf_peft(run_dir: Path) -> torch.nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(build("gpt2").hf_base(), run_dir / "adapter").eval()


def _histogram(path: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["unmerged", "merged"])
def test_dora_onnx_matches_hf_peft(mode):
    out = _export(mode)
    report = json.loads((out / "report.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert report["verified"] is True and report["max_abs_diff"] <= ATOL
    assert manifest["merged"] is (mode == "merged")
    path = out / "model.onnx"
    names = onnx_input_names(path)
    reference, base = _hf_peft(_runs()[0]), build("gpt2").hf_base()
    worst = 0.0
    for batch, seq, pads in TEST_SHAPES:
        inputs = make_inputs("causal-lm", names, batch, seq, pads)
        got = ort_logits(path, inputs)
        diff = max_diff("causal-lm", got, hf_logits(reference, inputs), inputs)
        assert diff <= ATOL, (batch, seq, pads, diff)
        assert max_diff("causal-lm", got, hf_logits(base, inputs), inputs) > 1e-2  # not the identity
        worst = max(worst, diff)
    print(f"\nDoRA ONNX {mode} vs HF PEFT: {worst:.3g} (export report {report['max_abs_diff']:.3g})")
    inits = {i.name for i in onnx.load(str(path), load_external_data=False).graph.initializer}
    magnitudes = [n for n in inits if MAGNITUDE in n]
    if mode == "merged":  # the base graph op for op, nothing of DoRA left
        assert _histogram(path) == _histogram(base_onnx("gpt2"))
        assert not magnitudes and not [n for n in inits if "lora_" in n]
    else:  # the norm of W + s·BA is computed in the graph, from the magnitude and A, B initializers
        assert len(magnitudes) == 2 * len(TARGETS)
        assert _histogram(path) != _histogram(base_onnx("gpt2"))


@pytest.mark.slow
def test_dora_swappable_two_adapters_match_hf_peft_and_base():
    from peftc.exporters.manifest import check_manifest
    from peftc.exporters.swappable import check_adapter

    out = _export("swappable")
    runs = _runs()
    manifest = json.loads((out / "manifest.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert report["verified"] is True and manifest["adapters_as_inputs"] is True
    assert [a["name"] for a in manifest["adapters"]] == ["dora-r4", "dora-r8"]
    assert [a["rank"] for a in manifest["adapters"]] == [4, 8]
    assert check_manifest(out) == []
    inputs = {i["name"]: i for i in manifest["adapter_inputs"]}
    sites = [f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("attn.c_attn", "mlp.c_fc")]
    assert sorted(inputs) == sorted(f"{s}.{p}" for s in sites for p in ("lora_A", "lora_B", MAGNITUDE))
    for s in sites:
        out_features = 192 if "c_attn" in s else 256
        assert inputs[f"{s}.lora_A"]["shape"] == ["lora_rank", 64] and inputs[f"{s}.lora_A"]["default_shape"] == [0, 64]
        assert inputs[f"{s}.{MAGNITUDE}"]["shape"] == inputs[f"{s}.{MAGNITUDE}"]["default_shape"] == [out_features]
    files = [out / a["file"] for a in manifest["adapters"]]
    for path, rank in zip(files, (4, 8), strict=True):
        tensors = check_adapter(out / "model.onnx", path)
        assert {shape[0] for name, (shape, _) in tensors.items() if name.endswith("lora_A")} == {rank}

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    token_names = [i.name for i in session.get_inputs()]
    assert not [n for n in token_names if n in inputs]  # every adapter input has a default
    adapters = []
    for path in files:
        adapter = ort.LoraAdapter()
        adapter.Load(str(path))
        adapters.append(adapter)
    references = [_hf_peft(run) for run in runs]
    base, base_path = build("gpt2").hf_base(), base_onnx("gpt2")
    worst, worst_base, worst_base_onnx = 0.0, 0.0, 0.0
    for batch, seq, pads in TEST_SHAPES:
        x = make_inputs("causal-lm", token_names, batch, seq, pads, seed=batch)
        feeds = {k: v.numpy() for k, v in x.items()}
        want_base = hf_logits(base, x)
        got_base = session.run(["logits"], feeds)[0]
        worst_base = max(worst_base, max_diff("causal-lm", got_base, want_base, x))
        # no adapter: rank-0 A, B' and m = ‖W‖ make m/‖W‖ = 1, the base export's own numbers
        worst_base_onnx = max(worst_base_onnx, float(np.abs(got_base - ort_logits(base_path, x)).max()))
        for adapter, reference in zip(adapters * 2, references * 2, strict=True):  # alternate in one live session
            options = ort.RunOptions()
            options.add_active_adapter(adapter)
            got = session.run(["logits"], feeds, options)[0]
            want = hf_logits(reference, x)
            assert max_diff("causal-lm", want, want_base, x) > 1e-2  # not the identity
            worst = max(worst, max_diff("causal-lm", got, want, x))
    print(
        f"\nDoRA swappable: adapters vs HF PEFT {worst:.3g}, no adapter vs HF base {worst_base:.3g}, "
        f"vs the base ONNX export {worst_base_onnx:.3g}"
    )
    assert worst <= ATOL and worst_base <= ATOL and worst_base_onnx <= 1e-6


@pytest.mark.slow
def test_dora_adapter_file_without_its_magnitudes_is_refused():
    from peftc.exporters.swappable import check_adapter, read_adapter, write_adapter

    out = _export("swappable")
    good = out / "adapters" / "dora-r4.onnx_adapter"
    values = {name: np.zeros(shape, np.float32) for name, (shape, _) in read_adapter(good).items()}
    first = sorted(n for n in values if n.endswith(MAGNITUDE))[0]
    tmp = scratch("dora-bad-adapters")
    missing = write_adapter(tmp / "missing.onnx_adapter", {k: v for k, v in values.items() if k != first})
    with pytest.raises(AdapterMismatchError, match=rf"no tensor '{first}' that the model takes"):
        check_adapter(out / "model.onnx", missing)
    short = write_adapter(tmp / "short.onnx_adapter", {**values, first: np.zeros(7, np.float32)})
    with pytest.raises(AdapterMismatchError, match=rf"{first}.*shape \[7\]"):
        check_adapter(out / "model.onnx", short)
