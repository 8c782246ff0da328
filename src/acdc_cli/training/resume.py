"""What continues a run: which settings a resumed or extended run may change (checked against the settings its last
checkpoint records), the first epoch of a run started from another checkpoint, and the checks of a resume state
(progress, optimizer, engine, mid-epoch totals) that refuse, in one line, a state this run cannot continue from."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from acdc_cli.config import Settings, flat_settings, format_validation_error
from acdc_cli.errors import AcdcError
from acdc_cli.files.checkpoint import recorded_config
from acdc_cli.files.jsonio import finite_number, meta_field
from acdc_cli.files.tensors import read_metadata
from acdc_cli.sparsity.schedule import Phase, PlannedEpoch, epoch_plan, learning_rate
from acdc_cli.sparsity.sparsifier import check_masks, shown


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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_resume_state(state: dict[str, Any], optimizer: torch.optim.Optimizer, prunable: Mapping[str, torch.Tensor],
                       plan: tuple[Phase, ...], world_size: int, split: str) -> dict[str, Any]:
    """Raise an AcdcError naming the first thing of a resume state that this run cannot continue from: a missing
    entry, a wrong type, an optimizer state that does not fit the model, masks that do not fit ``prunable`` (the
    weights the engine prunes; ``plan``: its phases). ``split``: the one the run selects its best
    checkpoints on (val, or test when data.val_size = 0). Returns the engine part of the state."""
    progress = state.get("progress")
    if not isinstance(progress, dict):
        raise AcdcError(f"progress is {shown(progress)}, expected a table")
    for key in ("epoch", "best_sparse", "best_dense"):
        if key not in progress:
            raise AcdcError(f"progress.{key} is missing")
    step = progress.get("step", 0)
    for key, value in (("epoch", progress["epoch"]), ("step", step), ("skip_streak", progress.get("skip_streak", 0))):
        if not _is_int(value) or value < 0:
            raise AcdcError(f"progress.{key} is {shown(value)}, expected a whole number >= 0")
    for key in ("best_sparse", "best_dense", "ema_best_sparse", "ema_best_dense"):  # ema_*: with optim.ema_decay
        best = progress.get(key)
        if best is None:
            continue
        if not isinstance(best, dict) or not _is_int(best.get("epoch")) or best["epoch"] < 0:
            raise AcdcError(f"progress.{key} is {shown(best)}, expected none or {{epoch, split, {split}_top1}}")
        if best.get("split") != split:
            raise AcdcError(f"progress.{key}.split is {shown(best.get('split'))}, this run selects on {split}")
        for metric in (f"{split}_top1", "test_top1"):
            if (metric in best or metric == f"{split}_top1") and not (finite_number(best.get(metric))
                                                                      and 0 <= best[metric] <= 1):
                raise AcdcError(f"progress.{key}.{metric} is {shown(best.get(metric))}, expected a fraction 0..1")
    _check_optimizer(state.get("optimizer"), optimizer)
    scaler = state.get("scaler")
    if scaler is not None and not (isinstance(scaler, dict) and all(finite_number(v) for v in scaler.values())):
        raise AcdcError(f"scaler is {shown(scaler)}, expected a table of numbers")
    if not isinstance(state.get("engine"), dict):
        raise AcdcError(f"engine is {shown(state.get('engine'))}, expected a table")
    engine_state = _phase_as_planned(dict(state["engine"]), plan)
    _check_engine(engine_state, prunable)
    if step:
        _check_totals(state.get("totals"), step, world_size)
    return engine_state


def _check_optimizer(saved: Any, optimizer: torch.optim.Optimizer) -> None:
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict) or not isinstance(
            saved.get("param_groups"), list):
        raise AcdcError(f"optimizer is {shown(saved)}, expected a table of state and param_groups")
    groups = optimizer.param_groups
    if len(saved["param_groups"]) != len(groups):
        raise AcdcError(f"optimizer has {len(saved['param_groups'])} parameter group(s), this run {len(groups)}")
    params: list[torch.Tensor] = []
    for i, (group, live) in enumerate(zip(saved["param_groups"], groups)):
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            raise AcdcError(f"optimizer.param_groups[{i}] is {shown(group)}, expected a table with params")
        if len(group["params"]) != len(live["params"]):
            raise AcdcError(f"optimizer.param_groups[{i}] holds {len(group['params'])} parameters, this model "
                            f"{len(live['params'])}")
        for key, value in live.items():
            if finite_number(value) and not finite_number(group.get(key)):
                raise AcdcError(f"optimizer.param_groups[{i}].{key} is {shown(group.get(key))}, expected a number")
        params += live["params"]
    index = {}
    for group in saved["param_groups"]:
        for key in group["params"]:
            if not _is_int(key) or key in index:
                raise AcdcError(f"optimizer.param_groups lists parameter {shown(key)} twice or not as a number")
            index[key] = params[len(index)]
    for key, entry in saved["state"].items():
        if key not in index:
            raise AcdcError(f"optimizer.state has an entry for parameter {shown(key)}, which no group lists")
        if not isinstance(entry, dict):
            raise AcdcError(f"optimizer.state[{key}] is {shown(entry)}, expected a table")
        param = index[key]
        for name, value in entry.items():
            if value is None or finite_number(value):
                continue
            if not isinstance(value, torch.Tensor):
                raise AcdcError(f"optimizer.state[{key}].{name} is {shown(value)}, expected a tensor")
            # per-parameter buffers (momentum, moments) are floats of the parameter's shape; counters single numbers
            if (value.shape != param.shape and value.numel() != 1) or (value.shape == param.shape
                                                                        and not value.is_floating_point()):
                raise AcdcError(f"optimizer.state[{key}].{name} has shape {list(value.shape)} "
                                f"({str(value.dtype).removeprefix('torch.')}); its parameter is "
                                f"{list(param.shape)}")


def _check_engine(saved: dict[str, Any], params: Mapping[str, torch.Tensor]) -> None:
    epoch, change = saved.get("epoch"), saved.get("mask_change")
    if epoch is not None and not _is_int(epoch):
        raise AcdcError(f"engine.epoch is {shown(epoch)}, expected a whole number")
    if change is not None and not finite_number(change):
        raise AcdcError(f"engine.mask_change is {shown(change)}, expected a number")
    phase = saved.get("phase")
    if phase is not None and not (isinstance(phase, dict) and set(phase) == {"start", "end", "kind", "sparsity"}):
        raise AcdcError(f"engine.phase is {shown(phase)}, expected a phase of this plan")
    previous = saved.get("previous_masks")
    if previous is not None:
        # whole, as the engine takes them: a partial table or masks of 2 would fail a phase later or record a wrong
        # mask_change
        check_masks(previous, params, "engine.previous_masks")


def _check_totals(every_rank: Any, step: int, world_size: int) -> None:
    if not isinstance(every_rank, list) or not every_rank:
        raise AcdcError(f"totals is {shown(every_rank)}, expected one table per process of a mid-epoch checkpoint")
    if len(every_rank) != world_size:
        raise AcdcError(f"totals holds the sums of {len(every_rank)} process(es), this run has {world_size}")
    for rank, totals in enumerate(every_rank):
        where = f"totals[{rank}]"
        if not isinstance(totals, dict):
            raise AcdcError(f"{where} is {shown(totals)}, expected a table")
        for key, kind in (("loss_sum", "floating"), ("correct", "integer")):
            value = totals.get(key)
            if not (isinstance(value, torch.Tensor) and value.numel() == 1 and value.dim() == 0
                    and value.is_floating_point() == (kind == "floating")):
                raise AcdcError(f"{where}.{key} is {shown(value)}, expected a single {kind} number")
        for key in ("step", "count", "skipped", "streak"):
            if (key != "streak" or key in totals) and not (_is_int(totals.get(key)) and totals[key] >= 0):
                raise AcdcError(f"{where}.{key} is {shown(totals.get(key))}, expected a whole number >= 0")
        if totals["step"] != step:
            raise AcdcError(f"{where}.step is {totals['step']}, the progress says {step}")


# what a resumed run may change: where things are and how they run, never what is computed
_RESUME_MAY_CHANGE = {"data.dir", "data.num_workers", "data.eval_batch_size", "data.download"}


_RESUME_SECTIONS_MAY_CHANGE = {"runtime", "log"}


_RESUME_MUST_KEEP = {"runtime.seed", "runtime.sync_batchnorm"}

# settings a run fills in when they are not given (an image folder's mean/std): recorded, they are not a change
_MEASURED_BY_THE_RUN = {"data.mean", "data.std"}


def recorded_run_settings(run_dir: Path) -> Settings:
    """The settings the run's last checkpoint was computed with, as recorded inside last.safetensors (config.toml is
    a file anyone can edit, so it is not the reference)."""
    path = run_dir / "last.safetensors"
    config = recorded_config(path)
    if not config:
        raise AcdcError(f"{path} records no settings, so this run cannot be resumed; start a new run with --from {path}")
    try:
        return Settings(**config)
    except ValidationError as exc:
        raise AcdcError(f"{path}: recorded settings: {format_validation_error(exc)}") from None


# what extending a run may change besides: its length, the phase lengths and the LR schedule's shape, as long as every
# epoch it already trained keeps its phase, sparsity, momentum reset and LR (check_extension)
_EXTEND_MAY_CHANGE = {
    "schedule.epochs", "schedule.warmup_epochs", "schedule.compressed_epochs", "schedule.decompressed_epochs",
    "schedule.final_decompressed_epochs", "schedule.final_compressed_epochs", "schedule.gmp_start_epoch",
    "schedule.gmp_end_epoch", "schedule.prune_every", "optim.lr_schedule", "optim.milestones", "optim.gamma",
    "optim.cosine_epochs", "optim.min_lr",
}


def _differences(recorded: Settings, requested: Settings) -> Iterator[tuple[str, Any, Any, bool]]:
    """(setting, recorded value, requested value, whether an extension may change it) for every setting a resumed
    run may not change freely."""
    new_values = flat_settings(requested)
    for dotted, old in flat_settings(recorded).items():
        new = new_values[dotted]
        if old == new or dotted in _RESUME_MAY_CHANGE:
            continue
        if dotted in _MEASURED_BY_THE_RUN and new is None:
            continue  # the same command line again: the run measures them again, to the same values
        if dotted.partition(".")[0] in _RESUME_SECTIONS_MAY_CHANGE and dotted not in _RESUME_MUST_KEEP:
            continue
        yield dotted, old, new, dotted in _EXTEND_MAY_CHANGE


def check_resume_settings(recorded: Settings, requested: Settings, run_dir: Path) -> None:
    """A resumed run continues the same computation: only locations and runtime/log knobs may change (from
    config.toml, flags, --set or ACDC_* variables alike); the seed, which fixes splits, data order and dropout, may
    not. It may also be extended (schedule.epochs and the phase lengths and LR shape that go with it) when the
    epochs it trained stay as planned. ``recorded``: the settings inside last.safetensors."""
    extended = []
    for dotted, old, new, extends in _differences(recorded, requested):
        if extends:
            extended.append(f"{dotted} {old!r} -> {new!r}")
            continue
        raise AcdcError(f"cannot change {dotted} when resuming ({old!r} in {run_dir / 'last.safetensors'} -> "
                        f"{new!r} from config.toml, flags, --set or ACDC_*); only locations (data.dir, ...), "
                        "runtime.* / log.* settings other than runtime.seed, and the schedule's length may change")
    if extended:
        check_extension(recorded, requested, run_dir, ", ".join(extended))


def check_restart_settings(started: Settings, requested: Settings, run_dir: Path) -> None:
    """A run that stopped before its first checkpoint trained nothing that could be continued; it is started again
    only as the same run: what ``--resume`` would refuse to change is refused here (its length may change: no epoch
    of it is kept). ``started``: the settings its config.toml records."""
    for dotted, old, new, extends in _differences(started, requested):
        if not extends:
            raise AcdcError(f"{run_dir} holds a run started with {dotted} = {old!r} (its {run_dir / 'config.toml'}), "
                            f"this command has {new!r}; give another --out, or --force to replace that run")


def epochs_trained(run_dir: Path) -> int:
    """Epochs the run's last checkpoint has trained, whole or in part (a mid-epoch checkpoint's epoch counts)."""
    path = run_dir / "last.safetensors"
    meta = read_metadata(path)
    epoch, step = (meta_field(meta, key, path, kind=int, default=0) for key in ("epoch", "step"))
    return epoch + (1 if step else 0)


def check_extension(recorded: Settings, requested: Settings, run_dir: Path, changes: str) -> None:
    """A schedule changed on resume (``changes``) is allowed when every epoch already trained keeps its planned
    phase, sparsity, momentum reset and LR; otherwise one line names the first epoch whose plan would change."""
    trained = epochs_trained(run_dir)
    prefix = f"cannot resume {run_dir} with {changes}"
    if requested.schedule.epochs < trained:
        raise AcdcError(f"{prefix}: the run has already trained {trained} epochs")
    before, after = epoch_plan(recorded), epoch_plan(requested)
    for epoch in range(trained):
        old, new = before[epoch], after[epoch]
        if (old.phase, old.sparsity) != (new.phase, new.sparsity):
            raise AcdcError(f"{prefix}: epoch {epoch}, already trained {_as_planned(old)}, would become "
                            f"{_as_planned(new)}; keep the phase lengths up to epoch {trained - 1}")
        if old.reset_momentum != new.reset_momentum:
            raise AcdcError(f"{prefix}: epoch {epoch}, already trained, would {'' if new.reset_momentum else 'not '}"
                            "start by zeroing the momentum")
        # with optim.lr_per_step the LR moves inside an epoch: its middle must agree too
        points = (epoch, epoch + 0.5) if requested.optim.lr_per_step else (epoch,)
        for at in points:
            lr_old, lr_new = learning_rate(recorded, at), learning_rate(requested, at)
            if not math.isclose(lr_old, lr_new, rel_tol=1e-12, abs_tol=0.0):
                hint = ""
                if recorded.optim.lr_schedule == "cosine" and recorded.optim.cosine_epochs is None:
                    hint = (f" (the cosine spans schedule.epochs: --set optim.cosine_epochs={recorded.schedule.epochs} "
                            "keeps it, and runs the added epochs at optim.min_lr)")
                raise AcdcError(f"{prefix}: epoch {epoch}, already trained at LR {lr_old:.6g}, would run at LR "
                                f"{lr_new:.6g}{hint}")


def _as_planned(epoch: PlannedEpoch) -> str:
    return f"sparse at {epoch.sparsity:g}" if epoch.phase == "sparse" else "dense"
