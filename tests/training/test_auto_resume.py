"""``acdc train --auto-resume --out DIR``: one command line that starts a run, continues it after a stop (the checks
of --resume) and refuses what is not this run, so that torchrun restarts, requeued jobs and people can all rerun it.
A signal's stop (SIGTERM, SIGUSR1 as SLURM sends it, SIGINT) writes a checkpoint and exits 75 under auto-resume.
Signals come at exact steps through the test hook ``_ACDC_TEST_SIGNAL``."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import assert_same_run, fails, invoke, short_schedule, shows, trained

from acdc_cli.config import load_settings
from acdc_cli.errors import AcdcError
from acdc_cli.files.checkpoint import load_checkpoint
from acdc_cli.files.jsonio import read_jsonl
from acdc_cli.training import start

# 3 short epochs (batches of 112 digits) of the default model, dropout on: resumed steps must redraw it exactly
RUN = short_schedule(3, 1, 1, 1, 1, 0, "data.batch_size=112", "model.dropout=0.3")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return trained(tmp_path_factory, "reference", *RUN)


def test_the_same_command_starts_stops_continues_and_ends_like_an_uninterrupted_run(tmp_path, reference):
    """SIGUSR1 after step 5 of epoch 1: a mid-epoch checkpoint and exit 75; the same command line then continues
    from that step and ends bit-identical to the run that never stopped; once more, it trains nothing."""
    run_dir = tmp_path / "run"
    command = ["train", "--auto-resume", "--out", run_dir, *RUN]
    first = invoke(*command, env={"_ACDC_TEST_SIGNAL": "SIGUSR1@epoch=1,step=5"})
    assert first.exit_code == start.STOPPED_EXIT_CODE == 75, first.output
    assert shows("stopped by SIGUSR1: checkpoint written at epoch 1, step 5", first.stdout)
    ckpt = load_checkpoint(run_dir / "last.safetensors")
    assert (ckpt.epoch, ckpt.extra["step"]) == (1, 5)

    again = invoke(*command)
    assert again.exit_code == 0, again.output
    assert_same_run(reference, run_dir)
    assert [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [0, 1, 2]

    finished = (run_dir / "last.safetensors").read_bytes()
    done = invoke(*command)
    assert done.exit_code == 0, done.output
    assert shows(f"note: {run_dir} has trained all 3 epochs of its plan; nothing to train", done.stdout)
    assert (run_dir / "last.safetensors").read_bytes() == finished
    # its config.toml records auto_resume = true: a person's --resume still continues it as ever
    resumed = invoke("train", "--resume", run_dir)
    assert resumed.exit_code == 0 and shows("nothing to train", resumed.stdout), resumed.output


def test_an_extension_is_continued_and_other_changes_are_refused(tmp_path, reference):
    """The run dir of a finished 3-epoch run: a command for 4 epochs (a legal extension) continues it; a changed
    seed or model is refused with --resume's own one line, and nothing is written."""
    run_dir = tmp_path / "run"
    assert invoke("train", "--auto-resume", "--out", run_dir, *RUN).exit_code == 0
    before = (run_dir / "last.safetensors").read_bytes()
    line = fails(["train", "--auto-resume", "--out", run_dir, *RUN, "--seed", "1"])
    assert line.startswith("error: cannot change runtime.seed when resuming (0 in ")
    line = fails(["train", "--auto-resume", "--out", run_dir, *RUN, "--set", "model.dropout=0.1"])
    assert line.startswith("error: cannot change model.dropout when resuming (0.3 in ")
    assert (run_dir / "last.safetensors").read_bytes() == before

    longer = invoke("train", "--auto-resume", "--out", run_dir, *RUN, "--set", "schedule.epochs=4",
                    "--set", "schedule.final_compressed_epochs=2", "--set", "optim.cosine_epochs=3")
    assert longer.exit_code == 0, longer.output
    assert [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [0, 1, 2, 3]


def test_a_run_that_stopped_before_its_first_checkpoint_starts_again(tmp_path, reference):
    """What a kill in epoch 0 leaves (config.toml, a torn metrics line, no checkpoint) is this run's: started again
    from scratch, it ends as the uninterrupted run. The same leftovers of other settings are refused."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    settings = load_settings(overrides=[v for i, v in enumerate(RUN) if RUN[i - 1] == "--set"],
                             flags={"runtime.device": "cpu"})
    (run_dir / "config.toml").write_text(settings.model_copy(update={"runtime": settings.runtime.model_copy(
        update={"seed": 7})}).to_toml())
    (run_dir / "metrics.jsonl").write_text('{"epoch": 0, "tor')
    line = fails(["train", "--auto-resume", "--out", run_dir, *RUN])
    assert line == (f"error: {run_dir} holds a run started with runtime.seed = 7 (its {run_dir / 'config.toml'}), "
                    "this command has 0; give another --out, or --force to replace that run")
    assert not (run_dir / "last.safetensors").exists()

    (run_dir / "config.toml").write_text(settings.to_toml())
    result = invoke("train", "--auto-resume", "--out", run_dir, *RUN)
    assert result.exit_code == 0, result.output
    assert_same_run(reference, run_dir)


def test_what_auto_resume_refuses_is_one_line(tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8")
    assert fails(["train", "--auto-resume", "--out", foreign, *RUN]) == (
        f"error: --auto-resume: {foreign} holds files but no acdc run (config.toml); give an empty or new --out")
    assert sorted(p.name for p in foreign.iterdir()) == ["cat.jpg"]
    assert fails(["train", "--auto-resume", *RUN]) == (
        "error: runtime.auto_resume (--auto-resume) needs the run dir: give --out DIR")
    assert fails(["train", "--auto-resume", "--force", "--out", tmp_path / "new", *RUN]) == (
        f"error: --auto-resume decides itself whether {tmp_path / 'new'} starts or continues; drop --force")
    assert not (tmp_path / "new").exists()
    file = tmp_path / "file"
    file.write_text("")
    with pytest.raises(AcdcError, match="exists and is not a folder"):
        start.auto_resume(file, load_settings())


def test_the_environment_setting_is_the_flag(tmp_path):
    """ACDC_RUNTIME__AUTO_RESUME=true (what a job script can export once) acts as --auto-resume."""
    assert start.auto_resume(tmp_path / "missing", load_settings()) == (False, False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".acdc.lock").write_text("")
    assert start.auto_resume(tmp_path / "empty", load_settings()) == (False, False)
    assert load_settings().runtime.auto_resume is False
    line = fails(["train", *RUN], env={"ACDC_RUNTIME__AUTO_RESUME": "true"})
    assert line == "error: runtime.auto_resume (--auto-resume) needs the run dir: give --out DIR"


@pytest.mark.slow  # a process of its own: ~25 s on 2 busy cores (the in-process test above stops on SIGUSR1 too)
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_a_scheduler_signal_to_a_real_process_exits_75_with_a_checkpoint(tmp_path, sig):
    """In a real process (the handlers are installed from its main thread): the signal after step 2 of epoch 0
    stops the run after that step with a checkpoint, and the exit status is 75 for the job script to requeue on."""
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "acdc_cli", "train", "--auto-resume", "--out", str(run_dir), *RUN],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "_ACDC_TEST_SIGNAL": f"{sig}@epoch=0,step=2"})
    assert proc.returncode == 75, proc.stderr
    assert shows(f"stopped by {sig}: checkpoint written at epoch 0, step 2", proc.stdout)
    ckpt = load_checkpoint(run_dir / "last.safetensors")
    assert (ckpt.epoch, ckpt.extra["step"]) == (0, 2)
