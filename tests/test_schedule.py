"""Phase plans and the learning-rate schedule."""

import pytest

from acdc_cli.config import load_settings
from acdc_cli.sparsity.schedule import (
    acdc_phases,
    compressed_starts,
    decompressed_starts,
    gmp_phases,
    gmp_sparsity,
    learning_rate,
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


def test_cosine_with_linear_warmup():
    s = load_settings(overrides=["optim.lr=0.256", "optim.lr_warmup_epochs=5", "schedule.epochs=30"])
    assert learning_rate(s, 0) == 0.0
    assert learning_rate(s, 2.5) == pytest.approx(0.128)
    assert learning_rate(s, 5) == pytest.approx(0.256)
    assert learning_rate(s, 17.5) == pytest.approx(0.128)
    assert learning_rate(s, 30) == pytest.approx(0.0, abs=1e-12)
