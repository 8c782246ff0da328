"""A run can always be resumed. Whatever write of a checkpoint fails (a full disk) or is killed,
and again during the resume's own first save, the run dir keeps a complete (last.safetensors, resume state) pair,
and a resume from it ends bit-identical to a run that never stopped.

Faults come from the test hook ``_ACDC_TEST_FAULT`` at exact writes, never from a wall-clock window; "fail" runs in
this process (fast), "kill" in a subprocess that SIGKILLs itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_same_run, fails, invoke, short_schedule, trained
from faults_helpers import killed_at

from acdc_cli import testing_hooks
from acdc_cli.errors import AcdcError
from acdc_cli.files.checkpoint import Checkpoint, load_checkpoint
from acdc_cli.files.torchfile import save_state
from acdc_cli.training.checkpoints import load_last, save_last, state_path

WRITES = ("write", "rename", "renamed")  # the three points of an atomic write (testing_hooks)
STATE, WEIGHTS = "last.state.*.pt", "last.safetensors"
SAVE_POINTS = [(name, point) for name in (STATE, WEIGHTS) for point in WRITES]


# ----------------------------------------------------------------------------------------------------------------
# save_last / load_last alone: every point of one save, then every point of the next


def _pair(n: int) -> tuple[Checkpoint, dict]:
    """The n-th (weights, state) pair: both carry n, so a test sees which save it got back."""
    ckpt = Checkpoint(weights={"w": torch.full((8,), float(n))}, masks={}, arch="tiny-test", model_kwargs={},
                      config={}, epoch=n, phase="dense")
    return ckpt, {"progress": {"epoch": n, "step": 0}, "n": torch.tensor(n)}


def _save(run_dir: Path, n: int, fault: tuple[str, str] | None, monkeypatch) -> None:
    """Save pair n with ``fault`` (file pattern, point) made a full disk; the failure is the caller's to expect."""
    testing_hooks.reset()
    if fault is None:
        monkeypatch.delenv(testing_hooks.FAULT_ENV, raising=False)
        save_last(run_dir, *_pair(n))
        return
    name, point = fault
    monkeypatch.setenv(testing_hooks.FAULT_ENV, f"fail@{point}:1:{name}")
    with pytest.raises(AcdcError, match="No space left on device"):
        save_last(run_dir, *_pair(n))


def _loaded(run_dir: Path) -> int:
    ckpt, state = load_last(run_dir)
    assert state["progress"]["epoch"] == ckpt.epoch and int(state["n"]) == ckpt.epoch
    assert torch.equal(ckpt.weights["w"], torch.full((8,), float(ckpt.epoch)))
    return ckpt.epoch


def _switched(fault: tuple[str, str] | None) -> bool:
    """Whether a save with this fault still replaced the pair: only once the weights are renamed into place."""
    return fault is None or fault == (WEIGHTS, "renamed")


@pytest.mark.parametrize("first", [None, *SAVE_POINTS], ids=str)
@pytest.mark.parametrize("second", [None, *SAVE_POINTS], ids=str)
def test_a_complete_pair_survives_two_failed_saves_in_a_row(tmp_path, monkeypatch, first, second):
    """Pair 1 is on disk; save 2 fails at ``first``, save 3 (the resume's first) at ``second``: the newest pair whose
    weights were renamed into place loads, whole. A clean save 4 then leaves that pair alone, no other state file."""
    _save(tmp_path, 1, None, monkeypatch)
    _save(tmp_path, 2, first, monkeypatch)
    expected = 2 if _switched(first) else 1
    assert _loaded(tmp_path) == expected
    _save(tmp_path, 3, second, monkeypatch)
    expected = 3 if _switched(second) else expected
    assert _loaded(tmp_path) == expected
    _save(tmp_path, 4, None, monkeypatch)
    assert _loaded(tmp_path) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.safetensors", state_path(tmp_path).name]


def test_the_named_state_missing_or_not_matching_is_one_line(tmp_path, monkeypatch):
    _save(tmp_path, 1, None, monkeypatch)
    paired = state_path(tmp_path)
    save_state(paired, _pair(7)[1])
    with pytest.raises(AcdcError, match=rf"{paired.name} does not hold the progress last.safetensors records "
                                        r"\(epoch 1, step 0\)"):
        load_last(tmp_path)
    paired.unlink()
    with pytest.raises(AcdcError, match=rf"{paired.name}, the resume state last.safetensors names, is missing"):
        load_last(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# acdc train: a failed or killed save, a second one in the resume, then a resume to the end

STEPS = 19  # 1,257 training digits in whole batches of 64
EVERY = 8  # saves per epoch: after steps 8 and 16, and at the end (with best_dense / best_sparse)
# dense 0, sparse 1-2; dropout draws random numbers every step: a resume must draw the same
RUN = short_schedule(3, 1, 1, 1, 1, 0, "data.batch_size=64", "model.dropout=0.3",
                     f"runtime.checkpoint_every_steps={EVERY}")
BEST = "best_dense.safetensors"
FILE_POINTS = [(name, point) for name in (BEST, STATE, WEIGHTS) for point in WRITES]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return trained(tmp_path_factory, "reference", *RUN)


def _fault(action: str, where: tuple[str, str], nth: int) -> str:
    """The hook entry for the nth write of ``where``'s file at its point (best_dense is written once per save that
    writes it)."""
    name, point = where
    return f"{action}@{point}:{1 if name == BEST else nth}:{name}"


def _last(run_dir: Path) -> tuple[int, int]:
    ckpt = load_checkpoint(run_dir / "last.safetensors")
    return ckpt.epoch, ckpt.extra.get("step", 0)


def _after(where: tuple[str, str], before: tuple[int, int], attempted: tuple[int, int]) -> tuple[int, int]:
    """The checkpoint a save that failed at ``where`` leaves as last.safetensors."""
    return attempted if where == (WEIGHTS, "renamed") else before


def _run_with_two_faults(tmp_path: Path, reference: Path, action: str, first: tuple[str, str],
                         second: tuple[str, str]) -> None:
    """A run whose 3rd save (the end of epoch 0, with best_dense) fails or is killed at ``first``; a resume whose
    own first save fails or is killed at ``second``; a resume to the end, bit-identical to ``reference``."""
    run_dir = tmp_path / "run"
    # save 3 of the run is the end of epoch 0; a save that did not switch leaves save 2 (epoch 0, step 16)
    epoch_end, step_16 = (1, 0), (0, 2 * EVERY)
    if action == "fail":
        assert "No space left on device" in fails(["train", "--out", run_dir, *RUN],
                                                  env={testing_hooks.FAULT_ENV: _fault("fail", first, 3)})
    else:
        killed_at(_fault("kill", first, 3), "--out", run_dir, *RUN)
    left = _after(first, step_16, epoch_end)
    assert _last(run_dir) == left
    # the resume's first save: the end of epoch 0 again, or epoch 1's step 8 (no best file: a fault aimed at one
    # then falls on the weights at the same point)
    attempted = epoch_end if left == step_16 else (1, EVERY)
    if second[0] == BEST and attempted != epoch_end:
        second = (WEIGHTS, second[1])
    testing_hooks.reset()  # this process counts writes anew, as the resume's own process would
    if action == "fail":
        assert "No space left on device" in fails(["train", "--resume", run_dir],
                                                  env={testing_hooks.FAULT_ENV: _fault("fail", second, 1)})
    else:
        killed_at(_fault("kill", second, 1), "--resume", run_dir)
    assert _last(run_dir) == _after(second, left, attempted)
    finished = invoke("train", "--resume", run_dir)
    assert finished.exit_code == 0, finished.output
    assert not list(run_dir.glob(".*.tmp")) and list(run_dir.glob("last.state*.pt")) == [state_path(run_dir)]
    assert_same_run(reference, run_dir)


@pytest.mark.parametrize("first,second", [
    ((STATE, "write"), (WEIGHTS, "write")),  # a full disk: the state half-written, then the weights
    ((BEST, "renamed"), (WEIGHTS, "rename")),
    ((WEIGHTS, "renamed"), (STATE, "renamed")),
], ids=str)
def test_two_failed_saves_then_a_resume_end_as_the_uninterrupted_run(tmp_path, reference, first, second):
    _run_with_two_faults(tmp_path, reference, "fail", first, second)


@pytest.mark.slow  # a long end-to-end run: the slow pass, which CI runs
def test_two_kills_inside_saves_then_a_resume_end_as_the_uninterrupted_run(tmp_path, reference):
    """Killed with the new state complete but not yet renamed, then killed in the resume with the new state in place
    and the weights half-written: the torn temporary files are left, and neither pair is lost."""
    _run_with_two_faults(tmp_path, reference, "kill", (STATE, "rename"), (WEIGHTS, "write"))


@pytest.mark.slow
@pytest.mark.parametrize("first", FILE_POINTS, ids=str)
@pytest.mark.parametrize("second", FILE_POINTS, ids=str)
def test_every_pair_of_failed_saves(tmp_path, reference, first, second):
    _run_with_two_faults(tmp_path, reference, "fail", first, second)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(FILE_POINTS)))
def test_every_kill_point_then_a_kill_in_the_resume(tmp_path, reference, index):
    """A kill at each point of the epoch-end save, and one at a different point of the resume's first save."""
    first, second = FILE_POINTS[index], FILE_POINTS[(index + 4) % len(FILE_POINTS)]
    _run_with_two_faults(tmp_path, reference, "kill", first, second)


# ----------------------------------------------------------------------------------------------------------------
# the same on a real full disk


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="mounting a tmpfs needs root")
def test_a_full_disk_twice_then_room_again_resumes(tmp_path, reference):
    """A 1,400 KiB tmpfs holds the config, a checkpoint pair and little more: the run fails (ENOSPC), its resume
    fails again while the disk is still full, and after the disk grows the resume ends as the reference."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1400k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        run_dir = disk / "run"
        train = [sys.executable, "-m", "acdc_cli", "train"]
        full = subprocess.run([*train, "--out", str(run_dir), *RUN], capture_output=True, text=True, timeout=900)
        assert full.returncode == 2 and "No space left on device" in full.stderr, full.stderr[-2000:]
        again = subprocess.run([*train, "--resume", str(run_dir)], capture_output=True, text=True, timeout=900)
        assert again.returncode == 2 and "No space left on device" in again.stderr, again.stderr[-2000:]
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        resumed = subprocess.run([*train, "--resume", str(run_dir)], capture_output=True, text=True, timeout=900)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert_same_run(reference, run_dir)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
