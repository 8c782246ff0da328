"""Phase plans, momentum resets, the learning-rate schedule and the per-epoch plan."""

import math

import pytest

from acdc_cli.config import load_settings
from acdc_cli.errors import AcdcError
from acdc_cli.sparsity.schedule import (
    Phase,
    acdc_phases,
    compressed_starts,
    decompressed_starts,
    epoch_plan,
    gmp_phases,
    gmp_sparsity,
    learning_rate,
    momentum_resets,
    phase_at,
    plan,
)


@pytest.mark.parametrize(
    "args, prune, restore",
    [
        ((200, 10, 20, 20, 0, 30), [10, 50, 90, 130, 170], [30, 70, 110, 150]),
        ((225, 10, 20, 13, 0, 50), [10, 43, 76, 109, 142, 175], [30, 63, 96, 129, 162]),
        ((100, 10, 5, 5, 10, 15), [10, 20, 30, 40, 50, 60, 70, 85], [15, 25, 35, 45, 55, 65, 75]),
        ((150, 10, 5, 5, 10, 15), list(range(10, 121, 10)) + [135], list(range(15, 116, 10)) + [125]),
        ((200, 10, 5, 5, 10, 15), list(range(10, 171, 10)) + [185], list(range(15, 166, 10)) + [175]),
        ((30, 4, 3, 3, 0, 8), [4, 10, 16, 22], [7, 13, 19]),
    ],
)
def test_acdc_reference_epochs(args, prune, restore):
    phases = acdc_phases(*args, sparsity=0.9)
    assert compressed_starts(phases) == prune
    assert decompressed_starts(phases) == restore
    # phases tile [0, epochs) without gaps and alternate kinds
    assert phases[0].start == 0 and phases[-1].end == args[0]
    for a, b in zip(phases, phases[1:]):
        assert a.end == b.start and a.kind != b.kind
    assert phases[-1].kind == "sparse" and all(p.sparsity == 0.9 for p in phases if p.kind == "sparse")


def test_no_warmup_starts_compressed():
    phases = acdc_phases(10, 0, 10, 5, 0, 0, 0.5)
    assert [(p.start, p.end, p.kind) for p in phases] == [(0, 10, "sparse")]


def test_gmp_ramp_is_cubic_monotone_and_held():
    phases = gmp_phases(20, 2, 12, 2, 0.05, 0.8)
    assert phases[0].kind == "dense" and phases[0].end == 2
    sparse = [p for p in phases if p.kind == "sparse"]
    assert [p.start for p in sparse] == [2, 4, 6, 8, 10, 12]
    levels = [p.sparsity for p in sparse]
    assert levels[0] == pytest.approx(0.05) and levels[-1] == pytest.approx(0.8)
    assert all(a < b for a, b in zip(levels, levels[1:]))
    assert sparse[-1].end == 20
    assert gmp_sparsity(7, 2, 12, 0.05, 0.8) == pytest.approx(0.8 + (0.05 - 0.8) * 0.5**3)


def test_plan_from_settings_and_phase_lookup():
    s = load_settings(overrides=["schedule.method='dense'"])
    assert [(p.start, p.end, p.kind) for p in plan(s)] == [(0, 30, "dense")]
    s = load_settings()
    phases = plan(s)
    assert phase_at(phases, 0).kind == "dense" and phase_at(phases, 4).kind == "sparse"
    assert phase_at(phases, 29).kind == "sparse"
    with pytest.raises(ValueError):
        phase_at(phases, 30)


def test_step_lr_multistep_semantics():
    s = load_settings(overrides=["optim.lr_schedule='step'", "optim.milestones=[10, 20]", "optim.lr=0.1"])
    assert learning_rate(s, 9.99) == pytest.approx(0.1)
    assert learning_rate(s, 10) == pytest.approx(0.01)
    assert learning_rate(s, 25) == pytest.approx(0.001)


def test_lr_is_set_once_per_epoch_by_default():
    s = load_settings(overrides=["optim.lr=0.256", "optim.lr_warmup_epochs=5", "schedule.epochs=30"])
    assert not s.optim.lr_per_step
    # warm-up epoch e runs at lr * (e + 1) / 5, every step of it (optimization/lr_schedulers.py CosineLR)
    assert [learning_rate(s, e) for e in (0, 0.5, 0.99, 1, 4, 4.7)] == pytest.approx(
        [0.0512, 0.0512, 0.0512, 0.1024, 0.256, 0.256])
    # then a cosine per epoch from lr at epoch 5 over the 25 epochs left
    assert learning_rate(s, 5.9) == pytest.approx(0.256)
    assert learning_rate(s, 17.5) == learning_rate(s, 17) == pytest.approx(0.128 * (1 + math.cos(math.pi * 12 / 25)))
    assert learning_rate(s, 29.99) == pytest.approx(0.128 * (1 + math.cos(math.pi * 24 / 25)))


def test_lr_per_step_is_continuous():
    s = load_settings(overrides=["optim.lr=0.256", "optim.lr_warmup_epochs=5", "schedule.epochs=30",
                                 "optim.lr_per_step=true"])
    assert learning_rate(s, 0) == 0.0
    assert learning_rate(s, 2.5) == pytest.approx(0.128)
    assert learning_rate(s, 5) == pytest.approx(0.256)
    assert learning_rate(s, 17.5) == pytest.approx(0.128)
    assert learning_rate(s, 30) == pytest.approx(0.0, abs=1e-12)
    step = load_settings(overrides=["optim.lr_schedule='step'", "optim.milestones=[10]", "optim.lr=0.1",
                                    "optim.lr_per_step=true"])
    assert learning_rate(step, 9.99) == pytest.approx(0.1) and learning_rate(step, 10) == pytest.approx(0.01)


IMAGENET_PHASES = acdc_phases(100, 10, 5, 5, 10, 15, 0.9)


@pytest.mark.parametrize("policy, expected", [
    # the reference zeroes momentum when it restores (recycler epochs [15, 10, 66] and [75, 20, 86] of
    # configs/neurips/iht_imagenet_resnet50_insta_cosinelr_s90_ep100.yaml, --reset_momentum_after_recycling)
    ("restore", {15, 25, 35, 45, 55, 65, 75}),
    ("every", {10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60, 65, 70, 75, 85}),
    ("never", set()),
])
def test_momentum_reset_policies(policy, expected):
    assert momentum_resets(IMAGENET_PHASES, policy) == expected


def test_momentum_resets_of_other_plans():
    cifar = acdc_phases(200, 10, 20, 20, 0, 30, 0.95)
    assert momentum_resets(cifar, "restore") == {30, 70, 110, 150}
    gmp = gmp_phases(100, 1, 40, 5, 0.05, 0.9)
    # GMP never restores; "every" resets at each mask recomputation
    assert momentum_resets(gmp, "restore") == set()
    assert momentum_resets(gmp, "every") == {1, 6, 11, 16, 21, 26, 31, 36, 40}
    dense = [Phase(0, 10, "dense", 0.0)]
    assert momentum_resets(dense, "restore") == momentum_resets(dense, "every") == set()
    with pytest.raises(ValueError):
        momentum_resets(cifar, "sometimes")


def test_reset_momentum_setting_is_one_of_its_choices():
    assert load_settings().schedule.reset_momentum == "restore"
    assert load_settings(overrides=["schedule.reset_momentum='every'"]).schedule.reset_momentum == "every"
    for value in ("'sometimes'", "true", "false"):
        with pytest.raises(AcdcError, match="schedule.reset_momentum"):
            load_settings(overrides=[f"schedule.reset_momentum={value}"])


def test_epoch_plan_lists_every_epoch():
    s = load_settings()  # quickstart: dense 0-3, C 4-6, D 7-9, C 10-12, D 13-15, C 16-18, D 19-21, final C 22-29
    epochs = epoch_plan(s)
    assert [e.epoch for e in epochs] == list(range(30))
    assert [e.epoch for e in epochs if e.phase == "sparse" and epochs[e.epoch - 1].phase == "dense"] == [4, 10, 16, 22]
    assert all(e.sparsity == (0.9 if e.phase == "sparse" else 0.0) for e in epochs)
    assert [e.epoch for e in epochs if e.reset_momentum] == [7, 13, 19]
    assert [e.lr for e in epochs] == [learning_rate(s, e) for e in range(30)]
    assert epochs[0].as_dict() == {"epoch": 0, "phase": "dense", "sparsity": 0.0, "lr": 0.05, "reset_momentum": False}


def test_cosine_runs_over_its_own_period_down_to_min_lr_and_stays_there():
    s = load_settings(overrides=["optim.lr=0.1", "optim.min_lr=0.001", "optim.cosine_epochs=20", "schedule.epochs=30",
                                 "optim.lr_warmup_epochs=0"])
    assert learning_rate(s, 0) == pytest.approx(0.1)
    assert learning_rate(s, 5) == pytest.approx(0.001 + 0.099 * 0.5 * (1 + math.cos(math.pi * 5 / 20)))
    assert learning_rate(s, 10) == pytest.approx(0.001 + 0.099 * 0.5)
    assert learning_rate(s, 20) == learning_rate(s, 29) == pytest.approx(0.001)


def test_the_alternation_is_cut_where_its_window_ends():
    def spans(phases):
        return [(p.start, p.end, p.kind) for p in phases]

    # window [2, 7): compressed 2-5, then the decompressed phase is cut at 7 where the final compressed one starts
    assert spans(acdc_phases(10, 2, 3, 3, 0, 3, 0.9)) == [(0, 2, "dense"), (2, 5, "sparse"), (5, 7, "dense"),
                                                          (7, 10, "sparse")]
    # window [2, 9): a compressed phase cut to one epoch before the final dense and compressed ones
    assert spans(acdc_phases(14, 2, 3, 3, 2, 3, 0.9)) == [(0, 2, "dense"), (2, 5, "sparse"), (5, 8, "dense"),
                                                          (8, 9, "sparse"), (9, 11, "dense"), (11, 14, "sparse")]
