"""MLflow and Weights & Biases tracking, read back with each service's own formats: MLflow's client on a file: store
in a temporary folder, W&B's offline run files (its protobuf records). A run stopped by a signal and resumed logs
into the same tracking run; a service that is down or refuses writes costs one warning, never the run."""

import importlib.util
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import fails, invoke, sets, short_schedule
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from acdc_cli.files.checkpoint import load_checkpoint
from acdc_cli.files.jsonio import read_jsonl
from acdc_cli.training.metrics import best_rows
from acdc_cli.training.tracking import TRACKING_FILE, flat_settings

STEPS = 19  # 1,257 training digits in whole batches of 64
EVERY = 8  # log.every_steps: per-step points after steps 8, 16 and at the epoch's end (19)
# 3 epochs: dense, sparse, sparse; a point every 8 steps
RUN = short_schedule(3, 1, 1, 1, 1, 0, "data.batch_size=64", f"log.every_steps={EVERY}")
STOP_AFTER_EPOCH_0 = {"_ACDC_TEST_SIGNAL": "SIGTERM@epoch=0,step=end"}


@pytest.fixture
def file_store(tmp_path, monkeypatch):
    """A file: store in tmp_path and an MLflow client on it (MLflow 3 opens a file store only when asked)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow import MlflowClient

    uri = f"file:{tmp_path / 'mlruns'}"
    return uri, MlflowClient(tracking_uri=uri)


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    # the order of points at one step is not kept by the store; sorting keeps a re-logged step's duplicates visible
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_mlflow_run_holds_what_tensorboard_holds_and_a_resume_continues_it(tmp_path, file_store):
    """A run stopped by SIGTERM after epoch 0 and resumed: one MLflow run (its id in tracking.json), KILLED after the
    stop and FINISHED at the end; the resolved settings as parameters; every TensorBoard tag with the same points
    (per-step train/loss and train/lr included); the summary equal to the run's own best rows and last row."""
    uri, client = file_store
    run_dir = tmp_path / "run"
    tracked = [*RUN, *sets(f"log.mlflow_uri={uri}", "log.tensorboard=true")]
    first = invoke("train", "--out", run_dir, *tracked, env=STOP_AFTER_EPOCH_0)
    assert first.exit_code == 0, first.output
    run_id = json.loads((run_dir / TRACKING_FILE).read_text())["mlflow"]
    assert client.get_run(run_id).info.status == "KILLED"
    assert _history(client, run_id, "val/top1") == [(STEPS, pytest.approx(read_jsonl(run_dir / "metrics.jsonl")[0]
                                                                           ["val_top1"]))]

    resumed = invoke("train", "--resume", run_dir)
    assert resumed.exit_code == 0, resumed.output
    assert "warning" not in resumed.output
    assert json.loads((run_dir / TRACKING_FILE).read_text()) == {"mlflow": run_id}
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [run_id]
    assert client.get_experiment(run.info.experiment_id).name == "acdc"

    settings = load_checkpoint(run_dir / "last.safetensors").config
    assert run.data.params["optim.lr"] == str(settings["optim"]["lr"])
    assert run.data.params["schedule.epochs"] == "3" and run.data.params["model.name"] == settings["model"]["name"]
    assert run.data.params["sparsity.include"] == json.dumps(settings["sparsity"]["include"])

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "val/top1", "sparsity/overall", "flops/train_ratio", "perf/img_per_s",
            "hparams/best_sparse_top1"} <= set(tags)
    for tag in tags:
        board = sorted((e.step, e.value) for e in events.Scalars(tag))
        assert _history(client, run_id, tag) == [(s, pytest.approx(v, rel=1e-6)) for s, v in board], tag
    assert [s for s, _ in _history(client, run_id, "train/loss")] == [8, 16, 19, 27, 35, 38, 46, 54, 57]

    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    best_sparse, best_dense = best_rows(rows, settings["sparsity"]["target"])
    summary = {key: values[-1][1] for key in run.data.metrics if key.startswith("summary/")
               for values in [_history(client, run_id, key)]}
    assert summary == {
        "summary/best_sparse_top1": pytest.approx(best_sparse["val_top1"]),
        "summary/best_dense_top1": pytest.approx(best_dense["val_top1"]),
        "summary/final_sparsity": pytest.approx(rows[-1]["sparsity"]),
        "summary/inference_flops_ratio": pytest.approx(rows[-1]["inference_flops_ratio"]),
        "summary/train_flops_ratio": pytest.approx(rows[-1]["train_flops_ratio"]),
    }
    assert 0.89 < summary["summary/final_sparsity"] < 0.91


def wandb_records(path: Path) -> list:
    """The records of a W&B run file (``run-ID.wandb``), as W&B's own protobuf ``Record`` messages. The file is a
    ":W&B" header then LevelDB's log format: 32 KiB blocks of chunks, each a 7-byte header (CRC, length, type:
    1 whole, 2 first, 3 middle, 4 last) and its bytes; a block's tail shorter than a header is padding."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, records, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def test_wandb_offline_run_logs_config_epochs_steps_summary_and_a_resume_keeps_its_id(tmp_path, monkeypatch):
    """WANDB_MODE=offline, no network: a run stopped after epoch 0 and resumed writes two offline run files of one
    run id (recorded in tracking.json), with the project, name and tags asked for, the resolved settings as config,
    every epoch's val/top1 and the per-step train/loss on acdc's step axis, and the summary of the whole run."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    tracked = [*RUN, *sets("log.wandb=true", "log.wandb_project=sparse", "log.wandb_tags=[\"cpu\", \"test\"]")]
    first = invoke("train", "--out", run_dir, *tracked, env=STOP_AFTER_EPOCH_0)
    assert first.exit_code == 0, first.output
    run_id = json.loads((run_dir / TRACKING_FILE).read_text())["wandb"]
    resumed = invoke("train", "--resume", run_dir)
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((run_dir / TRACKING_FILE).read_text()) == {"wandb": run_id}

    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert [f.name for f in files] == [f"run-{run_id}.wandb"] * 2
    records = [r for f in files for r in wandb_records(f)]
    kinds = [r.WhichOneof("record_type") for r in records]
    runs = [r.run for r, k in zip(records, kinds) if k == "run"]
    assert [(r.run_id, r.project, r.display_name, list(r.tags)) for r in runs] == [
        (run_id, "sparse", "run", ["cpu", "test"])] * 2
    config = _items(next(r for r, k in zip(records, kinds) if k == "config").config.update)
    settings = load_checkpoint(run_dir / "last.safetensors").config
    assert config["optim"]["lr"] == settings["optim"]["lr"] and config["schedule"]["epochs"] == 3

    history = [_items(r.history.item) for r, k in zip(records, kinds) if k == "history"]
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [(h["step"], h["val/top1"]) for h in history if "val/top1" in h] == [
        ((r["epoch"] + 1) * STEPS, pytest.approx(r["val_top1"])) for r in rows]
    assert [h["step"] for h in history if "train/loss" in h] == [8, 16, 19, 27, 35, 38, 46, 54, 57]
    summary = {}
    for record, kind in zip(records, kinds):
        if kind == "summary":
            summary.update(_items(record.summary.update))
    best_sparse, best_dense = best_rows(rows, settings["sparsity"]["target"])
    assert summary["summary/best_sparse_top1"] == pytest.approx(best_sparse["val_top1"])
    assert summary["summary/best_dense_top1"] == pytest.approx(best_dense["val_top1"])
    assert summary["summary/final_sparsity"] == pytest.approx(rows[-1]["sparsity"])
    assert summary["summary/train_flops_ratio"] == pytest.approx(rows[-1]["train_flops_ratio"])
    assert [r.exit.exit_code for r, k in zip(records, kinds) if k == "exit"] == [1, 0]  # stopped, then finished


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _refusing_stores(tmp_path: Path) -> dict[str, str]:
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("")
    # /proc refuses a new folder to root as well (a chmod 555 folder would not: the suite may run as root)
    return {"down": f"http://127.0.0.1:{_closed_port()}", "file-in-the-way": f"file:{in_the_way / 'mlruns'}",
            "read-only": "file:/proc/acdc-test-mlruns"}


@pytest.mark.parametrize("store", ["down", "file-in-the-way", "read-only"])
def test_a_tracking_server_down_or_refusing_writes_costs_one_warning_not_the_run(tmp_path, monkeypatch, store):
    """MLFLOW_TRACKING_URI (honoured without log.mlflow_uri) names a server on a closed loopback port, a file: store
    under a file, or one on a read-only file system: one warning line naming MLflow, and the run trains to its end
    with its checkpoints and every metrics row."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a refused connection fails at once
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _refusing_stores(tmp_path)[store])
    run_dir = tmp_path / "run"
    result = invoke("train", "--out", run_dir, *short_schedule(2, 1, 1, 1, 1, 0, "data.batch_size=128"))
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: MLflow tracking cannot start ("), warnings
    assert [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [0, 1]
    assert load_checkpoint(run_dir / "last.safetensors").epoch == 2
    assert json.loads((run_dir / TRACKING_FILE).read_text()) == {}


def test_writes_refused_in_the_middle_of_a_run_cost_one_warning(tmp_path, file_store, monkeypatch):
    """The store accepts the run, then refuses every write from the first per-step point on: one warning, the run
    goes on to its end, the run's parameters are there and nothing was tried again."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri, client = file_store
    accept = MlflowClient.log_batch
    tries = []

    def refuse(self, run_id, metrics=(), params=(), tags=()):
        if metrics:
            tries.append(len(metrics))
            raise MlflowException("RESOURCE_EXHAUSTED: quota")
        return accept(self, run_id, metrics=metrics, params=params, tags=tags)

    monkeypatch.setattr(MlflowClient, "log_batch", refuse)
    run_dir = tmp_path / "run"
    result = invoke("train", "--out", run_dir, *RUN, *sets(f"log.mlflow_uri={uri}"))
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning")]
    assert warnings == ["warning: MLflow tracking stopped (MlflowException: RESOURCE_EXHAUSTED: quota); the run goes "
                        "on, metrics.jsonl and TensorBoard keep everything"]
    assert tries == [2]  # the first point's loss and LR, once
    assert [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [0, 1, 2]
    run_id = json.loads((run_dir / TRACKING_FILE).read_text())["mlflow"]
    run = client.get_run(run_id)
    assert run.data.params["optim.lr"] == str(load_checkpoint(run_dir / "last.safetensors").config["optim"]["lr"])
    assert run.data.metrics == {} and run.info.status == "RUNNING"  # the close was not tried either


@pytest.mark.parametrize("setting, module, extra", [
    ("log.mlflow_uri=file:mlruns", "mlflow", "mlflow"), ("log.wandb=true", "wandb", "wandb")])
def test_a_missing_extra_is_one_line_naming_it_and_nothing_is_written(tmp_path, monkeypatch, setting, module, extra):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    run_dir = tmp_path / "run"
    line = fails(["train", "--out", run_dir, *RUN, "--set", setting])
    assert f"pip install 'acdc-cli[{extra}]'" in line and setting.split("=")[0] in line
    assert not run_dir.exists()


@pytest.mark.slow  # a fresh Python process that imports torch and trains: ~10 s alone, far more on a busy machine
def test_a_run_without_tracking_imports_neither_library(tmp_path):
    """In a fresh process (what earlier tests imported does not count): a whole run, then neither module loaded."""
    script = ("import sys\nfrom acdc_cli.cli.app import app\nfrom typer.testing import CliRunner\n"
              f"r = CliRunner().invoke(app, {['train', '--out', str(tmp_path / 'run'), *RUN]!r})\n"
              "assert r.exit_code == 0, r.output\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'wandb')))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "run" / "last.safetensors").is_file() and not (tmp_path / "run" / TRACKING_FILE).exists()


def test_flat_settings_are_section_dot_key_texts():
    from acdc_cli.config import load_settings

    flat = flat_settings(load_settings(overrides=["sparsity.target=0.75", "log.wandb_tags=[\"a\"]"]))
    assert flat["sparsity.target"] == "0.75" and flat["log.wandb_tags"] == '["a"]'
    assert flat["preset"] == "quickstart" and flat["paper_top1"] == "null"
