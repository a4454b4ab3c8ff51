"""A run's life on disk: the --out lock, --resume on a preemptible job, SIGTERM, Ctrl-C, --force and exports.

The fast cases train a tiny GPT-2 saved into a tmp dir in-process; the slow ones run ``peftc train`` in
subprocesses and signal them (SIGSTOP/SIGTERM/SIGKILL), then check the resumed adapter bit for bit
against an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftc.cli import main
from peftc.errors import ConfigError, OutputExistsError, RunLockedError, TrainingStopped
from peftc.training import TrainConfig, train
from peftc.training.lock import LOCK_FILE, run_lock

TEXTS = [f"sentence number {i} about the {w}" for i, w in enumerate(["cat", "dog", "sun", "sea", "hill", "tree"] * 2)]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    from peftc.models import causal_tokenizer, preset_path

    try:
        tokenizer = causal_tokenizer(preset_path("minilm"))
    except Exception as e:  # noqa: BLE001 - the MiniLM package is optional
        pytest.skip(f"MiniLM tokenizer unavailable: {e}")
    root = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tokenizer), pad_token_id=0)
    GPT2LMHeadModel(cfg).save_pretrained(root, safe_serialization=True)
    tokenizer.save_pretrained(root)
    return str(root)


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("lm") / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return str(path)


def _cfg(gpt2_dir, lm_data, out, **kw):
    base = dict(model=gpt2_dir, data=lm_data, out=str(out), max_steps=4, batch_size=4, log_every=1, progress=False)
    return TrainConfig(**{**base, **kw})


class _Crash(Exception):
    pass


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def _crash_after_step(monkeypatch, step: int, *, save: bool, exc: type[BaseException] = _Crash) -> None:
    """Make the next run stop right after optimizer step ``step`` (having written its checkpoint when ``save``)."""
    import peftc.training.loop as loop

    original = loop.save_checkpoint

    def fake(run_dir, state, params, opt, sched, trainer, hooks):
        if save:
            original(run_dir, state, params, opt, sched, trainer, hooks)
        if trainer["step"] == step:
            monkeypatch.setattr(loop, "save_checkpoint", original)
            raise exc()

    monkeypatch.setattr(loop, "save_checkpoint", fake)


def test_resume_on_a_missing_or_empty_out_starts_a_run(tmp_path, gpt2_dir, lm_data, caplog):
    caplog.set_level(logging.WARNING)
    res = train(_cfg(gpt2_dir, lm_data, tmp_path / "a" / "b", resume=True, max_steps=1))
    assert res.step == 1 and res.resumed_from is None
    assert "--resume: no run in" in caplog.text and "starting a new one" in caplog.text
    assert not (res.run_dir / LOCK_FILE).exists() and not (res.run_dir / "started.json").exists()
    (tmp_path / "empty").mkdir()
    assert train(_cfg(gpt2_dir, lm_data, tmp_path / "empty", resume=True, max_steps=1)).step == 1


def test_resume_before_the_first_checkpoint_starts_afresh_only_for_its_own_run(
    tmp_path, gpt2_dir, lm_data, monkeypatch, caplog
):
    out = tmp_path / "run"
    full = train(_cfg(gpt2_dir, lm_data, tmp_path / "full"))
    _crash_after_step(monkeypatch, 2, save=False)  # killed after step 2, before any checkpoint
    with pytest.raises(_Crash):
        train(_cfg(gpt2_dir, lm_data, out, save_every=2))
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "started.json"]
    # without --resume: refused, and the message puts --resume first
    with pytest.raises(OutputExistsError, match=r"stopped before its first checkpoint: rerun with --resume"):
        train(_cfg(gpt2_dir, lm_data, out))
    # other trajectory options: refused, naming the option
    with pytest.raises(ConfigError, match=r"--resume: lr=0.01 but the run in .* was started with lr=0.002"):
        train(_cfg(gpt2_dir, lm_data, out, lr=1e-2, resume=True))
    caplog.set_level(logging.WARNING)
    res = train(_cfg(gpt2_dir, lm_data, out, resume=True))
    assert "holds an unfinished run of these options that stopped before its first checkpoint; starting it afresh" in (
        caplog.text
    )
    assert res.resumed_from is None and res.step == 4
    a, b = (
        load_file(str(full.adapter_dir / "adapter_model.safetensors")),
        load_file(str(res.adapter_dir / "adapter_model.safetensors")),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _records(out) == _records(full.run_dir)


def test_resume_never_deletes_files_a_run_did_not_write(tmp_path, gpt2_dir, lm_data, monkeypatch):
    out = tmp_path / "run"
    _crash_after_step(monkeypatch, 1, save=False)
    with pytest.raises(_Crash):
        train(_cfg(gpt2_dir, lm_data, out, save_every=1))
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"holds no checkpoint .* files no unfinished peftc run wrote .*notes.txt"):
        train(_cfg(gpt2_dir, lm_data, out, resume=True))
    assert (out / "notes.txt").read_text() == "mine" and (out / "started.json").is_file()


def test_rerun_of_a_checkpointed_run_suggests_resume_first(tmp_path, gpt2_dir, lm_data, monkeypatch, capsys, caplog):
    out = tmp_path / "run"
    _crash_after_step(monkeypatch, 2, save=True)
    with pytest.raises(_Crash):
        train(_cfg(gpt2_dir, lm_data, out, save_every=2))
    argv = ["train", "--model", gpt2_dir, "--data", lm_data, "--out", str(out), "--max-steps", "4", "--batch-size",
            "4", "--log-every", "1", "--no-progress"]  # fmt: skip
    code, _, err = run_cli(capsys, *argv)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "holds an unfinished run with checkpoints (newest: checkpoints/step-2)" in err
    assert err.index("--resume") < err.index("--force")
    caplog.set_level(logging.WARNING)  # the CLI's stderr lines are warnings (in a real process: on stderr)
    code, out_text, err = run_cli(capsys, *argv, "--resume")
    assert code == 0, err
    assert f"resuming {out} from checkpoints/step-2 (step 2 of 4)" in caplog.text and "run directory" in out_text


def test_ctrl_c_names_the_checkpoint_and_the_exact_resume_command(
    tmp_path, gpt2_dir, lm_data, monkeypatch, capsys, caplog
):
    out = tmp_path / "run"
    _crash_after_step(monkeypatch, 2, save=True, exc=KeyboardInterrupt)
    argv = ["train", "--model", gpt2_dir, "--data", lm_data, "--out", str(out), "--max-steps", "4", "--batch-size",
            "4", "--save-every", "2", "--no-progress", "--force"]  # fmt: skip
    code, _, err = run_cli(capsys, *argv)
    assert code == 130
    (line,) = err.strip().splitlines()
    assert line.startswith(f"interrupted: {out} holds checkpoints up to step 2 (checkpoints/step-2); resume with: ")
    command = line.split("resume with: ", 1)[1]
    assert command.startswith("peftc train ") and command.endswith(" --resume") and "--force" not in command
    assert not (out / LOCK_FILE).exists()  # released on Ctrl-C
    caplog.set_level(logging.WARNING)
    code, _, err = run_cli(capsys, *command.split()[1:])  # the suggested command, as printed (no spaces in paths)
    assert code == 0 and f"resuming {out} from checkpoints/step-2" in caplog.text, err


def test_ctrl_c_before_the_first_step_says_nothing_was_written(tmp_path, gpt2_dir, lm_data, monkeypatch, capsys):
    import peftc.training.loop as loop

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_build", interrupted)
    out = tmp_path / "never"
    code, _, err = run_cli(capsys, "train", "--model", gpt2_dir, "--data", lm_data, "--out", str(out))
    assert code == 130 and err.strip() == f"interrupted: before the first training step; nothing was written to {out}"
    assert not out.exists()  # the lock and the directory made for it are gone


def test_force_keeps_exports_out_of_what_it_deletes(tmp_path, gpt2_dir, lm_data):
    out = tmp_path / "run"
    train(_cfg(gpt2_dir, lm_data, out, max_steps=1))
    (out / "export-onnx").mkdir()
    (out / "export-onnx" / "manifest.json").write_text("{}")
    with pytest.raises(OutputExistsError, match=r"holds a finished run; .* it holds exports \(export-onnx\)"):
        train(_cfg(gpt2_dir, lm_data, out, max_steps=1))
    with pytest.raises(OutputExistsError, match=r"--force would delete the exports in .* \(export-onnx\).* move them"):
        train(_cfg(gpt2_dir, lm_data, out, max_steps=1, force=True))
    assert (out / "export-onnx" / "manifest.json").is_file() and (out / "run.json").is_file()
    (out / "export-onnx").rename(tmp_path / "export-onnx")
    res = train(_cfg(gpt2_dir, lm_data, out, max_steps=2, force=True))
    assert res.step == 2 and not (out / "export-onnx").exists()


def test_a_second_run_on_the_same_out_is_refused_and_a_stale_lock_taken_over(tmp_path, gpt2_dir, lm_data, caplog):
    out = tmp_path / "run"
    with run_lock(out, "peftc train --out run") as lock:
        owner = json.loads(lock.path.read_text())
        assert owner["pid"] == os.getpid() and owner["host"]
        with pytest.raises(RunLockedError, match=rf"{out} is in use by pid {os.getpid()} on .*: peftc train --out run"):
            train(_cfg(gpt2_dir, lm_data, out, max_steps=1))
    assert not out.exists()  # made for the lock, removed with it
    # a lock left by a process that died (no flock held; its pid is gone)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": "h", "started": "s", "command": "c"}))
    caplog.set_level(logging.WARNING)
    res = train(_cfg(gpt2_dir, lm_data, out, max_steps=1))
    assert f"taking over the stale lock {out / LOCK_FILE} of pid {dead.pid}" in caplog.text
    assert res.step == 1 and not (out / LOCK_FILE).exists()


def test_no_progress_keeps_the_eval_lines(tmp_path, gpt2_dir, lm_data, capsys):
    code, out, err = run_cli(
        capsys, "train", "--model", gpt2_dir, "--data", lm_data, "--eval-data", lm_data, "--out", str(tmp_path / "r"),
        "--max-steps", "2", "--no-progress",
    )  # fmt: skip
    assert code == 0
    # on stderr, where the bar would have written them: stdout keeps only the run's result
    assert "epoch 1.00 step 1: eval loss=" in err and "epoch 2.00 step 2: eval loss=" in err and "\r" not in err
    assert "eval loss=" not in out


def test_sigterm_during_setup_stops_with_its_exit_code(tmp_path, gpt2_dir, lm_data, monkeypatch):
    import peftc.training.loop as loop

    original = loop._build

    def build_then_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "_build", build_then_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "run"
    with pytest.raises(TrainingStopped, match="during setup") as info:
        train(_cfg(gpt2_dir, lm_data, out))
    assert info.value.exit_code == 75 and info.value.step is None and not out.exists()
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back


# -- subprocesses --------------------------------------------------------------------------------------------------


def _peftc(*args: str) -> list[str]:
    return [sys.executable, "-c", "from peftc.cli import main; main()", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _wait_for_step(out: Path, proc: subprocess.Popen, step: int, timeout: float = 300) -> None:
    """Poll metrics.jsonl (log_every 1) until the run has done ``step`` optimizer steps."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            lines = (out / "metrics.jsonl").read_text().splitlines()
        except OSError:
            lines = []
        if sum('"type": "train"' in line for line in lines) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}): {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"no step {step} within {timeout}s")


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_reaches_the_uninterrupted_adapter(tmp_path, gpt2_dir, lm_data):
    """SIGTERM mid-run: a checkpoint at the next step boundary, exit 75; a second run on the same --out is
    refused while the first holds it; --resume then reaches the uninterrupted adapter bit for bit. A run
    SIGKILLed before its first checkpoint leaves a stale lock: --resume takes it over and starts afresh."""
    args = ["--model", gpt2_dir, "--data", lm_data, "--eval-data", lm_data, "--max-steps", "40", "--batch-size", "4",
            "--log-every", "1", "--lr", "1e-2", "--no-progress"]  # fmt: skip
    ref = tmp_path / "ref"
    assert subprocess.run(_peftc("train", *args, "--out", str(ref)), env=_env(), capture_output=True).returncode == 0

    out = tmp_path / "run"
    pipes = dict(env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = subprocess.Popen(_peftc("train", *args, "--out", str(out)), **pipes)
    _wait_for_step(out, first, 3)
    first.send_signal(signal.SIGSTOP)  # hold it mid-run while a second run tries the same --out
    try:
        second = subprocess.run(_peftc("train", *args, "--out", str(out)), capture_output=True, text=True, env=_env())
        assert second.returncode == 1, second.stderr
        assert f"{out} is in use by pid {first.pid} on " in second.stderr, second.stderr
        first.send_signal(signal.SIGTERM)
    finally:
        first.send_signal(signal.SIGCONT)
    code, err = _finish(first)
    assert code == 75, err
    line = err.strip().splitlines()[-1]  # (before it: warnings such as max_length > the model's positions)
    assert "Traceback" not in err and line.startswith("stopped: SIGTERM at step ") and line.endswith("--resume"), line
    step = int(line.split("SIGTERM at step ")[1].split(":")[0])
    assert 3 <= step < 40 and (out / "checkpoints" / f"step-{step}" / "trainer_state.json").is_file()
    assert not (out / "adapter").exists() and not (out / LOCK_FILE).exists()
    resumed = subprocess.run(_peftc("train", *args, "--out", str(out), "--resume"), capture_output=True, text=True,
                             env=_env())  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {out} from checkpoints/step-{step} (step {step} of 40)" in resumed.stderr
    _assert_same_run(ref, out)

    # SIGKILL before the first checkpoint (none is ever written here): a stale lock and an unfinished run
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_peftc("train", *args, "--out", str(killed)), **pipes)
    _wait_for_step(killed, proc, 2)
    proc.kill()
    proc.wait()
    assert (killed / LOCK_FILE).is_file() and not (killed / "checkpoints").exists()
    again = subprocess.run(_peftc("train", *args, "--out", str(killed), "--resume"), capture_output=True, text=True,
                           env=_env())  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert f"taking over the stale lock {killed / LOCK_FILE} of pid {proc.pid}" in again.stderr
    assert "stopped before its first checkpoint; starting it afresh" in again.stderr
    _assert_same_run(ref, killed)


def _assert_same_run(ref: Path, out: Path) -> None:
    a = load_file(str(ref / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (k, (a[k] - b[k]).abs().max())
    assert _records(out) == _records(ref)


def _records(run_dir):
    """metrics.jsonl without the machine's throughput and memory figures: what a resumed run reproduces exactly."""
    measured = ("tokens_per_s", "peak_memory_mb")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in measured} for r in records]
