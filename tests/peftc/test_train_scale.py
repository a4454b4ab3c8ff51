"""Training at scale: ``python -m peftc``, devices, precision, gradient checkpointing, torch.compile, data parallel.

Tiny models saved into tmp dirs (MiniLM's tokenizer); what needs CUDA skips with its reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_cases import SENTENCES, adapter_tensors, run_records, train_losses, write_jsonl

import peftc
from peftc.errors import ConfigError
from peftc.training import TrainConfig, train


def _run(*args, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def test_python_dash_m_peftc_is_the_cli(tmp_path):
    done = _run("-m", "peftc", "--version")
    assert done.returncode == 0 and peftc.__version__ in done.stdout, done
    done = _run("-m", "peftc", "train", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"))
    assert done.returncode == 1, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0], done.stderr
    assert not (tmp_path / "run").exists()


#: Twelve texts: a global batch of 12 splits evenly over 1, 2, 3, 4 or 6 processes.
TEXTS = SENTENCES[:12]


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("cls") / "train.jsonl", [{"text": t, "label": y} for t, y in TEXTS])


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("lm") / "train.jsonl", [{"text": t} for t, _ in TEXTS])


# -- device and precision options -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"device": "gpu"}, "device must be auto, cpu, cuda or cuda:N"),
        ({"precision": "fp8"}, "precision must be one of fp32, bf16, fp16"),
        ({"base_dtype": "int8"}, "base_dtype must be one of"),
        ({"base_dtype": "bfloat16"}, "--base-dtype bfloat16 needs --precision bf16"),
        ({"base_dtype": "float16", "precision": "bf16"}, "--base-dtype float16 needs --precision fp16"),
        ({"fsdp": True, "compile": True}, "--fsdp does not combine with --compile"),
    ],
)
def test_bad_scale_options_are_refused_before_any_work(tmp_path, options, message):
    with pytest.raises(ConfigError, match=message):
        train(TrainConfig(model="tiny-gpt2", out=str(tmp_path / "run"), **options))
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_cuda_without_cuda_is_one_clear_line(tmp_path, bert0_dir, cls_data):
    run = ["-m", "peftc", "train", "--model", bert0_dir, "--data", cls_data, "--out", str(tmp_path / "run")]
    done = _run(*run, "--device", "cuda")
    assert done.returncode == 1, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --device cuda:") and "no CUDA device" in lines[0], lines
    for options, message in (({"device": "cuda:1"}, "--device cuda:1: .* no CUDA device"),
                             ({"precision": "fp16"}, "--precision fp16 needs a CUDA device")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            train(TrainConfig(model=bert0_dir, data=cls_data, out=str(tmp_path / "run"), **options))
    assert not (tmp_path / "run").exists()


def test_explicit_cpu_device_is_the_default_run(tmp_path, bert0_dir, cls_data):
    common = dict(model=bert0_dir, data=cls_data, max_steps=2, batch_size=4, lr=1e-2, lora_dropout=0.0, progress=False)
    a = train(TrainConfig(**common, out=str(tmp_path / "auto")))
    b = train(TrainConfig(**common, device="cpu", out=str(tmp_path / "cpu")))
    x, y = adapter_tensors(a.run_dir), adapter_tensors(b.run_dir)
    assert all(torch.equal(x[k], y[k]) for k in x)
    run = json.loads((b.run_dir / "run.json").read_text())
    assert run["train_config"]["device"] == "cpu" and run["train_config"]["world_size"] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)")
def test_cuda_run_saves_a_cpu_adapter_close_to_the_cpu_run(tmp_path, bert0_dir, cls_data):
    common = dict(model=bert0_dir, data=cls_data, max_steps=3, batch_size=4, lr=1e-2, lora_dropout=0.0, progress=False)
    gpu = train(TrainConfig(**common, device="cuda", out=str(tmp_path / "gpu")))
    cpu = train(TrainConfig(**common, device="cpu", out=str(tmp_path / "cpu")))
    x, y = adapter_tensors(gpu.run_dir), adapter_tensors(cpu.run_dir)
    assert x.keys() == y.keys()
    for k in x:
        assert x[k].device.type == "cpu" and x[k].dtype == torch.float32
        assert torch.allclose(x[k], y[k], atol=1e-4), (k, (x[k] - y[k]).abs().max())


def test_bf16_trains_saves_float32_and_hf_peft_loads_it(tmp_path, bert0_dir, cls_data):
    peft = pytest.importorskip("peft")
    from peftc.passes import insertion_pipeline
    from transformers import AutoModelForSequenceClassification

    from peftc.adapters import AdapterState
    from peftc.dataset import collate, encode, read_jsonl
    from peftc.models import load_model
    from peftc.program import capture

    # the whole set in every step: the logged loss must fall, along the float32 run's curve
    common = dict(model=bert0_dir, data=cls_data, max_steps=12, batch_size=12, lr=1e-1, warmup_ratio=0.0,
                  lora_dropout=0.0, log_every=1, progress=False)  # fmt: skip
    res = train(TrainConfig(**common, out=str(tmp_path / "run"), precision="bf16", base_dtype="bfloat16"))
    ref32 = train(TrainConfig(**common, out=str(tmp_path / "fp32")))
    losses = train_losses(res.run_dir)
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.05, losses
    assert losses == pytest.approx(train_losses(ref32.run_dir), abs=0.05)
    assert losses != train_losses(ref32.run_dir)  # bf16 did round something
    tensors = adapter_tensors(res.run_dir)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert max(t.abs().max().item() for k, t in tensors.items() if "lora_B" in k) > 1e-3
    assert json.loads((res.run_dir / "run.json").read_text())["train_config"]["precision"] == "bf16"

    base = AutoModelForSequenceClassification.from_pretrained(bert0_dir, num_labels=2).eval()
    ref = peft.PeftModel.from_pretrained(base, str(res.adapter_dir)).eval()
    loaded = load_model(bert0_dir, "seq-cls", id2label=res.id2label)
    prog = capture(loaded.model, "seq-cls", mode="eval")
    state = AdapterState.load(res.adapter_dir)
    insertion_pipeline(state.config, state)(prog)
    enc = encode(read_jsonl(cls_data, "seq-cls"), loaded.tokenizer, "seq-cls")
    batch = collate(enc, list(range(len(enc))), prog.input_names)
    with torch.no_grad():
        want = ref(**{k: batch[k] for k in prog.input_names}).logits
        got = prog.forward_batch(batch)
        assert (got - want).abs().max().item() < 1e-4  # float32, both
        with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 autocast, both: bf16 rounding apart
            want16 = ref(**{k: batch[k] for k in prog.input_names}).logits.float()
            got16 = prog.forward_batch(batch).float()
    assert (got16 - want16).abs().max().item() < 5e-2
    assert (got16 - got).abs().max().item() > 0  # autocast did compute in bf16


# -- gradient checkpointing -----------------------------------------------------------------------


def _lora_program(model, task, dropout=0.1):
    from peftc.passes import insertion_pipeline

    from peftc.config import config_from_dict
    from peftc.program import capture

    prog = capture(model, task, mode="train")
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": dropout, "task_type": "CAUSAL_LM"}
    insertion_pipeline(config_from_dict(cfg, source="test"))(prog)
    torch.manual_seed(1)
    for p in prog.parameters(trainable=True):
        torch.nn.init.normal_(p, std=0.1)  # B away from 0: the adapter is not the identity
    return prog


def _grads(module, prog, params):
    for p in params:
        p.grad = None
    torch.manual_seed(3)  # the dropout masks (model's and LoRA's)
    out = module(*prog.example_inputs)
    out.float().pow(2).mean().backward()
    return out.detach(), [p.grad.clone() for p in params]


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_gradient_checkpointing_recomputes_blocks_with_the_same_gradients(family):
    from peftc.training.checkpointing import checkpoint_blocks

    conftest = _root_conftest()
    model, task = (conftest.tiny_gpt2(), "causal-lm") if family == "gpt2" else (conftest.tiny_bert(), "seq-cls")
    model.train()  # dropout 0.1 in the base too: the recompute must replay the same masks
    prog = _lora_program(model, task)
    params = prog.parameters(trainable=True)
    checkpointed, blocks = checkpoint_blocks(prog.graph_module)
    assert blocks == 2
    calls = [n for n in checkpointed.graph.nodes if n.target is torch.utils.checkpoint.checkpoint]
    assert len(calls) == 2
    assert {id(p) for p in checkpointed.parameters() if p.requires_grad} == {id(p) for p in params}  # shared
    out0, g0 = _grads(prog.graph_module, prog, params)
    out1, g1 = _grads(checkpointed, prog, params)
    assert torch.allclose(out0, out1, atol=1e-6, rtol=0)
    assert max(g.abs().max().item() for g in g0) > 1e-6  # the loss reaches every adapter tensor
    for a, b in zip(g0, g1, strict=True):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-6), (a - b).abs().max()


def test_gradient_checkpointing_leaves_a_graph_without_blocks_alone():
    from torch import fx

    from peftc.training.checkpointing import checkpoint_blocks

    gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
    assert checkpoint_blocks(gm) == (gm, 0)


@pytest.mark.slow
def test_gradient_checkpointing_run_gives_the_sameadapter_tensors(tmp_path, gpt2_dir, lm_data):
    common = dict(model=gpt2_dir, data=lm_data, max_steps=3, batch_size=4, lr=1e-2, progress=False, log_every=1)
    plain = train(TrainConfig(**common, out=str(tmp_path / "plain")))
    ckpt = train(TrainConfig(**common, gradient_checkpointing=True, out=str(tmp_path / "ckpt")))
    a, b = adapter_tensors(plain.run_dir), adapter_tensors(ckpt.run_dir)
    assert a.keys() == b.keys()
    for k in a:  # lora_dropout 0.05: the recompute replays the masks
        assert torch.allclose(a[k], b[k], atol=1e-6), (k, (a[k] - b[k]).abs().max())
    assert train_losses(plain.run_dir) == pytest.approx(train_losses(ckpt.run_dir), abs=1e-6)


# -- torch.compile --------------------------------------------------------------------------------


def _cxx():
    import shutil

    return next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)


@pytest.mark.slow
@pytest.mark.skipif(_cxx() is None, reason="torch.compile (Inductor) on the CPU needs a C++ compiler: none on PATH")
def test_compile_follows_the_eager_loss_curve(tmp_path, bert0_dir, cls_data):
    # the whole set every step: one sequence shape, one compilation
    common = dict(model=bert0_dir, data=cls_data, max_steps=4, batch_size=12, lr=5e-2, warmup_ratio=0.0,
                  lora_dropout=0.0, log_every=1, progress=False)  # fmt: skip
    eager = train(TrainConfig(**common, out=str(tmp_path / "eager")))
    compiled = train(TrainConfig(**common, compile=True, out=str(tmp_path / "compiled")))
    assert train_losses(compiled.run_dir) == pytest.approx(train_losses(eager.run_dir), abs=1e-5)
    a, b = adapter_tensors(eager.run_dir), adapter_tensors(compiled.run_dir)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), (k, (a[k] - b[k]).abs().max())


def test_compile_has_no_graph_break_on_the_captured_program(bert0_dir):
    """``fullgraph=True`` tracing (dynamo only, no Inductor codegen): a graph break would raise."""
    from peftc.passes import insertion_pipeline

    from peftc.config import config_from_dict
    from peftc.models import load_model
    from peftc.program import capture
    from peftc.training.checkpointing import checkpoint_blocks

    prog = capture(load_model(bert0_dir, "seq-cls", num_labels=2).model, "seq-cls", mode="train")
    cfg = {"peft_type": "LORA", "r": 4, "target_modules": ["query", "value"], "task_type": "SEQ_CLS"}
    insertion_pipeline(config_from_dict(cfg, source="test"))(prog)
    for module in (prog.graph_module, checkpoint_blocks(prog.graph_module)[0]):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(module)(*prog.example_inputs)
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


# -- data parallel ---------------------------------------------------------------------------------


def _torchrun(nproc, *args):
    env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return _run(*launcher, "-m", "peftc", "train", *args, env=env, timeout=600)


def _assert_same_run(one, two):
    """Run ``two`` trained ``one``'s adapter (≤ 1e-5, a non-zero B) and logged its records (same steps, ≤ 1e-5).

    Returns ``two``'s adapter tensors and records.
    """
    a, b = adapter_tensors(one), adapter_tensors(two)
    assert a.keys() == b.keys()
    assert max(a[k].abs().max().item() for k in a if "lora_B" in k) > 1e-3
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    r1, r2 = _records(one), _records(two)
    assert [(r["type"], r["step"]) for r in r2] == [(r["type"], r["step"]) for r in r1]
    for x, y in zip(r1, r2, strict=True):
        assert {k: v for k, v in x.items() if isinstance(v, float)} == pytest.approx(
            {k: v for k, v in y.items() if isinstance(v, float)}, rel=1e-5, abs=1e-5
        )
    return b, r2


def _records(run_dir):
    measured = ("tokens_per_s", "peak_memory_mb")
    return [{k: v for k, v in r.items() if k not in measured} for r in run_records(run_dir)]


def _parallel_args(gpt2_dir, lm_data):
    return ["--model", gpt2_dir, "--data", lm_data, "--eval-data", lm_data, "--max-steps", "4", "--save-every", "2",
            "--lr", "1e-2", "--lora-dropout", "0", "--log-every", "1", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, gpt2_dir, lm_data):
    """The reference of the 2-process runs: 1 process x batch 4, the options of :func:`_parallel_args`."""
    one = tmp_path_factory.mktemp("one") / "run"
    return train(TrainConfig(model=gpt2_dir, data=lm_data, eval_data=lm_data, max_steps=4, save_every=2, lr=1e-2,
                             lora_dropout=0.0, log_every=1, progress=False, batch_size=4, out=str(one)))  # fmt: skip


@pytest.mark.slow
def test_two_gloo_processes_give_the_one_process_adapter_and_resume(tmp_path, gpt2_dir, lm_data, one_process_run):
    """torchrun, 2 CPU processes x batch 2 == 1 process x batch 4 (lora_dropout 0: dropout masks are per rank).

    12 texts of different lengths: each rank pads its own slice, so padding differs from the one-process batch.
    """
    common = _parallel_args(gpt2_dir, lm_data)
    res = one_process_run
    one = res.run_dir
    two = tmp_path / "two"
    done = _torchrun(2, *common, "--batch-size", "2", "--out", str(two))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run directory:") == 1  # rank 0 speaks
    b, r2 = _assert_same_run(one, two)
    # rank 0 alone logs: the same records, once each; eval once per epoch (3 steps) and at the end
    assert [r["type"] for r in r2].count("eval") == 2
    run = json.loads((two / "run.json").read_text())
    assert run["train_config"]["world_size"] == 2 and run["train_config"]["batch_size"] == 2
    assert res.step == run["metrics"]["step"] == 4
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-2", "step-4"]

    # --resume under torchrun: from step 2 to the same adapter
    import shutil

    shutil.rmtree(two / "checkpoints" / "step-4")
    shutil.rmtree(two / "adapter")
    (two / "run.json").unlink()
    done = _torchrun(2, *common, "--batch-size", "2", "--out", str(two), "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    c = adapter_tensors(two)
    assert max((b[k] - c[k]).abs().max().item() for k in b) <= 1e-6
    assert _records(two) == r2
    # one process cannot continue a two-process run: the global batch would change
    with pytest.raises(ConfigError, match="world_size=1 but the run .* was started with world_size=2"):
        train(TrainConfig(model=gpt2_dir, data=lm_data, eval_data=lm_data, max_steps=4, save_every=2, lr=1e-2,
                          lora_dropout=0.0, log_every=1, progress=False, batch_size=2, out=str(two),
                          resume=True))  # fmt: skip


def test_rank_shards_sum_to_the_one_process_gradient(gpt2_dir, lm_data):
    """In-process: per-rank losses weighted by the global target count, summed, give the one-process gradient.

    Global micro-batches of 5 with 2 ranks x batch 3 and grad_accum 2: uneven and empty shards included.
    """
    from peftc.dataset import batch_order, collate, count_targets, encode, read_jsonl
    from peftc.models import load_model
    from peftc.training.distributed import Distributed
    from peftc.training.loop import _step_loss

    loaded = load_model(gpt2_dir, "causal-lm")
    prog = _lora_program(loaded.model, "causal-lm", dropout=0.0)  # the base has none: no per-rank masks
    enc = encode(read_jsonl(lm_data, "causal-lm"), loaded.tokenizer, "causal-lm", 64, None)
    params = prog.parameters(trainable=True)
    names = prog.input_names
    loss_of = lambda batch: prog.task.loss(prog.forward_batch(batch), batch)  # noqa: E731

    class _Rank(Distributed):
        total = 0

        def sum(self, values, device):
            return [self.total]  # what the all-reduce of the target counts returns

    for group in [batch_order(len(enc), 6, 0, 0)[:2], [[0, 1, 2, 3], [4]]]:
        micro = [collate(enc, idx, names) for idx in group]
        for p in params:
            p.grad = None
        one = _step_loss(loss_of, prog.task, micro, lambda: 0.0)
        want = [p.grad.clone() for p in params]
        _Rank.total = sum(count_targets(b, "causal-lm") for b in micro)

        got, value = [torch.zeros_like(p) for p in params], 0.0
        for rank in range(2):
            dist = _Rank(rank=rank, world_size=2)
            shards = [dist.shard(idx, 3) for idx in group]
            for p in params:
                p.grad = None
            value += _step_loss(loss_of, prog.task, [collate(enc, s, names) for s in shards if s], lambda: 0.0,
                                dist=dist)  # fmt: skip
            for g, p in zip(got, params, strict=True):
                g += p.grad if p.grad is not None else 0
        assert value == pytest.approx(one, rel=1e-6)
        for a, b in zip(want, got, strict=True):
            assert torch.allclose(a, b, atol=1e-7, rtol=1e-5), (a - b).abs().max()


# -- FSDP -----------------------------------------------------------------------------------------


def test_blocks_own_their_frozen_params_and_compute_the_same():
    """The split --fsdp shards: each block submodule owns (get_attr) the frozen weights of its block only."""
    from peftc.training.checkpointing import split_blocks
    from peftc.training.fsdp import own_frozen_params

    model = _root_conftest().tiny_gpt2().train()  # dropout 0.1: same masks under the same seed
    prog = _lora_program(model, "causal-lm")
    params = prog.parameters(trainable=True)
    split, blocks = split_blocks(prog.graph_module)
    assert sorted(blocks.values()) == ["model.transformer.h.0", "model.transformer.h.1"]
    moved = own_frozen_params(split, blocks)
    assert moved == 2 * 12  # ln_1, c_attn, c_proj, ln_2, c_fc, mlp.c_proj: weight and bias each
    full = dict(prog.graph_module.named_parameters())
    for target, block in blocks.items():
        sub = split.get_submodule(target)
        owned = {id(p) for p in sub.parameters()}
        want = {id(p) for name, p in full.items() if name.startswith(block + ".") and not p.requires_grad}
        assert owned == want and owned
        assert all(not p.requires_grad for p in sub.parameters())  # the adapter stays at the root
        args = next(n for n in split.graph.nodes if n.op == "call_module" and n.target == target).args
        assert not any(a.op == "get_attr" and id(split.get_parameter(a.target)) in owned for a in args)
    root_own = {id(p) for name, p in split.named_parameters() if not name.startswith("submod_")}
    assert not root_own & {id(p) for t in blocks for p in split.get_submodule(t).parameters()}
    assert {id(p) for p in split.parameters() if p.requires_grad} == {id(p) for p in params}
    out0, g0 = _grads(prog.graph_module, prog, params)
    out1, g1 = _grads(split, prog, params)
    assert torch.equal(out0, out1)
    assert max(g.abs().max().item() for g in g0) > 1e-6
    for a, b in zip(g0, g1, strict=True):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-6), (a - b).abs().max()


def _root_conftest():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_root_conftest", Path(__file__).parents[1] / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    return conftest


@pytest.fixture
def gloo_world_of_one():
    """A one-process gloo group in this process: FSDP2 runs (each shard is the whole tensor); left after."""
    if torch.distributed.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize(
    ("family", "task", "checkpointing"),
    [("gpt2", "causal-lm", False), ("llama", "causal-lm", True), ("bert", "seq-cls", True)],
    ids=["gpt2", "llama-checkpointed", "bert-checkpointed"],
)
def test_sharded_programs_give_the_unsharded_outputs_and_gradients(gloo_world_of_one, family, task, checkpointing):
    from peftc.passes import insertion_pipeline
    from torch.distributed.tensor import DTensor

    from peftc.program import capture
    from peftc.training.fsdp import shard_programs

    model = getattr(_root_conftest(), f"tiny_{family}")().train()  # dropout in the base: same masks, same seed
    prog = _lora_program(model, task)
    ev = capture(model, task, mode="eval")
    insertion_pipeline(prog.adapter.config, prog.adapter)(ev)
    params = prog.parameters(trainable=True)
    frozen = prog.parameters(trainable=False)
    elements = sum(p.numel() for p in frozen)
    with torch.no_grad():
        want_eval = ev.graph_module(*prog.example_inputs)
    out0, g0 = _grads(prog.graph_module, prog, params)
    sharded = shard_programs(prog.graph_module, ev.graph_module, gradient_checkpointing=checkpointing)
    assert sharded.blocks == 2 and sharded.summary["frozen_elements"] == elements
    assert all(p.numel() == 0 for p in frozen)  # the full tensors are released
    base = [p for p in sharded.parameters() if not p.requires_grad]
    assert base and all(isinstance(p, DTensor) for p in base)
    assert {id(p) for p in sharded.parameters() if p.requires_grad} == {id(p) for p in params}  # replicated
    calls = [n for n in sharded.train_root.graph.nodes if n.target is torch.utils.checkpoint.checkpoint]
    assert len(calls) == (2 if checkpointing else 0)
    out1, g1 = _grads(sharded, prog, params)
    assert torch.equal(out0, out1)
    for a, b in zip(g0, g1, strict=True):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-6), (a - b).abs().max()
    assert all(p.grad is None for p in base)  # no gradient of the frozen base
    with torch.no_grad(), sharded.evaluating():
        got_eval = sharded(*prog.example_inputs)
    assert torch.equal(want_eval, got_eval)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the CPU has one memory)")
def test_fsdp_moves_only_the_adapter_and_leaves_the_base_to_fully_shard():
    """Under ``--fsdp`` the base is not moved whole to the device (fully_shard moves each rank's shards)."""
    from peftc.training.loop import _to_device

    module = torch.nn.Linear(4, 3)
    module.weight.requires_grad_(False)  # the frozen base; the bias plays the adapter
    _to_device(module, torch.device("cuda"), trainable_only=True)
    assert module.weight.device.type == "cpu" and module.bias.device.type == "cuda"
    _to_device(module, torch.device("cuda"), trainable_only=False)
    assert module.weight.device.type == "cuda"


def test_fsdp_without_a_launcher_is_refused_in_one_line(tmp_path, gpt2_dir, lm_data):
    env = {k: "" for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    done = _run("-m", "peftc", "train", "--model", gpt2_dir, "--data", lm_data, "--fsdp", "--out", str(tmp_path / "r"),
                env=env)  # fmt: skip
    assert done.returncode == 1, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--fsdp shards the frozen base over the processes of a launcher" in lines[0], lines
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_fsdp_two_gloo_processes_give_the_one_process_adapter(tmp_path, gpt2_dir, lm_data, one_process_run):
    """torchrun, 2 CPU processes x batch 2 with --fsdp == 1 process x batch 4; evaluation sharded too."""
    peft = pytest.importorskip("peft")
    from transformers import GPT2LMHeadModel

    two = tmp_path / "fsdp"
    done = _torchrun(2, *_parallel_args(gpt2_dir, lm_data), "--batch-size", "2", "--fsdp", "--out", str(two))
    assert done.returncode == 0, done.stderr[-3000:]
    one = one_process_run.run_dir
    b, _ = _assert_same_run(one, two)
    run = json.loads((two / "run.json").read_text())
    assert run["train_config"]["fsdp"] is True and run["train_config"]["world_size"] == 2
    shard = run["fsdp"]
    assert shard["world_size"] == 2 and shard["blocks"] == 2
    assert shard["frozen_elements"] / 2 <= shard["frozen_elements_this_rank"] < 0.51 * shard["frozen_elements"]
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-2", "step-4"]
    # rank 0 wrote the whole adapter, in HF PEFT's format
    model = peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(gpt2_dir), str(two / "adapter"))
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(b)
    key = next(k for k in b if "lora_B" in k)
    assert torch.equal(loaded[key.replace(".weight", ".default.weight")], b[key])
