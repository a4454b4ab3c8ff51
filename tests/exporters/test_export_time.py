"""What keeps a merged KV-cache export quick (README: "Exporting big models", **Time**).

A merged program is the base graph op for op with folded weights, so the ONNX exporter converts the
capture's own ``ExportedProgram`` with the merged weights instead of tracing the graph module again
(``torch.export`` is not called). The file must be the one the traced path writes (same interface,
same ops) and reproduce the unmerged adapted program under ONNX Runtime; a program whose ops changed
(LoRA kept as ops) or whose weights changed shape or dtype is traced as before.
"""

from __future__ import annotations

import collections
import copy
import dataclasses

import onnx
import pytest
import torch
from peftc.exporters.onnx import ONNX, _rename_symbols, export_program_onnx
from peftc.exporters.verify import compare_outputs, make_cases, run_torch

from peftc.program import get_tensor


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """A tiny GPT-2 KV-cache program with a non-identity LoRA: unmerged outputs on held-out cases, then merged."""
    import peft
    from conftest import tiny_gpt2
    from peftc.passes import merge_pipeline

    from peftc.adapters import AdapterState
    from peftc.exporting.graphs import adapted_program

    adapter_dir = tmp_path_factory.mktemp("adapter")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False)
    torch.manual_seed(1)
    peft.get_peft_model(tiny_gpt2(), config).save_pretrained(adapter_dir)  # lora_B random: not the identity
    program = adapted_program(tiny_gpt2(), "causal-lm", AdapterState.load(adapter_dir), with_past=True)
    assert program.exported_program() is None, "LoRA ops in the graph: it is no longer the captured one"
    cases = make_cases(program)
    reference = run_torch(program, cases, program.input_names)
    merge_pipeline()(program)
    return program, cases, reference


def _io(path) -> list[tuple]:
    model = onnx.load(str(path), load_external_data=False)
    return [
        (v.name, v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
        for v in [*model.graph.input, *model.graph.output]
    ]


def _ops(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def test_merged_program_is_converted_from_its_capture_not_traced_again(merged, monkeypatch, tmp_path):
    program, cases, reference = merged
    traces = []
    export = torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: traces.append(1) or export(*a, **k))

    export_program_onnx(program, tmp_path / "captured.onnx")
    assert traces == [], "the merged program was traced again"
    export_program_onnx(dataclasses.replace(program, captured=None), tmp_path / "traced.onnx")
    assert traces, "without its capture the graph module is traced"

    assert _io(tmp_path / "captured.onnx") == _io(tmp_path / "traced.onnx")
    assert ("present.0.key", 1, ["batch", 4, "past_sequence + sequence", 16]) in _io(tmp_path / "captured.onnx")
    assert _ops(tmp_path / "captured.onnx") == _ops(tmp_path / "traced.onnx")
    for path in ("captured.onnx", "traced.onnx"):  # logits and every present, at the real (unpadded) positions
        outputs = ONNX.run(tmp_path / path, cases, program.input_names, program.output_names)
        report = compare_outputs(outputs, reference, cases, "causal-lm", atol=1e-5, candidate=path)
        assert report.passed and report.max_abs_diff > 0, report.summary()


def test_a_weight_of_another_dtype_or_an_op_change_is_traced(merged):
    program, _, _ = merged
    assert program.exported_program() is not None
    weight = "model.transformer.h.0.mlp.c_fc.weight"
    owner, _, attr = weight.rpartition(".")
    module = program.graph_module.get_submodule(owner)
    kept = get_tensor(program.graph_module, weight)
    try:
        setattr(module, attr, torch.nn.Parameter(kept.double(), requires_grad=False))
        assert program.exported_program() is None
    finally:
        setattr(module, attr, kept)
    graph = copy.deepcopy(program.graph)  # the same ops, one of them changed
    changed = dataclasses.replace(program, graph_module=torch.fx.GraphModule(program.graph_module, graph))
    assert changed.exported_program() is not None
    node = next(n for n in graph.nodes if n.target == torch.ops.aten.add.Tensor)
    node.target = torch.ops.aten.sub.Tensor
    changed.graph_module.recompile()
    assert changed.exported_program() is None


def test_derived_dims_are_renamed_inside_expressions():
    names = {"s24": "sequence", "s36": "past_sequence"}
    assert _rename_symbols("s24 + s36", names) == "past_sequence + sequence"
    assert _rename_symbols("2*s7 + s24", names) == "2*s7 + sequence"
    assert _rename_symbols("batch", names) == "batch"
