"""Preemption: SIGTERM/SIGINT finish the step, write a checkpoint, print how to resume and exit 0; a second signal
exits at once with 130, and so does Ctrl-C outside training; under a process group every rank agrees to stop after
the same step. Signals arrive at exact steps through the test hook ``_ACDC_TEST_SIGNAL`` (see
acdc_cli.testing_hooks), never after a sleep."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from cli_helpers import assert_same_run, invoke, short_schedule, shows, trained

from acdc_cli.files.checkpoint import load_checkpoint
from acdc_cli.files.jsonio import read_jsonl
from acdc_cli.training import preemption
from acdc_cli.training.checkpoints import state_path
from acdc_cli.training.preemption import DUPLICATE_WINDOW_S, StopSignal, reduce_int

# 3 epochs (dense, sparse, dense... see short_schedule) of 78 steps (whole batches of 16)
RUN = short_schedule(3, 1, 1, 1, 1, 0, "data.batch_size=16", "model.dropout=0.3")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return trained(tmp_path_factory, "reference", *RUN)


def test_signals_stop_with_a_checkpoint_exit_0_and_resume_exactly(tmp_path, reference):
    """SIGINT (Ctrl-C) at the end of epoch 0 and, in the resumed run, SIGTERM after step 5 of epoch 1: each stops
    with a checkpoint where it came, exits 0 and prints the resume command; the second resume ends bit-identical
    to the run that never stopped."""
    run_dir = tmp_path / "run"
    first = invoke("train", "--out", run_dir, *RUN, env={"_ACDC_TEST_SIGNAL": "SIGINT@epoch=0,step=end"})
    assert first.exit_code == 0, first.output
    assert shows(f"stopped by SIGINT: checkpoint written at epoch 1, step 0 ({run_dir / 'last.safetensors'})",
                 first.stdout)
    assert shows(f"resume with: acdc train --resume {run_dir}", first.stdout)
    assert (load_checkpoint(run_dir / "last.safetensors").epoch, len(read_jsonl(run_dir / "metrics.jsonl"))) == (1, 1)

    second = invoke("train", "--resume", run_dir, env={"_ACDC_TEST_SIGNAL": "SIGTERM@epoch=1,step=5"})
    assert second.exit_code == 0, second.output
    assert shows("stopped by SIGTERM: checkpoint written at epoch 1, step 5", second.stdout)
    ckpt = load_checkpoint(run_dir / "last.safetensors")
    assert (ckpt.epoch, ckpt.extra["step"]) == (1, 5)  # inside epoch 1, after exactly the step it came at
    assert [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [0]

    resumed = invoke("train", "--resume", run_dir)
    assert resumed.exit_code == 0, resumed.output
    assert_same_run(reference, run_dir)


def test_second_signal_exits_at_once_with_130(tmp_path):
    """SIGTERM and then SIGINT at the same step, in a real process: exit status 130, "interrupted", no resume
    command, and the checkpoint written before (step 2) is whole."""
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "acdc_cli", "train", "--out", str(run_dir), *RUN,
                           "--set", "runtime.checkpoint_every_steps=2"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "_ACDC_TEST_SIGNAL": "SIGTERM@epoch=0,step=3;SIGINT@epoch=0,step=3"})
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip() == "interrupted" and "resume with" not in proc.stdout
    ckpt = load_checkpoint(run_dir / "last.safetensors")
    assert (ckpt.epoch, ckpt.extra["step"]) == (0, 2)


def test_ctrl_c_outside_training_exits_130(quickstart_run, monkeypatch):
    """A real SIGINT while `acdc inspect` works: no training, so Python's own handler raises KeyboardInterrupt (it
    is installed here, as Python does at the start of `acdc ...` in a terminal; a test run started in the
    background of a shell inherits SIGINT ignored)."""
    from acdc_cli.commands import inspect_file as inspect_mod

    monkeypatch.setattr(inspect_mod, "inspect_file", lambda *a, **k: signal.raise_signal(signal.SIGINT))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = invoke("inspect", quickstart_run / "last.safetensors")
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt escaped the CLI")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert result.exit_code == 130 and result.stderr.strip() == "interrupted" and result.stdout == ""


def test_stop_signal_flag_then_keyboard_interrupt_and_handlers_restored():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with StopSignal() as stop:
        assert not stop.should_stop(0, 1)
        signal.raise_signal(signal.SIGTERM)  # the handler has run when this returns
        assert stop.should_stop(0, 1) and stop.name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert {sig: signal.getsignal(sig) for sig in before} == before
    assert reduce_int(7, "min") == 7  # no process group: the value itself


def test_same_signal_twice_at_once_is_one_request(monkeypatch):
    """Ctrl-C under --nproc: the terminal and torchrun both deliver SIGINT to each rank within milliseconds. The
    duplicate window is measured on a fake clock, so the test does not depend on how fast the machine is."""
    now = [1000.0]
    monkeypatch.setattr(preemption, "time", SimpleNamespace(monotonic=lambda: now[0]))
    with StopSignal() as stop:
        signal.raise_signal(signal.SIGINT)
        now[0] += 0.01
        signal.raise_signal(signal.SIGINT)
        assert stop.should_stop(0, 1) and stop.name == "SIGINT"
        now[0] += DUPLICATE_WINDOW_S
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)


def test_signal_hook_syntax_and_errors():
    from acdc_cli.testing_hooks import HookSyntaxError, parse_signals

    first, second = parse_signals("SIGTERM@epoch=2,step=3 ; SIGINT@epoch=0,step=end,rank=1,to=parent")
    assert (first.signum, first.epoch, first.step, first.rank, first.to_parent) == (signal.SIGTERM, 2, 3, None, False)
    assert (second.signum, second.epoch, second.step, second.rank, second.to_parent) == (signal.SIGINT, 0, None, 1,
                                                                                          True)
    for bad in ("SIGTERM", "SIGFOO@epoch=1,step=1", "SIGTERM@epoch=1", "SIGTERM@epoch=1,step=0",
                "SIGTERM@epoch=1,step=2,to=child", "SIGTERM@epoch=1,step=2,when=now"):
        with pytest.raises(HookSyntaxError, match="_ACDC_TEST_SIGNAL"):
            parse_signals(bad)


def test_planned_signal_fires_at_the_epoch_and_step_the_loop_passes(monkeypatch):
    """The hook matches the (epoch, step) handed to should_stop, nothing read from the caller's frames: the same
    step of another epoch, or the epoch-end check, does not fire it; it fires once."""
    monkeypatch.setenv("_ACDC_TEST_SIGNAL", "SIGTERM@epoch=1,step=3;SIGINT@epoch=2,step=end")
    epoch = 2  # a local named `epoch` that disagrees with what the loop passes
    with StopSignal() as stop:
        assert not stop.should_stop(0, 3) and not stop.should_stop(1, 2) and not stop.should_stop(1)
        assert stop.should_stop(1, 3) and stop.name == "SIGTERM"
    with StopSignal() as stop:
        assert not stop.should_stop(epoch, 3) and not stop.should_stop(1)
        assert stop.should_stop(epoch) and stop.name == "SIGINT"


RANK_SCRIPT = """
import json, signal, sys
import torch.distributed as dist
from acdc_cli.training import distributed
from acdc_cli.training.preemption import StopSignal, reduce_int

rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
with StopSignal(sync_every=5) as stop:
    before = stop.should_stop(0, 5)
    if rank == 1:
        signal.raise_signal(signal.SIGTERM)
    answers = [stop.should_stop(0, step) for step in (6, 9, 10)] + [stop.should_stop(0)]
low = reduce_int(10 + rank, "min")
print(json.dumps({"received": stop.name, "before": before, "answers": answers, "min": low}))
distributed.teardown()
"""


def test_ranks_agree_to_stop_when_one_rank_gets_the_signal(tmp_path):
    """Two gloo ranks: only rank 1 gets SIGTERM; both stop at the next agreement step (10), neither before."""
    store = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(rank), str(store)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert [r["received"] for r in results] == [None, "SIGTERM"]
    for r in results:
        assert r["before"] is False
        assert r["answers"] == [False, False, True, True]
        assert r["min"] == 10


@pytest.mark.slow
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="--nproc 2 on the CPU needs two cores")
def test_sigterm_to_the_launcher_under_nproc_2_agrees_and_resume_is_exact(tmp_path):
    """Three two-rank runs through `acdc train --nproc 2` (slow: about 25 s on 2 idle cores). After step 3 of
    epoch 1, rank 0 sends SIGTERM to the launcher, as a scheduler would, and waits until the launcher has passed it
    on to it; both ranks then stop after the next agreement step (10), rank 0 writes a mid-epoch checkpoint with
    both ranks' sums, the launcher exits 0, and `--nproc 2 --resume` ends bit-identical to an uninterrupted
    two-rank run."""
    run_dir, reference = tmp_path / "run", tmp_path / "reference"
    ddp = ["--nproc", "2", *RUN]
    train = [sys.executable, "-m", "acdc_cli", "train"]
    stopped = subprocess.run([*train, "--out", str(run_dir), *ddp], capture_output=True, text=True, timeout=900,
                             env={**os.environ, "_ACDC_TEST_SIGNAL": "SIGTERM@epoch=1,step=3,rank=0,to=parent"})
    assert stopped.returncode == 0, stopped.stderr[-3000:]  # the launcher knows the ranks stopped cleanly
    assert shows(f"resume with: acdc train --resume {run_dir}", stopped.stdout), stopped.stderr[-3000:]
    ckpt = load_checkpoint(run_dir / "last.safetensors")
    assert (ckpt.epoch, ckpt.extra["step"]) == (1, 10)
    assert len(torch.load(state_path(run_dir), weights_only=True)["totals"]) == 2

    resumed = subprocess.run([*train, "--nproc", "2", "--resume", str(run_dir)], capture_output=True, text=True,
                             timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = subprocess.run([*train, "--out", str(reference), *ddp], capture_output=True, text=True, timeout=900)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert_same_run(reference, run_dir)
