"""Preemption: SIGTERM/SIGINT finish the step, write a checkpoint, print how to resume and exit 0; a second signal
exits at once with 130; under a process group every rank agrees to stop after the same step."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from acdc_cli.checkpoint import load_checkpoint
from acdc_cli.cli import app
from acdc_cli.metrics import read_jsonl
from acdc_cli.preemption import DUPLICATE_WINDOW_S, StopSignal, reduce_int

# 3 epochs of 78 steps (whole batches of 16): a signal sent just after epoch 0's checkpoint lands early in epoch 1
RUN = [
    "--set", "schedule.epochs=3", "--set", "schedule.warmup_epochs=1", "--set", "schedule.compressed_epochs=1",
    "--set", "schedule.decompressed_epochs=1", "--set", "schedule.final_compressed_epochs=1",
    "--set", "data.batch_size=16", "--set", "runtime.deterministic=true", "--set", "runtime.threads=1",
    "--set", "log.tensorboard=false", "--set", "log.progress=false", "--set", "model.dropout=0.3",
]




def checkpoint_epoch(run_dir: Path) -> int:
    try:
        with safe_open(str(run_dir / "last.safetensors"), framework="pt") as fh:
            return int(fh.metadata()["epoch"])
    except Exception:  # not written yet
        return -1


def start_and_wait(run_dir: Path, until_epoch: int) -> subprocess.Popen:
    """Start a run and return once its checkpoint of ``until_epoch`` completed epochs is on disk."""
    proc = subprocess.Popen([sys.executable, "-m", "acdc_cli", "train", "--out", str(run_dir), *RUN],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while checkpoint_epoch(run_dir) < until_epoch:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    return proc


def test_sigterm_mid_epoch_writes_checkpoint_exits_0_and_resume_completes(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_and_wait(run_dir, 1)
    time.sleep(0.05)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert time.monotonic() - sent < 10
    assert f"resume with: acdc train --resume {run_dir}" in out and "SIGTERM" in out
    ckpt = load_checkpoint(run_dir / "last.safetensors")
    assert ckpt.epoch == 1 and 0 < ckpt.extra["step"] < 78  # inside epoch 1, not at its end
    assert [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [0]

    resumed = CliRunner().invoke(app, ["train", "--resume", str(run_dir)])
    assert resumed.exit_code == 0, resumed.output
    reference = tmp_path / "reference"
    assert CliRunner().invoke(app, ["train", "--out", str(reference), *RUN]).exit_code == 0
    for name in ("last.safetensors", "best_sparse.safetensors", "best_dense.safetensors"):
        a, b = load_file(reference / name), load_file(run_dir / name)
        assert all(a[k].numpy().tobytes() == b[k].numpy().tobytes() for k in a), name
    strip = lambda rows: [{k: v for k, v in r.items() if k != "img_per_s"} for r in rows]  # noqa: E731
    assert strip(read_jsonl(run_dir / "metrics.jsonl")) == strip(read_jsonl(reference / "metrics.jsonl"))


def test_second_signal_exits_at_once_with_130(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_and_wait(run_dir, 1)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)  # a different signal, so the two are not merged into one delivery
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert "resume with" not in out
    load_checkpoint(run_dir / "last.safetensors")  # the last checkpoint is still whole


def test_stop_signal_flag_then_keyboard_interrupt_and_handlers_restored():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with StopSignal() as stop:
        assert not stop.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.should_stop(1) and stop.name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here, between bytecodes
    assert {sig: signal.getsignal(sig) for sig in before} == before
    assert reduce_int(7, "min") == 7  # no process group: the value itself


def test_same_signal_twice_at_once_is_one_request():
    """Ctrl-C under --nproc: the terminal and torchrun both deliver SIGINT to each rank within milliseconds."""
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.should_stop(1) and stop.name == "SIGINT"
        time.sleep(DUPLICATE_WINDOW_S)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)


RANK_SCRIPT = """
import json, os, signal, sys
import torch.distributed as dist
from acdc_cli.preemption import StopSignal, reduce_int

rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
with StopSignal(sync_every=5) as stop:
    before = stop.should_stop(5)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    answers = [stop.should_stop(step) for step in (6, 9, 10)] + [stop.should_stop()]
low = reduce_int(10 + rank, "min")
print(json.dumps({"received": stop.name, "before": before, "answers": answers, "min": low}))
dist.destroy_process_group()
"""


def test_ranks_agree_to_stop_when_one_rank_gets_the_signal(tmp_path):
    """Two gloo ranks: only rank 1 gets SIGTERM; both stop at the next agreement step (10), neither before."""
    store = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(rank), str(store)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert [r["received"] for r in results] == [None, "SIGTERM"]
    for r in results:
        assert r["before"] is False
        assert r["answers"] == [False, False, True, True]
        assert r["min"] == 10


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="--nproc 2 on the CPU needs two cores")
def test_sigterm_under_nproc_2_agrees_and_resume_is_exact(tmp_path):
    """Two gloo ranks on the CPU through `--nproc 2`: SIGTERM to the launcher reaches both ranks, they stop after the
    same step, rank 0 writes a mid-epoch checkpoint with both ranks' sums, and `--nproc 2 --resume` ends where an
    uninterrupted two-rank run does."""
    run_dir, reference = tmp_path / "run", tmp_path / "reference"
    ddp = ["--nproc", "2", *RUN, "--set", "runtime.device=cpu"]
    proc = subprocess.Popen([sys.executable, "-m", "acdc_cli", "train", "--out", str(run_dir), *ddp],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while checkpoint_epoch(run_dir) < 1:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert "resume with: acdc train --resume" in out, err
    assert proc.returncode == 0, err  # the launcher knows the ranks stopped cleanly
    ckpt = load_checkpoint(run_dir / "last.safetensors")
    assert ckpt.epoch == 1 and ckpt.extra["step"] % 10 == 0 and ckpt.extra["step"] > 0  # an agreement step
    assert len(torch.load(run_dir / "last.state.pt", weights_only=True)["totals"]) == 2

    train = [sys.executable, "-m", "acdc_cli", "train"]
    resumed = subprocess.run([*train, "--nproc", "2", "--resume", str(run_dir)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    whole = subprocess.run([*train, "--out", str(reference), *ddp], capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    for name in ("last.safetensors", "best_sparse.safetensors", "best_dense.safetensors"):
        a, b = load_file(reference / name), load_file(run_dir / name)
        assert all(a[k].numpy().tobytes() == b[k].numpy().tobytes() for k in a), name
    strip = lambda rows: [{k: v for k, v in r.items() if k != "img_per_s"} for r in rows]  # noqa: E731
    assert strip(read_jsonl(run_dir / "metrics.jsonl")) == strip(read_jsonl(reference / "metrics.jsonl"))
