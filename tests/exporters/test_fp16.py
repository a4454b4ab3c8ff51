"""``--dtype float16``: half-precision artifacts, loaded and verified in float16, checked against HF PEFT in float32.

The independent check here is HF PEFT in float32 on the same adapter: ONNX Runtime's float16
logits stay within the documented float16 tolerance (``peftc.exporting.DTYPES``) of it, and the
adapter still moves them by more than that (a lost branch would not pass).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from test_with_past import _hf_peft, _prompt_batch

from peftc.errors import ConfigError
from peftc.exporting import DTYPES, export

FP16 = DTYPES["float16"]


def _ort(path, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(outputs, {i.name: feeds[i.name] for i in session.get_inputs()})


@pytest.mark.parametrize(
    ("family", "with_past"),
    [
        pytest.param("gpt2", False, id="gpt2-plain"),
        pytest.param("llama", True, id="llama-gqa-with-past", marks=pytest.mark.slow),
    ],
)
def test_float16_merged_lora_matches_float32_hf_peft(export_cases, family, with_past, tmp_path):
    root, peft_model = _hf_peft(export_cases, family, "lora")
    out = export(
        root / "adapter", model=str(root / "base"), merge=True, dtype="float16", with_past=with_past, out=tmp_path / "a"
    )
    model = onnx.load(str(out / "model.onnx"))
    weights = [t for t in model.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights if len(t.dims) == 2)
    manifest = json.loads((out / "manifest.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert manifest["dtype"] == "float16" and (report["atol"], report["rtol"]) == (FP16.atol, FP16.rtol)
    assert report["verified"]

    batch = _prompt_batch()
    mask = batch["attention_mask"]
    batch["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    feeds = {k: v.numpy() for k, v in batch.items()}
    if with_past:
        layers = sum(1 for i in manifest["inputs"] if i["name"].endswith(".key"))
        shape = next(i["shape"] for i in manifest["inputs"] if i["name"] == "past_key_values.0.key")
        empty = np.zeros((3, shape[1], 0, shape[3]), np.float16)
        feeds.update({f"past_key_values.{i}.{kind}": empty for i in range(layers) for kind in ("key", "value")})
    (logits,) = _ort(out / "model.onnx", feeds, ["logits"])
    assert logits.dtype == np.float16
    with torch.no_grad():
        want = peft_model(**batch).logits.numpy()
        base = peft_model.get_base_model()
        with peft_model.disable_adapter():
            base_logits = base(**batch).logits.numpy()
    rows = mask.bool().numpy()
    diff = np.abs(logits.astype(np.float32)[rows] - want[rows]).max()
    print(f"float16 {family} vs float32 HF PEFT: max abs diff {diff:.2e}")
    assert diff <= FP16.atol + FP16.rtol * np.abs(want[rows]).max()
    assert np.abs(base_logits[rows] - want[rows]).max() > 10 * diff


def test_float16_refuses_swappable_adapters(export_cases, tmp_path):
    root, _ = _hf_peft(export_cases, "gpt2", "lora")
    with pytest.raises(ConfigError, match="float16"):
        export(
            [root / "adapter"], model=str(root / "base"), adapters_as_inputs=True, dtype="float16", out=tmp_path / "x"
        )
    with pytest.raises(ConfigError, match="dtype 'bfloat16' is not supported"):
        export(root / "adapter", model=str(root / "base"), dtype="bfloat16", out=tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
