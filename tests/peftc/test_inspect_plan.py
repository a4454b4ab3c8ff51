"""``peftc inspect MODEL --plan --method NAME``: every method plans through its own insertion pipeline.

Each plan runs on a cached capture of a tiny model (conftest) and is checked against what the method's
pipeline then does to the same program: the sites a plan rewrites are exactly the sites the passes
create, and skipped candidates carry the pass's reason. The CLI cases use a tiny GPT-2 saved to a dir.
"""

from __future__ import annotations

import json

import pytest
from conftest import captured, tiny_gpt2

from peftc.cli import main
from peftc.errors import ConfigError, TargetNotFoundError
from peftc.inspect import plan_config, plan_program

GPT2_ATTN = ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
GPT2_FF = ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]


def by_name(info: dict) -> dict[str, dict]:
    return {d["name"]: d for d in info["decisions"]}


def rewrites(info: dict) -> list[str]:
    return sorted(d["name"] for d in info["decisions"] if d["action"] == "rewrite")


def inserted(program, config) -> list[str]:
    """The sites the method's pipeline creates on ``program`` (what the plan must have predicted)."""
    from peftc.passes import insertion_pipeline

    program = insertion_pipeline(config)(program).program
    return sorted(program.sites)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "gpt2"
    tiny_gpt2().save_pretrained(path, safe_serialization=True)
    return path


# -- each method through its pipeline -----------------------------------------------------------


def test_lora_plan_rank_details_and_skip_reason():
    program, _ = captured("gpt2", "causal-lm")
    config = plan_config("lora", "causal-lm", ["c_attn", "wte"], r=4)
    info = plan_program(program, config)
    assert info["method"] == "LORA" and info["label"] == "LoRA" and info["pipeline"] == "lora-insert"
    assert rewrites(info) == GPT2_ATTN == inserted(program, config)
    site = by_name(info)["transformer.h.0.attn.c_attn"]
    assert site["module_type"] == "Conv1D" and site["pass"] == "LoraPass"
    assert {k: site["details"][k] for k in ("rank", "in", "out")} == {"rank": 4, "in": 64, "out": 192}
    wte = by_name(info)["transformer.wte"]
    assert wte["action"] == "skip" and wte["reason"] == "Embedding is not a Linear or Conv1D layer"
    assert info["planned"] == {name: "LoRA r=4" for name in GPT2_ATTN}


def test_ia3_plan_says_which_targets_are_feedforward():
    program, _ = captured("gpt2", "causal-lm")
    config = plan_config("ia3", "causal-lm", options={"exclude_modules": ["transformer.h.1.attn.c_attn"]})
    info = plan_program(program, config)
    assert info["method"] == "IA3" and info["pipeline"] == "ia3-insert"
    assert rewrites(info) == sorted([GPT2_ATTN[0], *GPT2_FF]) == inserted(program, config)
    d = by_name(info)
    assert d[GPT2_ATTN[0]]["details"]["feedforward"] is False and d[GPT2_ATTN[0]]["details"]["shape"] == [192, 1]
    assert d[GPT2_FF[1]]["details"]["feedforward"] is True and d[GPT2_FF[1]]["details"]["shape"] == [1, 256]
    assert d[GPT2_ATTN[1]]["action"] == "skip" and d[GPT2_ATTN[1]]["reason"] == "listed in exclude_modules"
    assert set(info["planned"].values()) == {"IA3"}


def test_adalora_plan_uses_init_r_and_layers_to_transform():
    program, _ = captured("gpt2", "causal-lm")
    config = plan_config(
        "adalora", "causal-lm", ["c_attn"], options={"init_r": 4, "target_r": 2, "layers_to_transform": [1]}
    )
    info = plan_program(program, config)
    assert info["method"] == "ADALORA" and info["label"] == "AdaLoRA"
    assert rewrites(info) == [GPT2_ATTN[1]] == inserted(program, config)
    assert by_name(info)[GPT2_ATTN[1]]["details"]["rank"] == 4
    skipped = by_name(info)[GPT2_ATTN[0]]
    assert skipped["action"] == "skip" and skipped["reason"] == "layer not in layers_to_transform=[1]"
    assert info["planned"] == {GPT2_ATTN[1]: "AdaLoRA r=4"}


def test_adaption_prompt_plan_adapts_the_top_layers():
    program, _ = captured("llama", "causal-lm")
    config = plan_config("adaption-prompt", "causal-lm", options={"adapter_layers": 1, "adapter_len": 4})
    info = plan_program(program, config)
    layers = ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert info["method"] == "ADAPTION_PROMPT" and info["pipeline"] == "adaption-prompt-insert"
    assert rewrites(info) == [layers[1]] == inserted(program, config)
    top = by_name(info)[layers[1]]
    assert top["module_type"] == "LlamaAttention"
    assert top["details"] == {"adapter_len": 4, "hidden": 64, "heads": 4, "kv_heads": 2, "head_dim": 16}
    low = by_name(info)[layers[0]]
    assert low["action"] == "skip" and low["reason"] == "below the top adapter_layers=1 layers"
    assert info["planned"] == {layers[1]: "LLaMA-Adapter"}


@pytest.mark.parametrize("method", ["prompt-tuning", "p-tuning", "prefix-tuning"])
def test_prompt_methods_plan_one_input_site(method):
    program, _ = captured("gpt2", "causal-lm")
    info = plan_program(program, plan_config(method, "causal-lm", options={"num_virtual_tokens": 3}))
    (only,) = info["decisions"]
    assert only["action"] == "rewrite" and only["name"] == "input_embeddings"
    assert only["details"] == {"num_virtual_tokens": 3}


def test_seq_cls_plan_lists_the_head_copy_apart_from_the_sites():
    program, _ = captured("gpt2", "seq-cls")
    info = plan_program(program, plan_config("lora", "seq-cls", ["c_attn"], r=2))
    heads = [d for d in info["decisions"] if d["pass"] == "ModulesToSavePass"]
    assert [(d["name"], d["action"]) for d in heads] == [("score", "rewrite")]
    assert set(info["planned"]) == set(GPT2_ATTN)  # the head is copied whole, not an adapter site


def test_plan_that_adapts_nothing_is_an_error():
    program, _ = captured("gpt2", "causal-lm")
    with pytest.raises(TargetNotFoundError, match="matched no adaptable module"):
        plan_program(program, plan_config("ia3", "causal-lm", ["wte"], options={"feedforward_modules": []}))
    with pytest.raises(TargetNotFoundError, match="linear modules here: c_attn, c_proj, c_fc"):
        plan_program(program, plan_config("lora", "causal-lm", ["nothing"]))


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"method": "ia3", "r": 4}, "--r is the LoRA-family rank and method 'ia3' has none"),
        ({"method": "prompt-tuning", "target_modules": ["c_attn"]}, "--target-modules does not apply"),
        ({"method": "lora", "options": {"init_r": 4}}, "--set init_r: not a field of LORA"),
        ({"method": "lora", "options": {"task_type": "SEQ_CLS"}}, "--set task_type: not a field"),
        ({"method": "nope"}, "unknown method 'nope'"),
    ],
)
def test_plan_config_refuses_what_the_method_does_not_have(kwargs, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        plan_config(task="causal-lm", **kwargs)


def test_every_method_name_builds_its_config():
    from peftc.methods import cli_names, method_by_name

    for name in cli_names():
        assert isinstance(plan_config(name, "causal-lm"), method_by_name(name).config_class)


# -- CLI --------------------------------------------------------------------------------------------


def test_cli_plan_method_and_set(capsys, gpt2_dir):
    code, out, err = run_cli(
        capsys, "inspect", str(gpt2_dir), "--plan", "--method", "adalora", "--target-modules", "c_attn",
        "--set", "init_r=4", "--set", "target_r=2", "--set", "layers_to_transform=[0]", "--json",
    )  # fmt: skip
    assert code == 0, err
    info = json.loads(out)
    assert info["task"] == "causal-lm"  # guessed from the dir's config.json (GPT2LMHeadModel)
    assert info["method"] == "ADALORA" and info["config"]["init_r"] == 4
    assert rewrites(info) == [GPT2_ATTN[0]]
    code, out, err = run_cli(
        capsys, "inspect", str(gpt2_dir), "--plan", "--method", "ia3", "--set", 'exclude_modules=["c_attn"]'
    )
    assert code == 0, err
    assert out.splitlines()[0] == f"plan: {gpt2_dir}"
    assert "decisions of ia3-insert (IA3): 2 rewrite, 2 skip" in out
    assert f"rewrite  {GPT2_FF[0]} (Conv1D) in=256 out=64 feedforward=yes shape=[1, 256]" in out
    assert f"skip     {GPT2_ATTN[0]} (Conv1D)  — listed in exclude_modules" in out


def test_cli_plan_graph_marks_the_method_label(capsys, gpt2_dir, tmp_path):
    code, out, err = run_cli(
        capsys, "inspect", str(gpt2_dir), "--plan", "--method", "ia3", "--graph", str(tmp_path / "p.dot")
    )
    assert code == 0, err
    dot = (tmp_path / "p.dot").read_text()
    assert dot.count("IA3 (planned)") == 4 and "LoRA" not in dot


def test_cli_diff_against_an_ia3_plan(capsys, gpt2_dir):
    code, out, err = run_cli(capsys, "inspect", "--diff", str(gpt2_dir), str(gpt2_dir), "--plan", "--method", "ia3")
    assert code == 0, err
    assert "(IA3 inserted)" in out.splitlines()[1]
    assert all(f"+ {s}.ia3_l" in out for s in GPT2_ATTN + GPT2_FF)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--method", "ia3"], "--method configure a plan: add --plan"),
        (["--set", "r=2", "--r", "2"], "--r, --set configure a plan"),
        (["--plan", "--method", "ia3", "--r", "2"], "--r is the LoRA-family rank"),
        (["--plan", "--set", "r"], "expected FIELD=VALUE"),
        (["--plan", "--method", "nope"], "unknown method 'nope'; known: lora"),
    ],
)
def test_cli_plan_bad_options_are_one_line(capsys, gpt2_dir, argv, needle):
    code, _, err = run_cli(capsys, "inspect", str(gpt2_dir), *argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
