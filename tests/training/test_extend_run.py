"""Extending a run that turned out too short: `acdc train --resume DIR --set schedule.epochs=N` (with the phase
lengths that keep what was trained) continues it as if it had been planned that long; anything else is refused in
one line naming the first trained epoch whose plan would change."""

import shutil

import pytest
from cli_helpers import assert_same_run, fails, invoke, sets, short_schedule, trained
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from acdc_cli.files.jsonio import read_jsonl

# a constant LR, so that a longer schedule keeps the LR of the epochs already trained; TensorBoard on
CONSTANT = ["optim.lr_schedule=constant", "log.tensorboard=true"]
STEPS = 19  # 1,257 training digits in batches of 64


@pytest.fixture(scope="module")
def six_epochs(tmp_path_factory):
    """6 epochs: dense 0-1, compressed 2, decompressed 3, final compressed 4-5."""
    return trained(tmp_path_factory, "six", *short_schedule(6, 2, 1, 1, 2, 0, *CONSTANT))


def test_an_extended_run_equals_one_planned_that_long(six_epochs, tmp_path):
    """The final compressed phase 4-5 grows to 4-7: the extension holds its masks (no new pruning at epoch 6), and
    weights, masks, best checkpoints and every metrics row equal those of an 8-epoch run trained in one go."""
    whole = tmp_path / "whole"
    result = invoke("train", "--out", whole, *short_schedule(8, 2, 1, 1, 4, 0, *CONSTANT))
    assert result.exit_code == 0, result.output
    extended = shutil.copytree(six_epochs, tmp_path / "extended")
    result = invoke("train", "--resume", extended, *sets("schedule.epochs=8", "schedule.final_compressed_epochs=4"))
    assert result.exit_code == 0, result.output
    assert_same_run(whole, extended)
    rows = read_jsonl(extended / "metrics.jsonl")
    assert [r["phase"] for r in rows] == ["dense", "dense", "sparse", "dense", "sparse", "sparse", "sparse", "sparse"]
    assert "epochs = 8" in (extended / "config.toml").read_text()
    # TensorBoard holds each epoch once, on one step axis, across the two invocations
    acc = EventAccumulator(str(extended / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("val/top1")] == [
        (STEPS * (r["epoch"] + 1), pytest.approx(r["val_top1"])) for r in rows]
    assert [e.value for e in acc.Scalars("hparams/best_sparse_top1")][-1] == pytest.approx(
        max(r["val_top1"] for r in rows if r["phase"] == "sparse"))


def test_an_extension_that_would_change_a_trained_epoch_is_one_line(six_epochs):
    saved = {p.name: p.read_bytes() for p in six_epochs.iterdir() if p.is_file()}
    # a longer schedule with the same final phase moves the alternation: epoch 5 (sparse) would become dense
    line = fails(["train", "--resume", six_epochs, "--set", "schedule.epochs=8"])
    assert line == (f"error: cannot resume {six_epochs} with schedule.epochs 6 -> 8: epoch 5, already trained sparse "
                    "at 0.9, would become dense; keep the phase lengths up to epoch 5")
    line = fails(["train", "--resume", six_epochs, *sets("schedule.epochs=5", "schedule.final_compressed_epochs=1")])
    assert line.endswith("the run has already trained 6 epochs")
    # a step decay from epoch 1 on: epoch 1 trained at 0.05
    line = fails(["train", "--resume", six_epochs, *sets("schedule.epochs=8", "schedule.final_compressed_epochs=4",
                                                          "optim.lr_schedule=step", "optim.milestones=[1]")])
    assert "optim.milestones [] -> [1]" in line and "epoch 1, already trained at LR 0.05, would run at LR 0.005" in line
    # what an extension may not touch at all
    assert "cannot change sparsity.target" in fails(["train", "--resume", six_epochs, *sets(
        "schedule.epochs=8", "schedule.final_compressed_epochs=4", "sparsity.target=0.8")])
    assert {p.name: p.read_bytes() for p in six_epochs.iterdir() if p.is_file()} == saved  # nothing written


def test_extending_a_cosine_run_names_the_epoch_and_the_way_to_keep_its_lr(quickstart_run):
    """The quickstart's cosine spans schedule.epochs: 40 epochs instead of 30 change the LR from epoch 1 on."""
    line = fails(["train", "--resume", quickstart_run, *sets("schedule.epochs=40",
                                                              "schedule.final_compressed_epochs=18")])
    assert "epoch 1, already trained at LR 0.0498" in line and "--set optim.cosine_epochs=30 keeps it" in line
