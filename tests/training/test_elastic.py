"""Elastic restarts, for real: two torchrun agents on this host (``--nnodes 2 --nproc-per-node 1``, a c10d
rendezvous, gloo) run ``acdc train --auto-resume --out DIR`` with ``--max-restarts``. A worker is SIGKILLed in the
middle of the run (rank 0 between checkpoint writes and inside one, rank 1 between them); torchrun restarts the
group, every new rank continues from the last complete checkpoint pair, both agents exit 0, metrics.jsonl holds
every epoch once and the checkpoints equal an uninterrupted two-agent run's bit for bit. A worker that dies at every
start ends the job non-zero with its last checkpoint whole (the same command then finishes it).

The faults come from the test hooks (acdc_cli.testing_hooks) at exact steps and writes; a wrapper script hands them
to the first start only (TORCHELASTIC_RESTART_COUNT = 0), so the restarted group runs clean. Slow: each case is one
or two two-agent runs of a few seconds of training, mostly process start-up on 2 cores."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cli_helpers import assert_same_run, short_schedule

from acdc_cli.files.checkpoint import load_checkpoint
from acdc_cli.files.jsonio import read_jsonl
from acdc_cli.training.checkpoints import state_path

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two agents on the CPU need two cores")]

# 3 epochs (dense, sparse, sparse) of 11 steps, a mid-epoch checkpoint every 4 steps, dropout on (drawn from
# seed, epoch, step and rank); every step prints a progress line (the restart is timed from them)
RUN = [*short_schedule(3, 1, 1, 1, 1, 0, "data.batch_size=112", "model.dropout=0.3",
                       "runtime.checkpoint_every_steps=4", "log.progress=true", "log.progress_interval_s=0")]

# the hooks' variables reach the first start only, unless KEEP_FAULTS is set (a worker that dies at every start)
WRAPPER = """\
if [ "${TORCHELASTIC_RESTART_COUNT:-0}" != 0 ] && [ -z "$KEEP_FAULTS" ]; then
    unset _ACDC_TEST_SIGNAL _ACDC_TEST_FAULT
fi
exec "$ACDC_TEST_PYTHON" -m acdc_cli "$@"
"""

PROGRESS = re.compile(r"epoch (\d+)  step (\d+)/")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Agents:
    """Two torchrun agents of one worker each, their output lines kept with the time each arrived."""

    def __init__(self, folder: Path, max_restarts: int, env: dict[str, str], *acdc_args: str):
        wrapper = folder / "acdc.sh"
        wrapper.write_text(WRAPPER)
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                   "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-id", "elastic",
                   "--max-restarts", str(max_restarts), "--no-python", "bash", str(wrapper),
                   "train", "--auto-resume", *acdc_args]
        # as docs/clusters.md says: a fresh store for each round, or a restarted rank may read the address its
        # predecessor published in the shared one and fail to connect (torch's shared rendezvous store has no
        # per-round prefix for the workers' keys)
        env = {**os.environ, "ACDC_TEST_PYTHON": sys.executable, "PYTHONUNBUFFERED": "1",
               "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **env}
        self.lines: list[tuple[float, str]] = []
        self.procs = [subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True, start_new_session=True) for _ in range(2)]
        self.readers = [threading.Thread(target=self._read, args=(p,), daemon=True) for p in self.procs]
        for reader in self.readers:
            reader.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait(self, timeout: float = 900) -> list[int]:
        try:
            codes = [p.wait(timeout=timeout) for p in self.procs]
        finally:
            for p in self.procs:  # a hung agent must not outlive the test: its whole session goes
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            for reader in self.readers:
                reader.join(timeout=10)
        return codes

    def write_log(self, path: Path) -> None:
        """Every line with its arrival time, for a person reading why a case failed or took long."""
        start = self.lines[0][0] if self.lines else 0.0
        path.write_text("".join(f"{t - start:8.2f}  {line}\n" for t, line in self.lines))

    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)[-6000:]

    def steps_run(self, epoch: int, step: int) -> int:
        """How many times the group ran step ``step`` of ``epoch`` (rank 0's progress lines)."""
        wanted = (str(epoch), str(step))
        return sum(1 for _, line in self.lines if (m := PROGRESS.search(line)) and m.groups() == wanted)

    def restart_seconds(self, epoch: int, step: int) -> float:
        """Seconds from the progress line of (epoch, step), after which the worker was killed, to the next
        progress line: the first step of the restarted group."""
        steps = [(t, tuple(map(int, m.groups()))) for t, line in self.lines if (m := PROGRESS.search(line))]
        killed = next(i for i, (_, at) in enumerate(steps) if at == (epoch, step))
        return steps[killed + 1][0] - steps[killed][0]


def _agents(folder: Path, run_dir: Path, env: dict[str, str], max_restarts: int = 2) -> Agents:
    return Agents(folder, max_restarts, env, "--out", str(run_dir), *RUN)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted two-agent run."""
    folder = tmp_path_factory.mktemp("reference")
    agents = _agents(folder, folder / "run", {})
    assert agents.wait() == [0, 0], agents.output()
    return folder / "run"


def _restarted_run_matches(tmp_path: Path, reference: Path, env: dict[str, str]) -> Agents:
    run_dir = tmp_path / "run"
    agents = _agents(tmp_path, run_dir, env)
    try:
        codes = agents.wait()
    finally:
        agents.write_log(tmp_path / "agents.log")
    assert codes == [0, 0], agents.output()
    text = "\n".join(line for _, line in agents.lines)
    assert re.search(r"exitcode\s*:\s*-9", text), f"torchrun saw no worker killed:\n{agents.output()}"
    assert [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [0, 1, 2]
    assert_same_run(reference, run_dir)
    return agents


def test_rank_0_killed_between_checkpoint_writes(tmp_path, reference):
    """SIGKILL to global rank 0 after step 6 of epoch 1 (its checkpoint of step 4 is the last): the restarted group
    goes on from step 4 of epoch 1, mid-epoch sums, loader position and dropout included."""
    agents = _restarted_run_matches(tmp_path, reference, {"_ACDC_TEST_SIGNAL": "SIGKILL@epoch=1,step=6,rank=0"})
    assert [agents.steps_run(1, s) for s in (4, 5, 6, 7)] == [1, 2, 2, 1]
    print(f"\nrestart cost (rank 0 killed after epoch 1 step 6 -> first new step): "
          f"{agents.restart_seconds(1, 6):.1f} s")


def test_rank_0_killed_inside_a_checkpoint_write(tmp_path, reference):
    """SIGKILL to rank 0 with its fourth last.safetensors (epoch 1, step 4; after steps 4 and 8 and the end of
    epoch 0) complete in its temporary file but not renamed into place: the restarted group continues from the
    previous pair, the end of epoch 0."""
    agents = _restarted_run_matches(tmp_path, reference, {"_ACDC_TEST_FAULT": "kill@rename:4:last.safetensors"})
    assert agents.steps_run(0, 11) == 1 and agents.steps_run(1, 1) == 2


def test_rank_1_killed_between_checkpoint_writes(tmp_path, reference):
    agents = _restarted_run_matches(tmp_path, reference, {"_ACDC_TEST_SIGNAL": "SIGKILL@epoch=2,step=2,rank=1"})
    assert [agents.steps_run(2, s) for s in (1, 2, 3)] == [2, 2, 1]
    print(f"\nrestart cost (rank 1 killed after epoch 2 step 2 -> first new step): "
          f"{agents.restart_seconds(2, 2):.1f} s")


def test_a_worker_dying_more_often_than_max_restarts_ends_the_job_with_its_checkpoint_whole(tmp_path, reference):
    """Rank 0 dies after step 6 of epoch 1 at every start; with --max-restarts 1 the job fails (non-zero) after the
    second death. The last checkpoint pair is whole (epoch 1, step 4) and the same command, without the fault,
    finishes the run as the uninterrupted one."""
    run_dir = tmp_path / "run"
    agents = _agents(tmp_path, run_dir, {"_ACDC_TEST_SIGNAL": "SIGKILL@epoch=1,step=6,rank=0", "KEEP_FAULTS": "1"},
                     max_restarts=1)
    codes = agents.wait()
    assert any(codes), agents.output()
    ckpt = load_checkpoint(run_dir / "last.safetensors")
    assert (ckpt.epoch, ckpt.extra["step"]) == (1, 4)
    assert state_path(run_dir).is_file()

    again = _agents(tmp_path, run_dir, {})
    assert again.wait() == [0, 0], again.output()
    assert_same_run(reference, run_dir)


SRUN = """\
import os, signal, subprocess, sys
# srun's part here: one task per node (all on this host), SIGTERM passed on to every task, the worst exit status
tasks = [subprocess.Popen(sys.argv[1:], env={**os.environ, "SLURM_PROCID": str(i), "SLURM_NODEID": str(i)})
         for i in range(int(os.environ["SLURM_NNODES"]))]
signal.signal(signal.SIGTERM, lambda *_: [t.send_signal(signal.SIGTERM) for t in tasks])
sys.exit(max(t.wait() for t in tasks))
"""

SCONTROL = """\
#!/bin/bash
case "$1" in
    show) echo 127.0.0.1 ;;
    requeue) echo "$2" >> "$REQUEUED" ;;
esac
"""


def _sbatch_script() -> str:
    text = (Path(__file__).resolve().parents[2] / "docs" / "clusters.md").read_text()
    blocks = re.findall(r"^```sbatch\n(.*?)^```", text, re.S | re.M)
    assert len(blocks) == 1
    return blocks[0]


def test_the_sbatch_script_stops_requeues_and_finishes_the_run(tmp_path, reference):
    """clusters.md's sbatch script as written (its rendezvous port made free), under stand-ins for srun (two tasks
    on this host) and scontrol: USR1 to the script once the run has a checkpoint makes every rank stop with one,
    the job requeue itself and the script exit 0; its next start (the same script and arguments) finishes the run,
    bit-identical to the uninterrupted one."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!{sys.executable}\n{SRUN}")
    (bin_dir / "scontrol").write_text(SCONTROL)
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    script = tmp_path / "acdc.sbatch"
    run_dir = tmp_path / "run"
    env = {**os.environ, "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]]),
           "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_GPUS_ON_NODE": "1",
           "REQUEUED": str(tmp_path / "requeued"), "PYTHONUNBUFFERED": "1"}

    def job() -> subprocess.Popen:
        script.write_text(_sbatch_script().replace(":29400", f":{_free_port()}"))
        return subprocess.Popen(["bash", str(script), "--out", str(run_dir), *RUN], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    first = job()
    try:
        while not (run_dir / "last.safetensors").exists() and first.poll() is None:
            time.sleep(0.2)  # not a timed assertion: the signal waits for the first checkpoint, whenever it comes
        assert first.poll() is None, first.communicate()[0][-6000:]
        os.kill(first.pid, signal.SIGUSR1)
        output = first.communicate(timeout=900)[0]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 0, output[-6000:]
    assert (tmp_path / "requeued").read_text() == "4242\n"
    assert len(read_jsonl(run_dir / "metrics.jsonl")) < 3, "the run finished before the signal stopped it"

    second = job()
    output = second.communicate(timeout=900)[0]
    assert second.returncode == 0, output[-6000:]
    assert (tmp_path / "requeued").read_text() == "4242\n"
    assert [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [0, 1, 2]
    assert_same_run(reference, run_dir)
