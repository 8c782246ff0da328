"""Exact resume: a CPU run killed with SIGKILL at random points (once while it writes a checkpoint) and resumed ends
bit-identical to a run that never stopped; mid-epoch checkpoints; non-finite losses stop or skip cleanly."""

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from acdc_cli.checkpoint import load_checkpoint, load_state
from acdc_cli.cli import app
from acdc_cli.metrics import read_jsonl
from acdc_cli.models import registry

STEPS = 39  # 1,257 training digits in whole batches of 32
EPOCHS = 5
# 5 epochs: dense, sparse, dense, sparse, sparse (two compressed phases, so mask change and a restore are covered)
SHORT = [
    "--set", f"schedule.epochs={EPOCHS}", "--set", "schedule.warmup_epochs=1", "--set", "schedule.compressed_epochs=1",
    "--set", "schedule.decompressed_epochs=1", "--set", "schedule.final_compressed_epochs=2",
    "--set", "data.batch_size=32", "--set", "runtime.deterministic=true", "--set", "runtime.threads=1",
    "--set", "log.tensorboard=false", "--set", "log.progress=false",
    "--set", "model.dropout=0.3",  # dropout draws random numbers every step: a resume must draw the same ones
]
FILES = ("last.safetensors", "best_sparse.safetensors", "best_dense.safetensors")




@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The same run, never stopped (in this process: it gives the same bits as `python -m acdc_cli`)."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = CliRunner().invoke(app, ["train", "--out", str(run_dir), *SHORT])
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)
    assert result.exit_code == 0, result.output
    return run_dir


def assert_same_run(expected: Path, actual: Path) -> None:
    """Checkpoint tensors equal bit for bit (so -0.0 != +0.0) and every metrics row equal except img/s."""
    for name in FILES:
        a, b = load_file(expected / name), load_file(actual / name)
        assert a.keys() == b.keys(), name
        for key in a:
            assert a[key].dtype == b[key].dtype and a[key].numpy().tobytes() == b[key].numpy().tobytes(), f"{name}:{key}"
    strip = lambda rows: [{k: v for k, v in r.items() if k != "img_per_s"} for r in rows]  # noqa: E731
    assert strip(read_jsonl(actual / "metrics.jsonl")) == strip(read_jsonl(expected / "metrics.jsonl"))


def train_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "acdc_cli", "train", *args]


def progress(run_dir: Path) -> int:
    """Global step of the newest complete checkpoint (-1 before the first); renames make the read safe."""
    try:
        with safe_open(str(run_dir / "last.safetensors"), framework="pt") as fh:
            meta = fh.metadata()
    except Exception:  # not there yet
        return -1
    return int(meta["epoch"]) * STEPS + int(meta.get("step", "0"))


def temp_files(run_dir: Path) -> list[str]:
    return [e.name for e in os.scandir(run_dir) if e.name.endswith(".tmp")] if run_dir.is_dir() else []


def run_and_kill(cmd: list[str], kill_when) -> int:
    """Start ``cmd``; SIGKILL it the moment ``kill_when()`` holds. Returns the exit status (-9 when killed)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while proc.poll() is None:
            if kill_when():
                proc.kill()
                break
            time.sleep(0.001)
        proc.wait(timeout=120)
        assert proc.returncode in (0, -9), proc.stderr.read().decode()[-2000:]
        return proc.returncode
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_sigkill_at_random_points_resumes_bit_identically(tmp_path, reference):
    run_dir = tmp_path / "run"
    rng = random.Random(6)
    every = ["--set", "runtime.checkpoint_every_steps=4"]

    # 1. mid-epoch, at a random step of the first two epochs, a random few milliseconds after a checkpoint
    target, delay = rng.randrange(6, 2 * STEPS - 6), rng.uniform(0, 0.02)
    reached: list[float] = []

    def after_target() -> bool:
        if not reached and progress(run_dir) >= target:
            reached.append(time.monotonic())
        return bool(reached) and time.monotonic() - reached[0] >= delay

    assert run_and_kill(train_cmd("--out", str(run_dir), *SHORT, *every), after_target) == -9
    first = progress(run_dir)
    assert 0 < first < EPOCHS * STEPS

    # 2. while a checkpoint is being written: its temporary file is left behind, which proves where the kill hit
    resume = train_cmd("--resume", str(run_dir), *every)
    old = set(temp_files(run_dir))  # step 1 may have left one too; the resume deletes those, new names are random
    for _ in range(5):
        assert run_and_kill(resume, lambda: bool(set(temp_files(run_dir)) - old)) == -9
        if set(temp_files(run_dir)) - old:
            break
    assert set(temp_files(run_dir)) - old, "no kill landed inside a checkpoint write"
    load_checkpoint(run_dir / "last.safetensors")  # the previous checkpoint is complete and readable

    # 3. checkpoints at epoch ends only (runtime.* may change on resume): kill a random moment after the next one
    start, delay = progress(run_dir), rng.uniform(0.05, 0.3)
    seen: list[float] = []

    def after_next_epoch() -> bool:
        if not seen and progress(run_dir) > start:
            seen.append(time.monotonic())
        return bool(seen) and time.monotonic() - seen[0] >= delay

    epoch_ends = train_cmd("--resume", str(run_dir), "--set", "runtime.checkpoint_every_steps=0")
    assert run_and_kill(epoch_ends, after_next_epoch) == -9
    assert progress(run_dir) % STEPS == 0 and progress(run_dir) < EPOCHS * STEPS

    # 4. to the end
    assert run_and_kill(resume, lambda: False) == 0
    assert not temp_files(run_dir)  # the resume cleared what the killed writer left
    assert_same_run(reference, run_dir)


def test_mid_epoch_checkpoint_holds_step_totals_and_rng(tmp_path, reference):
    """A run stopped after a mid-epoch checkpoint (here: an exception right after it) resumes from that step."""
    from acdc_cli.rundir import RunDir

    run_dir = tmp_path / "run"
    real_save = RunDir.save_step

    class Stop(Exception):
        pass

    def save_then_stop(store, phase, step, every_rank):
        real_save(store, phase, step, every_rank)
        if step == 12 and store.state.epoch == 1:  # a compressed phase, then a restore
            raise Stop

    with pytest.MonkeyPatch.context() as m:
        m.setattr(RunDir, "save_step", save_then_stop)
        first = CliRunner().invoke(app, ["train", "--out", str(run_dir), *SHORT,
                                         "--set", "runtime.checkpoint_every_steps=6"])
    assert isinstance(first.exception, Stop)
    ckpt = load_checkpoint(run_dir / "last.safetensors")
    state = load_state(run_dir / "last.state.pt")
    assert (ckpt.epoch, ckpt.extra["step"]) == (1, 12) and state["progress"]["step"] == 12
    assert len(state["totals"]) == 1  # one process: one rank's sums
    assert state["totals"][0]["count"] == 12 * 32 and state["totals"][0]["loss_sum"].dtype == torch.float64
    assert len(read_jsonl(run_dir / "metrics.jsonl")) == 1

    resumed = CliRunner().invoke(app, ["train", "--resume", str(run_dir)])
    assert resumed.exit_code == 0, resumed.output
    assert_same_run(reference, run_dir)


# ----------------------------------------------------------------------------------------------------------------
# numerical faults


class NanAt(nn.Module):
    """The quickstart CNN whose training forward passes number ``bad`` return NaN logits (1-based call count).

    It records its parameters and buffers at the start of the bad call and of the call after it.
    """

    def __init__(self, bad: int, num_classes: int = 10, in_channels: int = 1, dropout: float = 0.0):
        super().__init__()
        self.inner = registry.create("digits-cnn", num_classes=num_classes, in_channels=in_channels, dropout=dropout)
        self.bad, self.calls, self.snapshots = bad, 0, []

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls in (self.bad, self.bad + 1):
                self.snapshots.append({k: v.clone() for k, v in self.inner.state_dict().items()})
        out = self.inner(x)
        return out * float("nan") if self.training and self.calls == self.bad else out


@pytest.fixture
def nan_model(monkeypatch):
    """Register ``nan-at-1-4`` for this test only: step 4 of epoch 1 (forward STEPS + 5) gives a NaN loss."""
    made: list[NanAt] = []
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @registry.register("nan-at-1-4", input_size=8, in_channels=1)
    def factory(num_classes: int = 10, in_channels: int = 1, dropout: float = 0.0) -> nn.Module:
        model = NanAt(STEPS + 5, num_classes, in_channels, dropout)
        if next(model.parameters()).device.type != "meta":  # models.create sizes every model on meta first
            made.append(model)
        return model

    return made


NAN_RUN = [*SHORT, "--set", "model.name=nan-at-1-4", "--set", "schedule.epochs=3",
           "--set", "schedule.final_compressed_epochs=1"]


def test_nan_loss_stops_with_one_line_and_keeps_last_good_checkpoint(tmp_path, nan_model):
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--out", str(run_dir), *NAN_RUN,
                                      "--set", "runtime.checkpoint_every_steps=2"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "non-finite loss at epoch 1, step 4" in lines[0], result.stderr
    assert "Traceback" not in result.output
    # the last checkpoint is the one written after step 4 of epoch 1, before the NaN step ran, with finite weights
    ckpt = load_checkpoint(run_dir / "last.safetensors")
    assert (ckpt.epoch, ckpt.extra["step"]) == (1, 4)
    assert all(torch.isfinite(t).all() for t in ckpt.weights.values() if t.is_floating_point())
    assert ckpt.weights["inner.classifier.4.weight"].equal(nan_model[0].snapshots[0]["classifier.4.weight"])
    assert [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [0]


def test_nan_policy_skip_skips_the_step_and_counts_it(tmp_path, nan_model):
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--out", str(run_dir), *NAN_RUN, "--set", "runtime.nan_policy=skip"])
    assert result.exit_code == 0, result.output
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["skipped_steps"] for r in rows] == [0, 1, 0]
    assert all(r["train_loss"] == r["train_loss"] for r in rows)  # not NaN: the bad step is not averaged in
    # no update at all: weights, batch-norm statistics and step counters are as they were before the bad step
    before, after = nan_model[0].snapshots
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


# ----------------------------------------------------------------------------------------------------------------
# checkpoints written in the background


def test_background_writer_keeps_order_and_hands_errors_back():
    import threading

    from acdc_cli.checkpoint import BackgroundWriter
    from acdc_cli.errors import AcdcError

    written, main = [], threading.get_ident()

    def slow(name):
        time.sleep(0.2)
        written.append((name, threading.get_ident() != main))

    writer = BackgroundWriter()
    writer.submit(slow, "first")
    writer.submit(written.append, ("second", True))  # waits for the first
    writer.wait()
    assert written == [("first", True), ("second", True)]

    def fail():
        raise AcdcError("cannot write /full/disk: No space left on device")

    writer.submit(fail)
    with pytest.raises(AcdcError, match="No space left"):
        writer.wait()
    writer.wait()  # reported once


def test_checkpoint_snapshot_is_independent_of_training(tmp_path):
    """What a background write saves is the state at the save, even if training changes the tensors meanwhile."""
    from acdc_cli import rundir
    from acdc_cli.checkpoint import host_copy
    from acdc_cli.config import load_settings
    from acdc_cli.engine import ACDC
    from acdc_cli.models import create

    settings = load_settings()
    model = create("tiny-test", num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = ACDC.from_settings(settings, model, optimizer)
    sparsifier = engine.sparsifier
    sparsifier.compress(0.5)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    ckpt = rundir.snapshot(model, engine, settings, {"num_classes": 10}, 1, "sparse", {"val_top1": 0.5})
    state = rundir.resume_state(rundir.RunState(epoch=1), engine, optimizer, torch.amp.GradScaler("cpu"))
    before = {k: v.clone() for k, v in ckpt.weights.items()}
    masks_before = {k: v.clone() for k, v in ckpt.masks.items()}
    momentum = [s["momentum_buffer"].clone() for s in state["optimizer"]["state"].values()]
    with torch.no_grad():  # training goes on
        for p in model.parameters():
            p.add_(1.0)
        for buffer in optimizer.state.values():
            buffer["momentum_buffer"].add_(1.0)
        next(iter(sparsifier.masks.values())).logical_not_()
    assert all(torch.equal(ckpt.weights[k], before[k]) for k in before)
    assert all(torch.equal(a, s["momentum_buffer"]) for a, s in zip(momentum, state["optimizer"]["state"].values()))
    assert all(torch.equal(ckpt.masks[k], masks_before[k]) for k in masks_before)
    nested = {"a": [torch.ones(2)], "b": (torch.zeros(1), 3)}
    copied = host_copy(nested)
    nested["a"][0].add_(1)
    assert torch.equal(copied["a"][0], torch.ones(2)) and copied["b"][1] == 3


def test_a_failed_background_write_stops_the_run_with_one_line(tmp_path, monkeypatch):
    from acdc_cli import checkpoint as ckpt_mod

    real = ckpt_mod._atomic_write

    def disk_full(path, data):
        if path.name == "last.safetensors" and (path.parent / "last.safetensors").exists():
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(ckpt_mod, "_atomic_write", disk_full)
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--out", str(run_dir), *SHORT])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot write" in lines[0] and "No space left" in lines[0]
    assert "Traceback" not in result.output
    assert load_checkpoint(run_dir / "last.safetensors").epoch == 1  # the first checkpoint is intact
