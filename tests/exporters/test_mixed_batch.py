"""Many adapters in one batch: ``export(..., mixed_batch=True)`` and :class:`~peftc.passes.mixed_batch.MixedBatchPass`.

References are independent of peftc: HF PEFT's own mixed batches (``PeftModel`` with several adapters
loaded and ``adapter_names=[...]`` per row, in ``forward`` and ``generate``) for LoRA and for a seq-cls
head in ``modules_to_save``; for IA3, which HF PEFT cannot mix in one batch, each row against
``PeftModel`` with that row's adapter set. Adapters are non-identity (B / l / the head perturbed) and
have different ranks and alphas.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama

from peftc.errors import AdapterMismatchError, ConfigError

ort = pytest.importorskip("onnxruntime")
peft = pytest.importorskip("peft")

ATOL = 1e-4


def _perturb(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif "ia3_l" in name:
                p.copy_(1 + torch.randn(p.shape, generator=gen) * 0.3)
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """``make(family, configs)``: a saved base and one HF PEFT adapter dir per config (memoised)."""
    root = tmp_path_factory.mktemp("mixed")
    cache: dict = {}

    def make(family: str, factory, configs: list) -> tuple[Path, list[Path]]:
        if family in cache:
            return cache[family]
        base_dir = root / family / "base"
        factory().save_pretrained(base_dir)
        dirs = []
        for i, config in enumerate(configs):
            model = peft.get_peft_model(factory(), config)
            _perturb(model, seed=10 + i)
            model.save_pretrained(root / family / f"a{i}")
            dirs.append(root / family / f"a{i}")
        cache[family] = (base_dir, dirs)
        return cache[family]

    return make


def _lora(r: int, alpha: int, task: str = "CAUSAL_LM", **kw):
    return peft.LoraConfig(r=r, lora_alpha=alpha, task_type=task, **kw)


def _hf_mixed(factory, adapters: list[Path]) -> torch.nn.Module:
    """HF PEFT with every adapter loaded under its index (``"0"``, ``"1"``…)."""
    model = peft.PeftModel.from_pretrained(factory(), adapters[0], adapter_name="0")
    for i, path in enumerate(adapters[1:], start=1):
        model.load_adapter(path, adapter_name=str(i))
    return model.eval()


def _names(index: list[int]) -> list[str]:
    return ["__base__" if i < 0 else str(i) for i in index]


def _session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _export(base: Path, adapters: list[Path], out: Path, task: str, with_past: bool = False) -> Path:
    from peftc.exporting import export

    return export(adapters, model=str(base), task=task, mixed_batch=True, with_past=with_past, out=out)


# -- GPT-2, KV cache: rows keep their adapters over decode steps ----------------------------------
@pytest.fixture(scope="module")
def gpt2_kv(made, tmp_path_factory):
    targets = ["c_attn", "c_fc"]
    base, adapters = made("gpt2", tiny_gpt2, [_lora(4, 8, target_modules=targets), _lora(8, 4, target_modules=targets)])
    out = _export(base, adapters, tmp_path_factory.mktemp("gpt2kv") / "art", "causal-lm", with_past=True)
    return out, adapters


def _hf_greedy(hf, ids, mask, index, steps):
    """HF PEFT's greedy ``generate`` with one adapter per row (``adapter_names``), per-step logits kept."""
    with torch.no_grad():
        return hf.generate(
            input_ids=ids,
            attention_mask=mask,
            adapter_names=_names(index),
            max_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )


def _empty_cache(names, batch):
    """Feeds of an empty KV cache (tiny GPT-2: 4 heads of 16) for every ``past_key_values.*`` input in ``names``."""
    empty = np.zeros((batch, 4, 0, 16), np.float32)
    return {n: empty for n in names if n.startswith("past_key_values.")}


@pytest.mark.slow
def test_gpt2_kv_generation_rows_keep_their_adapters_like_hf_peft_generate(gpt2_kv):
    out, adapters = gpt2_kv
    session = _session(out / "model.onnx")
    names = [i.name for i in session.get_inputs()]
    assert names[:4] == ["input_ids", "attention_mask", "position_ids", "adapter_index"]
    assert names[4] == "past_key_values.0.key" and not [n for n in names if "lora" in n]
    shape = session.get_inputs()[3].shape
    assert session.get_inputs()[3].type == "tensor(int64)" and isinstance(shape[0], str)

    index = [0, -1, 1, 1]
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 128, (4, 6), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    ids[1, :2] = 0
    steps = 4
    hf = _hf_mixed(tiny_gpt2, adapters)
    want = _hf_greedy(hf, ids, mask, index, steps)
    feeds = _empty_cache(names, len(index))
    cur, m, tokens = ids.numpy(), mask.numpy(), []
    for step in range(steps):
        pos = np.clip(m.cumsum(-1) - 1, 0, None)[:, -cur.shape[1] :]
        run = session.run(
            None,
            {"input_ids": cur, "attention_mask": m, "position_ids": pos, "adapter_index": np.array(index), **feeds},
        )
        logits = run[0][:, -1]
        np.testing.assert_allclose(logits, want.logits[step].numpy(), atol=ATOL, rtol=0)
        nxt = logits.argmax(-1)[:, None]
        tokens.append(nxt)
        feeds = {k: v for k, v in zip(feeds, run[1:], strict=True)}
        cur, m = nxt, np.concatenate([m, np.ones_like(nxt)], axis=1)
    np.testing.assert_array_equal(np.concatenate(tokens, 1), want.sequences[:, ids.shape[1] :].numpy())
    # the rows do differ: each adapter and the base change the logits
    first = want.logits[0]
    assert (first[0] - first[1]).abs().max() > 1e-2 and (first[2] - first[1]).abs().max() > 1e-2


def test_gpt2_kv_left_padded_rows_match_hf_peft_adapter_names_per_row(gpt2_kv):
    """Every row left-padded by its own amount, every adapter and the base on padded rows: ONNX Runtime's
    prefill logits (real positions) and three greedy decode steps against HF PEFT's ``adapter_names``.

    Positions as HF computes them for left padding (``generate``'s ``cumsum - 1``, 1 on the pads).
    """
    out, adapters = gpt2_kv
    session = _session(out / "model.onnx")
    names = [i.name for i in session.get_inputs()]
    index = [0, 1, -1, 1, 0]
    pads = [3, 1, 2, 5, 0]
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(1, 128, (len(index), 8), generator=gen)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        ids[row, :pad], mask[row, :pad] = 0, 0
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    hf = _hf_mixed(tiny_gpt2, adapters)
    steps = 3
    with torch.no_grad():
        prefill = hf(input_ids=ids, attention_mask=mask, position_ids=pos, adapter_names=_names(index)).logits
    want = _hf_greedy(hf, ids, mask, index, steps)
    feeds = _empty_cache(names, len(index))
    cur, m, p, tokens = ids.numpy(), mask.numpy(), pos.numpy(), []
    for step in range(steps):
        run = session.run(
            None, {"input_ids": cur, "attention_mask": m, "position_ids": p, "adapter_index": np.array(index), **feeds}
        )
        if step == 0:
            first = run[0]
            for row, pad in enumerate(pads):  # per row, its real positions only
                np.testing.assert_allclose(run[0][row, pad:], prefill[row, pad:].numpy(), atol=ATOL, rtol=0)
        np.testing.assert_allclose(run[0][:, -1], want.logits[step].numpy(), atol=ATOL, rtol=0)
        nxt = run[0][:, -1].argmax(-1)[:, None]
        tokens.append(nxt)
        feeds = dict(zip(feeds, run[1:], strict=True))
        cur, p, m = nxt, p[:, -1:] + 1, np.concatenate([m, np.ones_like(nxt)], axis=1)
    np.testing.assert_array_equal(np.concatenate(tokens, 1), want.sequences[:, ids.shape[1] :].numpy())
    with torch.no_grad():  # a padded row is its prompt alone: row 3 (5 pads, adapter 1) unpadded
        alone = hf(input_ids=ids[3:4, 5:], adapter_names=_names(index[3:4])).logits[0].numpy()
        swapped = hf(input_ids=ids, attention_mask=mask, position_ids=pos, adapter_names=_names([1, 0, 0, 0, 0])).logits
    np.testing.assert_allclose(first[3, 5:], alone, atol=ATOL, rtol=0)
    assert (swapped[0, 3:] - prefill[0, 3:]).abs().max() > 1e-2  # the rows' adapters differ: row 0 with 1, not 0


def test_gpt2_kv_manifest_report_and_out_of_range_indices(gpt2_kv):
    from peftc.passes.mixed_batch import check_adapter_index

    out, _ = gpt2_kv
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["mixed_batch"] is True and manifest["method"] == "LORA"
    assert [a["index"] for a in manifest["adapters"]] == [0, 1]
    assert [a["rank"] for a in manifest["adapters"]] == [4, 8]
    assert manifest["adapter_index"]["range"] == [-1, 1]
    assert "adapter_index" in [i["name"] for i in manifest["inputs"]]
    report = json.loads((out / "report.json").read_text())
    assert report["verified"] and report["onnx_vs_torch"]["passed"]
    rows = {r for case in report["adapter_index_rows"].values() for r in case}
    assert rows == {-1, 0, 1}  # verification mixed the base and both adapters
    assert (out / "adapters" / "a1" / "adapter_config.json").is_file()
    from peftc.inspect import inspect_path, render

    text = render(inspect_path(out))
    assert "mode: mixed-batch" in text and "-1 = the base model, 0 = a0 (rank 4), 1 = a1 (rank 8)" in text

    # ONNX Runtime's Gather fails the run on an index outside [-1, n); peftc's helper refuses first
    session = _session(out / "model.onnx")
    feeds = {"input_ids": np.ones((1, 2), np.int64), "attention_mask": np.ones((1, 2), np.int64)}
    feeds["position_ids"] = np.arange(2)[None]
    for i in session.get_inputs()[4:]:
        feeds[i.name] = np.zeros((1, 4, 0, 16), np.float32)
    for bad in (2, -2):
        with pytest.raises(Exception, match="(?i)out of bounds|out of range|indices"):
            session.run(None, {**feeds, "adapter_index": np.array([bad])})
        with pytest.raises(ConfigError, match="out of range"):
            check_adapter_index([bad], 2)
    with pytest.raises(ConfigError, match="one per row"):
        check_adapter_index([0, 1], 2, batch=3)
    assert check_adapter_index([-1, 1], 2).dtype == np.int64
    from peftc.exporters.onnx import run_onnx
    from peftc.exporters.verify import VerifyCase

    case = {k: torch.from_numpy(np.asarray(v)) for k, v in feeds.items()}
    with pytest.raises(ConfigError, match="adapter_index 2 is out of range"):
        run_onnx(out / "model.onnx", [VerifyCase("bad", {**case, "adapter_index": torch.tensor([2])})])


# -- LLaMA LoRA and GPT-2 IA3, no cache ------------------------------------------------------------
def _tokens(batch: int, seq: int, seed: int, pad_row: int | None = 1, side: str = "left") -> dict[str, torch.Tensor]:
    """Random ids; ``pad_row`` padded by 3 on ``side`` and row 0 by 1 (two pad lengths), positions as HF's."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    if pad_row is not None:
        for row, n in ((pad_row, 3), (0, 1)):
            pads = slice(None, n) if side == "left" else slice(seq - n, None)
            mask[row, pads] = 0
            ids[row, pads] = 0
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


@pytest.mark.slow
def test_llama_lora_three_ranks_mixed_rows_match_hf_peft_adapter_names(made, tmp_path):
    configs = [_lora(2, 4), _lora(4, 16), _lora(8, 8)]  # HF PEFT's default targets: q_proj, v_proj
    base, adapters = made("llama", tiny_llama, configs)
    out = _export(base, adapters, tmp_path / "art", "causal-lm")
    session = _session(out / "model.onnx")
    hf = _hf_mixed(tiny_llama, adapters)
    index = [2, -1, 0, 1, 0]
    for side in ("left", "right"):
        x = _tokens(5, 7, seed=3, side=side)
        got = session.run(["logits"], {**{k: v.numpy() for k, v in x.items()}, "adapter_index": np.array(index)})[0]
        with torch.no_grad():
            want = hf(**x, adapter_names=_names(index)).logits.numpy()
            with hf.disable_adapter():
                base = hf(**x).logits.numpy()
        real = x["attention_mask"].bool().numpy()
        np.testing.assert_allclose(got[real], want[real], atol=ATOL, rtol=0, err_msg=f"{side}-padded")
        adapted = [row for row, i in enumerate(index) if i >= 0]
        assert min(np.abs(got[r][real[r]] - base[r][real[r]]).max() for r in adapted) > 1e-2  # each adapter acts


@pytest.mark.slow
def test_gpt2_ia3_pair_each_row_matches_its_own_hf_peft_adapter(made, tmp_path):
    configs = [
        peft.IA3Config(
            task_type="CAUSAL_LM", target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"]
        )
        for _ in range(2)
    ]
    base, adapters = made("gpt2-ia3", tiny_gpt2, configs)
    out = _export(base, adapters, tmp_path / "art", "causal-lm")
    index = [1, 0, -1]
    x = _tokens(3, 6, seed=4)
    got = _session(out / "model.onnx").run(
        ["logits"], {**{k: v.numpy() for k, v in x.items()}, "adapter_index": np.array(index)}
    )[0]
    hf = _hf_mixed(tiny_gpt2, adapters)
    real = x["attention_mask"].bool().numpy()
    with torch.no_grad():
        for row, i in enumerate(index):
            if i < 0:
                with hf.disable_adapter():
                    want = hf(**x).logits.numpy()
            else:
                hf.set_adapter(str(i))
                want = hf(**x).logits.numpy()
            np.testing.assert_allclose(got[row][real[row]], want[row][real[row]], atol=ATOL, rtol=0)
    assert np.abs(got[0] - got[1]).max() > 1e-2


# -- BERT seq-cls: LoRA plus each adapter's own classifier head ------------------------------------
@pytest.mark.slow
def test_bert_seq_cls_stacks_lora_and_heads_like_hf_peft(made, tmp_path):
    from peftc.passes.mixed_batch import ADAPTER_INDEX

    configs = [
        _lora(4, 8, "SEQ_CLS", target_modules=["query", "value"]),
        _lora(2, 2, "SEQ_CLS", target_modules=["query", "value"]),
    ]
    base, adapters = made("bert", tiny_bert, configs)
    out = _export(base, adapters, tmp_path / "art", "seq-cls")
    session = _session(out / "model.onnx")
    assert [i.name for i in session.get_inputs()][-1] == ADAPTER_INDEX
    hf = _hf_mixed(tiny_bert, adapters)
    index = [1, -1, 0, 1]
    for pad_row, side in ((None, "none"), (2, "right"), (2, "left")):  # every row is pooled, padded or not
        x = _tokens(4, 8, seed=6, pad_row=pad_row, side=side)
        x = {
            "input_ids": x["input_ids"],
            "attention_mask": x["attention_mask"],
            "token_type_ids": torch.zeros_like(x["input_ids"]),
        }
        feeds = {i.name: x[i.name].numpy() for i in session.get_inputs() if i.name in x}
        got = session.run(["logits"], {**feeds, ADAPTER_INDEX: np.array(index)})[0]
        with torch.no_grad():
            want = hf(**x, adapter_names=_names(index)).logits.numpy()
            with hf.disable_adapter():
                base = hf(**x).logits.numpy()
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0, err_msg=f"padding: {side}")
        assert min(np.abs(got[r] - base[r]).max() for r, i in enumerate(index) if i >= 0) > 1e-2  # each adapter acts


# -- the pass, cheaply; refusals ----------------------------------------------------------------
def _bound(r: int, alpha: float, seed: int):
    from peftc.passes import insertion_pipeline

    from peftc.config import LoraConfig
    from peftc.program import capture

    program = capture(tiny_gpt2(), "causal-lm", mode="eval")
    insertion_pipeline(LoraConfig(r=r, lora_alpha=alpha, task_type="CAUSAL_LM"))(program)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in sorted(program.adapter.tensors.items()):
            if "lora_B" in key:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.1)
    return program


def test_pass_stacks_every_site_and_runs_each_row_as_its_own_program():
    from peftc.passes.mixed_batch import ADAPTER_INDEX, MixedBatchPass

    from peftc.program import capture

    first, second = _bound(4, 8, 1), _bound(8, 4, 2)
    base = capture(tiny_gpt2(), "causal-lm", mode="eval")
    x = _tokens(3, 6, seed=1)
    tokens = [x[n] for n in first.input_names]
    with torch.no_grad():
        refs = {0: first(*tokens), 1: second(*tokens), -1: base(*tokens)}
    result = MixedBatchPass([first.adapter, second.adapter])(first)
    assert result.modified and first.input_names[-1] == ADAPTER_INDEX
    attrs = [n.target for n in first.graph.nodes if n.op == "get_attr" and "lora_" in n.target]
    assert attrs and all(t.endswith("__stacked") for t in attrs)
    a = first.graph_module.get_parameter(attrs[0])
    assert a.shape[0] == 3 and not a[0].any()  # n + 1 slots, slot 0 (the base) zeros
    index = torch.tensor([1, -1, 0])
    with torch.no_grad():
        got = first(*tokens, index)
    for row, i in enumerate(index.tolist()):
        torch.testing.assert_close(got[row], refs[i][row], atol=1e-5, rtol=0)
    assert (refs[0] - refs[-1]).abs().max() > 1e-2
    assert not MixedBatchPass([first.adapter, second.adapter])(first).modified  # already mixed
    with pytest.raises(IndexError):
        first(*tokens, torch.tensor([2, 0, 0]))


def test_refusals_are_one_line(made, tmp_path):
    from peftc.exporting import export

    targets = ["c_attn", "c_fc"]
    base, adapters = made("gpt2", tiny_gpt2, [_lora(4, 8, target_modules=targets), _lora(8, 4, target_modules=targets)])
    with pytest.raises(ConfigError, match="exclude each other"):
        export(adapters, model=str(base), mixed_batch=True, merge=True, out=tmp_path / "x")
    with pytest.raises(ConfigError, match="--format torchscript takes no --mixed-batch"):
        export(adapters, model=str(base), mixed_batch=True, format="torchscript", out=tmp_path / "x")
    other = peft.get_peft_model(tiny_gpt2(), _lora(4, 8, target_modules=["c_proj"]))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(AdapterMismatchError, match="same target"):
        export([adapters[0], tmp_path / "other"], model=str(base), mixed_batch=True, out=tmp_path / "x")
    dora = peft.get_peft_model(tiny_gpt2(), _lora(4, 8, target_modules=targets, use_dora=True))
    dora.save_pretrained(tmp_path / "dora")
    with pytest.raises(ConfigError, match="DoRA"):
        export([adapters[0], tmp_path / "dora"], model=str(base), mixed_batch=True, out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_cli_passes_every_src_with_mixed_batch_and_refuses_in_one_line(capsys, monkeypatch, tmp_path):
    import sys

    import peftc.exporting  # noqa: F401
    from peftc.cli import main

    def cli(*argv: str) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as exc:
            main(list(argv))
        out, err = capsys.readouterr()
        return exc.value.code, out, err

    calls = []
    monkeypatch.setattr(sys.modules["peftc.exporting"], "export", lambda src, **kw: calls.append((src, kw)) or tmp_path)
    code, out, _ = cli("export", "a", "b", "--mixed-batch", "--out", str(tmp_path / "o"))
    assert code == 0 and calls[-1][0] == ["a", "b"] and calls[-1][1]["mixed_batch"] is True
    monkeypatch.undo()
    code, _, err = cli("export", "a", "b", "--mixed-batch", "--merge", "--out", str(tmp_path / "x"))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "exclude each other" in lines[0]
    assert not (tmp_path / "x").exists()


def test_mixed_batch_model_loads_without_onnx_runtime_warnings(gpt2_kv, tmp_path, capfd):
    """No input is backed by an initializer (the adapters are constants), so ORT has nothing to warn about.

    A hand-made model with an initializer-backed input shows the capture sees ORT's warning line.
    """
    import onnx
    from onnx import TensorProto, helper

    def open_session(path: Path) -> str:
        options = ort.SessionOptions()
        options.log_severity_level = 2  # warnings
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return capfd.readouterr().err

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "a"], ["y"])], "g", [x, a], [y], [helper.make_tensor("a", 1, [2], [0.0, 0.0])]
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "defaults.onnx")
    capfd.readouterr()
    assert "appears in graph inputs" in open_session(tmp_path / "defaults.onnx")
    out, _ = gpt2_kv
    err = open_session(out / "model.onnx")
    assert "appears in graph inputs" not in err and "[W:onnxruntime" not in err


def test_onnxruntime_genai_generates_a_mixed_batch_like_hf_peft(gpt2_kv):
    """The KV-cache export's genai_config.json drives og.Model; ``set_model_input`` feeds adapter_index."""
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (the genai extra)")
    out, adapters = gpt2_kv
    index = [0, -1, 1]
    prompt = np.array([[5, 16, 27, 38, 49]] * 3, dtype=np.int32)
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=10, batch_size=3, do_sample=False)
    generator = og.Generator(model, params)
    generator.set_model_input("adapter_index", np.array(index, dtype=np.int64))
    generator.append_tokens(prompt)
    prefill = np.asarray(generator.get_output("logits"))[:, -1]
    while not generator.is_done():
        generator.generate_next_token()
    got = np.array([list(generator.get_sequence(i)) for i in range(3)])
    with torch.no_grad():
        want = _hf_mixed(tiny_gpt2, adapters).generate(
            input_ids=torch.from_numpy(prompt).long(),
            attention_mask=torch.ones(prompt.shape, dtype=torch.long),
            adapter_names=_names(index),
            max_length=10,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    np.testing.assert_allclose(prefill, want.logits[0].numpy(), atol=ATOL, rtol=0)
    np.testing.assert_array_equal(got, want.sequences.numpy())
    assert len({tuple(row[5:]) for row in got.tolist()}) > 1  # the rows' adapters lead to different tokens
