"""Experiment trackers (``--report-to``): records written through each tool's library are read back
through that tool's own reader — TensorBoard's ``EventAccumulator``, MLflow's ``MlflowClient``, the
protobuf records of a W&B offline run — and compared with what was logged. Also: name and library
errors, rank-0-only reporting, a failing tracker dropped, and the throughput/memory meter.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import struct
from pathlib import Path

import pytest

from peftc.errors import ConfigError
from peftc.reporting import (
    Reporters,
    StepMeter,
    count_tokens,
    make_reporters,
    parse_report_to,
    peak_memory_mb,
    process_rank,
    scalars,
)

RECORDS = [
    {"type": "train", "step": 10, "epoch": 0.5, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.75, "tokens_per_s": 1200.0},
    {"type": "train", "step": 20, "epoch": 1.0, "loss": 2.0, "lr": 5e-4, "grad_norm": 0.5, "peak_memory_mb": 812.5},
    {"type": "eval", "step": 20, "epoch": 1.0, "loss": 1.75, "accuracy": 0.625, "examples": 8},
]


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# -- names, libraries, ranks -----------------------------------------------------------------------


def test_parse_report_to():
    assert parse_report_to(None) == [] and parse_report_to("none") == [] and parse_report_to("") == []
    assert [s.name for s in parse_report_to("TensorBoard, mlflow,tensorboard")] == ["tensorboard", "mlflow"]
    assert [s.name for s in parse_report_to(["wandb"])] == ["wandb"]


@pytest.mark.parametrize(
    ("value", "needles"),
    [
        ("tensorbord", ["unknown tracker 'tensorbord'", "choose from none, mlflow, tensorboard, wandb"]),
        ("tensorboard,comet", ["unknown tracker 'comet'"]),
        ("none,tensorboard", ["'none' turns reporting off"]),
    ],
)
def test_bad_names_are_one_line_config_errors(tmp_path, value, needles):
    for rank in (0, 1):  # a typo fails on every rank, not only where reports are written
        with pytest.raises(ConfigError) as exc:
            make_reporters(value, tmp_path / "run", rank=rank)
        message = str(exc.value)
        assert "\n" not in message and message.startswith(f"--report-to {value.lower().replace(' ', '')}")
        for needle in needles:
            assert needle in message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["tensorboard", "mlflow", "wandb"])
def test_missing_library_names_the_extra(tmp_path, monkeypatch, name):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda mod, *a: None if mod == name else real(mod, *a))
    with pytest.raises(ConfigError) as exc:
        make_reporters(name, tmp_path / "run")
    assert str(exc.value) == (f"--report-to {name}: the {name!r} package is not installed; pip install 'peftc[{name}]'")


def test_process_rank(monkeypatch):
    assert process_rank({}) == 0
    assert process_rank({"RANK": "3", "LOCAL_RANK": "1"}) == 3
    assert process_rank({"LOCAL_RANK": "2"}) == 2
    with pytest.raises(ConfigError, match="RANK='x' is not an integer"):
        process_rank({"RANK": "x"})


@pytest.mark.skipif(not has("tensorboard"), reason="tensorboard is not installed (pip install 'peftc[tensorboard]')")
def test_only_rank_zero_reports(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    reporters = make_reporters("tensorboard", tmp_path / "run")
    assert not reporters and len(reporters) == 0
    reporters.log(RECORDS[0])
    reporters.close()
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("RANK", "0")
    assert make_reporters("tensorboard", tmp_path / "run").names == ["tensorboard"]


def test_scalars():
    step, values = scalars(
        {"type": "eval", "step": 7, "loss": 1.5, "accuracy": 1, "ok": True, "name": "x", "bad": float("nan")}
    )
    assert step == 7 and values == {"eval/loss": 1.5, "eval/accuracy": 1.0}


def test_failing_tracker_is_dropped_and_training_goes_on(caplog):
    class Broken:
        closed = 0

        def log(self, record):
            raise OSError("disk full")

        def close(self):
            Broken.closed += 1

    class Good:
        def __init__(self):
            self.seen = []

        def log(self, record):
            self.seen.append(record["step"])

        def close(self):
            pass

    good = Good()
    reporters = Reporters([("broken", Broken()), ("good", good)])
    with caplog.at_level(logging.WARNING, logger="peftc.reporting.base"):
        for record in RECORDS:
            reporters.log(record)
    reporters.close()
    assert reporters.names == [] and good.seen == [10, 20, 20] and Broken.closed == 1
    assert "--report-to broken failed (OSError: disk full)" in caplog.text


# -- TensorBoard -----------------------------------------------------------------------------------


def tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.skipif(not has("tensorboard"), reason="tensorboard is not installed (pip install 'peftc[tensorboard]')")
def test_tensorboard_read_back(tmp_path):
    run = tmp_path / "run"
    reporters = make_reporters("tensorboard", run, config={"lr": 1e-3, "model": "tiny-gpt2"})
    assert not run.exists()  # nothing is written before the first record (the run dir is made lazily)
    for record in RECORDS:
        reporters.log(record)
    reporters.close()
    got = tensorboard_scalars(run / "tensorboard")
    assert got["train/loss"] == [(10, 2.5), (20, 2.0)]
    assert got["train/lr"] == [(10, pytest.approx(1e-3)), (20, pytest.approx(5e-4))]
    assert got["train/grad_norm"] == [(10, 0.75), (20, 0.5)]
    assert got["train/tokens_per_s"] == [(10, 1200.0)]
    assert got["train/peak_memory_mb"] == [(20, 812.5)]
    assert got["eval/loss"] == [(20, 1.75)] and got["eval/accuracy"] == [(20, 0.625)]
    assert got["eval/examples"] == [(20, 8.0)]


@pytest.mark.skipif(not has("tensorboard"), reason="tensorboard is not installed (pip install 'peftc[tensorboard]')")
def test_tensorboard_resume_hides_what_a_crashed_run_logged_after_its_checkpoint(tmp_path):
    run = tmp_path / "run"
    first = make_reporters("tensorboard", run)
    for step, loss in [(10, 3.0), (20, 2.5), (30, 2.25)]:  # crashes after step 30; checkpoint at 20
        first.log({"type": "train", "step": step, "loss": loss})
    first.close()
    resumed = make_reporters("tensorboard", run, resume_step=20)
    for step, loss in [(30, 2.0), (40, 1.5)]:
        resumed.log({"type": "train", "step": step, "loss": loss})
    resumed.close()
    assert tensorboard_scalars(run / "tensorboard")["train/loss"] == [(10, 3.0), (20, 2.5), (30, 2.0), (40, 1.5)]


# -- MLflow ----------------------------------------------------------------------------------------


@pytest.mark.skipif(
    not has("mlflow"), reason="mlflow is not installed (pip install 'peftc[mlflow]'; not in dev: ~440 MB)"
)
def test_mlflow_read_back_from_the_local_store(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from peftc.reporting.mlflow import MLflowReporter, local_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    run = tmp_path / "run"
    reporters = make_reporters("mlflow", run, config={"lr": 1e-3, "model": "tiny-gpt2", "data": {"path": "x.jsonl"}})
    for record in RECORDS:
        reporters.log(record)
    reporters.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    client = MlflowClient(tracking_uri=local_tracking_uri(run))
    experiment = client.get_experiment_by_name("peftc")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == "run" and found.info.status == "FINISHED"
    assert found.data.params == {"lr": "0.001", "model": "tiny-gpt2", "data.path": "x.jsonl"}
    history = {
        key: [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, key)]
        for key in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "eval/accuracy")
    }
    assert history == {
        "train/loss": [(10, 2.5), (20, 2.0)],
        "train/lr": [(10, 1e-3), (20, 5e-4)],
        "train/grad_norm": [(10, 0.75), (20, 0.5)],
        "train/tokens_per_s": [(10, 1200.0)],
        "eval/accuracy": [(20, 0.625)],
    }
    saved = json.loads((run / "mlflow" / "run.json").read_text())
    assert saved["run_id"] == found.info.run_id
    # a resumed training run continues the same MLflow run
    resumed = make_reporters("mlflow", run, resume_step=20)
    resumed.log({"type": "train", "step": 30, "loss": 1.5})
    resumed.close()
    assert len(client.search_runs([experiment.experiment_id])) == 1
    assert [m.step for m in client.get_metric_history(found.info.run_id, "train/loss")] == [10, 20, 30]
    # a tracking URI the user configured wins over the local store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert MLflowReporter(run).tracking_uri == "sqlite:///elsewhere.db"


# -- Weights & Biases ------------------------------------------------------------------------------


def wandb_history(path: Path) -> list[dict[str, float]]:
    """The history rows of a W&B offline run file (its record log holds ``wandb_internal_pb2.Record``s)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    block, pos, pending, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
    return rows


@pytest.mark.skipif(not has("wandb"), reason="wandb is not installed (pip install 'peftc[wandb]'; not in dev)")
def test_wandb_offline_read_back(tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    from peftc.reporting.wandb import wandb_mode

    assert wandb_mode({}) == "offline"
    assert wandb_mode({"WANDB_MODE": "online"}) is None and wandb_mode({"WANDB_API_KEY": "k"}) is None
    run = tmp_path / "run"
    reporters = make_reporters("wandb", run, config={"lr": 1e-3})
    for record in RECORDS:
        reporters.log(record)
    reporters.close()
    import wandb

    wandb.teardown()  # the W&B service writes the run file asynchronously; this waits for it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    (offline,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    rows = wandb_history(offline)
    by_step = {}
    for row in rows:
        by_step.setdefault(int(row["_step"]), {}).update({k: v for k, v in row.items() if not k.startswith("_")})
    assert by_step[10]["train/loss"] == 2.5 and by_step[10]["train/tokens_per_s"] == 1200.0
    assert by_step[20]["train/loss"] == 2.0 and by_step[20]["train/peak_memory_mb"] == 812.5
    assert by_step[20]["eval/accuracy"] == 0.625 and by_step[20]["eval/loss"] == 1.75
    assert json.loads((run / "wandb" / "peftc-run.json").read_text())["project"] == "peftc"


# -- throughput and memory -------------------------------------------------------------------------


def test_step_meter_counts_tokens_over_training_time_only():
    now = [100.0]
    meter = StepMeter(clock=lambda: now[0])
    meter.add(300)
    now[0] += 1.0
    with meter.paused():  # an evaluation: its 5 s are not training time
        now[0] += 5.0
    meter.add(500)
    now[0] += 1.0
    first = meter.read()
    assert first["tokens_per_s"] == 400.0  # 800 tokens in 2 s of training
    assert first["peak_memory_mb"] > 1  # this process's peak RSS, in MiB
    meter.add(100)
    now[0] += 0.5
    assert meter.read()["tokens_per_s"] == 200.0  # a new window after each read
    now[0] += 1.0
    assert "tokens_per_s" not in meter.read()  # no step since: no figure rather than 0


def test_count_tokens_and_peak_memory():
    import torch

    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    ids = torch.zeros(2, 4, dtype=torch.long)
    assert count_tokens({"input_ids": ids, "attention_mask": mask}) == 5
    assert count_tokens({"input_ids": ids}) == 8
    assert count_tokens([{"input_ids": ids, "attention_mask": mask}, {"input_ids": ids}]) == 13
    assert count_tokens({}) == 0
    peak = peak_memory_mb()
    assert peak is not None and peak > 0
    status = Path("/proc/self/status")
    if status.is_file():  # Linux: the kernel's own high-water mark, in kB; peak_memory_mb gives MiB
        hwm = next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        assert abs(peak_memory_mb() - hwm / 1024) < 64, (peak, hwm)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_step_meter_on_cuda():
    import torch

    meter = StepMeter(device="cuda")
    x = torch.empty(256, 1024, 1024, device="cuda")  # 1 GiB
    meter.add(1000)
    first = meter.read()
    assert first["peak_memory_mb"] >= 1024 and first["tokens_per_s"] > 0
    del x
    torch.cuda.empty_cache()
    assert meter.read()["peak_memory_mb"] < 1024  # the peak is reset at each read
