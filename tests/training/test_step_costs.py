"""What the training step no longer does every step, and that leaving it out changes no number: the step seeds only
the generators it draws from (the same draws as torch.manual_seed), sets the LR once per epoch unless the LR moves
per step, checks step_keeps_zeros once per epoch, finds the first non-finite step from the loss sum, and the
steps measure no sparsity; runtime.threads unset uses the cores the process may run on."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from acdc_cli import engine as engine_mod
from acdc_cli.config import load_settings
from acdc_cli.engine import ACDC
from acdc_cli.errors import TrainingFault
from acdc_cli.models import create
from acdc_cli.sparsity.schedule import learning_rate
from acdc_cli.training import loop, runtime
from acdc_cli.training.loop import RunResult, step_seed, summary_panel, train_epoch

CPU = torch.device("cpu")


class Batches:
    """A loader of fixed batches (images, labels), as the training loaders yield them."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)

    def iterate(self, start):
        return iter(self.batches[start:])


def _batches(count: int = 4, bad: int | None = None) -> Batches:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(count):
        images = torch.randn(8, 3, 8, 8, generator=g)
        if i == bad:
            images[0, 0, 0, 0] = float("nan")
        out.append((images, torch.randint(0, 10, (8,), generator=g)))
    return Batches(out)


def _settings(*overrides: str):
    return load_settings(overrides=["model.name='tiny-test'", "optim.lr=0.1", "optim.momentum=0.9",
                                    "schedule.method='acdc'", "schedule.epochs=4", "schedule.warmup_epochs=1",
                                    "schedule.compressed_epochs=1", "schedule.decompressed_epochs=1",
                                    "schedule.final_compressed_epochs=1", "sparsity.target=0.8", *overrides])


def _model():
    torch.manual_seed(0)
    return create("tiny-test", num_classes=10, dropout=0.5)


def _draws() -> list[torch.Tensor]:
    return [torch.rand(5), torch.randn(5), torch.randint(0, 1000, (5,)), F.dropout(torch.ones(64), 0.5)]


@pytest.mark.parametrize("seed", [0, 1, 2**62 - 1, step_seed(7, 3, 11, 1), 2**63 - 1])
def test_seeding_the_step_generators_gives_the_draws_torch_manual_seed_gave(seed):
    torch.manual_seed(seed)
    before = _draws()
    torch.manual_seed(seed + 1)  # something else in between
    runtime.seed_step_generators(seed, CPU)
    after = _draws()
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert not torch.equal(before[3], F.dropout(torch.ones(64), 0.5))  # the generator moves on: draws are live


def test_an_epoch_trains_as_with_torch_manual_seed_per_step_without_calling_it(one_thread, monkeypatch):
    """Dropout at 0.5 draws every step: the weights after an epoch are bit-equal to the old seeding's."""
    settings = _settings()
    results = []
    for old in (True, False):
        model = _model()
        optimizer = loop.build_optimizer(model, settings)
        with monkeypatch.context() as patch:
            if old:
                patch.setattr(runtime, "seed_step_generators", lambda seed, device: torch.manual_seed(seed))
            else:
                def refuse(seed):
                    raise AssertionError("torch.manual_seed called in a step")
                patch.setattr(torch, "manual_seed", refuse)
            train_epoch(model, _batches(), optimizer, settings, epoch=2, device=CPU)
        results.append(model.state_dict())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_the_lr_is_computed_once_per_epoch_unless_it_moves_per_step(one_thread, monkeypatch):
    calls = []
    monkeypatch.setattr(loop, "learning_rate", lambda s, e: calls.append(e) or learning_rate(s, e))
    for per_step, expected in ((False, [1.0]), (True, [1.0, 1.0, 1.25, 1.5, 1.75])):
        calls.clear()
        settings = _settings("optim.lr_warmup_epochs=3", f"optim.lr_per_step={str(per_step).lower()}")
        model = _model()
        optimizer = loop.build_optimizer(model, settings)
        seen = []
        optimizer.register_step_pre_hook(lambda opt, a, k: seen.append(opt.param_groups[0]["lr"]))
        stats = train_epoch(model, _batches(), optimizer, settings, epoch=1, device=CPU)
        # stats() reports the LR of the epoch's last step: one more call, after the steps
        assert calls == expected + [1.75]
        assert seen == [learning_rate(settings, e) for e in (expected[1:] if per_step else [1.0] * 4)]
        assert stats["lr"] == seen[-1]


def test_the_first_non_finite_step_is_named_from_the_loss_sum(one_thread):
    settings = _settings()
    model = _model()
    optimizer = loop.build_optimizer(model, settings)
    with pytest.raises(TrainingFault, match="non-finite loss at epoch 0, step 2;"):
        train_epoch(model, _batches(5, bad=2), optimizer, settings, epoch=0, device=CPU)


def test_step_keeps_zeros_is_checked_once_per_epoch_and_nothing_is_measured_per_step(one_thread, monkeypatch):
    settings = _settings()
    model = _model()
    optimizer = loop.build_optimizer(model, settings)
    engine = ACDC.from_settings(settings, model, optimizer)
    engine.count_flops((3, 8, 8))
    checks, stats = [], []
    monkeypatch.setattr(engine_mod, "step_keeps_zeros", lambda opt: checks.append(1) or True)
    real_stats = engine.sparsifier.stats
    monkeypatch.setattr(engine.sparsifier, "stats", lambda: stats.append(1) or real_stats())
    for epoch in range(2):
        engine.start_epoch(epoch)
        before = len(stats)
        train_epoch(model, _batches(), optimizer, settings, epoch=epoch, device=CPU)
        assert len(stats) == before  # the steps measure no sparsity
        engine.end_epoch(32)
        row = engine.metrics()
        per_layer = engine.layer_sparsity()
        params = {n: p for n, p in model.named_parameters() if n in engine.prunable}
        zeros = sum(int((p == 0).sum()) for p in params.values())
        assert row["sparsity"] == zeros / sum(p.numel() for p in params.values())
        assert per_layer == {n: int((p == 0).sum()) / p.numel() for n, p in params.items()}
    assert len(checks) == 2  # once per epoch, not per step


def test_measured_sparsity_follows_weights_changed_outside_a_step(one_thread):
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = ACDC(model, optimizer, epochs=4, warmup_epochs=1, compressed_epochs=1, decompressed_epochs=1,
                  final_compressed_epochs=1, sparsity=0.8)
    engine.start_epoch(1)
    sparse = engine.sparsity()
    assert abs(sparse - 0.8) < 0.01
    dense = copy.deepcopy(_model().state_dict())
    model.load_state_dict(dense)  # no step, no mask change: the weights' in-place change is seen
    assert engine.sparsity() == 0.0
    engine.start_epoch(2)  # restore: the masks change
    assert engine.sparsity() == 0.0


def test_threads_unset_use_the_cores_this_process_may_run_on(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    assert runtime.cpu_threads(None) == (3, "3 cores for 1 process(es)")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert runtime.cpu_threads(None) == (1, "3 cores for 2 process(es)")
    assert runtime.cpu_threads(4) == (4, "runtime.threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert runtime.cpu_threads(None) == (torch.get_num_threads(), "OMP_NUM_THREADS")


def test_the_summary_says_how_many_threads_it_used(tmp_path):
    result = RunResult(tmp_path, None, None, 0.0, threads=(3, "3 cores for 1 process(es)"))
    assert "CPU threads: 3 (3 cores for 1 process(es))" in str(summary_panel(result, False).renderable)
