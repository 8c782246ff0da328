"""AC/DC semantics inside the real training loop: momentum reset, pruned weights held at zero, revival from zero."""

import pytest
import torch

from acdc_cli.config import load_settings
from acdc_cli.engine import ACDC, reset_momentum
from acdc_cli.errors import AcdcError
from acdc_cli.models import create
from acdc_cli.sparsity.rules import select_layers
from acdc_cli.sparsity.sparsifier import Sparsifier
from acdc_cli.training import loop as train_mod

TINY = [
    "model.name='tiny-test'",
    "data.name='synthetic'",
    "data.synthetic_size=64",
    "data.batch_size=16",
    "schedule.epochs=9",
    "schedule.warmup_epochs=1",
    "schedule.compressed_epochs=2",
    "schedule.decompressed_epochs=2",
    "schedule.final_compressed_epochs=2",
    "sparsity.target=0.7",
    "optim.lr=0.05",
    "optim.weight_decay=0.01",
    "log.tensorboard=false",
]


@pytest.fixture(scope="module")
def instrumented_run(tmp_path_factory):
    """Run a tiny AC/DC plan through train.run (momentum reset by the default policy, "restore"), recording what
    happens at each boundary and epoch."""
    settings = load_settings(overrides=TINY)
    events = []
    engines = []  # the run's engine, seen at its first phase (before the first epoch)
    real_enter, real_stats = ACDC._enter, train_mod.EpochSteps.stats

    def enter(engine, phase, *args, **kwargs):
        engines.append(engine)
        sparsifier, optimizer = engine.sparsifier, engine.optimizer
        before = {n: p.detach().clone() for n, p in sparsifier.params.items()}
        real_enter(engine, phase, *args, **kwargs)
        change = engine.mask_change
        buffers = [s["momentum_buffer"] for s in optimizer.state.values() if "momentum_buffer" in s]
        events.append({
            "kind": "enter",
            "phase": phase,
            "buffers": len(buffers),
            "momentum_max": max((float(b.abs().max()) for b in buffers), default=0.0),
            "weights_before": before,
            "weights": {n: p.detach().clone() for n, p in sparsifier.params.items()},
            "masks": {n: m.clone() for n, m in (sparsifier.masks or {}).items()},
            "change": change,
        })

    def epoch_trained(steps):  # the loop reads an epoch's stats once all its steps ran
        sparsifier = engines[-1].sparsifier
        stats = real_stats(steps)
        events.append({
            "kind": "epoch",
            "epoch": steps.epoch,
            "weights": {n: p.detach().clone() for n, p in sparsifier.params.items()},
            "masks": {n: m.clone() for n, m in (sparsifier.masks or {}).items()},
        })
        return stats

    mp = pytest.MonkeyPatch()
    mp.setattr(ACDC, "_enter", enter)
    mp.setattr(train_mod.EpochSteps, "stats", epoch_trained)
    try:
        run_dir = tmp_path_factory.mktemp("tiny")
        train_mod.run(settings, run_dir)
    finally:
        mp.undo()
    return events


def test_momentum_is_zeroed_at_each_restore_and_kept_at_compression(instrumented_run):
    boundaries = [e for e in instrumented_run if e["kind"] == "enter"]
    assert [e["phase"].start for e in boundaries] == [0, 1, 3, 5]
    for e in boundaries[1:]:
        assert e["buffers"] > 0  # the buffers exist (the reset is not vacuous) ...
        if e["phase"].kind == "dense":
            assert e["momentum_max"] == 0.0  # ... and a restore zeroes them
        else:
            assert e["momentum_max"] > 0.0  # ... a compression keeps them ("restore", the reference's policy)


def test_pruned_weights_stay_exactly_zero_in_compressed_phases(instrumented_run):
    sparse_epochs = [e for e in instrumented_run if e["kind"] == "epoch" and e["masks"]]
    assert len(sparse_epochs) == 6
    for e in sparse_epochs:
        total = sum(m.numel() for m in e["masks"].values())
        pruned = sum(int((~m).sum()) for m in e["masks"].values())
        assert pruned == round(0.7 * total)
        for name, mask in e["masks"].items():
            assert torch.count_nonzero(e["weights"][name][~mask]) == 0


def test_revived_weights_restart_from_zero_and_train(instrumented_run):
    events = instrumented_run
    for i, e in enumerate(events):
        if e["kind"] != "enter" or e["phase"].kind != "dense" or e["phase"].start == 0:
            continue
        previous_masks = events[i - 1]["masks"]  # the last compressed epoch
        after_epoch = events[i + 1]["weights"]
        revived = 0
        for name, mask in previous_masks.items():
            assert torch.count_nonzero(e["weights"][name][~mask]) == 0  # they start at zero ...
            revived += int(torch.count_nonzero(after_epoch[name][~mask]))
        assert revived > 0  # ... and the dense phase trains them


def test_mask_change_measured_between_compressed_phases(instrumented_run):
    changes = [e["change"] for e in instrumented_run if e["kind"] == "enter" and e["phase"].kind == "sparse"]
    assert changes[0] is None  # no earlier compressed phase
    assert all(c is not None and 0.0 <= c <= 1.0 for c in changes[1:])
    first = next(e for e in instrumented_run if e["kind"] == "enter" and e["phase"].start == 1)["masks"]
    second = next(e for e in instrumented_run if e["kind"] == "enter" and e["phase"].start == 5)["masks"]
    flipped = sum(int((first[n] != second[n]).sum()) for n in first)
    assert changes[1] == pytest.approx(flipped / sum(m.numel() for m in first.values()))


def test_reset_momentum_zeroes_real_buffers():
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    assert reset_momentum(opt) == 2
    assert all(float(s["momentum_buffer"].abs().max()) == 0.0 for s in opt.state.values())


def test_layer_selection_rules():
    model = create("tiny-test", num_classes=10)
    rules = {r.module: r for r in select_layers(model, ["*"], ["fc"])}
    assert rules["fc"].reason == "excluded" and rules["conv"].selected and rules["stem"].selected
    nm_rules = {r.module: r for r in select_layers(model, ["*"], [], nm=(2, 4))}
    assert not nm_rules["stem"].selected and "multiple of 4" in nm_rules["stem"].reason
    assert nm_rules["conv"].selected and nm_rules["fc"].selected
    with pytest.raises(AcdcError, match="stem"):
        select_layers(model, ["stem", "conv"], [], nm=(2, 4))
    with pytest.raises(AcdcError, match="matches no"):
        select_layers(model, ["nothing*"], [])
    with pytest.raises(AcdcError, match="no layer"):
        select_layers(model, ["*"], ["*"])


def test_sparsity_counts_only_selected_weights():
    torch.manual_seed(0)
    model = create("tiny-test", num_classes=10)
    sp = Sparsifier(model, ["*"], ["stem"], "global", "unstructured")
    sp.compress(0.5)
    assert sp.stats()["sparsity"] == pytest.approx(round(0.5 * sp.numel) / sp.numel)
    assert torch.count_nonzero(model.stem.weight) == model.stem.weight.numel()


def test_mask_change_counts_flips_both_ways():
    old = {"a": torch.tensor([True, True, False, False]), "b": torch.tensor([True, False])}
    new = {"a": torch.tensor([False, True, True, False]), "b": torch.tensor([True, False])}
    assert Sparsifier.mask_change(old, new) == 2 / 6
    assert Sparsifier.mask_change(None, new) is None


def test_stats_count_zeros_overall_and_per_layer():
    torch.manual_seed(0)
    model = create("tiny-test", num_classes=10)
    sp = Sparsifier(model, ["*"], [], "uniform", "unstructured")
    sp.compress(0.7)
    stats = sp.stats()
    zeros = {n: int((p == 0).sum()) for n, p in sp.params.items()}
    assert stats["per_layer"] == {n: zeros[n] / p.numel() for n, p in sp.params.items()}
    assert stats["sparsity"] == sum(zeros.values()) / sp.numel
    assert all(abs(v - 0.7) < 0.05 for v in stats["per_layer"].values())
