"""The AC/DC training loop: per epoch -> phase boundary? (prune | restore, reset momentum) -> train -> eval -> log ->
checkpoint. Everything else is a call into a small function."""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from acdc_cli import data as data_mod
from acdc_cli import distributed, models, runtime
from acdc_cli.checkpoint import (
    BackgroundWriter,
    Checkpoint,
    atomic_write_text,
    build_model,
    load_checkpoint,
    load_state,
    host_copy,
    load_weights,
    remove_stale_temps,
    save_checkpoint,
    save_state,
)
from acdc_cli.config import Settings
from acdc_cli.errors import AcdcError, TrainingFault
from acdc_cli.evaluate import autocast, evaluate, evaluate_memorized
from acdc_cli.metrics import MetricsLogger
from acdc_cli.preemption import StopSignal, reduce_int
from acdc_cli.sparsity.schedule import Phase, learning_rate, phase_at, plan
from acdc_cli.sparsity.sparsifier import Sparsifier, reset_momentum

RUN_MARKER = "config.toml"


@dataclass
class RunState:
    """What a resumed run needs besides weights, masks and optimizer state."""

    epoch: int = 0  # epochs completed
    best_sparse: dict[str, Any] | None = None  # {"epoch", "val_top1"}
    best_dense: dict[str, Any] | None = None
    mask_change: float | None = None  # of the current compressed phase

    def as_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "best_sparse": self.best_sparse,
            "best_dense": self.best_dense,
            "mask_change": self.mask_change,
        }


@dataclass
class RunResult:
    run_dir: Path
    best_sparse: dict[str, Any] | None
    best_dense: dict[str, Any] | None
    final_sparsity: float
    files: list[Path] = field(default_factory=list)
    preempted: dict[str, Any] | None = None  # {"signal", "epoch", "step"} of the checkpoint a signal stopped at


# ----------------------------------------------------------------------------------------------------------------
# run directory


def default_run_dir(settings: Settings) -> Path:
    return Path("runs") / f"{settings.preset or 'custom'}-{datetime.now():%Y%m%d-%H%M%S}"


def prepare_run_dir(run_dir: Path, force: bool) -> None:
    """Refuse to write into a folder that already holds something, unless --force."""
    if run_dir.exists() and not run_dir.is_dir():
        raise AcdcError(f"--out {run_dir} exists and is not a folder")
    if run_dir.exists() and any(run_dir.iterdir()) and not force:
        raise AcdcError(f"run dir {run_dir} is not empty; pass --resume {run_dir} to continue it or --force to overwrite")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".acdc-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise AcdcError(f"cannot write to run dir {run_dir}: {exc.strerror or exc}") from None
    if force:
        for name in ("metrics.jsonl", "last.safetensors", "best_sparse.safetensors", "best_dense.safetensors"):
            (run_dir / name).unlink(missing_ok=True)
        for state in run_dir.glob("last.state*.pt"):
            state.unlink()
        remove_stale_temps(run_dir)
        shutil.rmtree(run_dir / "tb", ignore_errors=True)


def saved_settings(run_dir: Path) -> dict[str, Any]:
    from acdc_cli.config import read_toml

    marker = Path(run_dir) / RUN_MARKER
    if not Path(run_dir).is_dir() or not marker.is_file():
        raise AcdcError(f"{run_dir} is not an acdc run dir (expected {RUN_MARKER} and last.safetensors)")
    if not (Path(run_dir) / "last.safetensors").is_file():
        raise AcdcError(f"{run_dir} has no checkpoint yet (stopped before its first one); start it again with --force")
    return read_toml(marker)


# ----------------------------------------------------------------------------------------------------------------
# checkpoint of the run's last epoch: weights + masks (safetensors) and a resume state (torch.load weights_only)


def save_last(run_dir: Path, ckpt: Checkpoint, state: dict[str, Any]) -> None:
    """Write the pair so that a crash at any point leaves one matching (weights, state) pair on disk.

    Order: keep the old state as ``last.state.prev.pt``, write the new state, then the weights. The weights'
    ``epoch`` and ``step`` pick whichever state file matches them on resume.
    """
    current, previous = run_dir / "last.state.pt", run_dir / "last.state.prev.pt"
    if current.exists():
        current.replace(previous)
    save_state(current, state)
    save_checkpoint(run_dir / "last.safetensors", ckpt)


def load_last(run_dir: Path) -> tuple[Checkpoint, dict[str, Any]]:
    ckpt = load_checkpoint(run_dir / "last.safetensors")
    step = ckpt.extra.get("step", 0)
    for name in ("last.state.pt", "last.state.prev.pt"):
        path = run_dir / name
        if path.exists():
            state = load_state(path)
            progress = state.get("progress")
            if isinstance(progress, dict) and (progress.get("epoch"), progress.get("step", 0)) == (ckpt.epoch, step):
                return ckpt, state
    raise AcdcError(f"{run_dir}: no resume state matches last.safetensors (epoch {ckpt.epoch}, step {step})")


# ----------------------------------------------------------------------------------------------------------------
# the loop's pieces


def build_optimizer(model: nn.Module, settings: Settings) -> torch.optim.SGD:
    o = settings.optim
    return torch.optim.SGD(
        model.parameters(),
        lr=o.lr,
        momentum=o.momentum,
        nesterov=o.nesterov and o.momentum > 0,
        weight_decay=o.weight_decay,
    )


def enter_phase(phase: Phase, sparsifier: Sparsifier, optimizer: torch.optim.Optimizer, settings: Settings,
                held_masks: dict[str, torch.Tensor] | None = None) -> float | None:
    """Phase boundary: prune (compressed) or restore (decompressed), then reset momentum. Returns mask change."""
    change = None
    if phase.kind == "sparse":
        if held_masks is not None:
            sparsifier.set_masks(held_masks)
        else:
            change = sparsifier.compress(phase.sparsity)
    else:
        sparsifier.decompress()
    if settings.schedule.reset_momentum:
        reset_momentum(optimizer)
    return change


@dataclass
class EpochTotals:
    """An epoch's sums so far, kept on the device so that a step never waits for the host. Mid-epoch checkpoints
    save them, so a resumed epoch reports the metrics an uninterrupted one would."""

    loss_sum: torch.Tensor  # float64: sum of per-image losses
    correct: torch.Tensor  # long: top-1 hits
    first_bad: torch.Tensor  # long: the first step with a non-finite loss, -1 while there is none
    step: int = 0  # steps done in this epoch
    count: int = 0  # images in loss_sum / correct
    skipped: int = 0  # steps skipped for a non-finite loss (runtime.nan_policy = "skip")

    @classmethod
    def start(cls, device: torch.device, saved: dict[str, Any] | None = None) -> EpochTotals:
        totals = cls(
            torch.zeros((), device=device, dtype=torch.float64),
            torch.zeros((), device=device, dtype=torch.long),
            torch.full((), -1, device=device, dtype=torch.long),
        )
        if saved is not None:
            totals.loss_sum.copy_(saved["loss_sum"])
            totals.correct.copy_(saved["correct"])
            totals.step, totals.count, totals.skipped = int(saved["step"]), int(saved["count"]), int(saved["skipped"])
        return totals

    def as_state(self) -> dict[str, Any]:
        return {"loss_sum": self.loss_sum.cpu(), "correct": self.correct.cpu(), "step": self.step,
                "count": self.count, "skipped": self.skipped}


def gather_totals(totals: EpochTotals) -> list[dict[str, Any]]:
    """Every rank's sums in rank order, for a mid-epoch checkpoint (a collective under DDP): each rank's share of
    the epoch differs, so each resumes its own."""
    if not (dist.is_available() and dist.is_initialized()):
        return [totals.as_state()]
    local = torch.stack([totals.loss_sum, totals.correct.double(),
                         torch.tensor(float(totals.count), dtype=torch.float64, device=totals.loss_sum.device),
                         torch.tensor(float(totals.skipped), dtype=torch.float64, device=totals.loss_sum.device)])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return [{"loss_sum": g[0].cpu(), "correct": g[1].long().cpu(), "step": totals.step, "count": int(g[2]),
             "skipped": int(g[3])} for g in gathered]


_NO_BAD_STEP = 2**62


def raise_if_bad(totals: EpochTotals, epoch: int) -> None:
    """Stop on a non-finite loss before anything is saved; every rank raises, naming the first bad step of any."""
    local = int(totals.first_bad.item())
    bad = reduce_int(local if local >= 0 else _NO_BAD_STEP, "min")
    if bad != _NO_BAD_STEP:
        raise TrainingFault(f"non-finite loss at epoch {epoch}, step {bad}; the last good checkpoint is kept")


def step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """A well-mixed 63-bit seed per (seed, epoch, step, rank); distinct tuples never share a stream in practice."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{step}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def train_epoch(
    net: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    sparsifier: Sparsifier,
    settings: Settings,
    epoch: int,
    device: torch.device,
    progress: Progress | None,
    totals: EpochTotals | None = None,
    after_step: Callable[[EpochTotals], bool] | None = None,
    rank: int = 0,
) -> dict[str, float] | None:
    """Train one epoch from step ``totals.step`` (non-zero when resuming mid-epoch).

    ``after_step`` runs after every step (checkpoints, preemption); when it returns True the epoch stops there and
    this returns None.
    """
    net.train()
    steps = len(loader)
    totals = totals or EpochTotals.start(device)
    skip_bad = settings.runtime.nan_policy == "skip"
    task = progress.add_task(f"epoch {epoch}", total=steps, completed=totals.step) if progress else None
    seen = 0
    started = time.perf_counter()
    try:
        for step, (images, labels, *_) in enumerate(loader.iterate(totals.step) if totals.step else loader,
                                                     start=totals.step):
            lr = learning_rate(settings, epoch + step / steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # dropout's randomness is a function of (seed, epoch, step, rank): a run resumed at any step draws what
            # an uninterrupted one would, and ranks draw differently
            torch.manual_seed(step_seed(settings.runtime.seed, epoch, step, rank))
            # "skip" must undo the batch-norm statistics a bad forward pass moved
            buffers = [b.clone() for b in net.buffers()] if skip_bad else []
            with autocast(device, settings.runtime.amp):
                logits = net(images)
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=settings.optim.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # also for a step that is skipped: DDP expects every forward to have its backward
            detached = loss.detach()
            if skip_bad and reduce_int(int(not torch.isfinite(detached))):
                for buffer, saved in zip(net.buffers(), buffers):
                    buffer.copy_(saved)
                totals.skipped += 1
            else:
                sparsifier.apply_to_grads()
                optimizer.step()
                sparsifier.apply_to_weights()

                bad_now = (~torch.isfinite(detached)) & (totals.first_bad < 0)
                totals.first_bad = torch.where(bad_now, torch.full_like(totals.first_bad, step), totals.first_bad)
                totals.loss_sum += detached.double() * labels.numel()
                totals.correct += (logits.detach().argmax(1) == labels).sum()
                totals.count += labels.numel()
            totals.step = step + 1
            seen += labels.numel()
            if task is not None:
                progress.advance(task)
            if after_step is not None and after_step(totals):
                return None
    finally:
        if task is not None:
            progress.remove_task(task)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - started
    raise_if_bad(totals, epoch)
    return {
        "train_loss": totals.loss_sum.item() / max(totals.count, 1),
        "train_top1": totals.correct.item() / max(totals.count, 1),
        "lr": learning_rate(settings, epoch + (steps - 1) / steps),
        "img_per_s": seen / max(elapsed, 1e-9),
        "skipped_steps": totals.skipped,
    }


def _model_kwargs(settings: Settings, bundle: data_mod.DataBundle) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"num_classes": bundle.num_classes, "in_channels": bundle.in_channels}
    if settings.model.dropout is not None:
        kwargs["dropout"] = settings.model.dropout
    return kwargs


def _checkpoint(model: nn.Module, sparsifier: Sparsifier, settings: Settings, model_kwargs: dict[str, Any],
                epoch: int, phase: str, metrics: dict[str, Any]) -> Checkpoint:
    # snapshots on the host: the files are written in the background while training changes the live tensors
    return Checkpoint(
        weights=host_copy(dict(model.state_dict())),
        masks=host_copy(dict(sparsifier.masks or {})),
        arch=settings.model.name,
        model_kwargs=model_kwargs,
        config=settings.model_dump(mode="json"),
        epoch=epoch,
        phase=phase,
        metrics=host_copy(metrics),
        extra={"preset": settings.preset, "paper_top1": settings.paper_top1, "kind": "train"},
    )


# ----------------------------------------------------------------------------------------------------------------


def run(
    settings: Settings,
    run_dir: Path,
    *,
    resume: bool = False,
    from_checkpoint: Path | None = None,
    console: Console | None = None,
) -> RunResult:
    console = console or Console()
    info = distributed.setup(settings.runtime.device)
    device = info.device
    try:
        with StopSignal() as stop:
            result = _run(settings, Path(run_dir), info, device, resume, from_checkpoint, console, stop)
        # rank 0 still writes and tests after the loop; a rank that tore its process group down meanwhile, or with
        # DDP's reducer still alive, can abort in gloo's threads ("terminate called without an active exception"):
        # free the training objects, then leave together
        gc.collect()
        distributed.barrier()
        return result
    finally:
        distributed.teardown()


def _run(settings, run_dir, info, device, resume, from_checkpoint, console, stop: StopSignal) -> RunResult:
    if settings.runtime.threads:
        torch.set_num_threads(settings.runtime.threads)
    if settings.runtime.deterministic:
        torch.use_deterministic_algorithms(True)
    seed = settings.runtime.seed
    torch.manual_seed(seed)
    phases = plan(settings)
    if settings.schedule.start_epoch == "checkpoint" and from_checkpoint is None and not resume:
        raise AcdcError("schedule.start_epoch = 'checkpoint' continues a checkpoint: pass --from CHECKPOINT")

    bundle = data_mod.build(settings, device, info.rank, info.world_size)
    model_kwargs = _model_kwargs(settings, bundle)
    model = models.create(settings.model.name, **model_kwargs).to(device)
    # net (DDP / compile / channels_last) runs the training step; model keeps the names that checkpoints save
    net = runtime.prepare_model(model, settings, info)
    val_loader = runtime.shard_for_eval(bundle.val, info)
    sparsifier = Sparsifier(model, settings.sparsity.include, settings.sparsity.exclude,
                            settings.sparsity.scope, settings.sparsity.structure)
    optimizer = build_optimizer(model, settings)
    left_dense = [f"{r.module} ({r.reason})" for r in sparsifier.rules if not r.selected]
    if info.is_main and left_dense and settings.schedule.method != "dense":
        console.print("left dense by rule: " + ", ".join(left_dense), markup=False, highlight=False)
    run_state = RunState()
    held_masks = None
    totals: EpochTotals | None = None  # set when resuming mid-epoch
    preempted: dict[str, Any] | None = None

    if resume:
        if info.is_main:
            remove_stale_temps(run_dir)
        run_state, totals = _resume(run_dir, model, sparsifier, optimizer, device, info.rank, info.world_size)
    elif from_checkpoint is not None:
        source = load_checkpoint(from_checkpoint)
        if source.arch != settings.model.name:
            raise AcdcError(f"--from {from_checkpoint} holds a {source.arch}, settings ask for {settings.model.name}")
        classes = source.model_kwargs.get("num_classes")
        if classes != model_kwargs["num_classes"]:
            raise AcdcError(f"--from {from_checkpoint} was trained for {classes} classes, "
                            f"{settings.data.name} has {model_kwargs['num_classes']}")
        load_weights(model, source.weights, source=str(from_checkpoint))
        run_state.epoch = _start_epoch(settings, from_checkpoint, source.epoch)
        first = phase_at(phases, run_state.epoch)
        if source.masks and first.kind == "sparse":
            if sparsifier.masks_fit(source.masks, first.sparsity):
                held_masks = source.masks
            elif info.is_main:
                console.print(f"note: the masks in {from_checkpoint} do not match these sparsity rules at "
                              f"{first.sparsity:g}; the first compressed phase computes its own", markup=False)
    else:
        run_state.epoch = _start_epoch(settings, None, 0)

    is_main = info.is_main
    logger = MetricsLogger(run_dir, console, settings.log.tensorboard, settings.log.per_layer,
                           run_state.epoch) if is_main else None
    if is_main:  # on resume too: a moved data.dir or a new runtime knob is what the run now uses
        atomic_write_text(run_dir / RUN_MARKER, settings.to_toml())

    progress = None
    if is_main and settings.log.progress and console.is_terminal:
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), console=console, transient=True)
        progress.start()
    # a fresh run that starts inside a phase (schedule.start_epoch) enters that phase at its first epoch
    fresh_start = None if resume else run_state.epoch
    writer = BackgroundWriter()  # rank 0's checkpoint files, written while the next epoch trains
    try:
        for epoch in range(run_state.epoch, settings.schedule.epochs):
            phase = phase_at(phases, epoch)
            mask_checksums = None
            if totals is None:  # a mid-epoch resume is inside its phase already
                if epoch in (phase.start, fresh_start):
                    run_state.mask_change = enter_phase(phase, sparsifier, optimizer, settings, held_masks)
                    held_masks = None
                totals = EpochTotals.start(device)
            if epoch in (phase.start, fresh_start):
                mask_checksums = runtime.verify_masks(sparsifier.masks, info)
            bundle.train.set_epoch(epoch)
            save = functools.partial(_save_step, writer, run_dir, model, sparsifier, optimizer, settings,
                                     model_kwargs, phase, run_state) if is_main else None
            after_step = functools.partial(_after_step, stop=stop, every=settings.runtime.checkpoint_every_steps,
                                           steps=len(bundle.train), epoch=epoch, save=save)
            stats = train_epoch(net, bundle.train, optimizer, sparsifier, settings, epoch, device, progress,
                                totals, after_step, info.rank)
            if stats is None:
                preempted = {"signal": stop.name, "epoch": epoch, "step": totals.step}
                break
            totals = None
            stats = runtime.reduce_train_stats(stats, info)
            val = runtime.evaluate(model, val_loader, device, settings.runtime.amp, info)
            sparse_stats = sparsifier.stats()
            row = {
                "epoch": epoch,
                "phase": phase.kind,
                "target_sparsity": phase.sparsity,
                "sparsity": sparse_stats["sparsity"],
                "lr": stats["lr"],
                "train_loss": stats["train_loss"],
                "train_top1": stats["train_top1"],
                "val_loss": val["loss"],
                "val_top1": val["top1"],
                "val_top5": val["top5"],
                "mask_change": run_state.mask_change if phase.kind == "sparse" else None,
                "mask_checksums": mask_checksums,
                "img_per_s": stats["img_per_s"],
                "skipped_steps": stats["skipped_steps"],
            }
            if bundle.memorized is not None:
                row.update(evaluate_memorized(model, bundle.memorized, device, settings.runtime.amp))
            run_state.epoch = epoch + 1
            if is_main:
                logger.log_epoch(row, sparse_stats["per_layer"])
                _save_epoch(writer, run_dir, model, sparsifier, optimizer, settings, model_kwargs, phase, row,
                            run_state)
            if epoch + 1 < settings.schedule.epochs and stop.should_stop():
                preempted = {"signal": stop.name, "epoch": epoch + 1, "step": 0}
                break
    except BaseException:
        with contextlib.suppress(BaseException):  # the error in flight matters more than a failed write
            writer.wait()
        raise
    else:
        writer.wait()  # every checkpoint on disk before the run reports, tests best_* or exits
    finally:
        if progress is not None:
            progress.stop()
        if logger is not None:
            logger.close()

    result = RunResult(run_dir, run_state.best_sparse, run_state.best_dense, sparsifier.stats()["sparsity"],
                       preempted=preempted)
    if is_main and preempted is None:
        _test_best(run_dir, result, bundle, device, settings)
    if is_main:
        result.files = sorted(p for p in run_dir.iterdir() if p.is_file() and not p.name.startswith("."))
        result.files.append(run_dir / "tb")
    return result


def _start_epoch(settings: Settings, from_checkpoint: Path | None, checkpoint_epoch: int) -> int:
    """schedule.start_epoch resolved: 'checkpoint' is the --from checkpoint's epoch (epochs it completed)."""
    start = settings.schedule.start_epoch
    if start != "checkpoint":
        return start
    if checkpoint_epoch >= settings.schedule.epochs:
        raise AcdcError(
            f"--from {from_checkpoint} completed {checkpoint_epoch} epochs; schedule.epochs is "
            f"{settings.schedule.epochs}, so nothing is left to continue"
        )
    return checkpoint_epoch


def _save_epoch(writer, run_dir, model, sparsifier, optimizer, settings, model_kwargs, phase, row, run_state) -> None:
    """last every epoch; best_sparse (compressed phase at full target sparsity) and best_dense by val top-1.
    The files are written in the background (``writer``) from snapshots taken here."""
    epoch = row["epoch"]
    ckpt = _checkpoint(model, sparsifier, settings, model_kwargs, epoch + 1, phase.kind, row)
    at_target = phase.kind == "sparse" and abs(phase.sparsity - settings.sparsity.target) < 1e-9
    best_key = "best_sparse" if at_target else "best_dense" if phase.kind == "dense" else None
    best_path = None
    if best_key is not None:
        best = getattr(run_state, best_key)
        if best is None or row["val_top1"] > best["val_top1"]:
            setattr(run_state, best_key, {"epoch": epoch, "val_top1": row["val_top1"]})
            best_path = run_dir / f"{best_key}.safetensors"
    writer.submit(_write_checkpoints, run_dir, ckpt, _resume_state(run_state, optimizer, sparsifier), best_path)


def _write_checkpoints(run_dir: Path, ckpt: Checkpoint, state: dict[str, Any], best_path: Path | None) -> None:
    if best_path is not None:
        save_checkpoint(best_path, ckpt)
    save_last(run_dir, ckpt, state)


def _after_step(totals: EpochTotals, *, stop: StopSignal, every: int, steps: int, epoch: int,
                save: Callable[[int, list[dict[str, Any]]], None] | None) -> bool:
    """Between two steps: write last.* every ``every`` steps, and once a signal came write it and stop."""
    stopping = stop.should_stop(totals.step)
    if stopping or (every and totals.step % every == 0 and totals.step < steps):
        raise_if_bad(totals, epoch)  # never replace the last good checkpoint with diverged weights
        every_rank = gather_totals(totals)
        if save is not None:
            save(totals.step, every_rank)
    return stopping


def _save_step(writer, run_dir, model, sparsifier, optimizer, settings, model_kwargs, phase, run_state, step: int,
               every_rank: list[dict[str, Any]]) -> None:
    """A mid-epoch last.*: each rank's sums so far let the epoch go on as if never stopped."""
    own = every_rank[0]
    partial = {"epoch": run_state.epoch, "step": step, "phase": phase.kind,
               "train_loss": own["loss_sum"].item() / max(own["count"], 1),
               "train_top1": own["correct"].item() / max(own["count"], 1)}
    ckpt = _checkpoint(model, sparsifier, settings, model_kwargs, run_state.epoch, phase.kind, partial)
    ckpt.extra["step"] = step
    writer.submit(_write_checkpoints, run_dir, ckpt,
                  _resume_state(run_state, optimizer, sparsifier, step, every_rank), None)


def _resume_state(run_state: RunState, optimizer: torch.optim.Optimizer, sparsifier: Sparsifier, step: int = 0,
                  every_rank: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Everything besides weights and masks that continues the run; tensors and plain data only (weights_only).

    No RNG state: data order and augmentation come from (seed, epoch) and dropout from (seed, epoch, step, rank)."""
    state = {
        "progress": {**run_state.as_dict(), "step": step},
        "optimizer": optimizer.state_dict(),
        "previous_masks": sparsifier.previous,
    }
    if every_rank is not None:
        state["totals"] = every_rank
    return host_copy(state)


def _resume(run_dir: Path, model: nn.Module, sparsifier: Sparsifier, optimizer: torch.optim.Optimizer,
            device: torch.device, rank: int, world_size: int) -> tuple[RunState, EpochTotals | None]:
    """Load the newest complete checkpoint and its state; returns the progress and, mid-epoch, the epoch's sums."""
    ckpt, state = load_last(run_dir)
    load_weights(model, ckpt.weights, source=str(run_dir / "last.safetensors"))
    sparsifier.set_masks(ckpt.masks or None)
    try:
        optimizer.load_state_dict(state["optimizer"])
        previous = state.get("previous_masks")
        sparsifier.previous = {k: v.to(device) for k, v in previous.items()} if previous is not None else None
        p = state["progress"]
        run_state = RunState(p["epoch"], p["best_sparse"], p["best_dense"], p["mask_change"])
        totals = None
        if p.get("step"):
            every_rank = state["totals"]
            if len(every_rank) != world_size:
                raise AcdcError(f"{run_dir} stopped mid-epoch in a run of {len(every_rank)} process(es); resume it "
                                f"with as many (this run has {world_size}), or from an epoch-end checkpoint")
            totals = EpochTotals.start(device, every_rank[rank])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        detail = str(exc).splitlines()[0][:120] if str(exc) else ""
        raise AcdcError(f"{run_dir}: malformed resume state ({exc.__class__.__name__} {detail})") from None
    return run_state, totals


def _test_best(run_dir: Path, result: RunResult, bundle, device: torch.device, settings: Settings) -> None:
    """Evaluate the best sparse and best dense checkpoints on the test split for the summary."""
    for key in ("best_sparse", "best_dense"):
        best = getattr(result, key)
        path = run_dir / f"{key}.safetensors"
        if best is None or not path.exists() or bundle.test is None:
            continue
        model = build_model(load_checkpoint(path)).to(device)
        best["test_top1"] = evaluate(model, bundle.test, device, settings.runtime.amp)["top1"]


def summary_panel(result: RunResult) -> Panel:
    def line(label: str, best: dict[str, Any] | None) -> str:
        if best is None:
            return f"{label}: none"
        test = f", test top-1 {best['test_top1']:.4f}" if "test_top1" in best else ""
        return f"{label}: val top-1 {best['val_top1']:.4f} (epoch {best['epoch']}){test}"

    lines = [
        line("best sparse", result.best_sparse),
        line("best dense ", result.best_dense),
        f"final sparsity: {result.final_sparsity:.4f} of prunable weights",
        "files: " + ", ".join(p.name for p in result.files),
        f"run dir: {result.run_dir}",
        f"tensorboard --logdir {result.run_dir / 'tb'}",
    ]
    return Panel("\n".join(lines), title="acdc run finished", expand=False)
