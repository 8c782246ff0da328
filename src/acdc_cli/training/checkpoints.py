"""A training run's folder and everything that continues a run: the last/best checkpoints, mid-epoch totals, resume,
and the start of a run from another checkpoint (``--from``) or from pretrained weights (``model.weights``).

Files of a run dir::

    config.toml                      the resolved settings; marks the folder as a run dir
    metrics.jsonl, tb/               per-epoch metrics (metrics.py)
    last.safetensors                 weights + masks + metadata of the newest checkpoint (its epoch, and step
                                     when written mid-epoch, and the name of its resume state)
    last.state.<N>.pt                the resume state of last.safetensors, tensors and plain data only (torch.load
                                     weights_only): progress, optimizer, engine (its masks are those of
                                     last.safetensors), gradient scaler, and mid-epoch every rank's sums so far
    .acdc.lock                       held (flock) by the process writing the run; holds its PID
    best_sparse.safetensors          best val top-1 in a compressed phase at the target sparsity (test top-1 when
                                     data.val_size = 0: the paper's protocol)
    best_dense.safetensors           best val (or test) top-1 in a dense epoch
                                     (every checkpoint's metadata names eval_precision: the precision the run's
                                     evaluations, and so the choice of best_*, ran in: fp32, bf16 or fp16)
    ema_best_sparse.safetensors      with optim.ema_decay: the same two choices for the EMA of the weights, by its
    ema_best_dense.safetensors       own top-1 (its weights and the model's masks at that epoch)

Rank 0 writes every file, in a background thread from host snapshots, so training goes on meanwhile; writes are
atomic (checkpoint.py), and the (weights, state) pair is replaced so that a complete pair is always on disk
(:func:`save_last`). The snapshots go into host buffers reused from one checkpoint to the next, pinned on CUDA, where
the training thread only queues the copies (checkpoint.HostSnapshot).
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from acdc_cli.config import Settings
from acdc_cli.data.bundle import selection_split
from acdc_cli.data.preprocessing import preprocessing
from acdc_cli.engine import ACDC
from acdc_cli.errors import AcdcError, TrainingFault
from acdc_cli.files.atomic import atomic_write_text, remove_stale_temps
from acdc_cli.files.checkpoint import Checkpoint, build_model, host_copy, load_checkpoint, load_weights, save_checkpoint
from acdc_cli.files.jsonio import FORMAT_VERSION, check_format_version
from acdc_cli.files.open import load_pretrained
from acdc_cli.files.torchfile import load_state, save_state
from acdc_cli.sparsity.schedule import Phase, phase_at
from acdc_cli.training.distributed import DistInfo
from acdc_cli.training.evaluation import evaluate
from acdc_cli.training.metrics import EpochTotals
from acdc_cli.training.resume import check_resume_state, first_epoch
from acdc_cli.training.rundir import RUN_MARKER
from acdc_cli.training.runtime import precision
from acdc_cli.training.snapshots import (
    BackgroundWriter,
    HostSnapshot,
    Taken,
    all_finite,
)


@dataclass
class RunState:
    """The run's progress besides weights, masks, optimizer and engine state."""

    epoch: int = 0  # epochs completed
    # {"epoch", "split", "<split>_top1"}: split "val", or "test" when data.val_size = 0
    best_sparse: dict[str, Any] | None = None
    best_dense: dict[str, Any] | None = None
    skip_streak: int = 0  # steps skipped in a row when the last epoch ended (runtime.nan_policy = "skip")
    ema_best_sparse: dict[str, Any] | None = None  # optim.ema_decay: as best_*, for the EMA of the weights
    ema_best_dense: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "best_sparse": self.best_sparse, "best_dense": self.best_dense,
                "skip_streak": self.skip_streak, "ema_best_sparse": self.ema_best_sparse,
                "ema_best_dense": self.ema_best_dense}


def snapshot(model: nn.Module, engine: ACDC, settings: Settings, model_kwargs: dict[str, Any], epoch: int,
             phase: str, metrics: dict[str, Any], host: HostSnapshot | None = None, place: str = "") -> Checkpoint:
    """The checkpoint of the model as it is now, in host memory: it is written in the background while training
    changes the live tensors. ``host``: reused (pinned) buffers to copy into, inside ``host.taking()``; else new
    memory; ``place`` keeps the buffers of a second snapshot in the same taking (the EMA's) apart."""
    copy = host.copy if host is not None else (lambda value, *path: host_copy(value))
    config = settings.model_dump(mode="json")
    return Checkpoint(
        weights=copy(dict(model.state_dict()), place + "weights"),
        masks=copy(dict(engine.masks), place + "masks"),
        arch=settings.model.name,
        model_kwargs=model_kwargs,
        config=config,
        epoch=epoch,
        phase=phase,
        metrics=host_copy(metrics),
        extra={"preset": settings.preset, "paper_top1": settings.paper_top1, "kind": "train",
               "selection_split": selection_split(settings), "preprocessing": preprocessing(config),
               "eval_precision": precision(_device_of(model), settings.runtime.eval_amp)},
    )


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


def refuse_non_finite(model: nn.Module, where: str) -> None:
    """Stop the run (exit 1) rather than write a checkpoint whose weights or statistics hold NaN or infinity: one
    fused check over the model's tensors where they live, at save time only (no step waits for it), before the
    snapshot is taken."""
    tensors = model.state_dict()
    if bool(all_finite(tensors.values())):
        return
    name = next(n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    raise TrainingFault(f"non-finite weights in the checkpoint {where} ({name}); the run stops without writing it, "
                        "the last good checkpoint is kept")


def resume_state(run_state: RunState, engine: ACDC, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, step: int = 0,
                 every_rank: list[dict[str, Any]] | None = None, host: HostSnapshot | None = None,
                 ema: Any = None) -> dict[str, Any]:
    """Everything besides weights and masks that continues the run, as a host snapshot; tensors and plain data only.

    No RNG state: data order and augmentation come from (seed, epoch) and dropout from (seed, epoch, step, rank)."""
    engine_state = engine.state_dict()
    del engine_state["masks"]  # stored once, in the checkpoint beside this state
    state = {
        "format_version": FORMAT_VERSION,
        "progress": {**run_state.as_dict(), "step": step},
        "optimizer": optimizer.state_dict(),
        "engine": engine_state,
        "scaler": scaler.state_dict(),
    }
    if every_rank is not None:
        state["totals"] = every_rank
    if ema is not None:
        state["ema"] = ema.state_dict()
    return host.copy(state, "state") if host is not None else host_copy(state)


def save_last(run_dir: Path, ckpt: Checkpoint, state: dict[str, Any]) -> None:
    """Write a new (weights, resume state) pair so that the previous pair stays complete on disk until the new one
    is: a crash, a kill or a full disk at any point, again and again, leaves a pair that resumes.

    The state goes to a file of its own, ``last.state.<generation>.pt`` with a generation no file in the folder has
    yet; ``last.safetensors`` then names it in its metadata (``resume_state``), and its atomic replacement is the
    switch from the old pair to the new. Only after that are the older state files deleted. Nothing is ever renamed
    away: a failure before the switch leaves the old ``last.safetensors`` naming the old state, untouched.
    """
    generation = 1 + max((_generation(p.name) or 0 for p in run_dir.glob("last.state*.pt")), default=0)
    name = f"last.state.{generation}.pt"
    save_state(run_dir / name, state)
    save_checkpoint(run_dir / "last.safetensors", replace(ckpt, extra={**ckpt.extra, "resume_state": name}))
    for old in run_dir.glob("last.state*.pt"):
        if old.name != name:
            with contextlib.suppress(OSError):  # left for the next save: it pairs with nothing
                old.unlink()


_STATE_NAME = re.compile(r"last\.state\.([0-9]{1,18})\.pt")


def _generation(name: str) -> int | None:
    found = _STATE_NAME.fullmatch(name)
    return int(found.group(1)) if found else None


def load_last(run_dir: Path) -> tuple[Checkpoint, dict[str, Any]]:
    """``last.safetensors`` and the resume state it names."""
    ckpt = load_checkpoint(run_dir / "last.safetensors")
    return ckpt, _paired_state(run_dir, ckpt)[1]


def state_path(run_dir: Path) -> Path:
    """The resume state file that pairs with the run's ``last.safetensors``; an AcdcError when there is none."""
    return _paired_state(Path(run_dir), load_checkpoint(Path(run_dir) / "last.safetensors"))[0]


def _paired_state(run_dir: Path, ckpt: Checkpoint) -> tuple[Path, dict[str, Any]]:
    step = ckpt.extra.get("step", 0)
    named = ckpt.extra.get("resume_state")
    if named is None:
        raise AcdcError(f"{run_dir / 'last.safetensors'} names no resume state (no resume_state in its metadata)")
    if not (isinstance(named, str) and _generation(named) is not None):
        raise AcdcError(f"{run_dir / 'last.safetensors'}: malformed metadata (resume_state {str(named)[:60]!r} is "
                        "not a last.state.N.pt name)")
    path = run_dir / named
    if not path.exists():
        raise AcdcError(f"{run_dir}: {named}, the resume state last.safetensors names, is missing")
    state = load_state(path)
    check_format_version(state.get("format_version"), path)
    progress = state.get("progress")
    if not (isinstance(progress, dict) and (progress.get("epoch"), progress.get("step", 0)) == (ckpt.epoch, step)):
        raise AcdcError(f"{path} does not hold the progress last.safetensors records (epoch {ckpt.epoch}, step "
                        f"{step})")
    return path, state


def _write_checkpoints(run_dir: Path, ckpt: Checkpoint, state: dict[str, Any] | None,
                       bests: list[tuple[Path, Checkpoint]]) -> None:
    for path, best in bests:
        save_checkpoint(path, best)
    if state is not None:  # None: an epoch runtime.checkpoint_every skips, whose best_* are written alone
        save_last(run_dir, ckpt, state)


def _write_when_copied(taken: Taken, run_dir: Path, ckpt: Checkpoint, state: dict[str, Any] | None,
                       bests: list[tuple[Path, Checkpoint]]) -> None:
    taken.wait()  # in the writer thread: the device-to-host copies the training thread queued have landed
    _write_checkpoints(run_dir, ckpt, state, bests)


@dataclass
class EpochFiles:
    """An epoch's checkpoints as host snapshots, ready for the writer: last.* (``state`` None when the cadence skips
    it) and the best_* this epoch set."""

    epoch: int
    taken: Taken
    ckpt: Checkpoint
    state: dict[str, Any] | None
    bests: list[tuple[Path, Checkpoint]]


class RunDir:
    """The run dir of one training run and the objects whose state it keeps: rank 0 writes, every rank resumes."""

    def __init__(self, path: Path, settings: Settings, model_kwargs: dict[str, Any], model: nn.Module, engine: ACDC,
                 optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, info: DistInfo,
                 ema: Any = None):  # training.recipe.WeightEma (optim.ema_decay)
        self.path = Path(path)
        self.ema = ema
        self.settings = settings
        self.model_kwargs = model_kwargs
        self.model, self.engine, self.optimizer, self.scaler = model, engine, optimizer, scaler
        self.info = info
        self.state = RunState()
        self._writer = BackgroundWriter()  # rank 0's checkpoint files, written while the next epoch trains
        self._host = HostSnapshot()  # the host buffers each checkpoint is copied into before it is written
        self._waited = 0.0  # seconds the training thread waited for the writer since the last epoch-end save

    # starting ---------------------------------------------------------------------------------------------------

    def write_config(self) -> None:
        """config.toml, on resume too: a moved data.dir or a new runtime knob is what the run now uses."""
        if self.info.is_main:
            atomic_write_text(self.path / RUN_MARKER, self.settings.to_toml())

    def resume(self) -> EpochTotals | None:
        """Load the newest complete checkpoint and its state into the model, engine, optimizer and scaler; sets
        :attr:`state`. Returns this rank's sums of the epoch when the checkpoint was written mid-epoch.

        The state is checked whole before any of it is loaded, so a malformed one is a one-line error before the
        first step, never a failure an epoch later."""
        if self.info.is_main:
            remove_stale_temps(self.path)
        ckpt = load_checkpoint(self.path / "last.safetensors")
        path, state = _paired_state(self.path, ckpt)
        load_weights(self.model, ckpt.weights, source=str(self.path / "last.safetensors"))
        progress, every_rank = state.get("progress"), state.get("totals")
        if isinstance(progress, dict) and progress.get("step") and isinstance(every_rank, list) and \
                len(every_rank) != self.info.world_size:
            raise AcdcError(f"{self.path} stopped mid-epoch in a run of {len(every_rank)} process(es); resume it "
                            f"with as many (this run has {self.info.world_size}), or from an epoch-end checkpoint")
        try:
            engine_state = check_resume_state(state, self.optimizer, self.engine.prunable, self.engine.plan,
                                              self.info.world_size, selection_split(self.settings))
        except AcdcError as exc:
            raise AcdcError(f"{path}: malformed resume state: {exc}") from None
        p = state["progress"]
        self.state = RunState(p["epoch"], p["best_sparse"], p["best_dense"], p.get("skip_streak", 0),
                              p.get("ema_best_sparse"), p.get("ema_best_dense"))
        if self.ema is not None and not isinstance(state.get("ema"), dict):
            raise AcdcError(f"{path}: malformed resume state: no EMA weights, and optim.ema_decay is set")
        try:  # what the checks above do not foresee is still one line
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
            self.engine.load_state_dict({**engine_state, "masks": ckpt.masks or None})
            self.optimizer.load_state_dict(state["optimizer"])
            if state.get("scaler") and self.scaler.is_enabled():  # none saved: the run was not fp16 until now
                self.scaler.load_state_dict(state["scaler"])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
            detail = str(exc).splitlines()[0][:120] if str(exc) else ""
            raise AcdcError(f"{path}: malformed resume state ({exc.__class__.__name__} {detail})") from None
        if self.info.is_main:
            # states of saves that never completed: on a full disk their space is what the next save needs (only
            # rank 0 deletes, and other ranks read the named state alone)
            for orphan in self.path.glob("last.state*.pt"):
                if orphan != path:
                    with contextlib.suppress(OSError):
                        orphan.unlink()
        if not p.get("step"):
            return None
        return EpochTotals.start(self.info.device, state["totals"][self.info.rank])

    def start_from(self, checkpoint: Path, console: Console) -> None:
        """``--from``: the checkpoint's weights; its masks too when the first epoch is compressed and they fit the
        rules; ``schedule.start_epoch = 'checkpoint'`` continues at its epoch."""
        source = load_checkpoint(checkpoint)
        name = self.settings.model.name
        if source.arch != name:
            raise AcdcError(f"--from {checkpoint} holds a {source.arch}, settings ask for {name}")
        classes = source.model_kwargs.get("num_classes")
        if classes != self.model_kwargs["num_classes"]:
            raise AcdcError(f"--from {checkpoint} was trained for {classes} classes, {self.settings.data.name} has "
                            f"{self.model_kwargs['num_classes']}")
        load_weights(self.model, source.weights, source=str(checkpoint))
        self.state.epoch = first_epoch(self.settings, checkpoint, source.epoch)
        first = phase_at(list(self.engine.plan), self.state.epoch)
        if source.masks and first.kind == "sparse" and not self.engine.use_masks(source.masks, self.state.epoch):
            if self.info.is_main:
                console.print(f"note: the masks in {checkpoint} do not match these sparsity rules at "
                              f"{first.sparsity:g}; the first compressed phase computes its own", markup=False)

    def start_from_weights(self, console: Console) -> None:
        """``model.weights``: local pretrained weights, the keys matching ``model.weights_skip`` left as
        initialised."""
        m = self.settings.model
        assert m.weights is not None
        skipped = load_pretrained(self.model, m.weights, m.weights_skip, m.name)
        if self.info.is_main:
            kept = f"; left as initialised: {', '.join(skipped)}" if skipped else ""
            console.print(f"started from model.weights {m.weights}{kept}", markup=False, highlight=False)

    # saving -----------------------------------------------------------------------------------------------------

    def writes_last(self, phase: Phase, epoch: int) -> bool:
        """Whether the end of ``epoch`` writes last.*: every ``runtime.checkpoint_every``-th epoch (counted from 1),
        and always the last epoch of a phase and of the run, so that a resume starts every phase from its own
        state and the run's final files are complete."""
        every = self.settings.runtime.checkpoint_every
        return (epoch + 1) % every == 0 or epoch == phase.end - 1 or epoch + 1 == self.settings.schedule.epochs

    def save_epoch(self, phase: Phase, row: dict[str, Any], last: bool | None = None) -> None:
        """:meth:`take_epoch` then :meth:`write_epoch`, for a caller with nothing to do between them."""
        self.write_epoch(self.take_epoch(phase, row, last))

    def take_epoch(self, phase: Phase, row: dict[str, Any], last: bool | None = None) -> EpochFiles | None:
        """Rank 0, at an epoch's end, the snapshot of what :meth:`write_epoch` writes (None: nothing): last at the cadence :meth:`writes_last` says; best_sparse (compressed phase at
        the target sparsity) and best_dense by top-1 on the run's selection split (val; test when data.val_size = 0)
        whenever the epoch beats them, at the cadence or not (``last``: True or False overrides the cadence); the
        EMA's ema_best_* likewise (optim.ema_decay). The loop logs the epoch's row between the two, so a crash
        never leaves files of an epoch whose row is missing (a row without its files is redone on resume). Sets
        ``row["checkpoint_wait_s"]``: the seconds the training thread waited for the writer's
        previous write during the epoch and at its end (0 when it never waited)."""
        epoch = row["epoch"]
        last = self.writes_last(phase, epoch) if last is None else last
        at_target = phase.kind == "sparse" and abs(phase.sparsity - self.settings.sparsity.target) < 1e-9
        best_key = "best_sparse" if at_target else "best_dense" if phase.kind == "dense" else None
        split = selection_split(self.settings)
        new_best = self._record_best(best_key, row, epoch, split, f"{split}_top1")
        new_ema_best = self.ema is not None and self._record_best(
            f"ema_{best_key}" if best_key else None, row, epoch, split, f"{split}_ema_top1")
        writes = last or new_best or new_ema_best
        if writes:
            refuse_non_finite(self.model, f"at the end of epoch {epoch}")
            # the write in flight reads the host buffers this snapshot reuses; a second set would double the host
            # memory a checkpoint takes, so the training thread waits here (and only here) when a write outlasts
            # an epoch
            self._wait_for_writer()
        row["checkpoint_wait_s"], self._waited = self._waited, 0.0
        if not writes:
            return None
        bests = []
        with self._host.taking() as taken:
            ckpt = snapshot(self.model, self.engine, self.settings, self.model_kwargs, epoch + 1, phase.kind, row,
                            self._host)
            if new_best:
                bests.append((self.path / f"{best_key}.safetensors", ckpt))
            if new_ema_best:
                bests.append((self.path / f"ema_{best_key}.safetensors", snapshot(
                    self.ema.module, self.engine, self.settings, self.model_kwargs, epoch + 1, phase.kind, row,
                    self._host, place="ema.")))
            state = resume_state(self.state, self.engine, self.optimizer, self.scaler, host=self._host,
                                 ema=self.ema) if last else None
        return EpochFiles(epoch, taken, ckpt, state, bests)

    def write_epoch(self, files: EpochFiles | None) -> None:
        """Write a snapshot of :meth:`take_epoch` in the background (the writer is idle: take_epoch waited)."""
        if files is not None:
            self._writer.submit(_write_when_copied, files.taken, self.path, files.ckpt, files.state, files.bests)

    def _record_best(self, key: str | None, row: dict[str, Any], epoch: int, split: str, metric: str) -> bool:
        """Whether this epoch beats the record ``key`` (best_sparse, best_dense, ema_best_*) on ``metric``; it
        becomes the record if so. None: an epoch runtime.eval_every skipped, or a phase at another sparsity."""
        if key is None or row[metric] is None:
            return False
        best = getattr(self.state, key)
        if best is not None and row[metric] <= best[f"{split}_top1"]:
            return False
        setattr(self.state, key, {"epoch": epoch, "split": split, f"{split}_top1": row[metric]})
        return True

    def _wait_for_writer(self) -> None:
        if not self._writer.busy:
            return
        started = time.perf_counter()
        self._writer.wait()
        self._waited += time.perf_counter() - started

    def save_step(self, phase: Phase, step: int, every_rank: list[dict[str, Any]]) -> None:
        """Rank 0, inside an epoch: a last.* whose saved sums (one per rank) let the epoch go on as if never
        stopped."""
        own = every_rank[0]
        count = own["count"] or float("nan")  # every step so far skipped: no loss to report, not a loss of 0
        partial = {"epoch": self.state.epoch, "step": step, "phase": phase.kind,
                   "train_loss": own["loss_sum"].item() / count, "train_top1": own["correct"].item() / count}
        refuse_non_finite(self.model, f"at epoch {self.state.epoch}, step {step}")
        self._wait_for_writer()
        with self._host.taking() as taken:
            ckpt = snapshot(self.model, self.engine, self.settings, self.model_kwargs, self.state.epoch, phase.kind,
                            partial, self._host)
            state = resume_state(self.state, self.engine, self.optimizer, self.scaler, step, every_rank, self._host,
                                 self.ema)
        ckpt.extra["step"] = step
        self._writer.submit(_write_when_copied, taken, self.path, ckpt, state, [])

    def wait(self) -> None:
        """Block until every checkpoint is on disk; a failed write raises here."""
        self._writer.wait()

    def abandon(self) -> None:
        """On an error: let the write in flight finish, but the error in flight matters more than its failure."""
        with contextlib.suppress(BaseException):
            self._writer.wait()

    # finishing --------------------------------------------------------------------------------------------------

    def test_best(self, loader: Any, device: torch.device, amp: str | bool) -> None:
        """Evaluate the best sparse and best dense checkpoints on the test split; adds ``test_top1`` to their
        records in :attr:`state`. Records chosen on the test split hold it already."""
        for key in ("best_sparse", "best_dense", "ema_best_sparse", "ema_best_dense"):
            best = getattr(self.state, key)
            path = self.path / f"{key}.safetensors"
            if best is None or "test_top1" in best or not path.exists() or loader is None:
                continue
            model = build_model(load_checkpoint(path)).to(device)
            best["test_top1"] = evaluate(model, loader, device, amp)["top1"]

    def files(self) -> list[Path]:
        """The run's files and its TensorBoard folder, if it has one (the lock and temporary files left out)."""
        tb = self.path / "tb"
        return (sorted(p for p in self.path.iterdir() if p.is_file() and not p.name.startswith("."))
                + ([tb] if tb.is_dir() else []))
