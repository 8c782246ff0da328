"""Progress inside an epoch and the epoch row, without training: a fake clock, a loss sum that counts how often the
host reads it, terminals of every kind, and the TensorBoard tags of rows with test_* and FLOPs keys."""

import io
import re
from types import SimpleNamespace

import pytest
from rich.console import Console
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from acdc_cli.config import load_settings
from acdc_cli.training.metrics import MetricsLogger, StepReporter, best_rows, tensorboard_tag


class LossSum:
    """Stands for the device tensor EpochTotals.loss_sum: ``item()`` is the host sync, counted."""

    def __init__(self):
        self.value, self.reads = 0.0, 0

    def item(self) -> float:
        self.reads += 1
        return self.value


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _console(terminal: bool, term: str = "xterm-256color") -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=terminal, width=100, _environ={"TERM": term}), out


def _epoch(reporter: StepReporter, clock: FakeClock, epoch: int, steps: int, seconds_per_step: float,
           losses: list[float], batch: int = 64, first: int = 0):
    """Run ``steps`` fake steps of ``seconds_per_step`` each; step i adds ``losses[i]`` per image."""
    totals = SimpleNamespace(loss_sum=LossSum(), count=first * batch, step=first)
    totals.loss_sum.value = sum(losses[:first]) * batch
    reporter.begin(epoch, steps, totals)
    for i in range(first, steps):
        clock.now += seconds_per_step
        totals.loss_sum.value += losses[i] * batch
        totals.count += batch
        totals.step = i + 1
        reporter.step(totals, lr=0.1)
    reporter.end()
    return totals


def test_plain_lines_come_every_interval_and_read_the_loss_only_then():
    """100 steps of 1 s, lines every 30 s: exactly three lines (at 30, 60 and 90 s), and the loss sum is read from
    the device three times in the epoch, not once per step."""
    settings = load_settings(overrides=["log.progress_interval_s=30", "log.every_steps=0", "data.batch_size=64"])
    console, out = _console(terminal=False)
    clock = FakeClock()
    reporter = StepReporter(console, settings, writer=None, clock=clock)
    losses = [2.0 - i / 100 for i in range(100)]
    totals = _epoch(reporter, clock, epoch=4, steps=100, seconds_per_step=1.0, losses=losses)
    assert totals.loss_sum.reads == 3
    lines = out.getvalue().splitlines()
    # after 30 steps of 1 s: 64 images/s, the mean loss of steps 1-30, 70 steps left at 1 step/s
    assert lines == [
        f"epoch 4  step 30/100  64 img/s  loss {sum(losses[:30]) / 30:.4f}  eta 0:01:10",
        f"epoch 4  step 60/100  64 img/s  loss {sum(losses[:60]) / 60:.4f}  eta 0:00:40",
        f"epoch 4  step 90/100  64 img/s  loss {sum(losses[:90]) / 90:.4f}  eta 0:00:10",
    ]
    assert "\x1b" not in out.getvalue()


def test_a_resumed_epoch_measures_its_rate_from_where_it_resumed():
    settings = load_settings(overrides=["log.progress_interval_s=60", "log.every_steps=0", "data.batch_size=128"])
    console, out = _console(terminal=False)
    clock = FakeClock()
    reporter = StepReporter(console, settings, writer=None, clock=clock)
    _epoch(reporter, clock, epoch=0, steps=1000, seconds_per_step=2.0, losses=[1.0] * 1000, batch=128, first=900)
    # steps 901-930 in 60 s: 0.5 step/s, 64 images/s; 70 steps left take 140 s
    assert out.getvalue().splitlines()[0] == "epoch 0  step 930/1000  64 img/s  loss 1.0000  eta 0:02:20"


@pytest.mark.parametrize("terminal, term, bar", [(True, "xterm-256color", True), (True, "dumb", False),
                                                 (False, "xterm-256color", False)])
def test_a_bar_only_where_a_terminal_can_redraw_one(terminal, term, bar):
    """TERM=dumb (Emacs shells, some CI consoles) cannot move the cursor: it gets the plain lines, without colour."""
    settings = load_settings(overrides=["log.progress_interval_s=0", "log.every_steps=0"])
    console, out = _console(terminal, term)
    clock = FakeClock()
    reporter = StepReporter(console, settings, writer=None, clock=clock)
    assert (reporter.bar is not None) is bar
    _epoch(reporter, clock, epoch=0, steps=2, seconds_per_step=1.0, losses=[1.0, 1.0])
    reporter.close()
    plain = re.findall(r"^epoch 0  step \d/2 .*$", out.getvalue(), flags=re.M)
    assert len(plain) == (0 if bar else 2)
    if not bar:
        assert "\x1b" not in out.getvalue()


def test_no_progress_at_all_with_log_progress_false():
    settings = load_settings(overrides=["log.progress=false", "log.progress_interval_s=0", "log.every_steps=0"])
    console, out = _console(terminal=False)
    clock = FakeClock()
    totals = _epoch(StepReporter(console, settings, writer=None, clock=clock), clock, 0, 5, 1.0, [1.0] * 5)
    assert out.getvalue() == "" and totals.loss_sum.reads == 0


class Recorder:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))


def test_per_step_tensorboard_points_are_window_means_read_every_n_steps():
    """every_steps = 4 over a 10-step epoch: points after steps 4, 8 and 10 (the epoch's end), each the mean loss
    since the previous point, on the run's step axis; three reads of the loss, no lines (interval 1 h)."""
    settings = load_settings(overrides=["log.progress_interval_s=3600", "log.every_steps=4"])
    console, out = _console(terminal=False)
    writer, clock = Recorder(), FakeClock()
    reporter = StepReporter(console, settings, writer=writer, clock=clock)
    losses = [float(i) for i in range(10)]
    totals = _epoch(reporter, clock, epoch=2, steps=10, seconds_per_step=1.0, losses=losses)
    assert totals.loss_sum.reads == 3 and out.getvalue() == ""
    assert [s for s in writer.scalars if s[0] == "train/loss"] == [
        ("train/loss", pytest.approx(1.5), 24), ("train/loss", pytest.approx(5.5), 28),
        ("train/loss", pytest.approx(8.5), 30)]
    assert [s[2] for s in writer.scalars if s[0] == "train/lr"] == [24, 28, 30]


@pytest.mark.parametrize("key, tag", [
    ("train_loss", "train/loss"), ("train_top1", "train/top1"), ("lr", "train/lr"), ("val_loss", "val/loss"),
    ("val_top5", "val/top5"), ("test_loss", "test/loss"), ("test_top1", "test/top1"), ("test_top5", "test/top5"),
    ("sparsity", "sparsity/overall"), ("target_sparsity", "sparsity/target"), ("mask_change", "sparsity/mask_change"),
    ("inference_flops", "flops/inference"), ("inference_flops_ratio", "flops/inference_ratio"),
    ("train_flops", "flops/train"), ("train_flops_ratio", "flops/train_ratio"), ("img_per_s", "perf/img_per_s"),
    ("memorized_true_top1", "memorized/true_top1"), ("something_new", "other/something_new"),
])
def test_row_keys_map_to_grouped_tags(key, tag):
    assert tensorboard_tag(key) == tag


def test_a_run_without_validation_split_logs_test_tags_flops_and_hparams(tmp_path):
    """data.val_size = 0 rows carry test_* keys: TensorBoard groups them as test/*, the console heads them "te.*",
    the best rows are picked by test top-1, and FLOPs keys go under flops/."""
    settings = load_settings(overrides=["sparsity.target=0.5", "log.every_steps=0"])
    out = io.StringIO()
    logger = MetricsLogger(tmp_path, Console(file=out, width=200), tensorboard=True, per_layer=True,
                           steps_per_epoch=10, settings=settings)
    rows = [
        {"epoch": 0, "phase": "dense", "target_sparsity": 0.0, "sparsity": 0.0, "test_top1": 0.7, "test_loss": 1.0,
         "inference_flops": 2.0e6, "inference_flops_ratio": 1.0, "train_flops": 6.0e9, "train_flops_ratio": 1.0},
        {"epoch": 1, "phase": "sparse", "target_sparsity": 0.5, "sparsity": 0.5, "test_top1": 0.6, "test_loss": 1.2,
         "inference_flops": 1.0e6, "inference_flops_ratio": 0.5, "train_flops": 9.0e9, "train_flops_ratio": 0.75},
        {"epoch": 2, "phase": "sparse", "target_sparsity": 0.5, "sparsity": 0.5, "test_top1": 0.65,
         "test_loss": 1.1, "inference_flops": 1.0e6, "inference_flops_ratio": 0.5, "train_flops": 1.2e10,
         "train_flops_ratio": 2 / 3},
    ]
    for row in rows:
        logger.log_epoch(row, {"fc.weight": row["sparsity"]})
    logger.close()
    assert best_rows(rows, 0.5) == (rows[2], rows[0])
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("test/top1")] == [
        (10, pytest.approx(0.7)), (20, pytest.approx(0.6)), (30, pytest.approx(0.65))]
    assert [e.value for e in acc.Scalars("flops/train_ratio")] == pytest.approx([1.0, 0.75, 2 / 3])
    assert [e.value for e in acc.Scalars("flops/inference")] == pytest.approx([2.0e6, 1.0e6, 1.0e6])
    assert [e.value for e in acc.Scalars("sparsity/layer/fc.weight")] == [0.0, 0.5, 0.5]
    assert [e.value for e in acc.Scalars("hparams/best_sparse_top1")] == pytest.approx([0.6, 0.65])
    assert [e.value for e in acc.Scalars("hparams/best_dense_top1")] == pytest.approx([0.7, 0.7, 0.7])
    assert not [t for t in acc.Tags()["scalars"] if t.startswith("val/")]
    header = out.getvalue().splitlines()[0].split()
    assert "te.top1" in header and "v.top1" not in header
    # epoch 2's test top-1, under its header
    assert out.getvalue().splitlines()[3].split()[header.index("te.top1")] == "0.6500"
