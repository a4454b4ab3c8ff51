"""Export is one pipeline over a registry of exporters: the protocol, the registry, the CLI, and a new format.

Structural checks (no export needed) that every registered exporter satisfies the protocol, that
the CLI offers exactly the registry's formats, that no ``if format == …`` chain is left and that
exporters import no orchestration; then a fake format registered in a test goes through the
whole pipeline — what adding ExecuTorch will be: one exporter and one registration.
"""

from __future__ import annotations

import ast
import copy
import inspect
import json
import re
from pathlib import Path

import pytest
import torch
from peftc.exporters import (
    AdapterFiles,
    Exporter,
    ExportRequest,
    RuntimeConfig,
    WriteOptions,
    exporters,
    formats,
    get_exporter,
)
from peftc.exporters import registry as registry_module

from peftc.errors import ConfigError, ExportVerificationError

REPO = Path(__file__).resolve().parents[2]
SOURCES = [*sorted((REPO / "peftc").rglob("*.py")), *sorted((REPO / "exporters").glob("*.py"))]


def test_every_registered_exporter_satisfies_the_protocol():
    assert formats() == ["onnx", "torchscript", "aoti", "executorch"]
    methods = ("model_file", "check", "write", "run", "describe_io", "manifest_entries")
    for exporter in exporters():
        assert isinstance(exporter, Exporter), exporter
        assert get_exporter(exporter.name) is exporter
        assert all(isinstance(getattr(exporter, a), str) and getattr(exporter, a) for a in ("runtime", "summary"))
        assert isinstance(exporter.cache_by_default, bool)
        assert exporter.adapter_files is None or isinstance(exporter.adapter_files, AdapterFiles)
        assert exporter.runtime_config is None or isinstance(exporter.runtime_config, RuntimeConfig)
        for name in methods:  # the protocol's parameters, in its order
            want = list(inspect.signature(getattr(Exporter, name)).parameters)[1:]
            assert list(inspect.signature(getattr(exporter, name)).parameters) == want, (exporter.name, name)
        single, encoder = exporter.model_file(), exporter.model_file("encoder")
        assert "." in single and encoder != single and encoder.endswith(single), (single, encoder)
    assert [e.model_file() for e in exporters()] == ["model.onnx", "model.pt", "model.pt2", "model.pte"]
    for exporter in exporters():  # one role -> file rule (registry.role_file) for every format
        single = exporter.model_file()
        assert exporter.model_file("model") == single
        assert exporter.model_file("decoder_with_past") == f"decoder_with_past_{single}"
        assert exporter.model_file("unet") == f"unet/{single}"


def test_unknown_format_lists_the_registry():
    with pytest.raises(
        ConfigError, match="export format 'tflite' is not supported; supported: onnx, torchscript, aoti, executorch"
    ):
        get_exporter("tflite")


def test_cli_format_choices_are_the_registry(monkeypatch):
    import click

    from peftc.cli import cli

    option = next(p for p in cli.commands["export"].params if p.name == "fmt")
    assert tuple(option.type.choices) == tuple(formats())
    help_text = option.get_help_record(click.Context(cli.commands["export"]))[1]
    assert all(f"{e.name}: {e.summary}" in help_text for e in exporters())
    fake = _FakeExporter()
    monkeypatch.setitem(registry_module._REGISTRY, fake.name, fake)
    assert tuple(option.type.choices) == (*formats(),) and "fake" in option.type.choices  # read when needed


def test_no_format_chains_are_left():
    """What varies by format is asked of the registry: no ``format == "onnx"`` / ``fmt != …`` anywhere."""
    chain = re.compile(r"""\b(format|fmt)\s*(==|!=|in)\s*[("'\[]""")
    found = [
        f"{p.relative_to(REPO)}:{n}"
        for p in SOURCES
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if chain.search(line)
    ]
    assert found == []


def test_exporters_import_no_orchestration():
    """Exporters know programs and files: not the pipeline, runs, or how graphs were captured."""
    banned = ("peftc.exporting", "peftc.runs", "peftc.kv", "peftc.seq2seq", "peftc.training", "peftc.cli")
    for path in sorted((REPO / "exporters").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            assert not [n for n in names if n.startswith(banned)], (path.name, names)
    assert not (REPO / "peftc" / "kv.py").exists() and not (REPO / "peftc" / "seq2seq.py").exists()


@pytest.mark.parametrize(
    ("format", "request_", "match"),
    [
        ("torchscript", ExportRequest(adapters_as_inputs=True), "TorchScript takes one adapter"),
        ("torchscript", ExportRequest(dtype="float16"), "--dtype float16 is supported for --format onnx only"),
        ("torchscript", ExportRequest(graphs=2), "--format torchscript takes causal-lm, seq-cls and token-cls"),
        ("aoti", ExportRequest(adapters_as_inputs=True), "AOTInductor takes one adapter"),
        ("aoti", ExportRequest(with_past=True), "--with-past with --format aoti does not verify"),
    ],
)
def test_libtorch_exporters_refuse_what_they_cannot_take(format, request_, match):
    with pytest.raises(ConfigError, match=match):
        get_exporter(format).check(request_)


def test_onnx_takes_every_configuration():
    onnx = get_exporter("onnx")
    onnx.check(ExportRequest(adapters_as_inputs=True, dtype="float16", graphs=2, with_past=True))
    assert onnx.cache_by_default and onnx.adapter_files is not None and onnx.adapter_files.suffix == ".onnx_adapter"
    assert get_exporter("torchscript").check(ExportRequest(with_past=True)) is None  # only when asked


def test_aoti_without_a_compiler_is_refused_before_any_work(monkeypatch):
    import peftc.exporters.aoti as aoti

    monkeypatch.setattr(aoti, "compiler_available", lambda: None)
    with pytest.raises(ConfigError, match="no compiler was found"):
        get_exporter("aoti").check(ExportRequest())


# -- a new format is one exporter and one registration ---------------------------------------------
class _FakeExporter:
    """Writes the metadata as the "model file" and keeps the program in memory to run it: torch vs torch."""

    name = "fake"
    runtime = "FakeRuntime"
    summary = "model.fake (a test double)"
    cache_by_default = False
    adapter_files = None
    runtime_config = None
    cache_in_program = False

    def __init__(self, offset: float = 0.0):
        self.offset = offset
        self.calls: list[str] = []
        self.programs: dict[Path, object] = {}

    def model_file(self, role=None):
        return "model.fake" if role is None else f"{role}_model.fake"

    def check(self, request):
        self.calls.append("check")
        if request.adapters_as_inputs:
            raise ConfigError("fake takes no adapters as inputs")

    def write(self, program, path, metadata, options):
        self.calls.append("write")
        assert isinstance(options, WriteOptions)
        # a format's file is independent of the torch program (the pipeline frees the torch weights before
        # verifying): the double keeps a copy, as a file would
        self.programs[Path(path).name] = copy.deepcopy(program)
        Path(path).write_text(json.dumps(metadata))

    def run(self, path, cases, input_names, output_names, adapter=None):
        from peftc.exporters.verify import numpy_outputs

        self.calls.append("run")
        program = self.programs[Path(path).name]
        with torch.no_grad():
            return [numpy_outputs(program(*c.ordered(input_names))) + self.offset for c in cases]

    def describe_io(self, path, program):
        from peftc.exporters.manifest import program_io

        self.calls.append("describe_io")
        return program_io(program)

    def manifest_entries(self, path, program, options):
        self.calls.append("manifest_entries")
        return {"opset": None, "fake": {"metadata": json.loads(Path(path).read_text())}}


def test_a_registered_format_goes_through_the_whole_pipeline(export_cases, monkeypatch, tmp_path):
    from peftc.exporting import export

    fake = _FakeExporter()
    exporters()  # the registry loaded, then a copy of it for this test only
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))
    assert registry_module.register_exporter(fake) is fake and formats()[-1] == "fake"
    built = export_cases.build("gpt2")
    out = export(built.run_dir, format="fake", merge=True, out=tmp_path / "art")
    assert fake.calls == ["check", "write", "run", "describe_io", "manifest_entries"]  # each stage once, in order
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert "model.fake" in files and {"manifest.json", "report.json", "config.json"} <= set(files)
    assert "adapter/adapter_model.safetensors" in files
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "fake" and manifest["model_file"] == "model.fake" and manifest["opset"] is None
    assert manifest["with_past"] is False  # the format makes no cache unless asked
    assert manifest["fake"]["metadata"]["peftc.merged"] == "true" and manifest["method"] == "LORA"
    assert [i["name"] for i in manifest["inputs"]] == ["input_ids", "attention_mask", "position_ids"]
    report = json.loads((out / "report.json").read_text())
    assert report["fake_vs_torch"]["candidate"] == "FakeRuntime (model.fake)"
    assert report["fake_vs_torch"]["passed"] and report["merged_vs_unmerged"]["passed"]

    with pytest.raises(ConfigError, match="fake takes no adapters as inputs"):
        export([built.run_dir], format="fake", adapters_as_inputs=True, out=tmp_path / "lift")
    wrong = _FakeExporter(offset=1.0)
    monkeypatch.setitem(registry_module._REGISTRY, "fake", wrong)
    with pytest.raises(ExportVerificationError, match=r"FakeRuntime \(model.fake\) does not reproduce") as info:
        export(built.run_dir, format="fake", out=tmp_path / "wrong")
    assert info.value.exit_code == 3 and not (tmp_path / "wrong").exists()
    assert wrong.calls == ["check", "write", "run"]  # nothing described, nothing written


def test_register_refuses_a_second_exporter_for_a_format_and_a_non_exporter():
    with pytest.raises(ValueError, match="'onnx' is registered twice"):
        registry_module.register_exporter(type("Other", (_FakeExporter,), {"name": "onnx"})())
    with pytest.raises(TypeError, match="does not implement the Exporter protocol"):
        registry_module.register_exporter(object())
