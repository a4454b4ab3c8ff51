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
import os
import sys
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


_SESSION_PEAK = """
import json, sys
import numpy as np, onnxruntime as ort
path, level, order, arena = sys.argv[1], *map(int, sys.argv[2:5])
def kb(field):  # VmHWM, the peak of this process alone (ru_maxrss starts at the parent's peak)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))
before = kb("VmRSS")
options = ort.SessionOptions()
options.graph_optimization_level = ort.GraphOptimizationLevel(level)
options.execution_order = ort.ExecutionOrder(order)
options.enable_cpu_mem_arena = bool(arena)
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
x = np.random.default_rng(0).standard_normal((4, 1024)).astype(np.float16)
y = session.run(None, {"x": x})[0]
np.save(sys.argv[5], y)
print(json.dumps({"growth": kb("VmHWM") - before}))
"""


def _matmul_chain(path, dtype, layers: int = 48, width: int = 1024) -> int:
    """An ONNX file of ``layers`` ``MatMul``s by ``width``² weights of ``dtype`` (external data); its weight bytes."""
    from onnx import helper, numpy_helper

    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    rng = np.random.default_rng(1)
    weights = [(rng.standard_normal((width, width)) / np.sqrt(width)).astype(dtype) for _ in range(layers)]
    nodes = [helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"h{i + 1}"]) for i in range(layers)]
    nodes[0].input[0], nodes[-1].output[0] = "x", "y"
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", elem, ["batch", width])],
        [helper.make_tensor_value_info("y", elem, ["batch", width])],
        [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    return sum(w.nbytes for w in weights)


def _session_growth(path, options, out) -> int:
    """Peak RSS growth of a fresh process that opens ``path`` with ``options`` and runs it once (Linux)."""
    import subprocess

    args = [int(options.graph_optimization_level), int(options.execution_order), int(options.enable_cpu_mem_arena)]
    cmd = [sys.executable, "-c", _SESSION_PEAK, str(path), *map(str, args), str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(done.stdout.splitlines()[-1])["growth"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc/self/status")
def test_float16_verification_session_holds_one_copy_of_the_weights(tmp_path):
    """ONNX Runtime's CPU session of a float16 file holds float32 copies of its weights by default (2x
    the file's weights, more at its peak); peftc's verification options hold the float16 ones, with
    the same outputs. A float32 file keeps ONNX Runtime's defaults."""
    import onnxruntime as ort
    from peftc.exporters.onnx import verification_options

    half = tmp_path / "half.onnx"
    weights = _matmul_chain(half, np.float16)  # 96 MB of float16 weights, 192 MB as float32
    full = tmp_path / "full.onnx"
    _matmul_chain(full, np.float32, layers=1)

    default = ort.SessionOptions()
    lean = verification_options(half)
    kept = verification_options(full)
    assert kept.graph_optimization_level == default.graph_optimization_level
    assert kept.execution_order == default.execution_order and kept.enable_cpu_mem_arena
    assert lean.graph_optimization_level != default.graph_optimization_level

    grown_default = _session_growth(half, default, tmp_path / "default.npy")
    grown_lean = _session_growth(half, lean, tmp_path / "lean.npy")
    assert grown_default > 1.8 * weights, (grown_default, weights)  # the float32 copies: what is avoided
    assert grown_lean < 1.5 * weights, (grown_lean, weights)  # the float16 weights + a float32 one or so
    y_default, y_lean = np.load(tmp_path / "default.npy"), np.load(tmp_path / "lean.npy")
    assert np.abs(y_default).max() > 0.1
    np.testing.assert_allclose(y_lean.astype(np.float32), y_default.astype(np.float32), rtol=0, atol=1e-2)
