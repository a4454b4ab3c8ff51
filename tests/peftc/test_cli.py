"""The CLI contract for bad input: one line on stderr, non-zero exit, no traceback, nothing written.

Each case runs ``peftc.cli.main`` in-process (as the console script does) on a tiny GPT-2 saved
into a tmp dir, with an adapter made by peftc's own passes.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
import torch
from conftest import tiny_gpt2

from peftc.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    """A tiny GPT-2 model dir and a (non-identity) LoRA adapter dir made for it."""
    from peftc.passes import insertion_pipeline

    from peftc.config import LoraConfig
    from peftc.program import capture

    root = tmp_path_factory.mktemp("cli")
    model = tiny_gpt2()
    base = root / "base"
    model.save_pretrained(base, safe_serialization=True)
    program = capture(model, "causal-lm", mode="eval")
    cfg = LoraConfig(r=4, target_modules=["c_attn"], task_type="CAUSAL_LM", base_model_name_or_path=str(base))
    insertion_pipeline(cfg)(program)
    with torch.no_grad():
        for t in program.adapter.tensors.values():
            t.add_(0.05)
    adapter = root / "adapter"
    program.adapter.save(adapter)
    return base, adapter


def copy_adapter(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_model_dir(capsys, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--model", str(tmp_path / "nope"), "--out", str(out))
    assert_one_line_error(code, err, "does not exist", str(tmp_path / "nope"))
    assert not out.exists()


def test_dir_that_is_not_a_model(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "train", "--model", str(tmp_path / "empty"), "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, "config.json")
    assert not (tmp_path / "run").exists()


def test_truncated_model_weights(capsys, tmp_path, base_and_adapter):
    base, _ = base_and_adapter
    broken = copy_adapter(base, tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello world"}\n' * 4)
    code, _, err = run_cli(
        capsys,
        "train",
        "--model",
        str(broken),
        "--task",
        "causal-lm",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "run"),
    )
    assert_one_line_error(code, err, "cannot load")
    assert not (tmp_path / "run").exists()


def test_corrupt_adapter_weights(capsys, tmp_path, base_and_adapter):
    base, adapter = base_and_adapter
    bad = copy_adapter(adapter, tmp_path / "bad")
    (bad / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    code, _, err = run_cli(capsys, "export", str(bad), "--model", str(base), "--merge", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "corrupt or truncated")
    assert not (tmp_path / "o").exists()


def test_adapter_config_not_json(capsys, tmp_path, base_and_adapter):
    base, adapter = base_and_adapter
    bad = copy_adapter(adapter, tmp_path / "bad")
    (bad / "adapter_config.json").write_text("{not json")
    code, _, err = run_cli(capsys, "export", str(bad), "--model", str(base), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "not valid JSON")
    assert not (tmp_path / "o").exists()


def test_unknown_peft_type(capsys, tmp_path, base_and_adapter):
    base, adapter = base_and_adapter
    bad = copy_adapter(adapter, tmp_path / "bad")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["peft_type"] = "SUPER_LORA"
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "export", str(bad), "--model", str(base), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "SUPER_LORA", "LORA")
    assert not (tmp_path / "o").exists()


def test_adapter_for_another_model(capsys, tmp_path, base_and_adapter):
    from transformers import GPT2Config, GPT2LMHeadModel

    _, adapter = base_and_adapter
    other = tmp_path / "wider"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=96, n_head=4, vocab_size=128, n_positions=64)).save_pretrained(
        other, safe_serialization=True
    )
    code, _, err = run_cli(capsys, "export", str(adapter), "--model", str(other), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "lora_A.weight", "[4, 64]", "[4, 96]")
    assert not (tmp_path / "o").exists()


def test_targets_matching_nothing(capsys, tmp_path):
    code, _, err = run_cli(
        capsys, "train", "--model", "tiny-gpt2", "--target-modules", "q_proj", "--out", str(tmp_path / "run"),
        "--no-progress",
    )  # fmt: skip
    assert_one_line_error(code, err, "q_proj", "c_attn", "c_fc")
    assert not (tmp_path / "run").exists()


def test_data_line_missing_field(capsys, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "good", "label": "pos"}\n{"text": "bad"}\n')
    code, _, err = run_cli(capsys, "train", "--data", str(data), "--out", str(tmp_path / "run"), "--no-progress")
    assert_one_line_error(code, err, f"{data}:2", "label")
    assert not (tmp_path / "run").exists()


def test_export_into_non_empty_dir_needs_force(capsys, tmp_path, base_and_adapter):
    base, adapter = base_and_adapter
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "export", str(adapter), "--model", str(base), "--merge", "--out", str(out))
    assert_one_line_error(code, err, "--force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"


def test_debug_shows_the_traceback(tmp_path):
    import logging

    from peftc.errors import ModelLoadError

    level = logging.getLogger().level
    try:
        with pytest.raises(ModelLoadError):
            main(["--debug", "train", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "run")])
    finally:
        logging.getLogger().setLevel(level)


def test_inspect_json_of_adapter_dir(capsys, base_and_adapter):
    _, adapter = base_and_adapter
    code, out, _ = run_cli(capsys, "inspect", str(adapter), "--json")
    assert code == 0
    info = json.loads(out)
    assert info["kind"] == "adapter" and info["method"] == "LORA"
    sites = {s["module"]: s for s in info["sites"]}
    assert set(sites) == {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}
    assert sites["transformer.h.0.attn.c_attn"] == {
        "module": "transformer.h.0.attn.c_attn", "method": "LORA", "rank": 4, "in": 64, "out": 192,
    }  # fmt: skip


def test_inspect_plan_changes_nothing_and_lists_reasons(capsys, base_and_adapter):
    base, _ = base_and_adapter
    code, out, _ = run_cli(
        capsys, "inspect", str(base), "--plan", "--task", "causal-lm", "--target-modules", "c_attn,wte", "--json"
    )
    assert code == 0
    decisions = {d["name"]: d for d in json.loads(out)["decisions"]}
    assert decisions["transformer.h.0.attn.c_attn"]["action"] == "rewrite"
    assert decisions["transformer.wte"]["action"] == "skip"
    assert "not a Linear" in decisions["transformer.wte"]["reason"]


def _train_params() -> dict[str, click.Option]:
    from peftc.cli import cli

    command = cli.commands["train"]
    return {p.name: p for p in command.get_params(click.Context(command, info_name="train"))}


def test_train_help_lists_every_method_and_takes_method_flags_from_the_configs(capsys):
    from peftc.methods import cli_names, methods
    from peftc.training.options import METHOD_FLAGS

    code, out, _ = run_cli(capsys, "train", "--help")
    assert code == 0
    flat = "".join(out.split())  # click wraps lines (also at hyphens: llama-adapter)
    names = cli_names()
    assert len(names) == sum(len(m.cli_names) for m in methods())
    for name in names:
        assert f"{name}," in flat or f"{name}." in flat, name
    params = _train_params()
    assert list(params["method"].type.choices) == names
    for flag in METHOD_FLAGS:  # help and type of the first registered config that has the field
        config_class = next(m.config_class for m in methods() if flag in m.config_class.field_help())
        assert params[flag].help == config_class.field_help()[flag], flag
        assert "".join(config_class.field_help()[flag].split()) in flat
    assert params["r"].type is click.INT and params["lora_alpha"].type is click.FLOAT
    # defaults are shown; peftc's training presets say that they differ from HF PEFT's
    for shown in ("--epochsINTEGER", "[default:3]", "--lrFLOAT", "[default:0.002]", "[default:16]", "[default:8]"):
        assert shown in flat, shown
    assert "[default:16,apeftctrainingpreset(HFPEFT:8)]" in flat
    assert "[default:0.05,apeftctrainingpreset(HFPEFT:0.0)]" in flat
    assert "*ForTokenClassification->token-cls" in flat  # the --task inference rule


def test_train_flags_map_onto_train_config(capsys, monkeypatch):
    import peftc.training
    from peftc.training import TrainResult

    seen = []

    def fake_train(cfg):
        seen.append(cfg)
        return TrainResult(Path("r"), Path("r/adapter"), 0, 0.0, None, {"loss": 0.5}, 0.0, 0)

    monkeypatch.setattr(peftc.training, "train", fake_train)
    code, out, _ = run_cli(
        capsys, "train", "--method", "AdaLoRA", "--lora-alpha", "4", "--target-modules", "c_attn,c_proj",
        "--set", "init_r=3", "--no-progress", "--log-every", "2", "--config", "c.json",
    )  # fmt: skip
    assert code == 0 and "final eval: loss=0.5" in out
    (cfg,) = seen
    assert (cfg.method, cfg.lora_alpha, cfg.target_modules, cfg.options) == (
        "adalora",
        4.0,
        ["c_attn", "c_proj"],
        {"init_r": 3},
    )
    assert (cfg.progress, cfg.log_every, cfg.config_file, cfg.epochs, cfg.r) == (False, 2, "c.json", 3, None)
    code, _, err = run_cli(capsys, "train", "--method", "bogus")
    assert code == 2 and "lora" in err and "adalora" in err
