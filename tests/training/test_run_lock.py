"""One process writes a run dir at a time. A second `acdc train --out X` (or --resume X, or
--force X) while another process holds X is refused with one line naming the holder's PID, before anything in X is
written or deleted. Synchronised by what the processes print and by the lock itself, never by sleeping."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import PINNED, QUIET, fails, invoke, sets

from acdc_cli.training.rundir import LOCK_FILE, run_lock

ONE_EPOCH = [*PINNED, *QUIET, *sets("schedule.method=dense", "schedule.epochs=1")]


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LOCK_FILE}


def in_use_by(pid: int) -> str:
    return f"is in use by another acdc process (PID {pid}, holding {LOCK_FILE})"


@pytest.fixture
def finished_run(tmp_path) -> Path:
    run_dir = tmp_path / "run"
    result = invoke("train", "--out", run_dir, *ONE_EPOCH)
    assert result.exit_code == 0, result.output
    return run_dir


def test_a_held_run_dir_refuses_out_resume_force_and_nproc(finished_run, tmp_path):
    """Held by this process (flock locks belong to an open file, so the CLI's own open of the lock file competes
    like another process's would): every command that writes the run dir is refused, and nothing in it changes;
    once released, the same commands go on."""
    fresh = tmp_path / "fresh"
    before = contents(finished_run)
    with run_lock(finished_run), run_lock(fresh):
        assert (finished_run / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        for args in (["--out", fresh], ["--resume", finished_run], ["--out", finished_run, "--force"],
                     ["--nproc", "1", "--out", finished_run, "--force"]):
            line = fails(["train", *args, *([] if "--resume" in args else ONE_EPOCH)])
            assert in_use_by(os.getpid()) in line, (args, line)
        assert contents(finished_run) == before and contents(fresh) == {}
    resumed = invoke("train", "--resume", finished_run)
    assert resumed.exit_code == 0, resumed.output
    fresh_run = invoke("train", "--out", fresh, *ONE_EPOCH)
    assert fresh_run.exit_code == 0, fresh_run.output


def test_a_lock_file_left_by_a_killed_run_is_no_obstacle(tmp_path):
    """A run killed before its first file leaves only the lock file: the folder still counts as empty, and the lock
    of a process that is gone is free."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).write_text("999999\n")
    result = invoke("train", "--out", run_dir, *ONE_EPOCH)
    assert result.exit_code == 0, result.output
    assert (run_dir / "last.safetensors").is_file()


@pytest.mark.slow  # a long end-to-end run: the slow pass, which CI runs
def test_two_training_processes_never_share_a_run_dir(tmp_path):
    """The case that matters: a run is training in one process; a second `train --out` of the same folder, in another
    process, is refused naming the first one's PID and leaves the folder as the first run writes it. The first run,
    stopped by SIGTERM, resumes to its end."""
    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "acdc_cli", "train", "--out", str(run_dir), *PINNED, *QUIET],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        # the first epoch row: the first run holds the lock and is training
        for line in first.stdout:
            if re.match(r"\s*0\s+dense\s", line):
                break
        else:
            pytest.fail(f"the first run ended early: {first.wait()} {first.stderr.read()[-2000:]}")
        config = (run_dir / "config.toml").read_bytes()
        line = fails(["train", "--out", run_dir, "--force", *PINNED, *QUIET, *sets("schedule.method=dense")])
        assert in_use_by(first.pid) in line
        assert (run_dir / "config.toml").read_bytes() == config and (run_dir / "metrics.jsonl").is_file()
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=600) == 0, first.stderr.read()[-2000:]
    finally:
        first.kill()
        first.communicate()
    resumed = invoke("train", "--resume", run_dir)
    assert resumed.exit_code == 0, resumed.output


def test_a_run_that_fails_before_it_starts_leaves_no_folder_behind(tmp_path):
    """A new run dir (and the parents made for it) goes again when the run fails before writing anything; a folder
    that was there, or one something else was written into, stays."""
    missing_data = ["--set", "data.name=cifar10", "--set", "model.name=resnet20", "--data-dir", tmp_path / "no-cifar"]
    assert "CIFAR-10 not found" in fails(["train", "--out", tmp_path / "runs" / "a" / "b", *missing_data])
    assert not (tmp_path / "runs").exists()
    (tmp_path / "kept").mkdir()
    fails(["train", "--out", tmp_path / "kept" / "run", *missing_data])
    assert (tmp_path / "kept").is_dir() and list((tmp_path / "kept").iterdir()) == []
    with pytest.raises(RuntimeError):
        with run_lock(tmp_path / "other"):
            (tmp_path / "other" / "note.txt").write_text("written")
            raise RuntimeError("after a file was written")
    assert (tmp_path / "other" / "note.txt").read_text() == "written"
