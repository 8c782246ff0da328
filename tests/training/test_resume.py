"""Exact resume: a CPU run killed with SIGKILL at exact points of its checkpoint writes (the test fault hook
``_ACDC_TEST_FAULT``, never a wall-clock window) and resumed ends bit-identical to a run that never stopped;
mid-epoch checkpoints; non-finite losses stop or skip cleanly."""

import math
import os
import re
from pathlib import Path

import pytest
import torch
from cli_helpers import PINNED, QUIET, assert_same_run, fails, invoke, short_schedule, trained
from faults_helpers import killed_at
from torch import nn

from acdc_cli.files.checkpoint import load_checkpoint
from acdc_cli.files.jsonio import read_jsonl
from acdc_cli.files.torchfile import load_state
from acdc_cli.models import registry, table
from acdc_cli.training.checkpoints import state_path

STEPS = 39  # 1,257 training digits in whole batches of 32
EPOCHS = 5
# 5 epochs: dense, sparse, dense, sparse, sparse (two compressed phases, so mask change and a restore are covered)
SHORT = short_schedule(EPOCHS, 1, 1, 1, 2, 0, "data.batch_size=32",
                       "model.dropout=0.3")  # dropout draws random numbers every step: a resume must draw the same


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The same run, never stopped (in this process: it gives the same bits as `python -m acdc_cli`)."""
    return trained(tmp_path_factory, "reference", *SHORT)


def temp_files(run_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(run_dir) if e.name.endswith(".tmp"))


@pytest.mark.slow  # a long end-to-end run: the slow pass, which CI runs
def test_sigkill_inside_checkpoint_writes_resumes_bit_identically(tmp_path, reference):
    """Three SIGKILLs, each at a different point of the write of the checkpoint pair (state file, then weights),
    each followed by a resume that goes on from the newest complete pair; the last resume ends bit-identical to
    the run that never stopped."""
    run_dir = tmp_path / "run"
    every = ["--set", "runtime.checkpoint_every_steps=4"]

    # 1. mid-epoch, halfway through writing the 7th last.safetensors (epoch 0, step 28): its torn temporary file
    #    is left behind, the 6th (step 24) is what a resume finds
    killed_at("kill@write:7:last.safetensors", "--out", str(run_dir), *SHORT, *every)
    assert [name.startswith(".last.safetensors.") for name in temp_files(run_dir)] == [True]
    ckpt = load_checkpoint(run_dir / "last.safetensors")
    assert (ckpt.epoch, ckpt.extra["step"]) == (0, 24)

    # 2. right after the resume's 6th state file (steps 28, 32, 36, the end of epoch 0, then epoch 1 steps 4 and 8)
    #    is renamed into place, before its weights are written: the newest state is ahead of the weights, and the
    #    next resume must pair the weights with the state they name
    killed_at("kill@renamed:6:last.state.*.pt", "--resume", str(run_dir), *every)
    assert not temp_files(run_dir)  # the resume removed what the first kill left
    ckpt = load_checkpoint(run_dir / "last.safetensors")
    assert (ckpt.epoch, ckpt.extra["step"]) == (1, 4)
    paired = state_path(run_dir)
    ahead = sorted(set(run_dir.glob("last.state.*.pt")) - {paired})
    assert [load_state(p)["progress"] for p in ahead] == [{**load_state(paired)["progress"], "step": 8}]

    # 3. checkpoints at epoch ends only (runtime.* may change on resume): killed after the 2nd epoch-end weights
    #    file is complete and fsynced but before it is renamed into place, so the 1st (end of epoch 2) stands
    killed_at("kill@rename:2:last.safetensors", "--resume", str(run_dir), "--set", "runtime.checkpoint_every_steps=0")
    ckpt = load_checkpoint(run_dir / "last.safetensors")
    assert (ckpt.epoch, ckpt.extra.get("step", 0)) == (2, 0)
    assert len(temp_files(run_dir)) == 1

    # 4. to the end
    resumed = invoke("train", "--resume", run_dir, *every)
    assert resumed.exit_code == 0, resumed.output
    assert not temp_files(run_dir)
    assert_same_run(reference, run_dir)


def test_mid_epoch_checkpoint_holds_step_totals_and_rng(tmp_path, reference):
    """A run whose 10th last.safetensors write (epoch 1, step 18; every 6 steps) fails resumes from the one before
    (epoch 1, step 12: a compressed phase after a restore) with that step's sums, and ends as the reference."""
    run_dir = tmp_path / "run"
    line = fails(["train", "--out", run_dir, *SHORT, "--set", "runtime.checkpoint_every_steps=6"],
                 env={"_ACDC_TEST_FAULT": "fail@write:10:last.safetensors"})
    assert "No space left on device" in line
    ckpt = load_checkpoint(run_dir / "last.safetensors")
    state = load_state(state_path(run_dir))
    assert (ckpt.epoch, ckpt.extra["step"]) == (1, 12) and state["progress"]["step"] == 12
    assert len(state["totals"]) == 1  # one process: one rank's sums
    assert state["totals"][0]["count"] == 12 * 32 and state["totals"][0]["loss_sum"].dtype == torch.float64
    assert [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl")][:1] == [0]

    resumed = invoke("train", "--resume", run_dir)
    assert resumed.exit_code == 0, resumed.output
    assert_same_run(reference, run_dir)


# ----------------------------------------------------------------------------------------------------------------
# numerical faults


class NanAt(nn.Module):
    """The quickstart CNN whose training forward passes numbered in ``bad`` return NaN logits (1-based call count).

    It records its parameters and buffers at the start of the first bad call and of the call after it.
    """

    def __init__(self, bad: set[int], num_classes: int = 10, in_channels: int = 1, dropout: float = 0.0):
        super().__init__()
        self.inner = registry.create("digits-cnn", num_classes=num_classes, in_channels=in_channels, dropout=dropout)
        self.bad, self.calls, self.snapshots = bad, 0, []

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls in (min(self.bad), min(self.bad) + 1):
                self.snapshots.append({k: v.clone() for k, v in self.inner.state_dict().items()})
        out = self.inner(x)
        return out * float("nan") if self.training and self.calls in self.bad else out


def register_nan_model(monkeypatch, name: str, bad: set[int]) -> list[NanAt]:
    """Register ``name`` for this test only: a NanAt with these bad calls; returns the models it builds."""
    made: list[NanAt] = []
    monkeypatch.setattr(table, "REGISTRY", dict(table.REGISTRY))
    monkeypatch.setattr(registry, "REGISTRY", table.REGISTRY)

    @registry.register(name, input_size=8, in_channels=1)
    def factory(num_classes: int = 10, in_channels: int = 1, dropout: float = 0.0) -> nn.Module:
        model = NanAt(bad, num_classes, in_channels, dropout)
        if next(model.parameters()).device.type != "meta":  # models.create sizes every model on meta first
            made.append(model)
        return model

    return made


@pytest.fixture
def nan_model(monkeypatch):
    """``nan-at-1-4``: step 4 of epoch 1 (forward STEPS + 5) gives a NaN loss."""
    return register_nan_model(monkeypatch, "nan-at-1-4", {STEPS + 5})


NAN_RUN = [*SHORT, "--set", "model.name=nan-at-1-4", "--set", "schedule.epochs=3",
           "--set", "schedule.final_compressed_epochs=1"]


def test_nan_loss_stops_with_one_line_and_keeps_last_good_checkpoint(tmp_path, nan_model):
    run_dir = tmp_path / "run"
    line = fails(["train", "--out", run_dir, *NAN_RUN, "--set", "runtime.checkpoint_every_steps=2"], code=1)
    assert "non-finite loss at epoch 1, step 4" in line
    # the last checkpoint is the one written after step 4 of epoch 1, before the NaN step ran, with finite weights
    ckpt = load_checkpoint(run_dir / "last.safetensors")
    assert (ckpt.epoch, ckpt.extra["step"]) == (1, 4)
    assert all(torch.isfinite(t).all() for t in ckpt.weights.values() if t.is_floating_point())
    assert ckpt.weights["inner.classifier.4.weight"].equal(nan_model[0].snapshots[0]["classifier.4.weight"])
    assert [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [0]


def test_nan_policy_skip_skips_the_step_and_counts_it(tmp_path, nan_model):
    run_dir = tmp_path / "run"
    result = invoke("train", "--out", run_dir, *NAN_RUN, "--set", "runtime.nan_policy=skip")
    assert result.exit_code == 0, result.output
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["skipped_steps"] for r in rows] == [0, 1, 0]
    assert all(math.isfinite(r["train_loss"]) for r in rows)  # the bad step is not averaged in
    # no update at all: weights, batch-norm statistics and step counters are as they were before the bad step
    before, after = nan_model[0].snapshots
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def finite(ckpt) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in ckpt.weights.values() if t.is_floating_point())


LR_1000 = [*PINNED, *QUIET, "--set", "optim.lr=1000", "--set", "runtime.checkpoint_every_steps=1"]


def test_weights_broken_by_a_finite_loss_stop_the_run_before_they_are_saved(tmp_path):
    """A diverging run under the default policy: at LR 1000 the loss stays finite for a few steps while the weights
    overflow. The checkpoint due after that step is refused (exit 1), the one before it is kept, finite."""
    run_dir = tmp_path / "run"
    line = fails(["train", "--out", run_dir, *LR_1000], code=1)
    found = re.fullmatch(r"error: non-finite weights in the checkpoint at epoch 0, step (\d+) \(([\w.]+)\); the run "
                         r"stops without writing it, the last good checkpoint is kept", line)
    assert found, line
    ckpt = load_checkpoint(run_dir / "last.safetensors")
    assert (ckpt.epoch, ckpt.extra["step"]) == (0, int(found.group(1)) - 1) and finite(ckpt)
    assert not list(run_dir.glob("best_*")) and read_jsonl(run_dir / "metrics.jsonl") == []


def test_skip_undoes_steps_that_break_the_weights_and_stops_after_max_skipped_steps(tmp_path):
    """A diverging run under "skip" (it used to end with exit 0, train loss 0.0000, sparsity 0.83 and NaN in last
    and best_sparse): every step that breaks the weights is undone, and the 10th in a row ends the run (exit 1)
    before any epoch ends; the checkpoint taken mid-streak holds the weights from before it, finite."""
    run_dir = tmp_path / "run"
    line = fails(["train", "--out", run_dir, *LR_1000, "--set", "runtime.nan_policy=skip"], code=1)
    found = re.fullmatch(r"error: 10 steps in a row skipped for a non-finite loss or weights, the last at epoch 0, "
                         r"step (\d+) \(runtime.max_skipped_steps = 10\); the last good checkpoint is kept", line)
    assert found, line
    last = int(found.group(1))
    ckpt = load_checkpoint(run_dir / "last.safetensors")
    assert (ckpt.epoch, ckpt.extra["step"]) == (0, last) and finite(ckpt)  # written after skip 9 of the streak
    assert load_state(state_path(run_dir))["totals"][0]["streak"] == 9
    assert math.isfinite(ckpt.metrics["train_loss"])
    assert not list(run_dir.glob("best_*")) and read_jsonl(run_dir / "metrics.jsonl") == []
    # the streak is part of the run: resumed, the next skip is the 10th
    line = fails(["train", "--resume", run_dir], code=1)
    assert f"10 steps in a row skipped for a non-finite loss or weights, the last at epoch 0, step {last}" in line


def test_an_all_skipped_epoch_has_no_loss_and_the_streak_goes_on_across_epochs(tmp_path, monkeypatch):
    """4 steps per epoch; every step of epoch 1 and the first two of epoch 2 give NaN. With the limit at 10 the run
    ends, epoch 1's train loss is null (no step counted, not a loss of 0); at 6 the streak that began in epoch 1
    ends the run at epoch 2, step 1."""
    register_nan_model(monkeypatch, "nan-5-to-10", set(range(5, 11)))
    args = [*short_schedule(3), "--set", "data.batch_size=256",
            "--set", "model.name=nan-5-to-10", "--set", "runtime.nan_policy=skip"]
    result = invoke("train", "--out", tmp_path / "ten", *args)
    assert result.exit_code == 0, result.output
    rows = read_jsonl(tmp_path / "ten" / "metrics.jsonl")
    assert [r["skipped_steps"] for r in rows] == [0, 4, 2]
    assert rows[1]["train_loss"] is None and rows[1]["train_top1"] is None
    assert math.isfinite(rows[0]["train_loss"]) and math.isfinite(rows[2]["train_loss"])
    line = fails(["train", "--out", tmp_path / "six", *args, "--set", "runtime.max_skipped_steps=6"], code=1)
    assert "6 steps in a row skipped for a non-finite loss or weights, the last at epoch 2, step 1" in line
    assert load_checkpoint(tmp_path / "six" / "last.safetensors").epoch == 2  # epoch 1's end: finite, kept


def test_step_undo_puts_back_weights_statistics_and_optimizer_state():
    from acdc_cli.training.loop import StepUndo

    torch.manual_seed(0)
    model = registry.create("digits-cnn", num_classes=10, in_channels=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))

    def step(scale: float) -> None:
        optimizer.zero_grad()
        (torch.nn.functional.cross_entropy(model(x), y) * scale).backward()
        optimizer.step()

    undo = StepUndo(model, optimizer)
    undo.capture()  # before the first step: no optimizer state yet
    step(float("nan"))
    assert not bool(undo.finite()) and optimizer.state
    undo.restore()
    assert not optimizer.state and bool(undo.finite())

    copies = None
    for _ in range(2):  # the first capture after the optimizer made its state copies anew, the next reuses them
        step(1.0)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        momentum = {p: s["momentum_buffer"].clone() for p, s in optimizer.state.items()}
        undo.capture()
        assert copies is None or [id(c) for c in undo.copies] == copies
        copies = [id(c) for c in undo.copies]
        step(float("nan"))
        undo.restore()
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert all(torch.equal(s["momentum_buffer"], momentum[p]) for p, s in optimizer.state.items())


# ----------------------------------------------------------------------------------------------------------------
# checkpoints written in the background


def test_background_writer_keeps_order_and_hands_errors_back():
    """A second write waits for the first (held here until released), runs off the training thread, and an error
    reaches the caller once."""
    import threading

    from acdc_cli.errors import AcdcError
    from acdc_cli.training.snapshots import BackgroundWriter

    written, main, release = [], threading.get_ident(), threading.Event()

    def held(name):
        assert release.wait(timeout=300)  # a safety net, not a timing assumption
        written.append((name, threading.get_ident() != main))

    writer = BackgroundWriter()
    writer.submit(held, "first")
    submitted = threading.Event()
    second = threading.Thread(target=lambda: (writer.submit(written.append, ("second", True)), submitted.set()))
    second.start()
    # while the first write is held, submitting the second cannot return (a writer that did not wait would)
    assert not submitted.wait(timeout=0.5)
    release.set()
    second.join(timeout=300)
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
    from acdc_cli.config import load_settings
    from acdc_cli.engine import ACDC
    from acdc_cli.files.checkpoint import host_copy
    from acdc_cli.models import create
    from acdc_cli.training import checkpoints

    settings = load_settings()
    model = create("tiny-test", num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = ACDC.from_settings(settings, model, optimizer)
    sparsifier = engine.sparsifier
    sparsifier.compress(0.5)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    ckpt = checkpoints.snapshot(model, engine, settings, {"num_classes": 10}, 1, "sparse", {"val_top1": 0.5})
    state = checkpoints.resume_state(checkpoints.RunState(epoch=1), engine, optimizer, torch.amp.GradScaler("cpu"))
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


def test_fault_hook_fails_exactly_the_write_it_names(tmp_path, monkeypatch):
    """_ACDC_TEST_FAULT counts atomic writes per file name (or all of them) and fails the one it names at the point
    it names; what a failed write leaves is what a full disk would leave."""
    from acdc_cli.errors import AcdcError
    from acdc_cli.files.atomic import atomic_write_bytes
    from acdc_cli.testing_hooks import HookSyntaxError, parse_faults

    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    monkeypatch.setenv("_ACDC_TEST_FAULT", "fail@write:2:a.bin; fail@renamed:4")
    atomic_write_bytes(a, b"one")  # a.bin 1, all 1
    atomic_write_bytes(b, b"one")  # all 2
    with pytest.raises(AcdcError, match=r"cannot write .*a\.bin: No space left on device"):
        atomic_write_bytes(a, b"two")  # a.bin 2: fails halfway through the temporary file
    assert a.read_bytes() == b"one" and temp_files(tmp_path) == []
    with pytest.raises(AcdcError, match="No space left"):
        atomic_write_bytes(b, b"two")  # all 4: fails after the rename
    assert b.read_bytes() == b"two"
    atomic_write_bytes(a, b"three")  # nothing planned for a.bin 3 / all 5
    assert a.read_bytes() == b"three"
    for bad in ("fail@write", "crash@write:1", "kill@fsync:1", "kill@write:0", "kill@write:x"):
        with pytest.raises(HookSyntaxError, match="_ACDC_TEST_FAULT"):
            parse_faults(bad)
