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

Rank 0 writes every file, in a background thread from host snapshots, so training goes on meanwhile; writes are
atomic (checkpoint.py), and the (weights, state) pair is replaced so that a complete pair is always on disk
(:func:`save_last`). The snapshots go into host buffers reused from one checkpoint to the next, pinned on CUDA, where
the training thread only queues the copies (checkpoint.HostSnapshot).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shlex
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from torch import nn

from acdc_cli.checkpoint import (
    BackgroundWriter,
    all_finite,
    Checkpoint,
    HostSnapshot,
    Taken,
    atomic_write_text,
    build_model,
    host_copy,
    load_checkpoint,
    load_state,
    load_weights,
    remove_stale_temps,
    save_checkpoint,
    save_state,
)
from acdc_cli.config import Settings, read_toml
from acdc_cli.data import selection_split
from acdc_cli.distributed import DistInfo
from acdc_cli.engine import ACDC, STATE_FORMAT
from acdc_cli.errors import AcdcError, TrainingFault
from acdc_cli.metrics import finite_number
from acdc_cli.sparsity.schedule import Phase, phase_at

RUN_MARKER = "config.toml"
CHECKPOINTS = ("last.safetensors", "best_sparse.safetensors", "best_dense.safetensors")


# ----------------------------------------------------------------------------------------------------------------
# the folder


def default_run_dir(settings: Settings) -> Path:
    return Path("runs") / f"{settings.preset or 'custom'}-{datetime.now():%Y%m%d-%H%M%S}"


def check_new_run_dir(run_dir: Path, force: bool) -> None:
    """Refuse a ``--out`` that already holds something, unless --force; reads only, so that nothing is written into
    a folder that is refused."""
    if run_dir.exists() and not run_dir.is_dir():
        raise AcdcError(f"--out {run_dir} exists and is not a folder")
    if run_dir.exists() and not force and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        raise AcdcError(f"run dir {run_dir} is not empty; pass --resume {run_dir} to continue it or --force to overwrite")


def prepare_run_dir(run_dir: Path, force: bool) -> None:
    """Make the folder of a new run: checked again (under the run lock, :func:`run_lock`, so no other process is
    writing it), and with --force emptied of a previous run's files."""
    check_new_run_dir(run_dir, force)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".acdc-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise AcdcError(f"cannot write to run dir {run_dir}: {exc.strerror or exc}") from None
    if force:
        for name in ("metrics.jsonl", *CHECKPOINTS):
            (run_dir / name).unlink(missing_ok=True)
        for state in run_dir.glob("last.state*.pt"):
            state.unlink()
        remove_stale_temps(run_dir)
        shutil.rmtree(run_dir / "tb", ignore_errors=True)


LOCK_FILE = ".acdc.lock"
# set by `acdc train --nproc` while it holds the run lock for its ranks: its PID
LAUNCHER_LOCK_ENV = "_ACDC_RUN_LOCK_LAUNCHER"


@contextlib.contextmanager
def run_lock(run_dir: Path, *, for_ranks: bool = False) -> Iterator[None]:
    """Hold the run dir for writing: an exclusive ``flock`` on ``RUN_DIR/.acdc.lock`` (which holds this process's
    PID) until the block ends. A second process is refused with one line naming the holder, so two runs never write
    one folder. ``for_ranks``: the ranks this process launches (``--nproc``) write under its lock, and rank 0
    taking this lock then finds its launcher holding it and goes on. Creates the folder."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AcdcError(f"cannot write to run dir {run_dir}: {exc.strerror or exc}") from None
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        raise AcdcError(f"cannot write {run_dir / LOCK_FILE}: {exc.strerror or exc}") from None
    launcher = os.environ.get(LAUNCHER_LOCK_ENV)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = True
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            if not (holder and holder == launcher):
                raise AcdcError(f"run dir {run_dir} is in use by another acdc process (PID {holder or 'unknown'}, "
                                f"holding {LOCK_FILE}); one process writes a run at a time: wait for it to end, or "
                                "stop it (SIGTERM checkpoints it) and --resume") from None
            held = False  # our launcher holds it for us
        except OSError as exc:  # a file system without locks (some network mounts)
            print(f"note: cannot lock {run_dir / LOCK_FILE} ({exc.strerror or exc}); make sure no other acdc process "
                  "writes this run dir", file=sys.stderr)
            held = False
        if held:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            if for_ranks:
                os.environ[LAUNCHER_LOCK_ENV] = str(os.getpid())
        try:
            yield
        finally:
            if held and for_ranks:
                if launcher is None:
                    os.environ.pop(LAUNCHER_LOCK_ENV, None)
                else:
                    os.environ[LAUNCHER_LOCK_ENV] = launcher
    finally:
        os.close(fd)  # releases the lock


def saved_settings(run_dir: Path) -> dict[str, Any]:
    """The settings a run dir was trained with (its config.toml), for ``--resume``."""
    marker = Path(run_dir) / RUN_MARKER
    if not Path(run_dir).is_dir() or not marker.is_file():
        raise AcdcError(f"{run_dir} is not an acdc run dir (expected {RUN_MARKER} and last.safetensors)")
    if not (Path(run_dir) / "last.safetensors").is_file():
        best = [Path(run_dir) / name for name in CHECKPOINTS[1:] if (Path(run_dir) / name).is_file()]
        if best:
            # --force would delete them: a new run from one keeps them
            starts = " or ".join(f"acdc train --from {shlex.quote(str(path))} --out NEW_DIR" for path in best)
            raise AcdcError(f"{run_dir} has no last.safetensors to resume (it stopped before writing one), but its "
                            f"best checkpoints are kept: start a new run from one with {starts}")
        raise AcdcError(f"{run_dir} has no checkpoint yet (stopped before its first one); start it again with --force")
    return read_toml(marker)


# ----------------------------------------------------------------------------------------------------------------
# what a run carries from one checkpoint to the next


@dataclass
class RunState:
    """The run's progress besides weights, masks, optimizer and engine state."""

    epoch: int = 0  # epochs completed
    # {"epoch", "split", "<split>_top1"}: split "val", or "test" when data.val_size = 0 (states written before the
    # split was recorded hold no "split": val)
    best_sparse: dict[str, Any] | None = None
    best_dense: dict[str, Any] | None = None
    skip_streak: int = 0  # steps skipped in a row when the last epoch ended (runtime.nan_policy = "skip")

    def as_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "best_sparse": self.best_sparse, "best_dense": self.best_dense,
                "skip_streak": self.skip_streak}


@dataclass
class EpochTotals:
    """An epoch's sums so far, kept on the device so that a step never waits for the host. Mid-epoch checkpoints
    save them, so a resumed epoch reports the metrics an uninterrupted one would."""

    loss_sum: torch.Tensor  # float64: sum of per-image losses
    correct: torch.Tensor  # long: top-1 hits
    first_bad: torch.Tensor  # long: the first step with a non-finite loss, -1 while there is none
    step: int = 0  # steps done in this epoch
    count: int = 0  # images in loss_sum / correct
    skipped: int = 0  # steps skipped for a non-finite loss or weights (runtime.nan_policy = "skip")
    streak: int = 0  # the last steps skipped in a row (runtime.max_skipped_steps ends the run)

    @classmethod
    def start(cls, device: torch.device, saved: dict[str, Any] | None = None, streak: int = 0) -> EpochTotals:
        """An epoch's sums from zero (``streak``: the skips in a row the previous epoch ended with), or as a
        mid-epoch checkpoint ``saved`` them."""
        totals = cls(
            torch.zeros((), device=device, dtype=torch.float64),
            torch.zeros((), device=device, dtype=torch.long),
            torch.full((), -1, device=device, dtype=torch.long),
            streak=streak,
        )
        if saved is not None:
            totals.loss_sum.copy_(saved["loss_sum"])
            totals.correct.copy_(saved["correct"])
            totals.step, totals.count, totals.skipped = int(saved["step"]), int(saved["count"]), int(saved["skipped"])
            totals.streak = int(saved.get("streak", 0))  # states written before it existed have none
        return totals

    def as_state(self) -> dict[str, Any]:
        return {"loss_sum": self.loss_sum.cpu(), "correct": self.correct.cpu(), "step": self.step,
                "count": self.count, "skipped": self.skipped, "streak": self.streak}


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
    # ranks agree on every skip, so the step and the streak are every rank's
    return [{"loss_sum": g[0].cpu(), "correct": g[1].long().cpu(), "step": totals.step, "count": int(g[2]),
             "skipped": int(g[3]), "streak": totals.streak} for g in gathered]


def snapshot(model: nn.Module, engine: ACDC, settings: Settings, model_kwargs: dict[str, Any], epoch: int,
             phase: str, metrics: dict[str, Any], host: HostSnapshot | None = None) -> Checkpoint:
    """The checkpoint of the model as it is now, in host memory: it is written in the background while training
    changes the live tensors. ``host``: reused (pinned) buffers to copy into, inside ``host.taking()``; else new
    memory."""
    copy = host.copy if host is not None else (lambda value, *path: host_copy(value))
    return Checkpoint(
        weights=copy(dict(model.state_dict()), "weights"),
        masks=copy(dict(engine.masks), "masks"),
        arch=settings.model.name,
        model_kwargs=model_kwargs,
        config=settings.model_dump(mode="json"),
        epoch=epoch,
        phase=phase,
        metrics=host_copy(metrics),
        extra={"preset": settings.preset, "paper_top1": settings.paper_top1, "kind": "train",
               "selection_split": selection_split(settings)},
    )


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
                 every_rank: list[dict[str, Any]] | None = None, host: HostSnapshot | None = None) -> dict[str, Any]:
    """Everything besides weights and masks that continues the run, as a host snapshot; tensors and plain data only.

    No RNG state: data order and augmentation come from (seed, epoch) and dropout from (seed, epoch, step, rank)."""
    engine_state = engine.state_dict()
    del engine_state["masks"]  # stored once, in the checkpoint beside this state
    state = {
        "progress": {**run_state.as_dict(), "step": step},
        "optimizer": optimizer.state_dict(),
        "engine": engine_state,
        "scaler": scaler.state_dict(),
    }
    if every_rank is not None:
        state["totals"] = every_rank
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
# the pair as acdc wrote it before resume_state: whichever of these matches last.safetensors' epoch and step
_LEGACY_STATES = ("last.state.pt", "last.state.prev.pt")


def _generation(name: str) -> int | None:
    found = _STATE_NAME.fullmatch(name)
    return int(found.group(1)) if found else None


def load_last(run_dir: Path) -> tuple[Checkpoint, dict[str, Any]]:
    """``last.safetensors`` and the resume state it names (in a run dir written before that: the one of
    ``last.state.pt`` / ``last.state.prev.pt`` that matches its epoch and step)."""
    ckpt = load_checkpoint(run_dir / "last.safetensors")
    return ckpt, _paired_state(run_dir, ckpt)[1]


def state_path(run_dir: Path) -> Path:
    """The resume state file that pairs with the run's ``last.safetensors``; an AcdcError when there is none."""
    return _paired_state(Path(run_dir), load_checkpoint(Path(run_dir) / "last.safetensors"))[0]


def _paired_state(run_dir: Path, ckpt: Checkpoint) -> tuple[Path, dict[str, Any]]:
    step = ckpt.extra.get("step", 0)
    named = ckpt.extra.get("resume_state")
    if named is not None and not (isinstance(named, str) and _generation(named) is not None):
        raise AcdcError(f"{run_dir / 'last.safetensors'}: malformed metadata (resume_state {str(named)[:60]!r} is "
                        "not a last.state.N.pt name)")
    for name in (named,) if named is not None else _LEGACY_STATES:
        path = run_dir / name
        if not path.exists():
            continue
        state = load_state(path)
        progress = state.get("progress")
        if isinstance(progress, dict) and (progress.get("epoch"), progress.get("step", 0)) == (ckpt.epoch, step):
            return path, state
        if named is not None:
            raise AcdcError(f"{path} does not hold the progress last.safetensors records (epoch {ckpt.epoch}, step "
                            f"{step})")
    if named is not None:
        raise AcdcError(f"{run_dir}: {named}, the resume state last.safetensors names, is missing")
    raise AcdcError(f"{run_dir}: no resume state matches last.safetensors (epoch {ckpt.epoch}, step {step})")


def _write_checkpoints(run_dir: Path, ckpt: Checkpoint, state: dict[str, Any], best_path: Path | None) -> None:
    if best_path is not None:
        save_checkpoint(best_path, ckpt)
    save_last(run_dir, ckpt, state)


def _write_when_copied(taken: Taken, run_dir: Path, ckpt: Checkpoint, state: dict[str, Any],
                       best_path: Path | None) -> None:
    taken.wait()  # in the writer thread: the device-to-host copies the training thread queued have landed
    _write_checkpoints(run_dir, ckpt, state, best_path)


# ----------------------------------------------------------------------------------------------------------------
# one run's persistence


class RunDir:
    """The run dir of one training run and the objects whose state it keeps: rank 0 writes, every rank resumes."""

    def __init__(self, path: Path, settings: Settings, model_kwargs: dict[str, Any], model: nn.Module, engine: ACDC,
                 optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, info: DistInfo):
        self.path = Path(path)
        self.settings = settings
        self.model_kwargs = model_kwargs
        self.model, self.engine, self.optimizer, self.scaler = model, engine, optimizer, scaler
        self.info = info
        self.state = RunState()
        self._writer = BackgroundWriter()  # rank 0's checkpoint files, written while the next epoch trains
        self._host = HostSnapshot()  # the host buffers each checkpoint is copied into before it is written

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
            engine_state = check_resume_state(state, self.optimizer, self.engine, self.info.world_size,
                                              selection_split(self.settings))
        except AcdcError as exc:
            raise AcdcError(f"{path}: malformed resume state: {exc}") from None
        p = state["progress"]
        self.state = RunState(p["epoch"], p["best_sparse"], p["best_dense"], p.get("skip_streak", 0))
        try:  # what the checks above do not foresee is still one line
            self.engine.load_state_dict({**engine_state, "masks": ckpt.masks or None})
            self.optimizer.load_state_dict(state["optimizer"])
            if state.get("scaler") and self.scaler.is_enabled():  # none saved: the run was not fp16 until now
                self.scaler.load_state_dict(state["scaler"])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
            detail = str(exc).splitlines()[0][:120] if str(exc) else ""
            raise AcdcError(f"{path}: malformed resume state ({exc.__class__.__name__} {detail})") from None
        if self.info.is_main and _generation(path.name) is not None:
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
        from acdc_cli.weights import load_pretrained

        m = self.settings.model
        assert m.weights is not None
        skipped = load_pretrained(self.model, m.weights, m.weights_skip, m.name)
        if self.info.is_main:
            kept = f"; left as initialised: {', '.join(skipped)}" if skipped else ""
            console.print(f"started from model.weights {m.weights}{kept}", markup=False, highlight=False)

    # saving -----------------------------------------------------------------------------------------------------

    def save_epoch(self, phase: Phase, row: dict[str, Any]) -> None:
        """Rank 0, at an epoch's end: last every epoch; best_sparse (compressed phase at the target sparsity) and
        best_dense by top-1 on the run's selection split (val; test when data.val_size = 0). The files are written in
        the background from snapshots taken here."""
        epoch = row["epoch"]
        refuse_non_finite(self.model, f"at the end of epoch {epoch}")
        at_target = phase.kind == "sparse" and abs(phase.sparsity - self.settings.sparsity.target) < 1e-9
        best_key = "best_sparse" if at_target else "best_dense" if phase.kind == "dense" else None
        best_path = None
        split = selection_split(self.settings)
        top1 = f"{split}_top1"
        if best_key is not None and row[top1] is not None:  # None: an epoch runtime.eval_every skipped
            best = getattr(self.state, best_key)
            if best is None or row[top1] > best[top1]:
                setattr(self.state, best_key, {"epoch": epoch, "split": split, top1: row[top1]})
                best_path = self.path / f"{best_key}.safetensors"
        self._writer.wait()  # its write reads the buffers this snapshot reuses
        with self._host.taking() as taken:
            ckpt = snapshot(self.model, self.engine, self.settings, self.model_kwargs, epoch + 1, phase.kind, row,
                            self._host)
            state = resume_state(self.state, self.engine, self.optimizer, self.scaler, host=self._host)
        self._writer.submit(_write_when_copied, taken, self.path, ckpt, state, best_path)

    def save_step(self, phase: Phase, step: int, every_rank: list[dict[str, Any]]) -> None:
        """Rank 0, inside an epoch: a last.* whose saved sums (one per rank) let the epoch go on as if never
        stopped."""
        own = every_rank[0]
        count = own["count"] or float("nan")  # every step so far skipped: no loss to report, not a loss of 0
        partial = {"epoch": self.state.epoch, "step": step, "phase": phase.kind,
                   "train_loss": own["loss_sum"].item() / count, "train_top1": own["correct"].item() / count}
        refuse_non_finite(self.model, f"at epoch {self.state.epoch}, step {step}")
        self._writer.wait()
        with self._host.taking() as taken:
            ckpt = snapshot(self.model, self.engine, self.settings, self.model_kwargs, self.state.epoch, phase.kind,
                            partial, self._host)
            state = resume_state(self.state, self.engine, self.optimizer, self.scaler, step, every_rank, self._host)
        ckpt.extra["step"] = step
        self._writer.submit(_write_when_copied, taken, self.path, ckpt, state, None)

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
        from acdc_cli.evaluate import evaluate

        for key in ("best_sparse", "best_dense"):
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


def first_epoch(settings: Settings, from_checkpoint: Path | None, checkpoint_epoch: int) -> int:
    """schedule.start_epoch resolved: 'checkpoint' is the --from checkpoint's epoch (epochs it completed)."""
    start = settings.schedule.start_epoch
    if start != "checkpoint":
        return int(start)
    if checkpoint_epoch >= settings.schedule.epochs:
        raise AcdcError(
            f"--from {from_checkpoint} completed {checkpoint_epoch} epochs; schedule.epochs is "
            f"{settings.schedule.epochs}, so nothing is left to continue"
        )
    return checkpoint_epoch


def _engine_state(state: dict[str, Any], plan: tuple[Phase, ...]) -> dict[str, Any]:
    """The engine part of a resume state; states written before the engine existed kept its pieces elsewhere (the
    phase follows from the progress: the phase of the epoch being trained, or of the last one completed)."""
    if "engine" in state:
        return _phase_as_planned(dict(state["engine"]), plan)
    p = state["progress"]
    epoch = p["epoch"] if p.get("step") else p["epoch"] - 1
    return {
        "format": STATE_FORMAT,
        "epoch": epoch,
        "phase": phase_at(list(plan), epoch).as_dict() if epoch >= 0 else None,
        "previous_masks": state.get("previous_masks"),
        "mask_change": p.get("mask_change"),
    }


def _phase_as_planned(engine_state: dict[str, Any], plan: tuple[Phase, ...]) -> dict[str, Any]:
    """A run extended on resume (``--set schedule.epochs=N``) may now end the phase it stopped in later: the plan's
    phase with the same start, kind and sparsity is that phase, continued with its masks held."""
    saved = engine_state.get("phase")
    if isinstance(saved, dict):
        key = (saved.get("start"), saved.get("kind"), saved.get("sparsity"))
        for phase in plan:
            if (phase.start, phase.kind, phase.sparsity) == key:
                engine_state["phase"] = phase.as_dict()
    return engine_state
# ----------------------------------------------------------------------------------------------------------------
# a resume state, checked before any of it is used


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    text = repr(value) if not isinstance(value, torch.Tensor) else f"a tensor of shape {list(value.shape)}"
    return text if len(text) <= 60 else text[:57] + "..."


def check_resume_state(state: dict[str, Any], optimizer: torch.optim.Optimizer, engine: ACDC, world_size: int,
                       split: str) -> dict[str, Any]:
    """Raise an AcdcError naming the first thing of a resume state that this run cannot continue from: a missing
    entry, a wrong type, an optimizer state that does not fit the model. ``split``: the one the run selects its best
    checkpoints on (val, or test when data.val_size = 0). Returns the engine part of the state."""
    progress = state.get("progress")
    if not isinstance(progress, dict):
        raise AcdcError(f"progress is {_shown(progress)}, expected a table")
    for key in ("epoch", "best_sparse", "best_dense"):
        if key not in progress:
            raise AcdcError(f"progress.{key} is missing")
    step = progress.get("step", 0)
    for key, value in (("epoch", progress["epoch"]), ("step", step), ("skip_streak", progress.get("skip_streak", 0))):
        if not _is_int(value) or value < 0:
            raise AcdcError(f"progress.{key} is {_shown(value)}, expected a whole number >= 0")
    for key in ("best_sparse", "best_dense"):
        best = progress[key]
        if best is None:
            continue
        if not isinstance(best, dict) or not _is_int(best.get("epoch")) or best["epoch"] < 0:
            raise AcdcError(f"progress.{key} is {_shown(best)}, expected none or {{epoch, split, {split}_top1}}")
        if best.get("split", "val") != split:  # records of states written before the split was recorded: val
            raise AcdcError(f"progress.{key}.split is {_shown(best.get('split'))}, this run selects on {split}")
        for metric in (f"{split}_top1", "test_top1"):
            if (metric in best or metric == f"{split}_top1") and not (finite_number(best.get(metric))
                                                                      and 0 <= best[metric] <= 1):
                raise AcdcError(f"progress.{key}.{metric} is {_shown(best.get(metric))}, expected a fraction 0..1")
    _check_optimizer(state.get("optimizer"), optimizer)
    scaler = state.get("scaler")
    if scaler is not None and not (isinstance(scaler, dict) and all(finite_number(v) for v in scaler.values())):
        raise AcdcError(f"scaler is {_shown(scaler)}, expected a table of numbers")
    if "engine" in state and not isinstance(state["engine"], dict):
        raise AcdcError(f"engine is {_shown(state['engine'])}, expected a table")
    engine_state = _engine_state(state, engine.plan)
    _check_engine(engine_state, engine)
    if step:
        _check_totals(state.get("totals"), step, world_size)
    return engine_state


def _check_optimizer(saved: Any, optimizer: torch.optim.Optimizer) -> None:
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict) or not isinstance(
            saved.get("param_groups"), list):
        raise AcdcError(f"optimizer is {_shown(saved)}, expected a table of state and param_groups")
    groups = optimizer.param_groups
    if len(saved["param_groups"]) != len(groups):
        raise AcdcError(f"optimizer has {len(saved['param_groups'])} parameter group(s), this run {len(groups)}")
    params: list[torch.Tensor] = []
    for i, (group, live) in enumerate(zip(saved["param_groups"], groups)):
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            raise AcdcError(f"optimizer.param_groups[{i}] is {_shown(group)}, expected a table with params")
        if len(group["params"]) != len(live["params"]):
            raise AcdcError(f"optimizer.param_groups[{i}] holds {len(group['params'])} parameters, this model "
                            f"{len(live['params'])}")
        for key, value in live.items():
            if finite_number(value) and not finite_number(group.get(key)):
                raise AcdcError(f"optimizer.param_groups[{i}].{key} is {_shown(group.get(key))}, expected a number")
        params += live["params"]
    index = {}
    for group in saved["param_groups"]:
        for key in group["params"]:
            if not _is_int(key) or key in index:
                raise AcdcError(f"optimizer.param_groups lists parameter {_shown(key)} twice or not as a number")
            index[key] = params[len(index)]
    for key, entry in saved["state"].items():
        if key not in index:
            raise AcdcError(f"optimizer.state has an entry for parameter {_shown(key)}, which no group lists")
        if not isinstance(entry, dict):
            raise AcdcError(f"optimizer.state[{key}] is {_shown(entry)}, expected a table")
        param = index[key]
        for name, value in entry.items():
            if value is None or finite_number(value):
                continue
            if not isinstance(value, torch.Tensor):
                raise AcdcError(f"optimizer.state[{key}].{name} is {_shown(value)}, expected a tensor")
            # per-parameter buffers (momentum, moments) are floats of the parameter's shape; counters single numbers
            if (value.shape != param.shape and value.numel() != 1) or (value.shape == param.shape
                                                                        and not value.is_floating_point()):
                raise AcdcError(f"optimizer.state[{key}].{name} has shape {list(value.shape)} "
                                f"({str(value.dtype).removeprefix('torch.')}); its parameter is "
                                f"{list(param.shape)}")


def _check_engine(saved: dict[str, Any], engine: ACDC) -> None:
    epoch, change = saved.get("epoch"), saved.get("mask_change")
    if epoch is not None and not _is_int(epoch):
        raise AcdcError(f"engine.epoch is {_shown(epoch)}, expected a whole number")
    if change is not None and not finite_number(change):
        raise AcdcError(f"engine.mask_change is {_shown(change)}, expected a number")
    phase = saved.get("phase")
    if phase is not None and not (isinstance(phase, dict) and set(phase) == {"start", "end", "kind", "sparsity"}):
        raise AcdcError(f"engine.phase is {_shown(phase)}, expected a phase of this plan")
    previous = saved.get("previous_masks")
    if previous is None:
        return
    params = engine.sparsifier.params
    if not isinstance(previous, dict):
        raise AcdcError(f"engine.previous_masks is {_shown(previous)}, expected a table of masks")
    for name, mask in previous.items():
        if name not in params:
            raise AcdcError(f"engine.previous_masks has a mask for {_shown(name)}, which this run does not prune")
        if not isinstance(mask, torch.Tensor) or mask.shape != params[name].shape:
            raise AcdcError(f"engine.previous_masks[{name}] is {_shown(mask)}, its weight is "
                            f"{list(params[name].shape)}")


def _check_totals(every_rank: Any, step: int, world_size: int) -> None:
    if not isinstance(every_rank, list) or not every_rank:
        raise AcdcError(f"totals is {_shown(every_rank)}, expected one table per process of a mid-epoch checkpoint")
    if len(every_rank) != world_size:
        raise AcdcError(f"totals holds the sums of {len(every_rank)} process(es), this run has {world_size}")
    for rank, totals in enumerate(every_rank):
        where = f"totals[{rank}]"
        if not isinstance(totals, dict):
            raise AcdcError(f"{where} is {_shown(totals)}, expected a table")
        for key, kind in (("loss_sum", "floating"), ("correct", "integer")):
            value = totals.get(key)
            if not (isinstance(value, torch.Tensor) and value.numel() == 1 and value.dim() == 0
                    and value.is_floating_point() == (kind == "floating")):
                raise AcdcError(f"{where}.{key} is {_shown(value)}, expected a single {kind} number")
        for key in ("step", "count", "skipped", "streak"):
            if (key != "streak" or key in totals) and not (_is_int(totals.get(key)) and totals[key] >= 0):
                raise AcdcError(f"{where}.{key} is {_shown(totals.get(key))}, expected a whole number >= 0")
        if totals["step"] != step:
            raise AcdcError(f"{where}.step is {totals['step']}, the progress says {step}")
