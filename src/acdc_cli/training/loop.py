"""``acdc train``: build the data, the model and its optimizer, hand them to the AC/DC engine, then per epoch:
start_epoch (prune / restore / reset momentum at phase boundaries), train, evaluate, log, checkpoint.

The engine (engine.py) is the same object a user's own loop uses; the run's checkpoints live in checkpoints.py,
resuming in resume.py, devices, precision and ranks in runtime.py.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import shlex
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.panel import Panel
from rich.text import Text
from torch import nn

from acdc_cli import data as data_mod
from acdc_cli import models
from acdc_cli.config import Settings
from acdc_cli.data.bundle import DataBundle, selection_split
from acdc_cli.engine import ACDC
from acdc_cli.errors import AcdcError, TrainingFault
from acdc_cli.flops import si
from acdc_cli.paper import paper_reference
from acdc_cli.sparsity.schedule import Phase, learning_rate
from acdc_cli.training import distributed, evaluation, recipe, runtime
from acdc_cli.training.checkpoints import RunDir
from acdc_cli.training.distributed import DistInfo
from acdc_cli.training.evaluation import evaluate_memorized
from acdc_cli.training.metrics import EpochTotals, MetricsLogger, StepReporter, gather_totals
from acdc_cli.training.preemption import StopSignal, reduce_int
from acdc_cli.training.resume import first_epoch
from acdc_cli.training.snapshots import all_finite


@dataclass
class RunResult:
    run_dir: Path
    best_sparse: dict[str, Any] | None
    best_dense: dict[str, Any] | None
    final_sparsity: float
    files: list[Path] = field(default_factory=list)
    preempted: dict[str, Any] | None = None  # {"signal", "epoch", "step"} of the checkpoint a signal stopped at
    # {"inference": {"dense", "sparse", "ratio"} per image of the final model, "train": {"flops", "dense_flops",
    # "ratio"} of the run}
    flops: dict[str, Any] | None = None
    ema_best: dict[str, dict[str, Any] | None] | None = None  # optim.ema_decay: {"sparse", "dense"} records as above
    threads: tuple[int, str] | None = None  # the CPU threads torch used, and why that many
    # {"top1", "note"}: the preset's paper top-1 when this run is that experiment, else None and why not
    paper: dict[str, Any] | None = None


def run(settings: Settings, run_dir: Path, *, resume: bool = False, from_checkpoint: Path | None = None,
        console: Console | None = None) -> RunResult:
    """Train as ``settings`` say into ``run_dir`` (prepared by :func:`acdc_cli.training.rundir.prepare_run_dir`), or continue
    the run there (``resume``); under torchrun every rank calls this."""
    console = console or Console()
    info = distributed.setup(settings.runtime.device)
    try:
        with StopSignal() as stop:
            result = _run(settings, Path(run_dir), info, resume, from_checkpoint, console, stop)
        # tearing down the process group with one rank's collectives still in flight, or with DDP's reducer still
        # alive, can abort in gloo's threads ("terminate called without an active exception"): free the training
        # objects, then leave together
        gc.collect()
        distributed.barrier()
        return result
    finally:
        distributed.teardown()


def _run(settings: Settings, run_dir: Path, info: DistInfo, resume: bool, from_checkpoint: Path | None,
         console: Console, stop: StopSignal) -> RunResult:
    if settings.schedule.start_epoch == "checkpoint" and from_checkpoint is None and not resume:
        raise AcdcError("schedule.start_epoch = 'checkpoint' continues a checkpoint: pass --from CHECKPOINT")
    threads, threads_why = runtime.cpu_threads(settings.runtime.threads)
    torch.set_num_threads(threads)
    if settings.runtime.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(settings.runtime.seed)
    device, is_main = info.device, info.is_main

    # build: data, model (net wraps it for DDP / compile; model keeps the names files use), optimizer, engine
    bundle = data_mod.build(settings, device, info.rank, info.world_size)
    model_kwargs = _model_kwargs(settings, bundle)
    model = models.create(settings.model.name, **model_kwargs).to(device)
    net = runtime.prepare_model(model, settings, info)
    eval_net = runtime.prepare_eval_model(model, settings)
    optimizer = build_optimizer(model, settings)
    engine = ACDC.from_settings(settings, model, optimizer)
    if settings.optim.clip_grad_norm is not None:  # after the engine's hooks: it clips masked gradients
        recipe.clip_gradients(optimizer, settings.optim.clip_grad_norm)
    ema = recipe.WeightEma(model, settings.optim.ema_decay, engine) if settings.optim.ema_decay else None
    ema_net = runtime.prepare_eval_model(ema.module, settings) if ema is not None else None
    engine.count_flops((bundle.in_channels, bundle.image_size, bundle.image_size))
    scaler = runtime.grad_scaler(device, settings.runtime.amp)
    # data.val_size = 0 is the paper's protocol: the test split is measured every epoch and picks the best checkpoints
    split = selection_split(settings)
    eval_loader = distributed.shard_for_eval(bundle.val if split == "val" else bundle.test, info)
    _note_dense_layers(engine, settings, console, is_main)

    store = RunDir(run_dir, settings, model_kwargs, model, engine, optimizer, scaler, info, ema=ema)
    totals = store.resume() if resume else None  # this epoch's sums when resuming mid-epoch
    if not resume:
        if from_checkpoint is not None:
            store.start_from(from_checkpoint, console)
        else:
            store.state.epoch = first_epoch(settings, None, 0)
            if settings.model.weights is not None:
                store.start_from_weights(console)
        if ema is not None:
            ema.copy_from_model()  # the average starts where the model starts
    store.write_config()
    logger = MetricsLogger(run_dir, console, settings.log.tensorboard, settings.log.per_layer, store.state.epoch,
                           steps_per_epoch=len(bundle.train), start_step=totals.step if totals else 0,
                           settings=settings, resume=resume) if is_main else None
    progress = StepReporter(console, settings, logger.step_writer) if is_main else None
    first = None if resume else store.state.epoch  # a fresh run may start inside a phase (schedule.start_epoch)
    checkpoint_every = settings.runtime.checkpoint_every_steps
    preempted: dict[str, Any] | None = None
    outcome = "FINISHED"  # for the tracking services: FAILED on an exception, KILLED when a signal stops the run
    try:
        for epoch in range(store.state.epoch, settings.schedule.epochs):
            # at a phase boundary: prune, or restore and reset momentum
            phase = engine.start_epoch(epoch)
            if ema is not None:
                ema.follow_masks()
            # every rank must hold the same masks from the moment they change (a dense phase has none)
            checksums = None
            if epoch in (phase.start, first) and engine.masks:
                checksums = distributed.verify_masks(engine.masks, info)
            bundle.train.set_epoch(epoch)
            totals = totals or EpochTotals.start(device, streak=store.state.skip_streak)

            # train; between two steps, a mid-epoch checkpoint when one is due, and one more before a signal stops
            # the run (the next `acdc train --resume` goes on from that step)
            steps = EpochSteps(net, bundle.train, optimizer, settings, epoch=epoch, device=device, totals=totals,
                               progress=progress, rank=info.rank, scaler=scaler, ema=ema)
            for step in steps:
                stopping = stop.should_stop(epoch, step)
                if stopping or (checkpoint_every and step % checkpoint_every == 0 and step < steps.count):
                    steps.settle()
                    raise_if_bad(totals, epoch)  # never replace the last good checkpoint with diverged weights
                    every_rank = gather_totals(totals)
                    if is_main:
                        store.save_step(phase, step, every_rank)
                if stopping:
                    preempted = {"signal": stop.name, "epoch": epoch, "step": step}
                    break
            if preempted is not None:
                break
            stats = distributed.reduce_train_stats(steps.stats(), info)
            store.state.skip_streak, totals = totals.streak, None
            engine.end_epoch(bundle.train.num_samples * info.world_size)  # the images every rank really trained

            # evaluate: every runtime.eval_every epochs and at the end of each phase; null in metrics.jsonl otherwise
            scores = dict.fromkeys(("loss", "top1", "top5"))
            if evaluates(settings, phase, epoch):
                scores = evaluation.evaluate_sharded(eval_net, eval_loader, device, settings.runtime.eval_amp, info)
            row = {"epoch": epoch, **engine.metrics(), "lr": stats["lr"], "train_loss": stats["train_loss"],
                   "train_top1": stats["train_top1"], f"{split}_loss": scores["loss"], f"{split}_top1": scores["top1"],
                   f"{split}_top5": scores["top5"], "mask_checksums": checksums, "img_per_s": stats["img_per_s"],
                   "skipped_steps": stats["skipped_steps"]}
            if ema is not None:
                row.update(_ema_scores(ema_net, eval_loader, settings, phase, epoch, split, info))
            if bundle.memorized is not None:
                row.update(evaluate_memorized(model, bundle.memorized, device, settings.runtime.eval_amp))

            # checkpoint and log: last every runtime.checkpoint_every epochs and at phase ends, best_sparse /
            # best_dense when this epoch beats them; the row gets the time the loop waited for the writer
            store.state.epoch = epoch + 1
            stopping = epoch + 1 < settings.schedule.epochs and stop.should_stop(epoch)
            if is_main:
                # whatever the cadence when stopping: the next `acdc train --resume` goes on from here; the row is
                # logged before its files are written, so files never exist without their row
                files = store.take_epoch(phase, row, last=True if stopping else None)
                logger.log_epoch(row, engine.layer_sparsity() if settings.log.per_layer else None)
                store.write_epoch(files)
            if stopping:
                preempted = {"signal": stop.name, "epoch": epoch + 1, "step": 0}
                break
    except BaseException:
        store.abandon()
        outcome = "FAILED"
        raise
    else:
        store.wait()  # every checkpoint on disk before the run reports, tests best_* or exits
    finally:
        if progress is not None:
            progress.close()
        if logger is not None:
            logger.close(outcome if preempted is None else "KILLED")

    state = store.state
    result = RunResult(run_dir, state.best_sparse, state.best_dense, engine.sparsity(), preempted=preempted,
                       flops=_flops_summary(engine), threads=(threads, threads_why),
                       paper=dict(zip(("top1", "note"), paper_reference(settings, "test"))))
    if ema is not None:
        result.ema_best = {"sparse": state.ema_best_sparse, "dense": state.ema_best_dense}
    if is_main and preempted is None:
        store.test_best(bundle.test, device, settings.runtime.eval_amp)
    if is_main:
        result.files = store.files()
    return result


def build_optimizer(model: nn.Module, settings: Settings, kernel: str = "auto") -> torch.optim.Optimizer:
    """The optimizer the settings name (optim.optimizer; recipe.named_optimizer builds any other than SGD). SGD's
    ``kernel``: "auto" (acdc's step: one fused kernel where the parameters' device has one, foreach otherwise;
    with the engine's gradient mask before it, the whole post-backward step, see engine.py's ``step_keeps_zeros``)
    or "foreach"."""
    o = settings.optim
    params = list(model.parameters())
    if o.optimizer != "SGD":
        return recipe.named_optimizer(params, o)
    scaled = bool(params) and runtime.precision(params[0].device, settings.runtime.amp) == "fp16"
    chosen = {"auto": runtime.sgd_kernel(params, scaled), "foreach": {"foreach": True}}[kernel]
    return torch.optim.SGD(
        params,
        lr=o.lr,
        momentum=o.momentum,
        nesterov=o.nesterov and o.momentum > 0,
        weight_decay=o.weight_decay,
        **{**chosen, **o.optimizer_args},
    )


def evaluates(settings: Settings, phase: Phase, epoch: int) -> bool:
    """Whether ``epoch`` gets a validation pass: every ``runtime.eval_every``-th epoch (counted from 1), and always
    the last epoch of every phase (so the last one of the run), whose weights end the phase and are what
    best_sparse / best_dense choose among."""
    return (epoch + 1) % settings.runtime.eval_every == 0 or epoch == phase.end - 1


def _ema_scores(ema_net: nn.Module, loader: Any, settings: Settings, phase: Phase, epoch: int, split: str,
                info: DistInfo) -> dict[str, Any]:
    """The EMA's ``<split>_ema_loss / _top1 / _top5`` (null on the epochs without a validation pass)."""
    scores = dict.fromkeys(("loss", "top1", "top5"))
    if evaluates(settings, phase, epoch):
        scores = evaluation.evaluate_sharded(ema_net, loader, info.device, settings.runtime.eval_amp, info)
    return {f"{split}_ema_{key}": scores[key] for key in ("loss", "top1", "top5")}


def _model_kwargs(settings: Settings, bundle: DataBundle) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"num_classes": bundle.num_classes, "in_channels": bundle.in_channels}
    if settings.model.dropout is not None:
        kwargs["dropout"] = settings.model.dropout
    return kwargs


def _note_dense_layers(engine: ACDC, settings: Settings, console: Console, is_main: bool) -> None:
    left_dense = [f"{r.module} ({r.reason})" for r in engine.rules if not r.selected]
    if is_main and left_dense and settings.schedule.method != "dense":
        console.print("left dense by rule: " + ", ".join(left_dense), markup=False, highlight=False)


_NO_BAD_STEP = 2**62


def raise_if_bad(totals: EpochTotals, epoch: int) -> None:
    """Stop on a non-finite loss before anything is saved; every rank raises, naming the first bad step of any."""
    local = int(totals.first_bad.item())
    bad = reduce_int(local if local >= 0 else _NO_BAD_STEP, "min")
    if bad != _NO_BAD_STEP:
        raise TrainingFault(f"non-finite loss at epoch {epoch}, step {bad}; the last good checkpoint is kept")


class StepUndo:
    """A copy of all that one training step changes: parameters, buffers (batch-norm statistics) and optimizer
    state, for ``runtime.nan_policy = "skip"`` to put back. :meth:`capture` before each step copies into buffers
    kept from step to step (one multi-tensor copy), allocated anew only when the tensors to copy are others (the
    optimizer's first step creates its state, a load replaces it)."""

    def __init__(self, net: nn.Module, optimizer: torch.optim.Optimizer):
        self.net, self.optimizer = net, optimizer
        self.live: list[torch.Tensor] = []
        self.copies: list[torch.Tensor] = []

    @torch.no_grad()
    def capture(self) -> None:
        optimizer = self.optimizer
        self.keys = {p: set(s) for p, s in optimizer.state.items()}  # entries a first step creates are dropped
        state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        live = [*self.net.parameters(), *self.net.buffers(), *state]
        if len(live) == len(self.live) and all(a is b for a, b in zip(live, self.live)):
            torch._foreach_copy_(self.copies, live)
        else:
            self.live, self.copies = live, [t.detach().clone() for t in live]
        self.plain = {(p, k): v for p, s in optimizer.state.items() for k, v in s.items()
                      if not isinstance(v, torch.Tensor)}

    def finite(self) -> torch.Tensor:
        """Whether the parameters and buffers are all finite now (a device tensor: nothing waits for it here)."""
        return all_finite([*self.net.parameters(), *self.net.buffers()])

    @torch.no_grad()
    def restore(self) -> None:
        torch._foreach_copy_(self.live, self.copies)  # in place: whatever holds these tensors sees the old values
        for param in list(self.optimizer.state):
            if param not in self.keys:
                del self.optimizer.state[param]
                continue
            for key in set(self.optimizer.state[param]) - self.keys[param]:
                del self.optimizer.state[param][key]
        for (param, key), value in self.plain.items():
            self.optimizer.state[param][key] = value


def count_skip(totals: EpochTotals, epoch: int, step: int, limit: int) -> None:
    """One more step skipped; ``limit`` in a row ends the run (exit 1) with the last good checkpoint kept."""
    totals.skipped += 1
    totals.streak += 1
    if totals.streak >= limit:
        raise TrainingFault(f"{totals.streak} steps in a row skipped for a non-finite loss or weights, the last at "
                            f"epoch {epoch}, step {step} (runtime.max_skipped_steps = {limit}); the last good "
                            "checkpoint is kept")


def _no_sync(net: nn.Module, stepping: bool) -> contextlib.AbstractContextManager:
    """DDP's no_sync for a batch whose gradients only add up (not the last of its accumulation group)."""
    no_sync = getattr(net, "no_sync", None)
    return contextlib.nullcontext() if stepping or no_sync is None else no_sync()


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """A well-mixed 63-bit seed per (seed, epoch, step, rank); distinct tuples never share a stream in practice."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{step}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class EpochSteps:
    """One epoch of training from step ``totals.step`` (non-zero when resuming mid-epoch). Iterating runs the steps
    and yields the number of steps done after each, so that the loop can checkpoint or stop between two steps (it
    stops the epoch by leaving the iteration); after the last step, :meth:`stats` gives the epoch's numbers. The
    masks are kept by the engine's hooks on ``optimizer.step``.

    A step is one loader batch. With ``optim.grad_accumulation`` k, the gradients of k batches add up (each batch's
    loss divided by the batches in its group, so that the sum is the mean over the group's images) before one
    optimizer step, and the iteration yields only after an optimizer step: a checkpoint never holds half a group.
    The epoch's last group may be shorter."""

    def __init__(self, net: nn.Module, loader, optimizer: torch.optim.Optimizer, settings: Settings, *, epoch: int,
                 device: torch.device, totals: EpochTotals | None = None, progress: StepReporter | None = None,
                 rank: int = 0, scaler: torch.amp.GradScaler | None = None, ema: recipe.WeightEma | None = None):
        self.net, self.loader, self.optimizer, self.settings, self.ema = net, loader, optimizer, settings, ema
        self.epoch, self.device, self.progress, self.rank = epoch, device, progress, rank
        self.totals = totals or EpochTotals.start(device)
        self.scaler = scaler or runtime.grad_scaler(device, "off")
        self.count = len(loader)  # steps in a whole epoch
        # steps since this pass began whose loss kept the epoch's loss sum finite: a non-finite loss makes the sum
        # non-finite for good, so this counts the steps before the first bad one (two kernels a step, no sync)
        self.first = self.totals.step
        self.finite_steps = torch.zeros((), dtype=torch.long, device=device)
        self.seen = 0  # images trained on by this pass, skipped steps included (img/s)
        self.elapsed = 0.0

    def __iter__(self) -> Iterator[int]:
        net, optimizer, settings, totals, scaler = self.net, self.optimizer, self.settings, self.totals, self.scaler
        epoch, steps, progress = self.epoch, self.count, self.progress
        net.train()
        # "skip" must be able to undo all that a bad step moves, the forward pass's batch-norm statistics too
        undo = StepUndo(net, optimizer) if settings.runtime.nan_policy == "skip" else None
        if progress is not None:
            progress.begin(epoch, steps, totals)
        started = time.perf_counter()
        batches = self.loader.iterate(totals.step) if totals.step else self.loader
        accumulation = settings.optim.grad_accumulation
        try:
            per_step_lr = settings.optim.lr_per_step
            lr = set_lr(optimizer, learning_rate(settings, epoch))  # the reference's LR: one value for the epoch
            for step, (images, labels, *_) in enumerate(batches, start=totals.step):
                if per_step_lr:
                    lr = set_lr(optimizer, learning_rate(settings, epoch + step / steps))
                group_start = step - step % accumulation
                group_end = min(group_start + accumulation, steps)  # the last group of an epoch may be shorter
                stepping = step + 1 == group_end
                if step == group_start:
                    optimizer.zero_grad(set_to_none=True)
                # dropout's (and mixup's) randomness is a function of (seed, epoch, step, rank): a run resumed at any
                # step draws what an uninterrupted one would, and ranks draw differently
                runtime.seed_step_generators(step_seed(settings.runtime.seed, epoch, step, self.rank), self.device)
                if undo is not None:
                    undo.capture()
                images, lam = recipe.draw_mix(images, settings.data)
                # DDP averages the gradients across ranks once per group, at its last backward
                with _no_sync(net, stepping):
                    with runtime.autocast(self.device, settings.runtime.amp):
                        logits = net(images)
                        loss = recipe.recipe_loss(logits.float(), labels, lam, settings.optim.label_smoothing)
                    # also for a step that is skipped: DDP expects every forward to have its backward
                    scaler.scale(loss / (group_end - group_start)).backward()
                detached = loss.detach()
                if stepping:
                    scaler.step(optimizer)  # the engine's hooks mask gradients before and weights after
                    scaler.update()
                # "skip": a non-finite loss, or a finite one whose step broke the weights (a huge loss, an LR far too
                # high), is undone; every rank agrees (one host sync)
                if undo is not None and reduce_int(int(not (torch.isfinite(detached) & undo.finite()))):
                    undo.restore()
                    count_skip(totals, epoch, step, settings.runtime.max_skipped_steps)
                else:
                    if stepping and self.ema is not None:
                        self.ema.update()
                    totals.streak = 0
                    # the float32 loss times a batch size is exact in float64: the same sum as double() * n
                    totals.loss_sum.add_(detached, alpha=labels.numel())
                    self.finite_steps += torch.isfinite(totals.loss_sum)
                    totals.correct += (logits.detach().argmax(1) == labels).sum()
                    totals.count += labels.numel()
                totals.step = step + 1
                self.seen += labels.numel()
                if progress is not None:
                    progress.step(totals, lr)
                if stepping:
                    yield totals.step
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.elapsed = time.perf_counter() - started
        finally:
            if progress is not None:
                progress.end()

    def settle(self) -> None:
        """Set ``totals.first_bad`` from the steps so far, for :func:`raise_if_bad` to read (on the device: nothing
        waits here)."""
        totals = self.totals
        totals.first_bad = torch.where(torch.isfinite(totals.loss_sum), -1, self.first + self.finite_steps)

    def stats(self) -> dict[str, float]:
        """The epoch's training numbers, once every step ran; a non-finite loss in any of them raises here."""
        totals, settings, steps = self.totals, self.settings, self.count
        self.settle()
        raise_if_bad(totals, self.epoch)
        count = totals.count or float("nan")  # every step skipped: no loss to report, not a loss of 0
        return {
            "train_loss": totals.loss_sum.item() / count,
            "train_top1": totals.correct.item() / count,
            "lr": learning_rate(settings, self.epoch + (steps - 1) / steps),
            "img_per_s": self.seen / max(self.elapsed, 1e-9),
            "skipped_steps": totals.skipped,
        }


def train_epoch(net: nn.Module, loader, optimizer: torch.optim.Optimizer, settings: Settings, *, epoch: int = 0,
                device: torch.device, totals: EpochTotals | None = None, progress: StepReporter | None = None,
                rank: int = 0, scaler: torch.amp.GradScaler | None = None,
                ema: recipe.WeightEma | None = None) -> dict[str, float]:
    """A whole epoch with nothing between the steps (acdc bench, tests): :class:`EpochSteps` run to the end."""
    steps = EpochSteps(net, loader, optimizer, settings, epoch=epoch, device=device, totals=totals,
                       progress=progress, rank=rank, scaler=scaler, ema=ema)
    for _ in steps:
        pass
    return steps.stats()


def _flops_summary(engine: ACDC) -> dict[str, Any]:
    run = engine.train_flops
    return {"inference": engine.flops().as_dict(),
            "train": {"flops": run.flops, "dense_flops": run.dense_flops, "ratio": run.ratio}}


def summary_panel(result: RunResult, tensorboard: bool) -> Panel:
    """What the run left: best checkpoints, final sparsity, FLOPs, files, and the TensorBoard command when it wrote
    events. Plain text (paths may hold "[/]"), wrapped at the panel's width, never cut."""
    def line(label: str, best: dict[str, Any] | None) -> str:
        if best is None:
            return f"{label}: none"
        if best.get("split") == "test":  # data.val_size = 0: the paper's protocol
            return f"{label}: test top-1 {best['test_top1']:.4f} (epoch {best['epoch']}; chosen on the test split)"
        test = f", test top-1 {best['test_top1']:.4f}" if "test_top1" in best else ""
        return f"{label}: val top-1 {best['val_top1']:.4f} (epoch {best['epoch']}){test}"

    lines = [
        line("best sparse", result.best_sparse),
        line("best dense ", result.best_dense),
        *([line("EMA best sparse", result.ema_best["sparse"]), line("EMA best dense ", result.ema_best["dense"])]
          if result.ema_best is not None else []),
        f"final sparsity: {result.final_sparsity:.4f} of prunable weights",
        *_flops_lines(result.flops),
        *([f"CPU threads: {result.threads[0]} ({result.threads[1]})"] if result.threads else []),
        *_paper_lines(result),
        "files: " + ", ".join(p.name for p in result.files),
        f"run dir: {result.run_dir}",
    ]
    if tensorboard:
        lines.append(f"tensorboard --logdir {shlex.quote(str(result.run_dir / 'tb'))}")
    # no_wrap=False: a console that soft-wraps (a pipe) would otherwise crop each line at the panel's border
    return Panel(Text("\n".join(lines), no_wrap=False, overflow="fold"), title="acdc run finished", expand=False)


def _paper_lines(result: RunResult) -> list[str]:
    """The paper's top-1 beside the run's best test top-1 (best sparse; best dense for a dense run), or why this run
    is not the experiment the paper's number is for."""
    paper = result.paper
    if paper is None:
        return []
    if paper["top1"] is None:
        return [f"paper top-1 not shown: {paper['note']}"]
    label, best = ("best sparse", result.best_sparse) if result.best_sparse else ("best dense", result.best_dense)
    ours = (best or {}).get("test_top1")
    beside = f" ({label} {100 * (ours - paper['top1']):+.2f} points)" if ours is not None else ""
    return [f"paper top-1: {paper['top1']:.4f}{beside}"]


def _flops_lines(flops: dict[str, Any] | None) -> list[str]:
    """The paper's cost claim: multiply-accumulates of the final model per image, and of the whole run, to dense."""
    if flops is None:
        return []
    now, run = flops["inference"], flops["train"]
    lines = [f"inference FLOPs: {si(now['sparse'])} per image, {now['ratio']:.4f} × dense ({si(now['dense'])})"]
    lines.append(f"training FLOPs: {si(run['flops'])}, {run['ratio']:.4f} × the same run dense")
    return lines
