"""What keeps an export's memory near one copy of its weights (README: "Exporting big models").

- the written ONNX model lets go of the torch weights (onnxscript's rewrite rules keep the last
  graph they matched, which held a view of every weight);
- the pipeline frees the torch weights before the verification session loads its own copy, and
  the artifact still verifies (its torch references were computed before);
- large weights go to aligned external data (ONNX Runtime maps them); float16 loads in float16.
"""

from __future__ import annotations

import gc
import json
import weakref

import numpy as np
import onnx
import pytest
import torch

from peftc.exporting import export


def test_written_onnx_model_releases_the_torch_weights(tmp_path):
    from conftest import tiny_gpt2
    from peftc.exporters.onnx import export_program_onnx

    from peftc.program import capture

    model = tiny_gpt2()
    program = capture(model, "causal-lm", mode="eval")
    weight = model.transformer.h[0].mlp.c_fc.weight
    alive = weakref.ref(weight)
    export_program_onnx(program, tmp_path / "model.onnx", external_data=True)
    del model, program, weight
    gc.collect()
    assert alive() is None, "a torch weight outlived its ONNX export: " + ", ".join(
        type(r).__name__ for r in gc.get_referrers(alive())
    )


@pytest.mark.slow
def test_export_frees_torch_weights_and_aligns_external_data(export_cases, monkeypatch, tmp_path):
    import peftc.exporters.onnx as onnx_exporter

    import peftc.exporting.pipeline as pipeline

    freed: list[list[torch.Tensor]] = []
    release = pipeline.release_weights

    def spy(modules):
        release(modules)
        freed.append([t for m in modules for t in [*m.parameters(), *m.buffers()]])

    monkeypatch.setattr(pipeline, "release_weights", spy)
    monkeypatch.setattr(onnx_exporter, "EXTERNAL_DATA_THRESHOLD", 0)  # every model counts as large
    monkeypatch.setattr(onnx_exporter, "_ALIGN_ABOVE", 1024)  # the tiny model's tensors are KBs
    built = export_cases.build("gpt2")
    out = export(built.run_dir, merge=True, out=tmp_path / "out")

    (tensors,) = freed  # released once, before verification, and all of them
    assert tensors and all(t.numel() == 0 for t in tensors)
    report = json.loads((out / "report.json").read_text())
    assert report["verified"] and report["max_abs_diff"] <= report["atol"]

    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    offsets = {t.name: int({e.key: e.value for e in t.external_data}["offset"]) for t in external}
    large = [t.name for t in external if int(np.prod(t.dims)) * 4 > 1024]
    assert len(large) >= 8  # the blocks' weights, the embeddings
    assert all(offsets[n] % 65536 == 0 for n in large), {n: offsets[n] for n in large}
