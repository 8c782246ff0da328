"""One epoch of EpochSteps against a model whose logits are known: the train loss and top-1 are per-image means,
a non-finite loss is named at its first step (step 0 included), each step's LR and random stream are the ones the
schedule and the seed say, and the skip streak ends the run at exactly its limit."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from acdc_cli.config import load_settings
from acdc_cli.errors import TrainingFault
from acdc_cli.sparsity.schedule import learning_rate
from acdc_cli.training.loop import EpochSteps, build_optimizer, count_skip, step_seed
from acdc_cli.training.metrics import EpochTotals

CPU = torch.device("cpu")
CLASSES = 10
BATCH = 4
STEPS = 5


class TableModel(nn.Module):
    """Logits read from a fixed table by the image's index; one trainable weight that moves nothing while the loss
    is finite (so the optimizer has work, and the logits stay known). ``nan_at`` calls return NaN logits (whose NaN
    gradient then spreads to every later step); ``draws`` records one torch.rand per call (the step's stream)."""

    def __init__(self, logits: torch.Tensor, nan_at: tuple[int, ...] = ()):
        super().__init__()
        self.register_buffer("logits", logits)
        self.weight = nn.Parameter(torch.ones(1))
        self.nan_at, self.calls, self.draws = nan_at, 0, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.draws.append(float(torch.rand(())))
        out = self.logits[x[:, 0].long()] + 0.0 * self.weight
        if self.calls in self.nan_at:
            out = out * float("nan")
        self.calls += 1
        return out


def _data():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(BATCH * STEPS, CLASSES, generator=g)
    labels = torch.randint(0, CLASSES, (BATCH * STEPS,), generator=g)
    index = torch.arange(BATCH * STEPS, dtype=torch.float32).view(-1, 1)
    batches = [(index[i:i + BATCH], labels[i:i + BATCH]) for i in range(0, BATCH * STEPS, BATCH)]
    return logits, labels, batches


def _run(*overrides: str, nan_at: tuple[int, ...] = (), epoch: int = 0):
    settings = load_settings(overrides=["runtime.device=cpu", "schedule.method=dense", "schedule.epochs=4", *overrides])
    logits, labels, batches = _data()
    model = TableModel(logits, nan_at)
    optimizer = build_optimizer(model, settings)
    lrs = []
    optimizer.register_step_pre_hook(lambda opt, *_: lrs.append(opt.param_groups[0]["lr"]))
    steps = EpochSteps(model, batches, optimizer, settings, epoch=epoch, device=CPU)
    assert list(steps) == list(range(1, STEPS + 1))
    return steps, model, lrs, settings, logits, labels


def test_train_loss_and_top1_are_means_over_images():
    steps, _, _, _, logits, labels = _run()
    stats = steps.stats()
    assert stats["train_loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    assert stats["train_top1"] == (logits.argmax(1) == labels).sum().item() / len(labels)


@pytest.mark.parametrize(("nan_at", "first"), [((0,), 0), ((2,), 2), ((1, 3), 1)])
def test_a_non_finite_loss_is_named_at_its_first_step(nan_at, first):
    steps, *_ = _run(nan_at=nan_at)
    with pytest.raises(TrainingFault, match=rf"non-finite loss at epoch 0, step {first};"):
        steps.stats()


@pytest.mark.parametrize("per_step", [False, True])
def test_each_step_runs_at_the_lr_of_its_fractional_epoch(per_step):
    epoch = 1
    _, _, lrs, settings, _, _ = _run("optim.lr_schedule=step", "optim.milestones=[2]", "optim.lr_warmup_epochs=0",
                                     f"optim.lr_per_step={str(per_step).lower()}", epoch=epoch)
    expected = [learning_rate(settings, epoch + step / STEPS) for step in range(STEPS)]
    assert lrs == expected
    if not per_step:  # set once per epoch: the last step of epoch 1 still runs before milestone 2
        assert len(set(lrs)) == 1 and lrs[0] == settings.optim.lr


def test_each_step_draws_from_the_stream_of_its_seed_epoch_and_step():
    epoch = 2
    _, model, _, settings, _, _ = _run("runtime.seed=7", epoch=epoch)
    expected = [float(torch.rand((), generator=torch.Generator().manual_seed(step_seed(7, epoch, step, 0))))
                for step in range(STEPS)]
    assert model.draws == expected
    assert len(set(expected)) == STEPS


def test_the_skip_streak_ends_the_run_at_exactly_its_limit():
    totals = EpochTotals.start(CPU)
    count_skip(totals, 0, 0, 3)
    count_skip(totals, 0, 1, 3)
    with pytest.raises(TrainingFault, match=r"^3 steps in a row skipped .* epoch 0, step 2 "):
        count_skip(totals, 0, 2, 3)
    assert totals.skipped == 3
