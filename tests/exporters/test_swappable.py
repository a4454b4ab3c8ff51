"""Swappable LoRA adapters: the lift pass, ``export(..., adapters_as_inputs=True)`` and ``.onnx_adapter`` files.

References are independent of peftc: HF PEFT (``PeftModel.from_pretrained``) for each adapter and
the plain HF model for the base. Adapters are not at identity init (B and the seq-cls head are
perturbed), and the two GPT-2 adapters have different ranks (4 and 8) and scales.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_gpt2
from onnx_export_cases import ATOL, TEST_SHAPES, make_inputs, save_tokenizer

from peftc.errors import AdapterMismatchError, ConfigError

ort = pytest.importorskip("onnxruntime")


# -- the lift pass ---------------------------------------------------------------------------------
def _lora_program(r: int, alpha: float, seed: int, targets=None):
    from peftc.passes import insertion_pipeline

    from peftc.config import LoraConfig
    from peftc.program import capture

    program = capture(tiny_gpt2(), "causal-lm", mode="eval")
    insertion_pipeline(LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, task_type="CAUSAL_LM"))(program)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in sorted(program.adapter.tensors.items()):
            if "lora_B" in key:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.1)
    return program


def test_lift_pass_makes_a_and_scaled_b_graph_inputs():
    from peftc.passes.lift import RANK_DIM, LiftAdaptersToInputsPass, lifted_tensors

    program = _lora_program(r=4, alpha=8, seed=3)
    base = tiny_gpt2()
    x = make_inputs("causal-lm", program.input_names, 3, 9, [3, 0, 1])
    tokens = [x[n] for n in program.input_names]
    with torch.no_grad():
        want = program(*tokens)
        want_base = base(**x).logits
    assert (want - want_base).abs().max() > 1e-2  # the adapter is not the identity
    values = lifted_tensors(program)
    gen = torch.Generator().manual_seed(4)  # a rank-8 adapter through the same graph: x·Aᵀ·B'ᵀ per site
    values_other = {
        n: torch.randn(8, v.shape[1], generator=gen)
        if n.endswith("A")
        else torch.randn(v.shape[0], 8, generator=gen) * 0.1
        for n, v in values.items()
    }
    sites = list(program.sites)
    result = LiftAdaptersToInputsPass()(program)
    assert result.modified and program.history[-1] == "LiftAdaptersToInputsPass"

    names = [n for s in sites for n in (f"{s}.lora_A", f"{s}.lora_B")]
    assert program.input_names == ["input_ids", "attention_mask", "position_ids", *names]
    assert list(values) == names
    for s in sites:
        assert program.dynamic_dims[f"{s}.lora_A"] == {0: RANK_DIM}
        assert program.dynamic_dims[f"{s}.lora_B"] == {1: RANK_DIM}
        site = program.sites[s]
        assert values[f"{s}.lora_A"].shape == (4, site.in_features)
        b = program.adapter.tensors[f"base_model.model.{s}.lora_B.weight"]
        torch.testing.assert_close(values[f"{s}.lora_B"], b.detach() * site.scale)  # B pre-scaled by s = 2
    roles = [n.meta.get("peftc_role") for n in program.graph.nodes]
    assert "lora_scale" not in roles  # the scale op is gone
    attrs = [n.target for n in program.graph.nodes if n.op == "get_attr"]
    assert not [t for t in attrs if "lora_" in t]
    assert not [k for k, _ in program.graph_module.named_parameters() if "lora_" in k]

    with torch.no_grad():
        got = program(*tokens, *values.values())
        got_other = program(*tokens, *values_other.values())
        want_other = program(
            *tokens,
            *(torch.cat([v, torch.zeros_like(v)], dim=0 if n.endswith("A") else 1) for n, v in values_other.items()),
        )
        empty = [
            torch.zeros(0, v.shape[1]) if n.endswith("lora_A") else torch.zeros(v.shape[0], 0)
            for n, v in values.items()
        ]
        got_base = program(*tokens, *empty)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_other, want_other, atol=1e-5, rtol=0)  # zero-padding to rank 16 changes nothing
    assert (got_other - got).abs().max() > 1e-2  # the rank-8 tensors are used
    torch.testing.assert_close(got_base, want_base, atol=1e-5, rtol=0)  # rank 0 = the base model
    examples = zip(names, program.example_inputs[3:], strict=True)
    assert all(t.shape[0 if n.endswith("A") else 1] >= 2 for n, t in examples)  # rank >= 2 for export

    assert not LiftAdaptersToInputsPass()(program).modified  # nothing left to lift


def test_lift_pass_without_lora_sites_changes_nothing():
    from peftc.passes.lift import LiftAdaptersToInputsPass

    from peftc.program import capture

    program = capture(tiny_gpt2(), "causal-lm", mode="eval")
    before = list(program.input_names)
    assert not LiftAdaptersToInputsPass()(program).modified
    assert program.input_names == before


# -- export ---------------------------------------------------------------------------------------
def _second_run(export_cases, family: str, name: str, r: int, alpha: float, seed: int, targets=None) -> Path:
    """Another run dir over the family's base: another rank/scale/head, or other targets."""
    from peftc.passes import insertion_pipeline

    from peftc.config import LoraConfig
    from peftc.models import load_model
    from peftc.program import capture

    built = export_cases.build(family)
    seq_cls = built.task == "seq-cls"
    loaded = load_model(built.base_dir, built.task, num_labels=3 if seq_cls else None)
    program = capture(loaded.model, built.task, mode="eval")
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=targets,
        task_type="SEQ_CLS" if seq_cls else "CAUSAL_LM",
        modules_to_save=["classifier", "score"] if seq_cls else None,
    )
    insertion_pipeline(config)(program)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in sorted(program.adapter.tensors.items()):
            if "lora_B" in key:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.1)
            elif "lora_A" not in key:
                tensor.add_(torch.randn(tensor.shape, generator=gen) * 0.2)
    run_dir = built.run_dir.parent / name
    program.adapter.save(run_dir / "adapter")
    run = json.loads((built.run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps(run))
    return run_dir


def _swappable(export_cases, family: str) -> tuple[Path, list[Path]]:
    """The family's run and a rank-8 run exported as one swappable artifact (once per session)."""

    def make() -> tuple[Path, list[Path]]:
        from peftc.exporting import export

        built = export_cases.build(family)
        runs = [built.run_dir, _second_run(export_cases, family, "run-r8", r=8, alpha=4, seed=11)]
        out = export(
            runs, adapters_as_inputs=True, out=export_cases.scratch(f"{family}-swappable") / "art", with_past=False
        )
        return out, runs

    return export_cases.memo(("swappable", family), make)


def _hf_peft(export_cases, family: str, adapter_dir: Path) -> torch.nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(export_cases.build(family).hf_base(), adapter_dir).eval()


def _check_family(export_cases, family: str) -> None:
    out, runs = _swappable(export_cases, family)
    built = export_cases.build(family)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["adapters_as_inputs"] is True and manifest["merged"] is False
    names = [a["name"] for a in manifest["adapters"]]
    assert names == ["run", "run-r8"]
    assert [a["rank"] for a in manifest["adapters"]] == [4, 8]
    inputs = {i["name"]: i for i in manifest["adapter_inputs"]}
    lora = [n for n in inputs if n.endswith((".lora_A", ".lora_B"))]
    assert lora and all("lora_rank" in inputs[n]["shape"] for n in lora)
    assert all(0 in inputs[n]["default_shape"] for n in lora)  # rank-0 defaults
    assert json.loads((out / "report.json").read_text())["verified"] is True
    from peftc.exporters.manifest import check_manifest

    from peftc.inspect import inspect_path, render

    assert check_manifest(out) == []  # every file, adapters included, hashed
    assert "LORA" in render(inspect_path(out))
    for a in manifest["adapters"]:
        assert (out / a["file"]).is_file() and (out / a["hf_peft_copy"] / "adapter_model.safetensors").is_file()

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    token_names = [i.name for i in session.get_inputs()]  # initializer-backed inputs are optional
    assert not [n for n in token_names if n in inputs]
    adapters = []
    for a in manifest["adapters"]:
        adapter = ort.LoraAdapter()
        adapter.Load(str(out / a["file"]))
        adapters.append(adapter)
    references = [_hf_peft(export_cases, family, run / "adapter") for run in runs]
    base = built.hf_base()
    for batch, seq, pads in TEST_SHAPES:
        x = make_inputs(built.task, token_names, batch, seq, pads, seed=batch)
        rows = x["attention_mask"].bool().numpy() if built.task == "causal-lm" else slice(None)
        feeds = {k: v.numpy() for k, v in x.items()}
        with torch.no_grad():
            want_base = base(**x).logits.numpy()
        got_base = session.run(["logits"], feeds)[0]
        np.testing.assert_allclose(got_base[rows], want_base[rows], atol=ATOL, rtol=0)
        for adapter, reference in zip(adapters * 2, references * 2, strict=True):  # alternate in one live session
            options = ort.RunOptions()
            options.add_active_adapter(adapter)
            got = session.run(["logits"], feeds, options)[0]
            with torch.no_grad():
                want = reference(**x).logits.numpy()
            assert np.abs(want[rows] - want_base[rows]).max() > 1e-2  # not the identity
            np.testing.assert_allclose(got[rows], want[rows], atol=ATOL, rtol=0)


def test_swappable_gpt2_two_ranks_match_hf_peft_and_base(export_cases):
    _check_family(export_cases, "gpt2")


@pytest.mark.slow
def test_swappable_bert_seq_cls_swaps_head_and_lora(export_cases):
    _check_family(export_cases, "bert")
    out, _ = _swappable(export_cases, "bert")
    inputs = {i["name"] for i in json.loads((out / "manifest.json").read_text())["adapter_inputs"]}
    assert "classifier.weight" in inputs and "classifier.bias" in inputs


def test_check_adapter_accepts_the_exported_ones_and_names_the_first_mismatch(export_cases):
    from peftc.exporters.swappable import check_adapter, read_adapter, write_adapter

    out, _ = _swappable(export_cases, "gpt2")
    model = out / "model.onnx"
    files = [out / "adapters" / "run.onnx_adapter", out / "adapters" / "run-r8.onnx_adapter"]
    for path, rank in zip(files, (4, 8), strict=True):
        tensors = check_adapter(model, path)
        assert {shape[0] for name, (shape, _) in tensors.items() if name.endswith("lora_A")} == {rank}

    good = {name: np.zeros(shape, np.float32) for name, (shape, _) in read_adapter(files[0]).items()}
    first = sorted(n for n in good if n.endswith("lora_A"))[0]
    tmp = export_cases.scratch("bad-adapters")
    cases = {
        "shape": ({**good, first: np.zeros((4, 7), np.float32)}, rf"{first}.*shape \[4, 7\]"),
        "extra": ({**good, "transformer.h.0.mlp.c_fc.lora_A": np.zeros((4, 64), np.float32)}, "c_fc.lora_A"),
        "missing": ({k: v for k, v in good.items() if k != first}, rf"no tensor '{first}'"),
        "rank": ({**good, first: np.zeros((3, 64), np.float32)}, "lora_rank=3"),
    }
    for label, (values, match) in cases.items():
        path = write_adapter(tmp / f"{label}.onnx_adapter", values)
        with pytest.raises(AdapterMismatchError, match=match):
            check_adapter(model, path)


def test_sources_with_different_targets_are_refused(export_cases, tmp_path):
    from peftc.adapters import AdapterState
    from peftc.exporting import export

    built = export_cases.build("gpt2")
    state = AdapterState.load(built.run_dir / "adapter")
    for key in [k for k in state.tensors if ".h.1." in k]:  # adapts layer 0 only
        del state.tensors[key]
    other = tmp_path / "run-layer0"
    state.save(other / "adapter")
    (other / "run.json").write_text((built.run_dir / "run.json").read_text())
    with pytest.raises(AdapterMismatchError, match=r"run-layer0 does not adapt transformer\.h\.1\.attn\.c_attn"):
        export([built.run_dir, other], adapters_as_inputs=True, out=tmp_path / "art")
    assert not (tmp_path / "art").exists()


def test_merge_and_adapters_as_inputs_exclude_each_other(export_cases, tmp_path):
    from peftc.exporting import export

    with pytest.raises(ConfigError, match="exclude each other"):
        export([export_cases.build("gpt2").run_dir], merge=True, adapters_as_inputs=True, out=tmp_path / "x")
    with pytest.raises(ConfigError, match="adapters-as-inputs"):
        export([export_cases.build("gpt2").run_dir, export_cases.build("gpt2").run_dir], out=tmp_path / "y")


def test_different_bases_are_refused(export_cases, tmp_path):
    from peftc.exporting import export

    built = export_cases.build("gpt2")
    other_base = tmp_path / "other-base"
    tiny_gpt2().save_pretrained(other_base, safe_serialization=True)
    save_tokenizer(other_base)
    run = tmp_path / "run-other"
    (run / "adapter").mkdir(parents=True)
    for f in (built.run_dir / "adapter").iterdir():
        (run / "adapter" / f.name).write_bytes(f.read_bytes())
    (run / "run.json").write_text(
        json.dumps({"task": "causal-lm", "model": {"spec": str(other_base), "source": str(other_base)}})
    )
    with pytest.raises(ConfigError, match="share one base model"):
        export([built.run_dir, run], adapters_as_inputs=True, out=tmp_path / "art")


# -- CLI --------------------------------------------------------------------------------------------
def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    from peftc.cli import main

    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_cli_passes_every_src_with_adapters_as_inputs(capsys, monkeypatch, tmp_path):
    import sys

    import peftc.exporting  # noqa: F401

    calls = []

    def fake_export(src, **kwargs):
        calls.append((src, kwargs))
        return tmp_path

    monkeypatch.setattr(sys.modules["peftc.exporting"], "export", fake_export)
    code, out, _ = _cli(capsys, "export", "a", "b", "--adapters-as-inputs", "--out", str(tmp_path / "o"))
    assert code == 0 and "artifact directory" in out
    assert calls[-1][0] == ["a", "b"] and calls[-1][1]["adapters_as_inputs"] is True
    code, _, _ = _cli(capsys, "export")
    assert code == 0 and calls[-1][0] == "peftc-run" and calls[-1][1]["adapters_as_inputs"] is False
    code, _, _ = _cli(capsys, "export", "one", "--merge")
    assert code == 0 and calls[-1][0] == "one" and calls[-1][1]["merge"] is True


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["a", "--merge", "--adapters-as-inputs"], "exclude each other"),
        (["a", "b"], "needs --adapters-as-inputs"),
    ],
)
def test_cli_refuses_bad_combinations_in_one_line(capsys, argv, needle):
    code, _, err = _cli(capsys, "export", *argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]


# -- IA3 -------------------------------------------------------------------------------------------
def _ia3_run(export_cases, name: str, seed: int) -> Path:
    from peftc.passes import insertion_pipeline

    from peftc.config import IA3Config
    from peftc.models import load_model
    from peftc.program import capture

    built = export_cases.build("gpt2")
    program = capture(load_model(built.base_dir, "causal-lm").model, "causal-lm", mode="eval")
    insertion_pipeline(IA3Config(task_type="CAUSAL_LM"))(program)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, tensor in sorted(program.adapter.tensors.items()):
            tensor.add_(torch.randn(tensor.shape, generator=gen) * 0.3)  # l = 1 is the identity
    run_dir = built.run_dir.parent / name
    program.adapter.save(run_dir / "adapter")
    (run_dir / "run.json").write_text((built.run_dir / "run.json").read_text())
    return run_dir


@pytest.mark.slow
def test_swappable_ia3_vectors_match_hf_peft(export_cases, tmp_path):
    from peftc.exporting import export

    runs = [_ia3_run(export_cases, "ia3-a", 21), _ia3_run(export_cases, "ia3-b", 22)]
    out = export(runs, adapters_as_inputs=True, out=tmp_path / "art", with_past=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "IA3" and [a["rank"] for a in manifest["adapters"]] == [None, None]
    inputs = {i["name"]: i for i in manifest["adapter_inputs"]}
    assert inputs and all(n.endswith(".ia3_l") for n in inputs)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    x = make_inputs("causal-lm", names, 3, 9, [3, 0, 1], seed=5)
    rows = x["attention_mask"].bool().numpy()
    feeds = {k: v.numpy() for k, v in x.items()}
    with torch.no_grad():
        want_base = export_cases.build("gpt2").hf_base()(**x).logits.numpy()
    np.testing.assert_allclose(session.run(["logits"], feeds)[0][rows], want_base[rows], atol=ATOL, rtol=0)
    for a, run in zip(manifest["adapters"], runs, strict=True):
        adapter = ort.LoraAdapter()
        adapter.Load(str(out / a["file"]))
        options = ort.RunOptions()
        options.add_active_adapter(adapter)
        with torch.no_grad():
            want = _hf_peft(export_cases, "gpt2", run / "adapter")(**x).logits.numpy()
        assert np.abs(want[rows] - want_base[rows]).max() > 1e-2
        np.testing.assert_allclose(session.run(["logits"], feeds, options)[0][rows], want[rows], atol=ATOL, rtol=0)
