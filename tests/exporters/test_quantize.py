"""``export(..., quantize="int4"|"int8")``: ONNX Runtime's quantizers on the verified float file.

Quality figures mean something only when the float model's output distributions are peaked: a
random tiny model's next-token distribution is near uniform, so its top-1 flips under any noise and
its KL is tiny whatever happens. The models here are therefore *trained* (a few seconds each): a
2-layer GPT-2 (hidden 64, int4 blocks of 32) learns "next token = token + 1"; two LoRA adapters,
trained with HF PEFT and saved by HF PEFT, turn it into "+ 2" and "+ 3". A quantized export that
loses a block scale or misplaces a weight then predicts the wrong token (agreement near 1/127),
and swapping adapters changes every prediction. References are independent of peftc: HF PEFT's
``PeftModel`` in float32 on the same adapter directories.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx_export_cases import save_tokenizer

from peftc.errors import ConfigError

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

VOCAB = 128


def _batch(gen: torch.Generator, shift: int, b: int = 16, s: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(1, VOCAB, (b, s), generator=gen)
    return x, (x + shift - 1) % (VOCAB - 1) + 1  # tokens 1…127 (0 is pad), next = token + shift


def _fit(model: torch.nn.Module, shift: int, steps: int, lr: float) -> float:
    gen = torch.Generator().manual_seed(shift)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    for _ in range(steps):
        x, y = _batch(gen, shift)
        loss = torch.nn.functional.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A trained tiny GPT-2 base (+1) and two HF PEFT LoRA adapters saved by HF PEFT (+2, +3)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("quantize")
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64, pad_token_id=0)
    base = GPT2LMHeadModel(cfg)
    assert _fit(base, 1, steps=150, lr=3e-3) < 0.2
    base.save_pretrained(root / "base", safe_serialization=True)
    save_tokenizer(root / "base")
    dirs = {"base": root / "base"}
    for name, shift in (("plus2", 2), ("plus3", 3)):
        torch.manual_seed(shift)
        config = LoraConfig(
            r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, task_type="CAUSAL_LM"
        )
        peft_model = get_peft_model(GPT2LMHeadModel.from_pretrained(root / "base"), config)
        assert _fit(peft_model, shift, steps=100, lr=1e-2) < 1.0
        peft_model.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


def _hf_peft(trained: dict[str, Path], name: str) -> torch.nn.Module:
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    return PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(trained["base"]), trained[name]).eval()


def _tokens(seed: int, b: int = 3, s: int = 10) -> dict[str, np.ndarray]:
    """Held-out text for the independent checks (unlike the export's own cases)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (b, s), generator=gen)
    return {"input_ids": ids.numpy(), "attention_mask": np.ones((b, s), np.int64)}


def _agreement_and_kl(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    got, want = torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64)
    log_p, log_q = want.log_softmax(-1), got.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    return float((got.argmax(-1) == want.argmax(-1)).double().mean()), float(kl)


def _feeds(session, tokens: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Token feeds plus an empty cache for a KV-cache graph (prefill)."""
    b, s = tokens["input_ids"].shape
    feeds = {}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((b, i.shape[1], 0, i.shape[3]), np.float32)
        elif i.name == "position_ids":
            feeds[i.name] = np.tile(np.arange(s), (b, 1))
        else:
            feeds[i.name] = tokens[i.name]
    return feeds


def _ops(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _float_weight_ops(path: Path) -> list[str]:
    """MatMul/Gemm nodes still multiplying by a constant 2-D float weight (what a quantizer should have taken)."""
    model = onnx.load(str(path), load_external_data=False)
    inputs = {i.name for i in model.graph.input}
    weights = {t.name for t in model.graph.initializer if len(t.dims) == 2 and t.name not in inputs}
    return [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]


@pytest.fixture(scope="module")
def merged(trained, tmp_path_factory) -> dict[str, Path]:
    """The +2 adapter merged into the base, exported as a KV-cache graph in int4 and int8 (weights in external data)."""
    from peftc.exporting import export

    root = tmp_path_factory.mktemp("merged")
    return {
        q: export(
            trained["plus2"], model=trained["base"], merge=True, out=root / q, quantize=q, external_data=q == "int8"
        )
        for q in ("int4", "int8")
    }


@pytest.mark.slow  # trains its tiny GPT-2 first (~13 s on 2 cores)
@pytest.mark.parametrize(
    ("scheme", "ops"), [("int4", {"MatMulNBits"}), ("int8", {"DynamicQuantizeLinear", "MatMulInteger"})]
)
def test_merged_kv_cache_quantized_matches_hf_peft_float(trained, merged, scheme, ops):
    out = merged[scheme]
    model_file = out / "model.onnx"
    counts = _ops(model_file)
    assert ops <= set(counts)
    assert _float_weight_ops(model_file) == []  # every linear weight (and the tied LM head) quantized
    assert counts["MatMul"] >= 4  # attention's Q·Kᵀ and P·V (two layers) stay float MatMuls
    from transformers import GPT2LMHeadModel

    base = GPT2LMHeadModel.from_pretrained(trained["base"])
    linear = sum(m.weight.numel() for m in base.modules() if type(m).__name__ in ("Conv1D", "Linear"))
    size = sum(f.stat().st_size for f in out.glob("model.onnx*"))
    assert (out / "model.onnx.data").is_file() == (scheme == "int8")  # external data stays external, quantized
    report = json.loads((out / "report.json").read_text())
    assert report["verified"] is True and report["max_abs_diff"] <= 1e-4  # the float file verified first, tightly
    q = report["quantization"]
    assert q["scheme"] == scheme and q["bits"] == int(scheme[3:])
    assert q["size_bytes"] == size and q["float_size_bytes"] > 4 * sum(p.numel() for p in base.parameters())
    # every linear weight (and the LM head) shrank from 4 bytes to ~0.6 (int4: 4 bits + a scale per 32) or ~1.1
    assert q["float_size_bytes"] - size > 0.7 * 4 * linear
    assert q["quantized_weights"] == 9 and q["float_weights"] == 0  # 2 layers × 4 linears + the LM head
    assert q["top1_agreement"] >= 0.95 and q["mean_kl"] < 0.01 and q["max_abs_diff"] > 1e-4  # not the float file
    assert {c["rows"] for c in q["comparisons"]} == {7 + 4 * 12 - (3 + 6 + 11) + 4 + 3}  # prefills + decode steps
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantize"]["scheme"] == scheme and manifest["quantize"]["top1_agreement"] == q["top1_agreement"]
    from peftc.exporters.manifest import check_manifest

    assert check_manifest(out) == []  # the quantized files are the ones hashed
    meta = {p.key: p.value for p in onnx.load(str(model_file), load_external_data=False).metadata_props}
    assert meta["peftc.quantize"] == scheme and meta["peftc.merged"] == "true"
    from peftc.inspect import inspect_path, render

    assert f"quantization: {scheme}" in render(inspect_path(out))

    # independent check: ONNX Runtime on the quantized file vs HF PEFT in float32, on other text
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    tokens = _tokens(seed=5)
    got = session.run(["logits"], _feeds(session, tokens))[0]
    with torch.no_grad():
        want = _hf_peft(trained, "plus2")(**{k: torch.from_numpy(v) for k, v in tokens.items()}).logits.numpy()
    agreement, kl = _agreement_and_kl(got, want)
    assert agreement >= 0.95 and kl < 0.02, (agreement, kl)
    assert (want.argmax(-1) == (tokens["input_ids"] + 1) % (VOCAB - 1) + 1).mean() > 0.9  # the +2 model is peaked


@pytest.mark.slow  # ~11 s: one more export
def test_quality_gate_fails_the_cli_export_in_one_line_and_writes_nothing(trained, tmp_path, capsys):
    from peftc.cli import main

    out = tmp_path / "art"
    argv = ["export", str(trained["plus2"]), "--model", str(trained["base"]), "--merge", "--out", str(out)]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--quantize", "int4", "--quantize-max-kl", "1e-9"])
    _, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert exc.value.code == 3 and len(lines) == 1 and "Traceback" not in err, err
    assert "int4 model (model.onnx) is too far from the float torch program" in lines[0]
    assert "(max 1e-09); nothing was written" in lines[0]
    assert not out.exists()


@pytest.mark.slow  # ~25 s: three graphs
def test_seq2seq_int8_quantizes_encoder_and_decoder(tmp_path):
    """T5: the three files quantized; the encoder's hidden states get a max abs diff, the decoders get every figure."""
    from conftest import tiny_t5
    from peft import LoraConfig, get_peft_model
    from transformers import T5ForConditionalGeneration

    from peftc.exporting import export

    tiny_t5().save_pretrained(tmp_path / "base", safe_serialization=True)
    save_tokenizer(tmp_path / "base")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM")
    peft_model = get_peft_model(T5ForConditionalGeneration.from_pretrained(tmp_path / "base"), config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    # a random T5's activations are large: the gate is relaxed, the figures are what is checked
    out = export(
        tmp_path / "adapter", model=tmp_path / "base", out=tmp_path / "art", quantize="int8", quantize_min_top1=0.5,
        quantize_max_kl=1.0,
    )  # fmt: skip
    files = ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx")  # the KV-cache default
    for f in files:
        assert _float_weight_ops(out / f) == [] and "MatMulInteger" in _ops(out / f)
    q = json.loads((out / "report.json").read_text())["quantization"]
    encoder, *decoders = q["comparisons"]
    assert [c["candidate"] for c in q["comparisons"]] == list(files)
    assert encoder["top1_agreement"] is None and 0 < encoder["max_abs_diff"] < 1
    for decoder in decoders:  # the first step and the steps on the cache: next-token figures
        assert decoder["rows"] > 0 and decoder["top1_agreement"] > 0.5, decoder


@pytest.fixture(scope="module")
def swappable_int4(trained, tmp_path_factory) -> Path:
    """+2 and +3 as float adapter files over one int4 KV-cache base (~30 s: a two-adapter KV-cache export)."""
    from peftc.exporting import export

    names = ("plus2", "plus3")
    out = tmp_path_factory.mktemp("swappable") / "art"
    return export([trained[n] for n in names], model=trained["base"], adapters_as_inputs=True, out=out, quantize="int4")


@pytest.mark.slow
def test_swappable_int4_base_switches_float_adapters_like_hf_peft(trained, swappable_int4):
    """One int4 base, two float adapters: each activated in one session equals HF PEFT in float (prefill)."""
    from peftc.exporters.swappable import read_adapter

    out = swappable_int4
    model_file = out / "model.onnx"
    model = onnx.load(str(model_file), load_external_data=False)
    lifted = {i.name for i in model.graph.input if i.name.endswith((".lora_A", ".lora_B"))}
    assert len(lifted) == 2 * 4 * 2  # A and B of c_attn, attn.c_proj, c_fc, mlp.c_proj in two layers
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 9 and not [n for n in nbits if set(n.input) & lifted]  # adapter MatMuls untouched
    assert _float_weight_ops(model_file) == []
    q = json.loads((out / "report.json").read_text())["quantization"]
    assert [c["candidate"] for c in q["comparisons"]] == [
        "model.onnx + plus2.onnx_adapter",
        "model.onnx + plus3.onnx_adapter",
        "model.onnx",
    ]
    assert q["top1_agreement"] >= 0.95 and q["quantized_weights"] == 9 and q["float_weights"] == len(lifted)
    files = [out / "adapters" / f"{name}.onnx_adapter" for name in ("plus2", "plus3")]
    for f in files:
        assert {dtype for _, dtype in read_adapter(f).values()} == {"tensor(float)"}  # adapters stay float

    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    tokens = _tokens(seed=9)
    feeds = _feeds(session, tokens)
    x = {k: torch.from_numpy(v) for k, v in tokens.items()}
    outputs = {}
    for name, f in [*zip(("plus2", "plus3"), files, strict=True)] * 2:  # switch back and forth in one session
        adapter = ort.LoraAdapter()
        adapter.Load(str(f))
        options = ort.RunOptions()
        options.add_active_adapter(adapter)
        got = session.run(["logits"], feeds, options)[0]
        with torch.no_grad():
            want = _hf_peft(trained, name)(**x).logits.numpy()
        agreement, kl = _agreement_and_kl(got, want)
        assert agreement >= 0.95 and kl < 0.02, (name, agreement, kl)
        outputs[name] = got
    agreement, _ = _agreement_and_kl(outputs["plus2"], outputs["plus3"])
    assert agreement < 0.1  # the adapters predict different tokens (+2 vs +3)
    from transformers import GPT2LMHeadModel

    with torch.no_grad():
        want = GPT2LMHeadModel.from_pretrained(trained["base"])(**x).logits.numpy()
    agreement, _ = _agreement_and_kl(session.run(["logits"], feeds)[0], want)
    assert agreement >= 0.95  # no adapter: the (quantized) base


@pytest.mark.slow
def test_keep_mode_classifier_int8_quantizes_base_and_adapter_alike(export_cases, tmp_path):
    """seq-cls with the adapter as ops: every constant weight int8; label agreement and KL over labels reported."""
    from peftc.exporting import export

    built = export_cases.build("bert")
    out = export(built.run_dir, out=tmp_path / "art", quantize="int8")
    model_file = out / "model.onnx"
    assert _float_weight_ops(model_file) == []  # the LoRA branches' A and B too
    ops = _ops(model_file)
    assert ops["MatMulInteger"] == 2 * (6 + 2 * 2) + 2  # per layer q, k, v, o, up, down + A and B of q, v; pooler, head
    q = json.loads((out / "report.json").read_text())["quantization"]
    assert q["float_weights"] == 0 and q["quantized_weights"] == ops["MatMulInteger"]
    assert [c["rows"] for c in q["comparisons"]] == [1 + 3 + 4]  # one label distribution per sequence
    assert q["top1_agreement"] >= 0.95 and q["mean_kl"] < 0.01
    assert q["max_abs_diff"] > 1e-5  # the logits do move, yet the labels agree


# -- refusals: before any file is read ---------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"format": "torchscript", "quantize": "int4"}, r"--quantize is not supported for --format torchscript.*onnx"),
        ({"dtype": "float16", "quantize": "int8"}, r"quantizes float32 weights; drop --dtype float16"),
        ({"quantize": "int2"}, r"--quantize 'int2' is not supported; choose one of: int4, int8"),
        ({"quantize": "int4", "quantize_block_size": 48}, r"power of two >= 16"),
        ({"quantize": "int8", "quantize_block_size": 32}, r"block-wise schemes \(int4\), not int8"),
        ({"quantize": "int4", "quantize_min_top1": 1.5}, r"between 0 and 1"),
        ({"quantize_max_kl": 0.1}, r"need --quantize"),
        (
            {"format": "executorch", "quantize": "int8", "adapters_as_inputs": True},
            r"--quantize with --adapters-as-inputs is not supported for --format executorch",
        ),
        ({"format": "executorch", "quantize": "int4", "quantize_block_size": 32}, r"none in --format executorch"),
    ],
)
def test_refused_options(tmp_path, kwargs, match):
    from peftc.exporting import export

    with pytest.raises(ConfigError, match=match):
        export(tmp_path / "no-such-run", out=tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_cli_refuses_quantize_for_torchscript_in_one_line(tmp_path, capsys):
    from peftc.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["export", str(tmp_path), "--format", "torchscript", "--quantize", "int4"])
    _, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert exc.value.code != 0 and len(lines) == 1 and "Traceback" not in err
    assert "--quantize is not supported for --format torchscript" in lines[0]


# -- ExecuTorch: torchao's PT2E flow before lowering (the edge extra; skipped without it) -----------------


@pytest.fixture(scope="module")
def executorch_merged(trained, tmp_path_factory) -> dict[str, Path]:
    """The +2 adapter merged, exported with --format executorch in int8 and int4."""
    pytest.importorskip("executorch", reason="--format executorch needs the edge extra: pip install 'peftc[edge]'")
    from peftc.exporting import export

    root = tmp_path_factory.mktemp("executorch")
    return {
        q: export(trained["plus2"], model=trained["base"], merge=True, format="executorch", out=root / q, quantize=q)
        for q in ("int8", "int4")
    }


@pytest.mark.slow  # two ExecuTorch lowerings per scheme (float, quantized): ~30 s each on 2 cores
@pytest.mark.parametrize(("scheme", "max_ratio"), [("int8", 0.55), ("int4", 0.45)])
def test_executorch_quantized_matches_hf_peft_float(trained, executorch_merged, scheme, max_ratio):
    from peftc.exporters import executorch as et

    out = executorch_merged[scheme]
    report = json.loads((out / "report.json").read_text())
    assert report["verified"] is True and report["max_abs_diff"] <= 1e-4  # the float .pte verified first, tightly
    q = report["quantization"]
    assert q["scheme"] == scheme and q["bits"] == int(scheme[3:]) and q["block_size"] is None
    assert q["quantized_weights"] == 9  # 2 layers × (c_attn, c_proj, c_fc, mlp c_proj) + the tied LM head
    assert q["size_bytes"] == (out / "model.pte").stat().st_size and q["size_ratio"] < max_ratio
    assert q["top1_agreement"] >= 0.95 and q["mean_kl"] < 0.01 and q["max_abs_diff"] > 1e-4  # not the float file
    assert sorted(p.name for p in out.glob(".*")) == []  # the staged file was moved into place
    assert et.read_info(out / "model.pte")["peftc.quantize"] == scheme
    from peftc.exporters.manifest import check_manifest

    assert check_manifest(out) == []

    # independent check: ExecuTorch's runtime on the quantized .pte vs HF PEFT in float32, on other text
    method = et.load_executorch(out / "model.pte")
    tokens = _tokens(seed=5)
    b, s = tokens["input_ids"].shape
    feeds = {**tokens, "position_ids": np.tile(np.arange(s), (b, 1))}
    names = et.read_info(out / "model.pte")["input_names"]
    got = method.execute([torch.from_numpy(feeds[n]) for n in names])[0]
    with torch.no_grad():
        want = _hf_peft(trained, "plus2")(**{k: torch.from_numpy(v) for k, v in tokens.items()}).logits.numpy()
    agreement, kl = _agreement_and_kl(got.numpy(), want)
    assert agreement >= 0.95 and kl < 0.02, (agreement, kl)
    assert np.abs(got.numpy() - want).max() > 1e-4  # quantized, not float
    assert (want.argmax(-1) == (tokens["input_ids"] + 1) % (VOCAB - 1) + 1).mean() > 0.9  # the +2 model is peaked


def test_addmm_to_linear_keeps_gpt2_arithmetic_and_leaves_no_addmm():
    """GPT-2's Conv1D ``addmm`` becomes ``linear`` over the transposed weight (what XNNPACKQuantizer annotates)."""
    from conftest import captured
    from peftc.exporters.executorch_quantize import addmm_to_linear

    program, _ = captured("gpt2", "causal-lm")
    inputs = tuple(program.example_inputs)
    module = torch.export.export(program.graph_module, inputs, strict=False).module()  # what the exporter quantizes
    count = lambda op: sum(n.target is op for n in module.graph.nodes)  # noqa: E731
    addmms = count(torch.ops.aten.addmm.default)
    linears = count(torch.ops.aten.linear.default)
    with torch.no_grad():
        before = module(*inputs)[0]
        assert addmm_to_linear(module) == addmms == 8  # 2 layers × c_attn, c_proj, c_fc, mlp.c_proj
        after = module(*inputs)[0]
    assert count(torch.ops.aten.addmm.default) == 0 and count(torch.ops.aten.linear.default) == linears + addmms
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    assert addmm_to_linear(module) == 0  # nothing left to rewrite


# -- the Gemm rewrite, on a hand-made graph --------------------------------------------------------
def test_gemm_to_matmul_keeps_the_arithmetic_and_leaves_input_weights_alone():
    """Gemm(x, W, b, transB=1) → MatMul(x, Wᵀ) + b; a weight read twice is transposed once; an input weight stays."""
    from onnx import TensorProto, helper, numpy_helper
    from peftc.exporters.onnx_quantize import gemm_to_matmul

    rng = np.random.default_rng(0)
    w, b, v = (rng.standard_normal(s).astype(np.float32) for s in ((8, 4), (8,), (8, 8)))
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["y1"], name="g1", transB=1),
        helper.make_node("Gemm", ["x", "w"], ["y2"], name="g2", transB=1),  # w read twice
        helper.make_node("Gemm", ["y1", "v"], ["y3"], name="g3"),  # no transpose, no bias
        helper.make_node("Gemm", ["x", "lora"], ["y4"], name="g4", transB=1),  # weight is a graph input
        helper.make_node("Gemm", ["y1", "v"], ["y5"], name="g5", alpha=2.0),  # not the plain form
    ]
    names = ["y1", "y2", "y3", "y4", "y5"]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4]),
         helper.make_tensor_value_info("lora", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3, 2 if n == "y4" else 8]) for n in names],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"), numpy_helper.from_array(v, "v"),
         numpy_helper.from_array(np.zeros((2, 4), np.float32), "lora")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    x = rng.standard_normal((3, 4)).astype(np.float32)
    lora = rng.standard_normal((2, 4)).astype(np.float32)

    def run(m):
        session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(names, {"x": x, "lora": lora})

    before = run(model)
    assert gemm_to_matmul(model) == 3
    onnx.checker.check_model(model)
    ops = [(n.op_type, list(n.input)) for n in model.graph.node]
    assert ops[:4] == [
        ("MatMul", ["x", "w.T"]),
        ("Add", ["y1.matmul", "b"]),
        ("MatMul", ["x", "w.T"]),
        ("MatMul", ["y1", "v"]),
    ]
    assert ops[4:] == [("Gemm", ["x", "lora"]), ("Gemm", ["y1", "v"])]
    assert sorted(t.name for t in model.graph.initializer) == ["b", "lora", "v", "w.T"]  # w itself is gone
    for got, want in zip(run(model), before, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_genai_generates_with_an_int4_base_and_switched_float_adapters_as_hf_peft_does(trained, swappable_int4):
    """onnxruntime-genai on one int4 KV-cache base: each adapter's greedy tokens are HF PEFT's (float32)."""
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    out, names = swappable_int4, ("plus2", "plus3")
    assert "MatMulNBits" in _ops(out / "model.onnx")
    model = og.Model(str(out))
    adapters = og.Adapters(model)
    for name in names:
        adapters.load(str(out / "adapters" / f"{name}.onnx_adapter"), name)
    prompt, new = [10, 11, 12], 6

    def og_tokens(name: str) -> list[int]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + new, do_sample=False)
        generator = og.Generator(model, params)
        generator.set_active_adapter(adapters, name)
        generator.append_tokens(prompt)
        while not generator.is_done():
            generator.generate_next_token()
        return [int(t) for t in generator.get_sequence(0)]

    for name in [*names, *names]:  # alternate on one model
        reference = _hf_peft(trained, name)
        ids = torch.tensor([prompt])
        with torch.no_grad():
            want = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_length=len(prompt) + new,
                                      do_sample=False, pad_token_id=0)[0].tolist()  # fmt: skip
        assert og_tokens(name) == want, name
    assert og_tokens("plus2") != og_tokens("plus3")
