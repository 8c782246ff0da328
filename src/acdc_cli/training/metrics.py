"""Where a run's metrics go: ``metrics.jsonl`` (one object per epoch), TensorBoard, a console row per epoch, and
progress inside each epoch (a bar in a terminal, plain lines in a pipe, a file or a batch log).

TensorBoard's x axis is the training step (optimizer steps since epoch 0): epoch ``e``'s row is logged at step
``(e + 1) * steps_per_epoch``, so the per-step ``train/loss`` and ``train/lr`` share the axis with everything else.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from rich.console import Console

from acdc_cli.config import preset_label
from acdc_cli.errors import AcdcError
from acdc_cli.files.atomic import atomic_write_bytes, atomic_write_text
from acdc_cli.files.jsonio import finite_number, json_line, read_rows
from acdc_cli.training.tracking import Tracking

if TYPE_CHECKING:
    from acdc_cli.config import Settings


# console columns: key, header, width, format (a run without a validation split shows test_* under "te.*")
_COLUMNS = [
    ("epoch", "epoch", 5, "{:d}"),
    ("phase", "phase", 6, "{}"),
    ("sparsity", "sparse", 6, "{:.3f}"),
    ("lr", "lr", 8, "{:.2e}"),
    ("train_loss", "t.loss", 7, "{:.4f}"),
    ("train_top1", "t.top1", 6, "{:.4f}"),
    ("val_loss", "v.loss", 7, "{:.4f}"),
    ("val_top1", "v.top1", 6, "{:.4f}"),
    ("val_top5", "v.top5", 6, "{:.4f}"),
    ("mask_change", "mask Δ", 6, "{:.4f}"),
    ("img_per_s", "img/s", 6, "{:.0f}"),
]


_TEST_COLUMNS = [(key.replace("val_", "test_"), header.replace("v.", "te."), width, fmt) if key.startswith("val_")
                 else (key, header, width, fmt) for key, header, width, fmt in _COLUMNS]


# row key -> TensorBoard tag, for the keys that are not "<group>_<name>" (train_loss -> train/loss, and so on)
_TAGS = {
    "lr": "train/lr",
    "sparsity": "sparsity/overall",
    "target_sparsity": "sparsity/target",
    "mask_change": "sparsity/mask_change",
    "img_per_s": "perf/img_per_s",
    "checkpoint_wait_s": "perf/checkpoint_wait_s",
    "skipped_steps": "train/skipped_steps",
}


_GROUPS = ("train", "val", "test", "memorized")


# the scalars the HParams tab compares runs by (one value per run: the latest, which is the run's result at its end)
HPARAM_METRICS = ("hparams/best_sparse_top1", "hparams/best_dense_top1")


def tensorboard_tag(key: str) -> str:
    """The grouped TensorBoard tag of a metrics row key: ``val_top1`` -> ``val/top1``, ``inference_flops_ratio`` ->
    ``flops/inference_ratio``, ``img_per_s`` -> ``perf/img_per_s``; another key goes under ``other/``."""
    if key in _TAGS:
        return _TAGS[key]
    parts = key.split("_")
    if "flops" in parts:
        return "flops/" + ("_".join(p for p in parts if p != "flops") or "total")
    if parts[0] in _GROUPS and len(parts) > 1:
        return f"{parts[0]}/{'_'.join(parts[1:])}"
    return f"other/{key}"


def top1_key(rows: list[dict[str, Any]]) -> str:
    """``val_top1``, or ``test_top1`` for a run without a validation split (its rows carry test_* keys)."""
    return "val_top1" if any("val_top1" in r for r in rows) or not any("test_top1" in r for r in rows) else "test_top1"


def best_rows(rows: list[dict[str, Any]], target: float) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(best sparse row, best dense row) by top-1, as training picks best_sparse / best_dense: a compressed epoch at
    the ``target`` sparsity, a dense epoch; the first of equals."""
    key = top1_key(rows)
    sparse = [r for r in rows if r.get("phase") == "sparse" and finite_number(r.get("target_sparsity"))
              and abs(r["target_sparsity"] - target) < 1e-9 and finite_number(r.get(key))]
    dense = [r for r in rows if r.get("phase") == "dense" and finite_number(r.get(key))]
    return (max(sparse, key=lambda r: r[key]) if sparse else None,
            max(dense, key=lambda r: r[key]) if dense else None)


def hparams_of(settings: Settings) -> dict[str, Any]:
    """What tells the runs of a sweep apart, for TensorBoard's HParams tab."""
    return {
        # a run that only started from a preset is told apart by its data and model, not named after the preset
        "preset": preset_label(settings) if settings.preset else "custom",
        "model": settings.model.name,
        "dataset": settings.data.name,
        "method": settings.schedule.method,
        "sparsity": 0.0 if settings.schedule.method == "dense" else settings.sparsity.target,
        "structure": settings.sparsity.structure,
        "epochs": settings.schedule.epochs,
        "lr": settings.optim.lr,
    }


def summary_of(rows: list[dict[str, Any]], target: float | None) -> dict[str, float]:
    """A run's result from its rows, for the tracking services: best sparse / dense top-1 (as best_sparse /
    best_dense pick them), and the last epoch's sparsity and FLOPs ratios; what the rows lack is left out."""
    summary = {}
    if target is not None:
        key = top1_key(rows)
        for name, best in zip(("best_sparse_top1", "best_dense_top1"), best_rows(rows, target)):
            if best is not None:
                summary[f"summary/{name}"] = best[key]
    last = rows[-1] if rows else {}
    for key, name in (("sparsity", "final_sparsity"), ("inference_flops_ratio", "inference_flops_ratio"),
                      ("train_flops_ratio", "train_flops_ratio")):
        if finite_number(last.get(key)):
            summary[f"summary/{name}"] = last[key]
    return summary


class MetricsLogger:
    """Rank 0 only. On resume, rows past the checkpoint's epoch are dropped so the files match the run, and
    TensorBoard events past its step.

    ``steps_per_epoch`` places each row on TensorBoard's step axis; ``start_step`` is the step inside
    ``start_epoch`` a mid-epoch checkpoint resumes at; ``settings`` (when given) go to TensorBoard as the config
    text and the run's hyperparameters, and open the tracking services they name (MLflow, W&B), which get the same
    scalars as TensorBoard; ``resume``: those continue the runs recorded in the run dir.
    """

    def __init__(self, run_dir: Path, console: Console, tensorboard: bool, per_layer: bool, start_epoch: int = 0, *,
                 steps_per_epoch: int = 1, start_step: int = 0, settings: Settings | None = None,
                 resume: bool = False):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.console = console
        self.per_layer = per_layer
        self.steps_per_epoch = max(steps_per_epoch, 1)
        self.target = settings.sparsity.target if settings is not None else None
        self.per_step = settings is not None and settings.log.every_steps > 0
        rows, damaged = read_rows(self.path)
        if damaged:
            # kept beside the file, never dropped in silence: the rows around them are all still there
            aside = self.path.with_name(self.path.name + ".damaged")

            try:
                previous = aside.read_bytes() if aside.exists() else b""
            except OSError as exc:
                raise AcdcError(f"cannot read {aside}: {exc.strerror or exc.__class__.__name__}") from None
            atomic_write_bytes(aside, previous + b"".join(line + b"\n" for line in damaged))
            console.print(f"note: {len(damaged)} damaged line(s) of {self.path} set aside in {aside}", markup=False,
                          highlight=False, soft_wrap=True)
        self.rows = [r for r in rows if type(r.get("epoch")) is int and r["epoch"] < start_epoch]
        self._write()
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops the events a crashed or stopped run wrote after its checkpoint: those of the steps
            # after it, which this run trains again
            resumed_at = start_epoch * self.steps_per_epoch + start_step
            self.writer = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resumed_at + 1 if resumed_at else None)
            if settings is not None:
                self._log_settings(settings, resumed_at)
        self.tracking = Tracking.open(settings, run_dir, resume, console) if settings is not None else None
        self._columns: list[tuple[str, str, int, str]] | None = None

    @property
    def step_writer(self) -> MetricsLogger | None:
        """Where StepReporter sends per-step points (:meth:`add_scalar`); None when nothing takes them."""
        return self if self.writer is not None or self.tracking is not None else None

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)
        if self.tracking is not None:
            self.tracking.add_scalar(tag, value, step)

    def _write(self) -> None:
        # the whole file through a temp file and a rename (a few kB even for long runs): never a torn line

        atomic_write_text(self.path, "".join(json_line(r) + "\n" for r in self.rows))

    def _log_settings(self, settings: Settings, step: int) -> None:
        """The resolved config as text (a code block: TensorBoard renders text as Markdown) and the hyperparameters
        with the metrics the HParams tab shows beside them."""
        from torch.utils.tensorboard.summary import hparams

        toml = settings.to_toml()
        self.writer.add_text("config", "\n".join("    " + line for line in toml.splitlines()), step)
        experiment, session_start, _ = hparams(hparams_of(settings), {tag: 0.0 for tag in HPARAM_METRICS})
        self.writer.file_writer.add_summary(experiment)
        self.writer.file_writer.add_summary(session_start)
        self.writer.flush()

    def log_epoch(self, row: dict[str, Any], per_layer: dict[str, float] | None = None) -> None:
        self.rows.append(row)
        self._write()
        if self.writer is not None or self.tracking is not None:
            step = (row["epoch"] + 1) * self.steps_per_epoch
            scalars = self._scalars(row, per_layer)
            if self.writer is not None:
                for tag, value in scalars.items():
                    self.writer.add_scalar(tag, value, step)
                self.writer.flush()
            if self.tracking is not None:
                self.tracking.log(scalars, step)
        self._print_row(row)

    def _scalars(self, row: dict[str, Any], per_layer: dict[str, float] | None) -> dict[str, float]:
        """An epoch's points by tag, for TensorBoard and the tracking services alike."""
        scalars = {}
        for key, value in row.items():
            # with per-step logging, train/loss and train/lr get their points from the steps (StepReporter)
            if key == "epoch" or not finite_number(value) or (self.per_step and key in ("train_loss", "lr")):
                continue
            scalars[tensorboard_tag(key)] = value
        scalars["sparsity/compressed_phase"] = 1.0 if row.get("phase") == "sparse" else 0.0
        if self.per_layer and per_layer:
            for name, value in per_layer.items():
                scalars[f"sparsity/layer/{name}"] = value
        if self.target is not None:
            key = top1_key(self.rows)
            for tag, best in zip(HPARAM_METRICS, best_rows(self.rows, self.target)):
                if best is not None:
                    scalars[tag] = best[key]
        return scalars

    def _print_row(self, row: dict[str, Any]) -> None:
        if self._columns is None:
            self._columns = _TEST_COLUMNS if "val_top1" not in row and "test_top1" in row else _COLUMNS
            self.console.print(" ".join(f"{h:>{w}}" for _, h, w, _ in self._columns), style="bold")
        cells = []
        for key, _, width, fmt in self._columns:
            value = row.get(key)
            text = "-" if value is None else fmt.format(value)
            cells.append(f"{text:>{width}}")
        style = "cyan" if row.get("phase") == "sparse" else None
        self.console.print(" ".join(cells), style=style, highlight=False, markup=False)

    def close(self, status: str = "FINISHED") -> None:
        """``status`` (FINISHED, FAILED, or KILLED for a run a signal stopped) goes to the tracking services, with
        the run's summary."""
        if self.tracking is not None:
            step = (self.rows[-1]["epoch"] + 1) * self.steps_per_epoch if self.rows else 0
            self.tracking.finish(summary_of(self.rows, self.target), step, status)
        if self.writer is not None:
            self.writer.close()


def _clock_text(seconds: float) -> str:
    seconds = max(int(round(seconds)), 0)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class StepReporter:
    """Rank 0's view inside an epoch: the rich bar in a terminal; elsewhere (a pipe, a file, a batch log, TERM=dumb)
    a plain line at most every ``log.progress_interval_s`` seconds with the step, images/s, the epoch's loss so far
    and the time left in the epoch; TensorBoard's per-step ``train/loss`` (mean since its previous point) and
    ``train/lr`` every ``log.every_steps`` steps and at the epoch's end.

    The loss lives on the device (``EpochTotals.loss_sum``): it is read only at those moments, so no step waits for
    the host because of this. Loss and images/s are rank 0's share of a data-parallel run's batches, scaled to the
    global batch for images/s.
    """

    def __init__(self, console: Console, settings: Settings, writer: Any = None,
                 clock: Callable[[], float] = time.monotonic):
        log = settings.log
        self.console = console
        self.writer = writer
        self.clock = clock
        self.batch_size = settings.data.batch_size
        self.interval = log.progress_interval_s
        self.every = log.every_steps if writer is not None else 0
        self.bar = None
        # a dumb terminal cannot redraw a bar: it gets the plain lines a log file gets
        if log.progress and console.is_terminal and not console.is_dumb_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), console=console, transient=True)
            self.bar.start()
        self.lines = log.progress and self.bar is None
        self._task = None

    def begin(self, epoch: int, steps: int, totals: EpochTotals) -> None:
        """An epoch starts, at step ``totals.step`` (non-zero when resuming mid-epoch)."""
        self.epoch, self.steps, self.first_step = epoch, steps, totals.step
        self.started = self.last_line = self.clock()
        self._window = (totals.loss_sum.item() if totals.step else 0.0, totals.count)
        if self.bar is not None:
            self._task = self.bar.add_task(f"epoch {epoch}", total=steps, completed=totals.step)

    def step(self, totals: EpochTotals, lr: float) -> None:
        """After each step (``totals`` already count it), with the LR it ran at."""
        if self._task is not None:
            self.bar.advance(self._task)
        log_now = self.every and (totals.step % self.every == 0 or totals.step == self.steps)
        now = self.clock() if self.lines else 0.0
        line_now = self.lines and now - self.last_line >= self.interval
        if not (log_now or line_now):
            return
        loss_sum = totals.loss_sum.item()  # the one host sync, at a reporting moment only
        if log_now:
            self._log_step(totals, loss_sum, lr)
        if line_now:
            self.last_line = now
            self.console.print(self._line(totals, loss_sum, now), markup=False, highlight=False, soft_wrap=True)

    def _log_step(self, totals: EpochTotals, loss_sum: float, lr: float) -> None:
        window_sum, window_count = self._window
        images = totals.count - window_count
        self._window = (loss_sum, totals.count)
        step = self.epoch * self.steps + totals.step
        if images and math.isfinite(loss_sum - window_sum):
            self.writer.add_scalar("train/loss", (loss_sum - window_sum) / images, step)
        self.writer.add_scalar("train/lr", lr, step)

    def _line(self, totals: EpochTotals, loss_sum: float, now: float) -> str:
        done = totals.step - self.first_step
        elapsed = max(now - self.started, 1e-9)
        rate = done / elapsed
        eta = _clock_text((self.steps - totals.step) / rate) if rate > 0 else "-"
        loss = f"{loss_sum / totals.count:.4f}" if totals.count else "-"
        return (f"epoch {self.epoch}  step {totals.step}/{self.steps}  {rate * self.batch_size:.0f} img/s  "
                f"loss {loss}  eta {eta}")

    def end(self) -> None:
        """The epoch is over (or stopped): its bar goes."""
        if self._task is not None:
            self.bar.remove_task(self._task)
            self._task = None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


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
