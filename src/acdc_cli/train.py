"""The AC/DC training loop: per epoch -> phase boundary? (prune | restore, reset momentum) -> train -> eval -> log ->
checkpoint. Everything else is a call into a small function."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from acdc_cli import data as data_mod
from acdc_cli import distributed, models
from acdc_cli.checkpoint import (
    Checkpoint,
    atomic_write_text,
    build_model,
    load_checkpoint,
    load_state,
    load_weights,
    save_checkpoint,
    save_state,
)
from acdc_cli.config import Settings
from acdc_cli.errors import AcdcError, TrainingFault
from acdc_cli.evaluate import autocast, evaluate
from acdc_cli.metrics import MetricsLogger
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
        shutil.rmtree(run_dir / "tb", ignore_errors=True)


def saved_settings(run_dir: Path) -> dict[str, Any]:
    from acdc_cli.config import read_toml

    marker = Path(run_dir) / RUN_MARKER
    if not Path(run_dir).is_dir() or not marker.is_file() or not (Path(run_dir) / "last.safetensors").is_file():
        raise AcdcError(f"{run_dir} is not an acdc run dir with a checkpoint (expected {RUN_MARKER} and last.safetensors)")
    return read_toml(marker)


# ----------------------------------------------------------------------------------------------------------------
# checkpoint of the run's last epoch: weights + masks (safetensors) and a resume state (torch.load weights_only)


def save_last(run_dir: Path, ckpt: Checkpoint, state: dict[str, Any]) -> None:
    """Write the pair so that a crash at any point leaves one matching (weights, state) pair on disk.

    Order: keep the old state as ``last.state.prev.pt``, write the new state, then the weights. The weights'
    ``epoch`` picks whichever state file matches it on resume.
    """
    current, previous = run_dir / "last.state.pt", run_dir / "last.state.prev.pt"
    if current.exists():
        current.replace(previous)
    save_state(current, state)
    save_checkpoint(run_dir / "last.safetensors", ckpt)


def load_last(run_dir: Path) -> tuple[Checkpoint, dict[str, Any]]:
    ckpt = load_checkpoint(run_dir / "last.safetensors")
    for name in ("last.state.pt", "last.state.prev.pt"):
        path = run_dir / name
        if path.exists():
            state = load_state(path)
            if state.get("progress", {}).get("epoch") == ckpt.epoch:
                return ckpt, state
    raise AcdcError(f"{run_dir}: no resume state matches last.safetensors (epoch {ckpt.epoch})")


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


def train_epoch(
    net: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    sparsifier: Sparsifier,
    settings: Settings,
    epoch: int,
    device: torch.device,
    progress: Progress | None,
) -> dict[str, float]:
    net.train()
    steps = len(loader)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    # the first step with a non-finite loss, tracked on the device so the step never waits for the host
    first_bad = torch.full((), -1, device=device, dtype=torch.long)
    count = 0
    task = progress.add_task(f"epoch {epoch}", total=steps) if progress else None
    lr = settings.optim.lr
    started = time.perf_counter()
    for step, (images, labels, *_) in enumerate(loader):
        lr = learning_rate(settings, epoch + step / steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(device, settings.runtime.amp):
            logits = net(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=settings.optim.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sparsifier.apply_to_grads()
        optimizer.step()
        sparsifier.apply_to_weights()

        detached = loss.detach()
        bad_now = (~torch.isfinite(detached)) & (first_bad < 0)
        first_bad = torch.where(bad_now, torch.full_like(first_bad, step), first_bad)
        loss_sum += detached.double() * labels.numel()
        correct += (logits.detach().argmax(1) == labels).sum()
        count += labels.numel()
        if task is not None:
            progress.advance(task)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - started
    if task is not None:
        progress.remove_task(task)
    bad = int(first_bad.item())
    if bad >= 0:
        raise TrainingFault(f"non-finite loss at epoch {epoch}, step {bad}; the last good checkpoint is kept")
    return {
        "train_loss": loss_sum.item() / max(count, 1),
        "train_top1": correct.item() / max(count, 1),
        "lr": lr,
        "img_per_s": count / max(elapsed, 1e-9),
    }


def _model_kwargs(settings: Settings, bundle: data_mod.DataBundle) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"num_classes": bundle.num_classes, "in_channels": bundle.in_channels}
    if settings.model.dropout is not None:
        kwargs["dropout"] = settings.model.dropout
    return kwargs


def _checkpoint(model: nn.Module, sparsifier: Sparsifier, settings: Settings, model_kwargs: dict[str, Any],
                epoch: int, phase: str, metrics: dict[str, Any]) -> Checkpoint:
    return Checkpoint(
        weights={k: v.detach() for k, v in model.state_dict().items()},
        masks=dict(sparsifier.masks or {}),
        arch=settings.model.name,
        model_kwargs=model_kwargs,
        config=settings.model_dump(mode="json"),
        epoch=epoch,
        phase=phase,
        metrics=metrics,
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
        return _run(settings, Path(run_dir), info, device, resume, from_checkpoint, console)
    finally:
        distributed.teardown()


def _run(settings, run_dir, info, device, resume, from_checkpoint, console) -> RunResult:
    if settings.runtime.threads:
        torch.set_num_threads(settings.runtime.threads)
    if settings.runtime.deterministic:
        torch.use_deterministic_algorithms(True)
    seed = settings.runtime.seed
    torch.manual_seed(seed)
    phases = plan(settings)

    bundle = data_mod.build(settings, device, info.rank, info.world_size)
    model_kwargs = _model_kwargs(settings, bundle)
    model = models.create(settings.model.name, **model_kwargs).to(device)
    sparsifier = Sparsifier(model, settings.sparsity.include, settings.sparsity.exclude,
                            settings.sparsity.scope, settings.sparsity.structure)
    optimizer = build_optimizer(model, settings)
    run_state = RunState()
    held_masks = None

    if resume:
        ckpt, state = load_last(run_dir)
        load_weights(model, ckpt.weights, source=str(run_dir / "last.safetensors"))
        sparsifier.set_masks(ckpt.masks or None)
        optimizer.load_state_dict(state["optimizer"])
        sparsifier.previous = state.get("previous_masks")
        p = state["progress"]
        run_state = RunState(p["epoch"], p["best_sparse"], p["best_dense"], p["mask_change"])
    elif from_checkpoint is not None:
        source = load_checkpoint(from_checkpoint)
        if source.arch != settings.model.name:
            raise AcdcError(f"--from {from_checkpoint} holds a {source.arch}, settings ask for {settings.model.name}")
        load_weights(model, source.weights, source=str(from_checkpoint))
        if source.masks and phases[0].kind == "sparse":
            held_masks = source.masks

    is_main = info.is_main
    logger = MetricsLogger(run_dir, console, settings.log.tensorboard, settings.log.per_layer,
                           run_state.epoch) if is_main else None
    if is_main and not resume:
        atomic_write_text(run_dir / RUN_MARKER, settings.to_toml())

    progress = None
    if is_main and settings.log.progress and console.is_terminal:
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), console=console, transient=True)
        progress.start()
    try:
        for epoch in range(run_state.epoch, settings.schedule.epochs):
            phase = phase_at(phases, epoch)
            if epoch == phase.start:
                run_state.mask_change = enter_phase(phase, sparsifier, optimizer, settings, held_masks)
                held_masks = None
            # every epoch's randomness (dropout, order, augmentation) is a function of (seed, epoch): resumable
            torch.manual_seed(seed * 1_000_003 + epoch)
            bundle.train.set_epoch(epoch)
            stats = train_epoch(model, bundle.train, optimizer, sparsifier, settings, epoch, device, progress)
            val = evaluate(model, bundle.val, device, settings.runtime.amp)
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
                "img_per_s": stats["img_per_s"],
            }
            run_state.epoch = epoch + 1
            if is_main:
                logger.log_epoch(row, sparse_stats["per_layer"])
                _save_epoch(run_dir, model, sparsifier, optimizer, settings, model_kwargs, phase, row, run_state)
    finally:
        if progress is not None:
            progress.stop()
        if logger is not None:
            logger.close()

    result = RunResult(run_dir, run_state.best_sparse, run_state.best_dense, sparsifier.stats()["sparsity"])
    if is_main:
        _test_best(run_dir, result, bundle, device, settings)
        result.files = sorted(p for p in run_dir.iterdir() if p.is_file() and not p.name.startswith("."))
        result.files.append(run_dir / "tb")
    return result


def _save_epoch(run_dir, model, sparsifier, optimizer, settings, model_kwargs, phase, row, run_state) -> None:
    """last every epoch; best_sparse (compressed phase at full target sparsity) and best_dense by val top-1."""
    epoch = row["epoch"]
    ckpt = _checkpoint(model, sparsifier, settings, model_kwargs, epoch + 1, phase.kind, row)
    at_target = phase.kind == "sparse" and abs(phase.sparsity - settings.sparsity.target) < 1e-9
    best_key = "best_sparse" if at_target else "best_dense" if phase.kind == "dense" else None
    if best_key is not None:
        best = getattr(run_state, best_key)
        if best is None or row["val_top1"] > best["val_top1"]:
            setattr(run_state, best_key, {"epoch": epoch, "val_top1": row["val_top1"]})
            save_checkpoint(run_dir / f"{best_key}.safetensors", ckpt)
    state = {
        "progress": run_state.as_dict(),
        "optimizer": optimizer.state_dict(),
        "previous_masks": sparsifier.previous,
    }
    save_last(run_dir, ckpt, state)


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
