"""Phase plans (AC/DC, GMP, dense) and the learning-rate schedule, as pure functions of the settings."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from acdc_cli.config import Settings


@dataclass(frozen=True)
class Phase:
    start: int  # first epoch of the phase
    end: int  # exclusive
    kind: str  # "dense" | "sparse"
    sparsity: float  # 0.0 for dense phases

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _merge(phases: list[Phase]) -> list[Phase]:
    """Drop empty phases and join neighbours of the same kind and sparsity (one mask computation, not two)."""
    out: list[Phase] = []
    for p in phases:
        if p.end <= p.start:
            continue
        if out and (out[-1].kind, out[-1].sparsity) == (p.kind, p.sparsity):
            out[-1] = Phase(out[-1].start, p.end, p.kind, p.sparsity)
        else:
            out.append(p)
    return out


def acdc_phases(
    epochs: int,
    warmup: int,
    compressed: int,
    decompressed: int,
    final_decompressed: int,
    final_compressed: int,
    sparsity: float,
) -> list[Phase]:
    """Dense warm-up, alternating compressed/decompressed phases, optional final dense phase, final compressed phase.

    The alternation fills ``[warmup, epochs - final_decompressed - final_compressed)`` and its last phase is cut
    where that window ends (ImageNet's C5/D5 schedule ends its alternation with a compressed 70-75).
    """
    cycle_end = epochs - final_decompressed - final_compressed
    phases = [Phase(0, warmup, "dense", 0.0)]
    epoch, sparse = warmup, True
    while epoch < cycle_end:
        length = compressed if sparse else decompressed
        end = min(epoch + length, cycle_end)
        phases.append(Phase(epoch, end, "sparse" if sparse else "dense", sparsity if sparse else 0.0))
        epoch, sparse = end, not sparse
    phases.append(Phase(cycle_end, cycle_end + final_decompressed, "dense", 0.0))
    phases.append(Phase(epochs - final_compressed, epochs, "sparse", sparsity))
    return _merge(phases)


def gmp_sparsity(epoch: int, start: int, end: int, initial: float, target: float) -> float:
    """Cubic ramp (Zhu & Gupta): ``initial`` at ``start``, ``target`` at ``end`` and after."""
    if end <= start or epoch >= end:
        return target
    progress = (epoch - start) / (end - start)
    return target + (initial - target) * (1.0 - progress) ** 3


def gmp_phases(epochs: int, start: int, end: int, every: int, initial: float, target: float) -> list[Phase]:
    """Dense until ``start``; a mask recomputation every ``every`` epochs up to ``end``; then held at target."""
    phases = [Phase(0, start, "dense", 0.0)]
    prune_epochs = list(range(start, end, every)) + [end]
    for i, e in enumerate(prune_epochs):
        stop = prune_epochs[i + 1] if i + 1 < len(prune_epochs) else epochs
        phases.append(Phase(e, stop, "sparse", round(gmp_sparsity(e, start, end, initial, target), 6)))
    return _merge(phases)


def plan(settings: Settings) -> list[Phase]:
    s, sp = settings.schedule, settings.sparsity
    if s.method == "dense":
        return [Phase(0, s.epochs, "dense", 0.0)]
    if s.method == "gmp":
        return gmp_phases(s.epochs, s.gmp_start_epoch, s.gmp_end_epoch, s.prune_every, sp.initial, sp.target)
    return acdc_phases(
        s.epochs,
        s.warmup_epochs,
        s.compressed_epochs,
        s.decompressed_epochs,
        s.final_decompressed_epochs,
        s.final_compressed_epochs,
        sp.target,
    )


def phase_at(phases: list[Phase], epoch: int) -> Phase:
    for p in phases:
        if p.start <= epoch < p.end:
            return p
    raise ValueError(f"epoch {epoch} is outside the plan")


def compressed_starts(phases: list[Phase]) -> list[int]:
    return [p.start for p in phases if p.kind == "sparse"]


def decompressed_starts(phases: list[Phase]) -> list[int]:
    """Starts of dense phases that follow a compressed one (the warm-up is not a restore)."""
    return [b.start for a, b in zip(phases, phases[1:]) if a.kind == "sparse" and b.kind == "dense"]


def momentum_resets(phases: list[Phase], policy: str) -> set[int]:
    """Epochs at whose start the optimizer's momentum is zeroed.

    ``"restore"``: the start of every dense phase that follows a compressed one (the reference zeroes momentum after
    each restore only: ``--reset_momentum_after_recycling``, policies/recyclers.py); ``"every"``: the start of every
    phase but the first; ``"never"``: none.
    """
    if policy == "restore":
        return set(decompressed_starts(phases))
    if policy == "every":
        return {p.start for p in phases if p.start > 0}
    if policy == "never":
        return set()
    raise ValueError(f"unknown momentum reset policy '{policy}' (restore, every, never)")


def learning_rate(settings: Settings, epoch: float) -> float:
    """LR at a (fractional) epoch.

    By default the LR is set once per epoch, as the reference sets it (its schedulers step at the end of an epoch):
    a fractional ``epoch`` gets the value of the whole epoch it lies in. Warm-up epoch ``e < W`` runs at
    ``lr * (e + 1) / W``, then the cosine goes per epoch from ``lr`` at epoch ``W`` towards ``min_lr`` at the end of
    its period; a step schedule lowers the LR by ``gamma`` from each milestone epoch on. With ``optim.lr_per_step``
    the same shapes are continuous in the fractional epoch (warm-up linear from 0).
    """
    o = settings.optim
    if not o.lr_per_step:
        epoch = math.floor(epoch)
    warmup = o.lr_warmup_epochs
    if warmup > 0 and epoch < warmup:
        progress = epoch / warmup if o.lr_per_step else min((epoch + 1) / warmup, 1.0)
        return o.lr * progress
    if o.lr_schedule == "constant":
        return o.lr
    if o.lr_schedule == "step":
        # epoch m is the first one at the lower rate (torch's MultiStepLR); the reference's ExponentialLR stepped at
        # the end of epoch k is milestone k + 1
        return o.lr * o.gamma ** sum(1 for m in o.milestones if epoch >= m)
    period = o.cosine_epochs or settings.schedule.epochs
    t = min(max(epoch - warmup, 0.0) / max(period - warmup, 1e-9), 1.0)
    return o.min_lr + (o.lr - o.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass(frozen=True)
class PlannedEpoch:
    epoch: int
    phase: str  # "dense" | "sparse"
    sparsity: float  # target sparsity of the epoch's phase (0.0 when dense)
    lr: float  # LR at the start of the epoch
    reset_momentum: bool  # momentum zeroed at the start of the epoch

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def epoch_plan(settings: Settings) -> list[PlannedEpoch]:
    """One entry per epoch of the schedule, so that a plan can be diffed against the reference without training."""
    phases = plan(settings)
    resets = momentum_resets(phases, settings.schedule.reset_momentum)
    return [
        PlannedEpoch(epoch, phase.kind, phase.sparsity, learning_rate(settings, epoch), epoch in resets)
        for phase in phases
        for epoch in range(phase.start, phase.end)
    ]
