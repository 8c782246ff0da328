"""runtime.checkpoint_every: last.* every N epochs and at every phase end, best_* whenever an epoch beats it, so a
run with a cadence resumes bit-identically and keeps the every-epoch run's best checkpoints; and the time the loop
waits for the checkpoint writer, per epoch, in metrics.jsonl and TensorBoard."""

from pathlib import Path

import pytest
from cli_helpers import assert_same_run, invoke, short_schedule, trained
from faults_helpers import killed_at
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from acdc_cli.files.checkpoint import load_checkpoint
from acdc_cli.files.jsonio import read_jsonl

# dense 0-3, compressed 4, dense 5, compressed 6; with a cadence of 3, last.* is written at the ends of epochs 2
# (cadence), 3, 4, 5 (phase ends) and 6 (the run's end), never at 0 and 1
RUN = short_schedule(7, 4, 1, 1, 1, 0, "data.batch_size=128", "model.dropout=0.3")
CADENCE = ["--set", "runtime.checkpoint_every=3"]


@pytest.fixture(scope="module")
def every_epoch(tmp_path_factory) -> Path:
    return trained(tmp_path_factory, "every-epoch", *RUN)


def test_a_run_with_a_cadence_resumes_bit_identically_with_the_same_best(tmp_path, every_epoch):
    run_dir = tmp_path / "run"
    # killed just before the 2nd last.safetensors is renamed into place: the 1st, written at the end of epoch 2,
    # stands (an every-epoch run would have written its 2nd at the end of epoch 1)
    killed_at("kill@rename:2:last.safetensors", "--out", str(run_dir), *RUN, *CADENCE)
    assert load_checkpoint(run_dir / "last.safetensors").epoch == 3
    # best_dense was written at epochs 0 and 1 though last was not
    assert load_checkpoint(run_dir / "best_dense.safetensors").epoch >= 1
    resumed = invoke("train", "--resume", run_dir, *CADENCE)
    assert resumed.exit_code == 0, resumed.output
    assert_same_run(every_epoch, run_dir)


def test_checkpoint_wait_is_measured_per_epoch(tmp_path):
    run_dir = tmp_path / "run"
    result = invoke("train", "--out", run_dir, *short_schedule(2, 1, 1, 1, 1, 0, "data.batch_size=256"),
                    "--set", "log.tensorboard=true")
    assert result.exit_code == 0, result.output
    rows = read_jsonl(run_dir / "metrics.jsonl")
    waits = [r["checkpoint_wait_s"] for r in rows]
    assert len(waits) == 2 and all(isinstance(w, float) and 0.0 <= w < 600 for w in waits)
    assert waits[0] == 0.0  # nothing was in flight before the first save
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    assert [e.value for e in events.Scalars("perf/checkpoint_wait_s")] == pytest.approx(waits)
