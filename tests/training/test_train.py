"""Training end to end: the quickstart (the README's done-when), its run dir, best checkpoints and summary; the other
modes the README promises (GMP, a constant LR, 2:4 with layers left dense by rule); --force, the default run dir,
and a run stopped by a failed write that resumes identically with changed locations and runtime knobs."""

import re
import shutil

import pytest
import torch
from cli_helpers import (
    PINNED,
    QUIET,
    assert_same_run,
    fails,
    invoke,
    invoke_json,
    sets,
    short_schedule,
    shows,
    squash,
    trained,
)
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from acdc_cli.files.checkpoint import load_checkpoint
from acdc_cli.files.jsonio import read_jsonl
from acdc_cli.models import create
from acdc_cli.sparsity import masks as M
from acdc_cli.sparsity.rules import prunable_modules
from acdc_cli.sparsity.schedule import gmp_sparsity
from acdc_cli.training.checkpoints import state_path

# the quickstart CNN: every conv and linear weight (the README's 90 % are of these)
QUICKSTART_PRUNABLE = 98_848


def _prunable_names() -> list[str]:
    return [f"{n}.weight" for n, _ in prunable_modules(create("digits-cnn", num_classes=10))]


def test_quickstart_reaches_accuracy_and_sparsity(quickstart_run):
    rows = read_jsonl(quickstart_run / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == list(range(30))
    assert rows[-1]["phase"] == "sparse" and rows[-1]["val_top1"] >= 0.95
    assert max(r["val_top1"] for r in rows if r["phase"] == "dense") >= 0.97
    required = {"epoch", "phase", "sparsity", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5",
                "mask_change", "img_per_s"}
    assert all(required <= set(r) for r in rows)


def test_best_sparse_file_holds_90_percent_zeros(quickstart_run):
    tensors = load_file(quickstart_run / "best_sparse.safetensors")
    names = _prunable_names()
    zeros = sum(int((tensors[n] == 0).sum()) for n in names)
    total = sum(tensors[n].numel() for n in names)
    assert total == QUICKSTART_PRUNABLE and zeros == M.pruned_count(total, 0.9)
    # every mask is stored, as uint8, and the weights obey it
    for n in names:
        mask = tensors[f"mask.{n}"]
        assert mask.dtype == torch.uint8
        assert torch.count_nonzero(tensors[n][mask == 0]) == 0


def test_best_checkpoints_hold_the_best_epochs(quickstart_run):
    """best_sparse is the compressed epoch at full target sparsity with the highest val top-1 (the first of equals),
    best_dense the dense epoch with the highest; each file holds that epoch's row and epoch count."""
    rows = read_jsonl(quickstart_run / "metrics.jsonl")
    candidates = {
        "best_sparse": [r for r in rows if r["phase"] == "sparse" and r["target_sparsity"] == 0.9],
        "best_dense": [r for r in rows if r["phase"] == "dense"],
    }
    for name, pool in candidates.items():
        best = max(pool, key=lambda r: r["val_top1"])  # max() keeps the first of equals, as training does
        ckpt = load_checkpoint(quickstart_run / f"{name}.safetensors")
        assert ckpt.metrics == best, name
        assert ckpt.epoch == best["epoch"] + 1  # epochs completed
    # the last checkpoint is the final epoch, which here is not the best sparse one unless it ties
    assert load_checkpoint(quickstart_run / "last.safetensors").metrics == rows[-1]


def test_phases_in_metrics_match_dry_run(quickstart_run):
    phases = invoke_json("train", "--dry-run")["phases"]
    expected = {e: p["kind"] for p in phases for e in range(p["start"], p["end"])}
    rows = read_jsonl(quickstart_run / "metrics.jsonl")
    assert {r["epoch"]: r["phase"] for r in rows} == expected
    for r in rows:
        if r["phase"] == "sparse":
            assert r["sparsity"] == pytest.approx(M.pruned_count(QUICKSTART_PRUNABLE, 0.9) / QUICKSTART_PRUNABLE,
                                                  abs=1e-12)


def test_tensorboard_events_hold_every_epoch(quickstart_run):
    """Grouped tags on the step axis: the quickstart's 1,257 training digits are 19 full batches of 64, so epoch e's
    row is at step 19 (e + 1); train/loss gets its point at each epoch's end (log.every_steps 50 > 19): the epoch's
    mean."""
    acc = EventAccumulator(str(quickstart_run / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("val/top1", "train/loss", "sparsity/overall", "train/lr", "perf/img_per_s"):
        assert tag in tags
    rows = read_jsonl(quickstart_run / "metrics.jsonl")
    assert [e.step for e in acc.Scalars("val/top1")] == [19 * (e + 1) for e in range(30)]
    assert [e.value for e in acc.Scalars("val/top1")] == pytest.approx([r["val_top1"] for r in rows])
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([r["train_loss"] for r in rows], rel=1e-6)
    assert {t for t in tags if t.startswith("sparsity/layer/")} == {f"sparsity/layer/{n}" for n in _prunable_names()}


def test_run_dir_contents_and_metadata(quickstart_run):
    for name in ("config.toml", "last.safetensors", "best_sparse.safetensors", "best_dense.safetensors",
                 "metrics.jsonl", state_path(quickstart_run).name):
        assert (quickstart_run / name).is_file()
    assert not list(quickstart_run.glob(".*.tmp"))
    ckpt = load_checkpoint(quickstart_run / "best_dense.safetensors")
    assert ckpt.arch == "digits-cnn" and ckpt.phase == "dense" and not ckpt.masks
    assert ckpt.config["sparsity"]["target"] == 0.9 and ckpt.metrics["val_top1"] >= 0.97


def test_summary_panel_reports_the_run(quickstart_run):
    """The panel the quickstart ends with: best sparse and dense accuracy with their epochs and test accuracy, the
    final sparsity, the files written and the TensorBoard command (README, Quickstart)."""
    printed = squash((quickstart_run.parent / "stdout.txt").read_text())
    rows = read_jsonl(quickstart_run / "metrics.jsonl")
    for label, name in (("best sparse", "best_sparse"), ("best dense", "best_dense")):
        best = load_checkpoint(quickstart_run / f"{name}.safetensors").metrics
        found = re.search(rf"{label} ?: val top-1 ([0-9.]+) \(epoch (\d+)\), test top-1 ([0-9.]+)", printed)
        assert found, (label, printed[-1500:])
        assert float(found.group(1)) == pytest.approx(best["val_top1"], abs=5e-5)
        assert int(found.group(2)) == best["epoch"] and 0.9 <= float(found.group(3)) <= 1.0
    final = M.pruned_count(QUICKSTART_PRUNABLE, 0.9) / QUICKSTART_PRUNABLE
    assert f"final sparsity: {final:.4f} of prunable weights" in printed and f"{rows[-1]['sparsity']:.4f}" in printed
    files = re.search(r"files: ([\w., ]+?) ?[│|]", printed).group(1).split(", ")  # up to the panel's border
    assert set(files) == {"best_dense.safetensors", "best_sparse.safetensors", "config.toml", "last.safetensors",
                          state_path(quickstart_run).name, "metrics.jsonl", "tb"}
    assert shows(f"tensorboard --logdir {quickstart_run / 'tb'}", printed)
    # one row per epoch before the panel
    assert len(re.findall(r"^\s*\d+ +(dense|sparse) ", (quickstart_run.parent / "stdout.txt").read_text(),
                          flags=re.M)) == 30


def test_existing_run_dir_is_not_overwritten(quickstart_run):
    before = (quickstart_run / "metrics.jsonl").read_bytes()
    assert "not empty" in fails(["train", "--out", quickstart_run])
    assert (quickstart_run / "metrics.jsonl").read_bytes() == before


def test_force_overwrites_a_run_and_leaves_nothing_of_it(quickstart_run, tmp_path):
    """--force on a finished AC/DC run: the new (dense, one-epoch) run's files replace it; files the new run does
    not write (best_sparse, the previous state, TensorBoard events) are gone, files acdc never writes are kept."""
    run = shutil.copytree(quickstart_run, tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    result = invoke("train", "--out", run, "--force", *PINNED, *QUIET,
                    *sets("schedule.method=dense", "schedule.epochs=1"))
    assert result.exit_code == 0, result.output
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [0]
    assert not (run / "best_sparse.safetensors").exists() and not (run / "tb").exists()
    assert list(run.glob("last.state*.pt")) == [state_path(run)]
    assert load_checkpoint(run / "last.safetensors").epoch == 1 and (run / "notes.txt").read_text() == "mine"
    assert 'method = "dense"' in (run / "config.toml").read_text()


def test_default_run_dir_is_preset_and_timestamp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    summary = invoke_json("train", *PINNED, *QUIET, *sets("schedule.method=dense", "schedule.epochs=1"))
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and re.fullmatch(r"quickstart-\d{8}-\d{6}", runs[0].name)
    assert (tmp_path / summary["run_dir"]).resolve() == runs[0].resolve()
    assert (runs[0] / "last.safetensors").is_file()
    assert next(iter(summary)) == "schema" and summary["schema"] == "acdc.train/1"


def test_gmp_run_follows_the_cubic_ramp(tmp_path):
    """schedule.method = "gmp": dense until gmp_start_epoch, then masks recomputed every prune_every epochs along
    the cubic ramp from sparsity.initial to sparsity.target, held at the target from gmp_end_epoch on; every
    epoch's measured sparsity is the exact count of its step of the ramp."""
    run = tmp_path / "run"
    summary = invoke_json("train", "--out", run, *PINNED, *QUIET, *sets(
        "schedule.method=gmp", "schedule.epochs=5", "schedule.gmp_start_epoch=1", "schedule.gmp_end_epoch=4",
        "schedule.prune_every=2", "sparsity.initial=0.3"))
    rows = read_jsonl(run / "metrics.jsonl")
    # masks recomputed at epochs 1, 3 (every 2) and 4 (the end of the ramp); held in between and after
    ramp = {1: 0.3, 3: round(gmp_sparsity(3, 1, 4, 0.3, 0.9), 6), 4: 0.9}
    assert ramp[3] == pytest.approx(0.9 - 0.6 / 27)
    targets = [0.0, ramp[1], ramp[1], ramp[3], ramp[4]]
    assert [r["phase"] for r in rows] == ["dense"] + ["sparse"] * 4
    assert [r["target_sparsity"] for r in rows] == targets
    assert [r["sparsity"] for r in rows] == pytest.approx(
        [M.pruned_count(QUICKSTART_PRUNABLE, t) / QUICKSTART_PRUNABLE for t in targets], abs=1e-12)
    best = load_checkpoint(run / "best_sparse.safetensors")
    assert best.metrics == rows[4] and summary["best_sparse"]["epoch"] == 4  # the only epoch at the target
    zeros = sum(int((best.weights[n] == 0).sum()) for n in _prunable_names())
    assert zeros == M.pruned_count(QUICKSTART_PRUNABLE, 0.9)


def test_constant_lr_and_2_4_run_leave_the_stem_dense_by_rule(tmp_path):
    """optim.lr_schedule = "constant" keeps the LR at optim.lr every epoch; a 2:4 run says which layers its rules
    leave dense and why, and holds 2 of every 4 input channels in the others."""
    run = tmp_path / "run"
    result = invoke("train", "--out", run, *short_schedule(
        3, 0, 1, 1, 1, 0, "optim.lr_schedule=constant", "optim.lr=0.03", 'sparsity.structure="2:4"'))
    assert result.exit_code == 0, result.output
    assert shows("left dense by rule: features.0 (input channels not a multiple of 4)", result.stdout)
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["lr"] for r in rows] == [0.03, 0.03, 0.03]
    ckpt = load_checkpoint(run / "last.safetensors")
    assert "features.0.weight" not in ckpt.masks and len(ckpt.masks) == len(_prunable_names()) - 1
    for name, mask in ckpt.masks.items():
        groups = mask.permute(0, 2, 3, 1) if mask.dim() == 4 else mask
        assert torch.all(groups.reshape(*groups.shape[:-1], -1, 4).sum(-1) == 2), name
        assert torch.count_nonzero(ckpt.weights[name][~mask]) == 0, name


# 10 epochs: dense 0-1, compressed 2-3, decompressed 4-5, compressed 6-7, final compressed 8-9
SHORT = short_schedule(10, 2, 2, 2, 2, 0, "model.dropout=0.3")


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    return trained(tmp_path_factory, "whole", *SHORT)


def test_a_run_stopped_by_a_failed_write_resumes_identically_with_new_locations_and_knobs(whole_run, tmp_path):
    """The 6th last.safetensors write (after row 5, the end of a decompressed phase) fails as on a full disk: one
    line, exit 2, the checkpoint after row 4 intact. The resume changes what the README lets a resume change
    (data.dir, data.num_workers, data.eval_batch_size, log.*, runtime.* but the seed), re-runs row 5 and recomputes
    the masks of the compressed phase after it, and ends where the uninterrupted run did: the same weights, masks
    and metrics (val_loss to float rounding: another eval batch size sums the losses in another order)."""
    broken = tmp_path / "broken"
    line = fails(["train", "--out", broken, *SHORT], env={"_ACDC_TEST_FAULT": "fail@write:6:last.safetensors"})
    assert "cannot write" in line and "last.safetensors" in line and "No space left on device" in line
    assert load_checkpoint(broken / "last.safetensors").epoch == 5

    resumed = invoke("train", "--resume", broken, "--data-dir", tmp_path, *sets(
        "data.num_workers=1", "data.eval_batch_size=50", "log.tensorboard=true", "log.per_layer=false",
        "runtime.checkpoint_every_steps=7"))
    assert resumed.exit_code == 0, resumed.output
    assert (broken / "tb").is_dir() and f'dir = "{tmp_path}"' in (broken / "config.toml").read_text()
    assert_same_run(whole_run, broken, approx={"val_loss"})


@pytest.fixture(scope="module")
def six_epochs(tmp_path_factory):
    return trained(tmp_path_factory, "six", *short_schedule(6, 2, 1, 1, 2))


def test_resume_refuses_changed_schedule_env_and_seed(six_epochs):
    saved = (six_epochs / "config.toml").read_text()
    assert "optim.lr" in fails(["train", "--resume", six_epochs, "--set", "optim.lr=0.5"])
    assert "schedule.epochs" in fails(["train", "--resume", six_epochs], env={"ACDC_SCHEDULE__EPOCHS": "14"})
    assert "runtime.seed" in fails(["train", "--resume", six_epochs, "--seed", "7"])
    assert (six_epochs / "config.toml").read_text() == saved
