"""LoKr through ``peftc.exporting.export``: unmerged and merged ONNX, and swappable LoKr adapters.

Each export verifies itself against the torch program (or raises); these tests also compare ONNX Runtime with
HF PEFT 0.21 on held-out, left-padded shapes (GPT-2: HF PEFT on its Conv1D layers as nn.Linear, see
``conftest.linearise_conv1d``). Adapters are perturbed away from init (every factor).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import linearise_conv1d
from lokr_cases import LAYOUTS, perturb
from onnx_export_cases import ATOL, SPECS, TEST_SHAPES, make_inputs, save_tokenizer, scratch

from peftc.errors import AdapterMismatchError

pytestmark = pytest.mark.usefixtures("export_cases")  # the module-level helpers use this session's cases

ort = pytest.importorskip("onnxruntime")
peft = pytest.importorskip("peft")


@functools.cache
def _base(family: str) -> Path:
    task, factory, _ = SPECS[family]
    base_dir = scratch(f"lokr-{family}") / "base"
    factory().save_pretrained(base_dir, safe_serialization=True)
    save_tokenizer(base_dir)
    return base_dir


@functools.cache
def _run(family: str, name: str, seed: int, **changes) -> Path:
    """A run directory over ``_base(family)`` holding a perturbed LoKr adapter of LAYOUTS[(family, kind)]."""
    from peftc.passes import insertion_pipeline

    from peftc.config import LoKrConfig
    from peftc.program import capture

    task, factory, _ = SPECS[family]
    kw = {**LAYOUTS[(family, changes.pop("kind", "decompose_both"))], **changes}
    program = capture(factory(), task, mode="eval")
    insertion_pipeline(LoKrConfig(task_type="CAUSAL_LM", **kw))(program)
    perturb(program.adapter.tensors.values(), seed=seed)
    run_dir = _base(family).parent / name
    program.adapter.save(run_dir / "adapter")
    base = str(_base(family))
    (run_dir / "run.json").write_text(json.dumps({"task": task, "model": {"spec": base, "source": base}}))
    return run_dir


def _hf(family: str, adapter_dir: Path | None) -> torch.nn.Module:
    import transformers

    auto = getattr(transformers, SPECS[family][2])
    model = auto.from_pretrained(_base(family), use_safetensors=True).eval()
    if adapter_dir is None:
        return model
    return peft.PeftModel.from_pretrained(linearise_conv1d(model), str(adapter_dir)).eval()


def _session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _compare(session, reference, base, options=None) -> float:
    """Max |ORT - reference| over real positions of the held-out shapes (asserting ATOL, and not the base)."""
    names = [i.name for i in session.get_inputs()]
    worst = 0.0
    for batch, seq, pads in TEST_SHAPES:
        x = make_inputs("causal-lm", names, batch, seq, pads, seed=batch)
        rows = x["attention_mask"].bool().numpy()
        got = session.run(["logits"], {k: v.numpy() for k, v in x.items()}, options)[0]
        with torch.no_grad():
            want, want_base = reference(**x).logits.numpy(), base(**x).logits.numpy()
        assert np.abs(want[rows] - want_base[rows]).max() > 1e-2  # the adapter is not the identity
        np.testing.assert_allclose(got[rows], want[rows], atol=ATOL, rtol=0)
        worst = max(worst, float(np.abs(got[rows] - want[rows]).max()))
    return worst


def _matmuls(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return sum(n.op_type in ("Gemm", "MatMul") for n in model.graph.node)


#: GPT-2 in the default suite, LLaMA slow (as the other exporter tests).
FAMILIES = [pytest.param("gpt2"), pytest.param("llama", marks=pytest.mark.slow)]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_unmerged_and_merged_exports_verify_and_match_hf_peft(family):
    """Unmerged: one more matmul per site (x·ΔWᵀ; ONNX folds the constant kron(w1, w2)·s into one ΔW
    initializer). Merged: the base graph, ΔW folded into W."""
    from peftc.exporting import export

    run_dir = _run(family, "run", seed=1)
    reference, base = _hf(family, run_dir / "adapter"), _hf(family, None)
    matmuls = {}
    for merge in (False, True):
        out = export(run_dir, merge=merge, out=run_dir.parent / f"export-{merge}", with_past=False)
        report = json.loads((out / "report.json").read_text())
        assert report["verified"] is True
        matmuls[merge] = _matmuls(out / "model.onnx")
        diff = _compare(_session(out / "model.onnx"), reference, base)
        print(f"EXPORT {family} merged={merge} ORT vs HF PEFT max_abs_diff={diff:.3g}", report["max_abs_diff"])
    sites = {k.rsplit(".lokr_", 1)[0] for k in _state(run_dir).tensors}
    assert matmuls[False] - matmuls[True] == len(sites) == 4


def _state(run_dir: Path):
    from peftc.adapters import AdapterState

    return AdapterState.load(run_dir / "adapter")


@functools.cache
def _swappable(family: str) -> tuple[Path, list[Path]]:
    from peftc.exporting import export

    runs = [_run(family, "run", seed=1), _run(family, "run-b", seed=2, alpha=9.0)]
    out = export(runs, adapters_as_inputs=True, out=scratch(f"lokr-{family}-swappable") / "art", with_past=False)
    return out, runs


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_swappable_two_lokr_adapters_match_hf_peft_and_base(family):
    out, runs = _swappable(family)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "LOKR" and manifest["adapters_as_inputs"] is True
    assert [a["name"] for a in manifest["adapters"]] == ["run", "run-b"]
    assert json.loads((out / "report.json").read_text())["verified"] is True
    inputs = {i["name"]: i for i in manifest["adapter_inputs"]}
    assert inputs and all(".lokr_" in n for n in inputs)
    for name, spec in inputs.items():  # decompose_both: every factor has the symbolic rank, default rank 0
        assert "lora_rank" in spec["shape"] and 0 in spec["default_shape"], name

    session = _session(out / "model.onnx")
    base = _hf(family, None)
    for a, run in zip(manifest["adapters"] * 2, runs * 2, strict=True):  # alternate in one live session
        adapter = ort.LoraAdapter()
        adapter.Load(str(out / a["file"]))
        options = ort.RunOptions()
        options.add_active_adapter(adapter)
        diff = _compare(session, _hf(family, run / "adapter"), base, options)
        print(f"SWAPPABLE {family} {a['name']} ORT vs HF PEFT max_abs_diff={diff:.3g}")
    names = [i.name for i in session.get_inputs()]
    x = make_inputs("causal-lm", names, 3, 9, [3, 0, 1])
    rows = x["attention_mask"].bool().numpy()
    got = session.run(["logits"], {k: v.numpy() for k, v in x.items()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got[rows], base(**x).logits.numpy()[rows], atol=ATOL, rtol=0)  # no adapter: base


@pytest.mark.slow
def test_swappable_full_factors_are_static_inputs():
    """w1 and w2 full (r >= half the factor dims): static inputs, zero defaults; two adapters still swap."""
    from peftc.exporting import export

    runs = [_run("llama", f"full-{i}", seed=3 + i, kind="w2_decomposed", r=8, alpha=3.0 * i) for i in (1, 2)]
    out = export(runs, adapters_as_inputs=True, out=scratch("lokr-full-swappable") / "art", with_past=False)
    inputs = {i["name"]: i for i in json.loads((out / "manifest.json").read_text())["adapter_inputs"]}
    assert inputs and all(n.endswith((".lokr_w1", ".lokr_w2")) for n in inputs)
    assert all(all(isinstance(d, int) for d in s["shape"]) for s in inputs.values())
    session = _session(out / "model.onnx")
    for run in runs:
        adapter = ort.LoraAdapter()
        adapter.Load(str(out / "adapters" / f"{run.name}.onnx_adapter"))
        options = ort.RunOptions()
        options.add_active_adapter(adapter)
        _compare(session, _hf("llama", run / "adapter"), _hf("llama", None), options)


@pytest.mark.slow
def test_swappable_adapters_with_another_layout_are_refused():
    """One model serves one factor layout per site: a full-w2 adapter does not fit a decomposed-w2 graph."""
    from peftc.exporting import export

    decomposed = _run("llama", "rank-2", seed=9, kind="w2_decomposed", r=2)  # the runs of the tests above and below
    full = _run("llama", "full-1", seed=4, kind="w2_decomposed", r=8, alpha=3.0)
    runs = [decomposed, full]
    with pytest.raises(AdapterMismatchError, match="q_proj"):
        export(runs, adapters_as_inputs=True, out=scratch("lokr-layouts") / "art", with_past=False)


@pytest.mark.slow
def test_swappable_lokr_adapters_of_different_ranks():
    from peftc.exporting import export

    runs = [_run("llama", f"rank-{r}", seed=7 + r, kind="w2_decomposed", r=r) for r in (2, 3)]
    out = export(runs, adapters_as_inputs=True, out=scratch("lokr-ranks") / "art", with_past=False)
    assert json.loads((out / "report.json").read_text())["verified"] is True
