"""ExecuTorch export: the .pte in ExecuTorch's runtime vs HF PEFT on held-out shapes, every method, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import captured
from onnx_export_cases import ATOL, TEST_SHAPES, hf_logits, make_inputs, max_diff
from peftc.exporters import ExportRequest, get_exporter
from peftc.exporters import executorch as et
from peftc.exporters.verify import make_cases, run_torch, verify_artifact

from peftc.errors import AdapterFormatError, ConfigError, ExportVerificationError


@pytest.fixture
def executorch_installed():
    pytest.importorskip("executorch", reason="--format executorch needs the edge extra: pip install 'peftc[edge]'")


def _pipeline_export(export_cases, family: str, merge: bool):
    """``peftc export --format executorch`` of the session's non-identity LoRA run (once per session)."""
    from peftc.exporting import export

    built = export_cases.build(family)
    out = built.run_dir.parent / f"export-executorch-{'merged' if merge else 'unmerged'}"
    return built, export_cases.memo(
        ("executorch", family, merge), lambda: export(built.run_dir, format="executorch", merge=merge, out=out)
    )


@pytest.mark.slow  # one ExecuTorch lowering each: ~20 s on two shared cores
@pytest.mark.usefixtures("executorch_installed")
@pytest.mark.parametrize("family", [pytest.param("gpt2", id="gpt2-causal-lm"), pytest.param("bert", id="bert-seq-cls")])
@pytest.mark.parametrize("merge", [pytest.param(True, id="merged"), pytest.param(False, id="unmerged")])
def test_peftc_export_format_executorch_matches_hf_peft(export_cases, family, merge):
    """``peftc export --format executorch``: verified, described, and the .pte agrees with HF PEFT."""
    built, out = _pipeline_export(export_cases, family, merge)
    manifest = json.loads((out / "manifest.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert manifest["format"] == "executorch" and manifest["model_file"] == "model.pte" and manifest["opset"] is None
    assert manifest["merged"] is merge
    assert manifest["executorch"] == {
        "backend": "XNNPACK",
        "dim_bounds": {"batch": {"min": 1, "max": et.MAX_BATCH}, "sequence": {"min": 1, "max": 64}},
    }
    assert report["verified"] and report["executorch_vs_torch"]["max_abs_diff"] <= ATOL
    names = [i["name"] for i in manifest["inputs"]]
    info = et.read_info(out / "model.pte")
    assert info["input_names"] == names and info["output_names"] == ["logits"] and info["task"] == built.task
    assert info["peftc.merged"] == str(merge).lower()

    method = et.load_executorch(out / "model.pte")
    hf_peft, hf_base = built.hf_peft(), built.hf_base()
    for batch, seq, pads in TEST_SHAPES:  # held-out shapes, one left-padded batch
        inputs = make_inputs(built.task, names, batch, seq, pads)
        got = method.execute(list(inputs.values()))[0].numpy()
        assert max_diff(built.task, got, hf_logits(hf_peft, inputs), inputs) <= ATOL, (batch, seq, pads)
        # the adapter is not the identity: the artifact is far from the bare base model
        assert max_diff(built.task, got, hf_logits(hf_base, inputs), inputs) > 1e-3


@pytest.mark.slow  # shares the merged GPT-2 export above, or pays for it
@pytest.mark.usefixtures("executorch_installed")
def test_verify_executorch_fails_against_another_model(export_cases):
    built, out = _pipeline_export(export_cases, "gpt2", merge=True)
    program, _ = captured("gpt2", "causal-lm")  # the base: the adapter moves the logits away from it
    cases = make_cases(program)
    reference = run_torch(program, cases, program.input_names)
    with pytest.raises(ExportVerificationError) as info:
        verify_artifact("executorch", out / "model.pte", program, cases, reference, reference_name="the base")
    assert not info.value.report.passed
    assert "ExecuTorch (model.pte) does not reproduce the base" in str(info.value)


def _perturbed(family: str, task: str, config, merge: bool):
    """A program with ``config``'s adapter inserted, every adapter tensor moved off its no-op value."""
    from peftc.passes import insertion_pipeline, merge_pipeline

    program, _ = captured(family, task)
    base = run_torch(program, make_cases(program), program.input_names)
    insertion_pipeline(config)(program)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for key, tensor in sorted(program.adapter.tensors.items()):
            if "ranknum" not in key and tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=gen) * 0.1)
    if merge:
        merge_pipeline()(program)
    return program, base


def _method_params():
    from peftc.config import (
        AdaLoraConfig,
        AdaptionPromptConfig,
        IA3Config,
        LoHaConfig,
        LoKrConfig,
        LoraConfig,
        PrefixTuningConfig,
        PromptEncoderConfig,
        PromptTuningConfig,
    )

    lm = {"task_type": "CAUSAL_LM"}
    weight_methods = {
        "lora": LoraConfig(r=4, **lm),
        "dora": LoraConfig(r=4, use_dora=True, **lm),
        "adalora": AdaLoraConfig(init_r=4, target_r=2, total_step=10, **lm),
        "ia3": IA3Config(**lm),
        "loha": LoHaConfig(r=4, **lm),
        "lokr": LoKrConfig(r=4, **lm),
    }
    params = [
        pytest.param("gpt2", config, merge, id=f"{name}-{'merged' if merge else 'unmerged'}")
        for name, config in weight_methods.items()
        for merge in (False, True)
    ]
    params += [
        pytest.param("gpt2", PromptTuningConfig(num_virtual_tokens=4, **lm), False, id="prompt-tuning"),
        pytest.param("gpt2", PromptEncoderConfig(num_virtual_tokens=4, **lm), False, id="p-tuning"),
        pytest.param("gpt2", PrefixTuningConfig(num_virtual_tokens=4, **lm), False, id="prefix-tuning"),
        pytest.param("llama", AdaptionPromptConfig(adapter_len=4, adapter_layers=1, **lm), False, id="llama-adapter"),
    ]
    return params


@pytest.mark.slow
@pytest.mark.usefixtures("executorch_installed")
@pytest.mark.parametrize(("family", "config", "merge"), _method_params())
def test_every_method_verifies(family, config, merge, tmp_path):
    program, base = _perturbed(family, "causal-lm", config, merge)
    path = et.export_program_executorch(program, tmp_path / "model.pte")
    report = verify_artifact("executorch", path, program)
    assert report.max_abs_diff <= ATOL, report.summary()
    got = et.run_executorch(path, make_cases(program), program.input_names)
    # not the identity (prompt methods lengthen the logits by their virtual tokens: compare the real positions)
    assert max(float(abs(a[:, -b.shape[1] :] - b).max()) for a, b in zip(got, base, strict=True)) > 1e-3
    portable = (getattr(config, "use_dora", False) and not merge) or type(config).__name__ == "AdaptionPromptConfig"
    assert et.read_info(path)["backend"] == ("portable" if portable else "XNNPACK")  # see the exporter's docstring


def test_attention_rewrite_keeps_the_program():
    """The spelled-out attention equals the fused op, fully masked rows included (finite, no NaN)."""
    program, _ = captured("gpt2", "causal-lm")
    nodes_before = [n.format_node() for n in program.graph.nodes]
    rewritten = et._attention_as_matmuls(program)
    assert [n.format_node() for n in program.graph.nodes] == nodes_before  # the program is untouched
    targets = [n.target for n in rewritten.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.scaled_dot_product_attention.default not in targets
    assert targets.count(et._attention) == 2  # one per layer
    for case in make_cases(program):
        args = case.ordered(program.input_names)
        real = case.inputs["attention_mask"].bool()  # padded query positions differ and are read by no one
        torch.testing.assert_close(rewritten(*args)[real], program(*args)[real], atol=1e-5, rtol=0)
    q, k, v = (torch.randn(2, 4, 5, 16) for _ in range(3))
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    mask[0, :, 0] = False  # a fully masked query row
    got = et._attention(q, k, v, mask)
    assert torch.isfinite(got).all()
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, mask)
    torch.testing.assert_close(got[:, :, 1:], want[:, :, 1:], atol=1e-5, rtol=0)


@pytest.fixture
def pretend_installed(monkeypatch):
    """The refusals are decided before executorch is imported: they hold with or without the extra."""
    monkeypatch.setattr(et, "executorch_available", lambda: True)


@pytest.mark.usefixtures("pretend_installed")
@pytest.mark.parametrize(
    ("request_", "match"),
    [
        (
            ExportRequest(adapters_as_inputs=True, with_past=True),
            "--adapters-as-inputs with --with-past is not supported by --format executorch",
        ),
        (ExportRequest(dtype="float16"), "--dtype float16 is supported for --format onnx only"),
        (ExportRequest(graphs=2), "--format executorch takes causal-lm, seq-cls and token-cls"),
    ],
    ids=["adapters-as-inputs-with-past", "float16", "seq2seq"],
)
def test_executorch_refuses_what_it_cannot_take(request_, match):
    exporter = get_exporter("executorch")
    with pytest.raises(ConfigError, match=match):
        exporter.check(request_)
    assert exporter.check(ExportRequest(with_past=False)) is None and not exporter.cache_by_default
    assert exporter.check(ExportRequest(with_past=True)) is None and exporter.cache_in_program
    assert exporter.check(ExportRequest(adapters_as_inputs=True)) is None  # program–data separation


def test_missing_executorch_is_refused_before_any_work(export_cases, monkeypatch):
    from peftc.exporting import export

    monkeypatch.setattr(et, "executorch_available", lambda: False)
    with pytest.raises(ConfigError, match=r"needs the executorch package.*pip install 'peftc\[edge\]'"):
        get_exporter("executorch").check(ExportRequest())
    built = export_cases.build("gpt2")
    out = built.run_dir.parent / "export-executorch-missing"
    with pytest.raises(ConfigError, match=r"pip install 'peftc\[edge\]'"):
        export(built.run_dir, format="executorch", out=out)
    assert not out.exists()


def test_prompt_methods_are_refused_in_the_llm_runner_layout(tmp_path):
    """Prefix tuning's keys/values would have to enter the static cache: refused in one line, at capture."""
    import peft
    from conftest import tiny_gpt2

    from peftc.adapters import AdapterState
    from peftc.exporting.graphs import graph_plan

    config = peft.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
    peft.get_peft_model(tiny_gpt2(), config).save_pretrained(tmp_path)
    plan = graph_plan("causal-lm", with_past=True, cache_in_program=True)
    assert plan.cache_in_program and plan.with_past
    with pytest.raises(ConfigError, match=r"not supported in the in-program KV-cache layout yet.*--format onnx"):
        plan.capture(tiny_gpt2(), AdapterState.load(tmp_path))
    assert not graph_plan("causal-lm", with_past=None).cache_in_program  # the ONNX layout is the default


def test_train_mode_program_is_refused(tmp_path, pretend_installed):
    program, _ = captured("gpt2", "causal-lm", mode="train")
    with pytest.raises(ConfigError, match="train-mode program"):
        et.export_program_executorch(program, tmp_path / "model.pte")
    assert not (tmp_path / "model.pte").exists()


def test_dim_bounds_cap_the_batch():
    program, _ = captured("bert", "seq-cls")
    assert et.dim_bounds(program) == {"batch": {"min": 1, "max": et.MAX_BATCH}, "sequence": {"min": 1, "max": 64}}
    assert et.dim_bounds(program, max_batch=2)["batch"]["max"] == 2


def test_inputs_past_the_planned_bounds_are_refused():
    """ExecuTorch does not check sizes against its planned buffers: peftc refuses before it writes past them."""
    ids = torch.ones(9, 5, dtype=torch.long)
    with pytest.raises(ConfigError, match=r"input 'input_ids' of shape \[9, 5\] exceeds the bounds \[8, 64\]"):
        et.check_bounds([ids], ["input_ids"], [(8, 64)], "model.pte")
    with pytest.raises(ConfigError, match="takes 2 inputs, got 1"):
        et.check_bounds([ids], ["input_ids"], [(8, 64), (8, 64)], "model.pte")
    assert et.check_bounds([ids[:8]], ["input_ids"], [(8, 64)], "model.pte") is None


def test_a_crashing_program_is_detected_in_a_child_process(monkeypatch, tmp_path):
    """A runtime crash (signal) is reported, a Python error is left to verification, success is None."""
    from types import SimpleNamespace

    program = SimpleNamespace(example_inputs=(torch.ones(2, 3, dtype=torch.long),))
    monkeypatch.setattr(et, "_SMOKE", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert et._crash_of(tmp_path / "model.pte", program) == "signal 11"
    monkeypatch.setattr(et, "_SMOKE", "raise ValueError('wrong output')")
    assert et._crash_of(tmp_path / "model.pte", program) is None
    monkeypatch.setattr(
        et,
        "_SMOKE",
        "import sys; from safetensors.torch import load_file as load\nassert load(sys.argv[2])['0'].shape == (2, 3)",
    )
    assert et._crash_of(tmp_path / "model.pte", program) is None


# -- the LLM-runner layout: KV cache in the program ------------------------------------------------
def _hf_lora(export_cases, family: str, name: str = "lora", r: int = 4, seed: int = 11):
    """A base dir and an HF PEFT LoRA adapter of ``family`` (non-identity: HF's random B), once per session."""

    def make():
        import peft
        from conftest import tiny_gpt2, tiny_llama
        from onnx_export_cases import save_tokenizer

        factory = {"gpt2": tiny_gpt2, "llama": tiny_llama}[family]
        root = export_cases.memo(("et-base", family), lambda: export_cases.scratch(f"et-{family}"))
        if not (root / "base").exists():
            factory().save_pretrained(root / "base", safe_serialization=True)
            save_tokenizer(root / "base")
        torch.manual_seed(seed)
        config = peft.LoraConfig(r=r, lora_alpha=2 * r, task_type="CAUSAL_LM", init_lora_weights=False)
        model = peft.get_peft_model(factory(), config).eval()
        model.save_pretrained(root / name)
        return root, model

    return export_cases.memo(("et-hf-lora", family, name), make)


def _llm_export(export_cases, family: str, merge: bool):
    def make():
        from peftc.exporting import export

        root, _ = _hf_lora(export_cases, family)
        out = root / f"et-llm-{merge}"
        return export(
            root / "lora", model=str(root / "base"), format="executorch", with_past=True, merge=merge, out=out
        )

    return export_cases.memo(("et-llm", family, merge), make)


def _hf_steps(model, ids: torch.Tensor, prefill: int) -> list[torch.Tensor]:
    """HF PEFT's logits over a prefill of ``ids[:, :prefill]`` then one token per step, with its DynamicCache."""
    with torch.no_grad():
        out = model(input_ids=ids[:, :prefill], use_cache=True)
        logits, cache = [out.logits], out.past_key_values
        for i in range(prefill, ids.shape[1]):
            out = model(input_ids=ids[:, i : i + 1], past_key_values=cache, use_cache=True)
            logits.append(out.logits)
            cache = out.past_key_values
    return logits


@pytest.mark.slow  # one ExecuTorch lowering each: ~25 s on two shared cores
@pytest.mark.usefixtures("executorch_installed")
@pytest.mark.parametrize(
    ("family", "merge"),
    [pytest.param("llama", False, id="llama-gqa-lora-unmerged"), pytest.param("gpt2", True, id="gpt2-lora-merged")],
)
def test_llm_runner_layout_matches_hf_peft_over_prefill_and_decode(export_cases, family, merge):
    """``--with-past``: tokens + positions in, the cache in the program; a prefill and 4 decode steps vs HF PEFT."""
    out = _llm_export(export_cases, family, merge)
    _, peft_model = _hf_lora(export_cases, family)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [i["name"] for i in manifest["inputs"]] == ["tokens", "input_pos"] and manifest["merged"] is merge
    runner = manifest["executorch"]["llm_runner"]
    assert runner["get_max_seq_len"] == peft_model.config.max_position_embeddings if family == "llama" else 64
    assert runner["use_kv_cache"] and runner["enable_dynamic_shape"] and runner["get_n_layers"] == 2
    assert runner["get_vocab_size"] == 128 and manifest["executorch"]["backend"] == "XNNPACK"

    from executorch.runtime import Runtime

    program = Runtime.get().load_program(out / "model.pte")
    assert {"forward", "get_max_seq_len", "get_eos_ids", "use_kv_cache"} <= set(program.method_names)
    assert program.load_method("get_max_seq_len").execute([])[0] == runner["get_max_seq_len"]
    method = program.load_method("forward")
    ids = torch.randint(1, 128, (1, 10), generator=torch.Generator().manual_seed(4))
    for generation in range(2):  # the second starts over at position 0, over the first one's cache
        prefill = 6 - 2 * generation
        want = _hf_steps(peft_model, ids[:, generation:], prefill)
        with peft_model.disable_adapter():
            base = _hf_steps(peft_model, ids[:, generation:], prefill)
        start = 0
        for step, (w, b) in enumerate(zip(want, base, strict=True)):
            n = w.shape[1]
            tokens = ids[:, generation + start : generation + start + n]
            got = method.execute([tokens, torch.arange(start, start + n)])[0]
            assert got.shape == w.shape
            assert float((got - w).abs().max()) <= ATOL, (generation, step)
            assert float((got - b).abs().max()) > 1e-3  # the adapter is not the identity
            start += n


# -- program–data separation: one .pte, model.ptd, one .ptd per adapter ------------------------------
def _ptd_export(export_cases):
    def make():
        from peftc.exporting import export

        root, _ = _hf_lora(export_cases, "gpt2", "rank4", r=4, seed=21)
        _hf_lora(export_cases, "gpt2", "rank8", r=8, seed=22)
        srcs = [root / "rank4", root / "rank8"]
        out = root / "et-ptd"
        return export(srcs, model=str(root / "base"), format="executorch", adapters_as_inputs=True, out=out)

    return export_cases.memo(("et-ptd",), make)


@pytest.mark.slow  # one ExecuTorch lowering: ~30 s on two shared cores
@pytest.mark.usefixtures("executorch_installed")
def test_one_program_serves_each_adapter_from_its_own_data_file(export_cases):
    """Two HF PEFT LoRA adapters (ranks 4 and 8): one .pte + model.ptd + adapters/<name>.ptd each vs HF PEFT."""
    import peft
    from peftc.exporters import executorch_data as data

    out = _ptd_export(export_cases)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["executorch"]["data_files"] == ["model.ptd", "adapter.ptd"]
    assert [a["file"] for a in manifest["adapters"]] == ["adapters/rank4.ptd", "adapters/rank8.ptd"]
    names = [i["name"] for i in manifest["inputs"]]
    assert names == ["input_ids", "attention_mask", "position_ids"]  # the adapters are data here, not inputs
    assert manifest["executorch"]["backend"] == "XNNPACK"
    assert {"model.pte", "model.ptd", "adapter.ptd", "adapters/rank4.ptd", "adapters/rank8.ptd"} <= set(
        manifest["files"]
    )
    report = json.loads((out / "report.json").read_text())
    assert all(r["max_abs_diff"] <= ATOL for r in report["adapters_vs_torch"].values())
    # every adapter file holds the same keys and shapes (rank 4 zero-padded to 8), none of the base weights
    keys = [set(data.read_data(out / a["file"])[1]) for a in manifest["adapters"]]
    assert keys[0] == keys[1] and all(k.startswith("peftc_adapter.") for k in keys[0])
    layout = data.ExecuTorchAdapterFiles().inputs(out / "model.pte")
    assert {tuple(v["shape"]) for k, v in layout.items() if k.endswith("lora_A")} == {(8, 64)}
    # every base weight is in model.ptd (the XNNPACK delegate's too); the program keeps its code and small constants
    weights = sum(p.numel() * 4 for p in built_base(out.parent).parameters())
    assert (out / "model.ptd").stat().st_size >= weights > 2 * (out / "model.pte").stat().st_size

    inputs = make_inputs("causal-lm", names, 2, 6, [2, 0])
    root = out.parent
    base = _hf_lora(export_cases, "gpt2", "rank4")[1]
    with base.disable_adapter():
        want_base = hf_logits(base, inputs)
    got_base = et.load_executorch(out / "model.pte").execute(list(inputs.values()))[0].numpy()
    assert max_diff("causal-lm", got_base, want_base, inputs) <= ATOL  # the no-op adapter.ptd: the base model
    for name in ("rank4", "rank8"):
        hf = peft.PeftModel.from_pretrained(built_base(root), root / name).eval()
        want = hf_logits(hf, inputs)
        got = et.load_executorch(out / "model.pte", out / "adapters" / f"{name}.ptd").execute(list(inputs.values()))
        got = got[0].numpy()
        assert max_diff("causal-lm", got, want, inputs) <= ATOL, name
        assert max_diff("causal-lm", got, want_base, inputs) > 1e-3, name  # not the identity


def built_base(root):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(root / "base", use_safetensors=True).eval()


def _char_tokenizer(path) -> None:
    """A BPE tokenizer.json ExecuTorch's C++ tokenizers read: 94 printable ASCII characters, ids 1..94 of 128."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{chr(c): c - 32 for c in range(33, 127)}}
    vocab.update({f"<x{i}>": i for i in range(len(vocab), 128)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "removed")
    tok.save(str(path))


@pytest.mark.slow  # shares the merged GPT-2 LLM-runner export above, or pays for it
@pytest.mark.usefixtures("executorch_installed")
def test_executorch_text_llm_runner_generates_hf_peft_greedy_tokens(export_cases, tmp_path):
    """ExecuTorch's own TextLLMRunner (C++ behind its Python bindings) drives the .pte: HF PEFT's greedy tokens."""
    runner_mod = pytest.importorskip("executorch.extension.llm.runner", reason="ExecuTorch built without the runner")
    out = _llm_export(export_cases, "gpt2", merge=True)
    _, peft_model = _hf_lora(export_cases, "gpt2")
    _char_tokenizer(tmp_path / "tokenizer.json")
    prompt = "LoRA"  # the tiny random model mostly repeats a token; here the adapter changes the greedy tokens
    ids = torch.tensor([[ord(c) - 32 for c in prompt]])
    with torch.no_grad():
        want = peft_model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, ids.shape[1] :]

    runner = runner_mod.TextLLMRunner(str(out / "model.pte"), str(tmp_path / "tokenizer.json"))
    pieces: list[str] = []
    config = runner_mod.GenerationConfig(max_new_tokens=6, temperature=0.0, echo=False)
    runner.generate(prompt, config, token_callback=pieces.append)
    vocab = {i: t for t, i in json.loads((tmp_path / "tokenizer.json").read_text())["model"]["vocab"].items()}
    assert pieces == [vocab[int(i)] for i in want]
    with peft_model.disable_adapter(), torch.no_grad():  # the adapter changes what is generated
        base = peft_model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, ids.shape[1] :]
    assert base.tolist() != want.tolist()


def test_data_files_pad_ranks_and_refuse_what_does_not_fit(tmp_path, executorch_installed):
    """Ranks zero-pad to the program's shape; a larger rank, another shape, a duplicated key are refused."""
    from peftc.exporters import executorch_data as data

    from peftc.errors import AdapterMismatchError

    a = torch.randn(4, 6)
    padded = data._pad(a, [8, 6], 0, "x.lora_A")
    assert padded.shape == (8, 6) and torch.equal(padded[:4], a) and not padded[4:].any()
    with pytest.raises(AdapterMismatchError, match=r"x.lora_A has shape \[4, 6\]; the program takes \[2, 6\]"):
        data._pad(a, [2, 6], 0, "x.lora_A")
    with pytest.raises(AdapterMismatchError, match="takes"):
        data._pad(a, [8, 5], 0, "x.lora_A")
    data.write_data(tmp_path / "a.ptd", {"k.a": a, "k.b": torch.ones(3)})
    data.write_data(tmp_path / "b.ptd", {"k.c": torch.zeros(2, 2)})
    merged = data.merged_data([tmp_path / "a.ptd", tmp_path / "b.ptd"], tmp_path / "ab.ptd")
    buffers, entries = data.read_data(merged)
    assert sorted(entries) == ["k.a", "k.b", "k.c"] and list(entries["k.a"].tensor_layout.sizes) == [4, 6]
    got = torch.frombuffer(bytearray(buffers[entries["k.a"].buffer_index]), dtype=torch.float32).view(4, 6)
    assert torch.equal(got, a)
    with pytest.raises(AdapterMismatchError, match="both hold 'k.a'"):
        data.merged_data([tmp_path / "a.ptd", tmp_path / "a.ptd"], tmp_path / "aa.ptd")
    with pytest.raises(AdapterFormatError, match="is not an ExecuTorch .ptd data file"):
        (tmp_path / "bad.ptd").write_bytes(b"not a ptd")
        data.read_data(tmp_path / "bad.ptd")


def test_graphless_formats_share_one_base():
    """TorchScript, AOTInductor and ExecuTorch: no adapter files but ExecuTorch's, run() goes through run_file."""
    from peftc.exporters import GraphlessFileExporter

    for name in ("torchscript", "aoti", "executorch"):
        exporter = get_exporter(name)
        assert isinstance(exporter, GraphlessFileExporter) and exporter.runtime_config is None
        assert exporter.model_file() == exporter.model_file_name
        assert exporter.model_file("decoder") == f"decoder_{exporter.model_file_name}"
    assert get_exporter("torchscript").adapter_files is None and get_exporter("aoti").adapter_files is None
    assert get_exporter("executorch").adapter_files.suffix == ".ptd" and get_exporter("executorch").cache_in_program
    assert not get_exporter("onnx").cache_in_program
