"""Starting a training run, for ``acdc train`` and Python callers alike: the run's settings resolved from their
layers, every check made before anything is written (resume, extension, ``--from``, model and data, the run dir),
the run dir prepared and locked, and the choice between training here and relaunching under torchrun.

``acdc train`` is :func:`resolve_settings` then :func:`train`; a Python caller who builds its own settings calls
:func:`train` alone and meets the same checks and the same one-line :class:`~acdc_cli.errors.AcdcError` messages.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from rich.console import Console

from acdc_cli.config import (
    Settings,
    flat_settings,
    format_validation_error,
    load_settings,
    merge_layer,
    read_toml,
)
from acdc_cli.data.bundle import input_shape
from acdc_cli.errors import AcdcError
from acdc_cli.files.checkpoint import load_checkpoint
from acdc_cli.models import create, lookup
from acdc_cli.training import distributed, runtime, tracking
from acdc_cli.training.loop import RunResult, run
from acdc_cli.training.resume import (
    check_restart_settings,
    check_resume_settings,
    epochs_trained,
    recorded_run_settings,
)
from acdc_cli.training.rundir import (
    CHECKPOINTS,
    RUN_MARKER,
    check_new_run_dir,
    default_run_dir,
    holds_nothing,
    prepare_run_dir,
    run_lock,
    saved_settings,
)

# datasets that live in a folder of the user's: the ranks of --nproc cannot each fetch or guess it
_NEEDS_DATA_DIR = ("cifar10", "cifar100", "imagenet")

# the exit status of a run that runtime.auto_resume lets a signal stop with a checkpoint: EX_TEMPFAIL ("try again
# later"), so that a job script can requeue on it and torchrun, restarting the group on it, lets the run go on
STOPPED_EXIT_CODE = 75


class RunStopped(Exception):
    """A signal stopped an auto-resumed run with a checkpoint, seen from a rank that does not report: it exits
    :data:`STOPPED_EXIT_CODE` like rank 0, so that every process of the job says the run is not finished."""

    exit_code = STOPPED_EXIT_CODE


class RanksFailed(Exception):
    """A rank started by ``nproc`` failed; the ranks have said why themselves. ``exit_code``: the first failure's."""

    def __init__(self, exit_code: int):
        super().__init__(f"a rank failed (exit code {exit_code})")
        self.exit_code = exit_code


def resolve_settings(preset: str | None = None, config: Path | None = None, overrides: list[str] | None = None,
                     flags: dict[str, Any] | None = None, *, resume: Path | None = None,
                     from_checkpoint: Path | None = None, out: Path | None = None, force: bool = False) -> Settings:
    """The settings of a run as ``acdc train`` resolves them: defaults < preset < ``config`` < ACDC_SECTION__KEY env <
    ``flags`` / ``overrides`` (``--set``). ``resume``: the run dir to continue, whose recorded settings (with its
    config.toml over them) replace preset and config; what the other layers change is checked against them.
    ``from_checkpoint`` without preset or config: the checkpoint's own settings. Checked as :func:`train` checks
    them (a dry run sees the same errors); ``out`` and ``force`` only to refuse them with ``resume``."""
    if resume is not None:
        if preset or config or from_checkpoint:
            raise AcdcError("--resume continues a run with its saved settings; drop --preset/--config/--from")
        if out is not None or force:
            raise _resumed_in_place(resume)
        config_toml = saved_settings(resume)  # also: is it a run dir with a checkpoint
        recorded = recorded_run_settings(resume)
        # config.toml (where a moved data.dir may be recorded) over the settings the checkpoint records, so that an
        # emptied config.toml still resumes; what it or a flag changes is checked against the checkpoint
        base = merge_layer(recorded.model_dump(mode="json"), config_toml)
        settings = load_settings(base=base, overrides=overrides, flags=flags)
        check_resume_settings(recorded, settings, resume)
    else:
        # --from alone continues with the checkpoint's own settings (a pruned checkpoint's are compressed throughout)
        use_checkpoint = from_checkpoint is not None and preset is None and config is None
        base = checkpoint_settings(from_checkpoint) if use_checkpoint else None
        settings = load_settings(preset, config, overrides, flags, base=base)
    _check_start(settings, from_checkpoint, new_run=resume is None)
    return settings


def train(settings: Settings, *, out: Path | None = None, resume: bool = False, force: bool = False,
          from_checkpoint: Path | None = None, nproc: int | None = None, console: Console | None = None,
          launch_argv: list[str] | None = None) -> RunResult | None:
    """Train as ``settings`` say into the run dir ``out`` (default: runs/<preset>-<timestamp>), or continue the run
    there (``resume``: only what :func:`~acdc_cli.training.resume.check_resume_settings` allows may differ from the
    settings its last checkpoint records). ``force``: overwrite a non-empty ``out``. ``from_checkpoint``: start from
    its weights and masks. ``nproc``: relaunch as that many data-parallel processes through torchrun, each running
    ``python -m acdc_cli`` with ``launch_argv`` (``acdc train``'s own options; by default these settings) and the
    run dir; this process holds the run lock for them.

    With ``settings.runtime.auto_resume`` (and ``out``, no ``resume`` or ``force``) the run dir decides: see
    :func:`auto_resume`.

    Returns the result for the process that reports it; None in the process that launched ranks and in ranks other
    than 0. Raises AcdcError (one line) before anything is written when a check fails, :class:`RanksFailed` when a
    launched rank fails, :class:`RunStopped` in ranks other than 0 of an auto-resumed run a signal stopped."""
    auto = settings.runtime.auto_resume
    # an explicit resume needs no decision (and a run dir's config.toml may carry auto_resume into `--resume DIR`)
    if auto and not resume:
        if out is None:
            raise AcdcError("runtime.auto_resume (--auto-resume) needs the run dir: give --out DIR")
        if force:
            raise AcdcError(f"--auto-resume decides itself whether {out} starts or continues; drop --force")
        resume, force = auto_resume(Path(out), settings)
    if resume:
        if out is None:
            raise AcdcError("resume continues the run in a run dir: give it as out")
        if force:
            raise _resumed_in_place(out)
        saved_settings(out)  # is it a run dir with a checkpoint
        check_resume_settings(recorded_run_settings(out), settings, out)
        run_dir = Path(out)
    else:
        run_dir = Path(out) if out is not None else default_run_dir(settings)
    _check_start(settings, from_checkpoint, new_run=not resume)
    if from_checkpoint is not None:
        _check_from(from_checkpoint)
    if nproc is not None:
        _launch(settings, run_dir, resume, force, from_checkpoint, nproc, launch_argv)
        return None
    # under torchrun only rank 0 touches the run dir and prints
    is_main = distributed.env_rank() == 0
    console = console or Console()
    with contextlib.ExitStack() as held:
        if not resume and is_main:
            check_new_run_dir(run_dir, force)  # before the lock file is made in it
        if is_main:
            held.enter_context(run_lock(run_dir))
        if not resume and is_main:
            prepare_run_dir(run_dir, force)
        if resume and is_main and epochs_trained(run_dir) >= settings.schedule.epochs:
            console.print(f"note: {run_dir} has trained all {settings.schedule.epochs} epochs of its plan; nothing to "
                          "train (a longer run: --set schedule.epochs=N, see docs/runs.md, 'Extending a run')",
                          markup=False, highlight=False, soft_wrap=True)
        result = run(settings, run_dir, resume=resume, from_checkpoint=from_checkpoint, console=console)
    if not is_main:
        if auto and result.preempted is not None:
            raise RunStopped()
        return None
    if result.preempted is not None:
        distributed.mark_stopped()
    return result


def auto_resume(run_dir: Path, settings: Settings) -> tuple[bool, bool]:
    """What ``runtime.auto_resume`` does with ``run_dir``: (resume, force) for :func:`train`.

    A missing or empty folder: a new run. A run with a checkpoint: continued, when ``settings`` are ones ``--resume``
    accepts for it (a legal extension included). A run of the same settings that stopped before its first
    checkpoint: started again (nothing of it could be resumed; its config.toml, metrics and events are replaced).
    Anything else, one line and nothing written. It reads only, and reads what no process of a torchrun group writes
    before every rank has joined the group (the first checkpoint comes after the first collective step), so every
    rank of a group (re)started by torchrun reaches the same answer from the same files."""
    if run_dir.exists() and not run_dir.is_dir():
        raise AcdcError(f"--out {run_dir} exists and is not a folder")
    if holds_nothing(run_dir):
        return False, False
    if not (run_dir / RUN_MARKER).is_file():
        raise AcdcError(f"--auto-resume: {run_dir} holds files but no acdc run ({RUN_MARKER}); give an empty or new "
                        "--out")
    if any((run_dir / name).is_file() for name in CHECKPOINTS):
        saved_settings(run_dir)  # a run dir with last.safetensors (kept best checkpoints alone are refused)
        check_resume_settings(recorded_run_settings(run_dir), settings, run_dir)
        return True, False
    try:
        started = Settings(**read_toml(run_dir / RUN_MARKER))
    except ValidationError as exc:
        raise AcdcError(f"{run_dir / RUN_MARKER}: {format_validation_error(exc)}") from None
    check_restart_settings(started, settings, run_dir)
    return False, True


def _check_from(path: Path) -> None:
    if path.is_dir():
        raise AcdcError(f"--from: {path} is a directory; give a checkpoint file (a run's best_sparse.safetensors, or "
                        "what acdc prune wrote)")
    if not path.is_file():
        raise AcdcError(f"--from: no such checkpoint {path}")


def checkpoint_settings(path: Path) -> dict[str, Any]:
    """The settings a ``--from`` checkpoint records, as the base of a new run from it."""
    _check_from(path)
    config = load_checkpoint(path).config
    if not config:
        raise AcdcError(f"--from {path} records no settings; give --preset or --config as well")
    # the pretrained weights that run started from are history: the checkpoint's own weights are the start now
    model = config.get("model")
    if isinstance(model, dict) and "weights" in model:
        config = {**config, "model": {k: v for k, v in model.items() if k != "weights"}}
    return config


def _resumed_in_place(run_dir: Path) -> AcdcError:
    return AcdcError(f"--resume continues the run in {run_dir} in place; drop --out/--force (--out NEW_DIR "
                     f"--from {Path(run_dir) / 'last.safetensors'} starts a new run from its weights)")


def _check_start(settings: Settings, from_checkpoint: Path | None, new_run: bool) -> None:
    """What must hold before anything runs (a dry run too): one source of starting weights, a model that exists and
    fits the data, the tracking libraries the settings ask for, and (for a new run) the pretrained weights file."""
    if from_checkpoint is not None and settings.model.weights is not None:
        raise AcdcError("--from and model.weights both give the starting weights; keep one")
    lookup(settings.model.name)
    tracking.check_installed(settings)
    if settings.model.name.startswith("torchvision:"):
        channels = input_shape(settings.data.name, settings.model.name, settings.data.image_size)[0]
        if channels != 3:
            raise AcdcError(f"{settings.model.name} takes 3-channel images and data.name = "
                            f"{settings.data.name!r} has {channels}; use cifar10, cifar100, imagenet or synthetic "
                            "(--set data.name=...)")
    _check_model_input(settings)
    runtime.check_threads(settings.runtime.threads)
    weights = settings.model.weights
    if new_run and weights is not None and not weights.is_file():
        raise AcdcError(f"model.weights: no such file {weights}")
    # a launch's rendezvous variables, before a run dir is made for it (init_process_group reads them much later)
    _, world_size, _ = distributed.launch_env()
    if world_size > 1:
        distributed.check_rendezvous(world_size)


def _check_model_input(settings: Settings) -> None:
    """Build the model on the meta device (no memory, no data read) and pass it one image of the data's size: a
    name the factory refuses (wrn-4-1) and a model too deep for the images (inception_v3 on 32 pixels) are refused
    here, in one line, for a dry run too, instead of inside the first epoch."""
    channels, height, width = input_shape(settings.data.name, settings.model.name,
                                           settings.data.image_size)
    kwargs: dict[str, Any] = {"in_channels": channels}
    if settings.model.dropout is not None:
        kwargs["dropout"] = settings.model.dropout
    with torch.device("meta"):
        model = create(settings.model.name, num_classes=10, **kwargs)  # the class count only sizes the head
        try:
            with torch.no_grad():
                model.eval()(torch.zeros(1, channels, height, width))
        except NotImplementedError:
            return  # an operation without a meta kernel: the model cannot be checked ahead, the first step will
        except RuntimeError as exc:
            detail = str(exc).splitlines()[0][:160] if str(exc) else exc.__class__.__name__
            if "meta" in detail:  # a model that reads values (.item()) cannot run on the meta device
                return
            raise AcdcError(f"{settings.model.name} does not take the {height}x{width} images of data.name = "
                            f"{settings.data.name!r} ({detail})") from None


def _launch(settings: Settings, run_dir: Path, resume: bool, force: bool, from_checkpoint: Path | None, nproc: int,
            launch_argv: list[str] | None) -> None:
    """Train in ``nproc`` processes under torchrun, this one holding the run dir's lock for them."""
    threads = distributed.check_nproc(nproc, settings)
    if settings.data.name in _NEEDS_DATA_DIR and settings.data.dir is None:
        raise AcdcError(f"data.dir is not set: {settings.data.name} needs --data-dir PATH")
    with contextlib.ExitStack() as held:
        if not resume:
            check_new_run_dir(run_dir, force)  # before the lock file is made in it
        held.enter_context(run_lock(run_dir, for_ranks=True))
        if not resume:
            prepare_run_dir(run_dir, force)
        if launch_argv is None:
            folder = Path(held.enter_context(tempfile.TemporaryDirectory(prefix="acdc-ranks-")))
            argv = _rank_argv(settings, run_dir, resume, from_checkpoint, folder)
        else:
            # an auto-resumed run's ranks are given the same --out and decide again, finding what this process did
            auto = settings.runtime.auto_resume
            argv = [*launch_argv, *([] if resume and not auto else ["--out", str(run_dir)])]
        code = distributed.launch(nproc, argv, threads, STOPPED_EXIT_CODE if settings.runtime.auto_resume else 0)
    if code:
        raise RanksFailed(code)


def _rank_argv(settings: Settings, run_dir: Path, resume: bool, from_checkpoint: Path | None,
               folder: Path) -> list[str]:
    """``acdc train`` arguments that make every rank resolve exactly ``settings``: a new run reads them from a TOML
    file in ``folder``; a resumed run starts from its run dir's settings and sets what differs."""
    if not resume:
        path = folder / "settings.toml"
        path.write_text(settings.to_toml())
        start = ["--from", str(from_checkpoint)] if from_checkpoint is not None else []
        return ["train", "--config", str(path), "--out", str(run_dir), *start]
    saved = flat_settings(resolve_settings(resume=run_dir))
    sets = []
    for name, value in flat_settings(settings).items():
        if "." not in name or value == saved[name]:  # top-level labels (preset, description) are not --set
            continue
        if value is None:
            raise AcdcError(f"{name} is unset here and set in {run_dir}; ranks started with nproc cannot unset it")
        sets += ["--set", f"{name}={json.dumps(value)}"]
    return ["train", "--resume", str(run_dir), *sets]
