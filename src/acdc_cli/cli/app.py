"""The ``acdc`` command line: parse, call a plain function, render. No training logic lives here.
"""

from __future__ import annotations

import functools
import inspect
import math
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from acdc_cli import __version__
from acdc_cli.errors import AcdcError, one_line

app = typer.Typer(
    help="Train sparse image classifiers with AC/DC (Alternating Compressed/DeCompressed training).",
    add_completion=True,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


presets_app = typer.Typer(help="List the presets, or show one resolved with its phase timeline.")


app.add_typer(presets_app, name="presets")


_state = {"debug": False}


# a pipe, a file or a batch log has no width: tables there take the width their cells need (rich reads COLUMNS, or
# assumes 80, and would cut cells to "mo…")
_UNBOUNDED_WIDTH = 100_000


def _console(stderr: bool = False, markup: bool = True) -> Console:
    """A terminal gets rich's wrapping at its width; a pipe, a file or a batch log gets each message on one line and
    each table at its natural width, never a cell cut short (hard-wrapping at an assumed 80 columns would split
    paths and words that scripts and tests look for). ``markup=False``: nothing printed is read as rich markup, not
    even the text inside a panel."""
    console = Console(stderr=stderr, markup=markup)
    if not console.is_terminal:
        console.soft_wrap = True
        console.width = _UNBOUNDED_WIDTH
    return console


def out_console(markup: bool = True) -> Console:
    return _console(markup=markup)


# the top-level "schema" of each --json output this module writes (eval, export and bench write their own):
# a script checks it before reading the rest; the number changes when a key changes meaning or goes away
TRAIN_SCHEMA = "acdc.train/1"


RESOLVED_SCHEMA = "acdc.resolved/1"  # train --dry-run, presets show


PRESETS_SCHEMA = "acdc.presets/1"


PRUNE_SCHEMA = "acdc.prune/1"


INSPECT_SCHEMA = "acdc.inspect/1"


def print_json(value: Any, schema: str | None = None) -> None:
    """One JSON object on stdout, its ``schema`` first when given; NaN and infinities become null (bare NaN is not
    JSON)."""
    from acdc_cli.files.jsonio import json_line

    print(json_line({"schema": schema, **value} if schema is not None else value))


def err_console(markup: bool = True) -> Console:
    return _console(stderr=True, markup=markup)


def user_errors(func):
    """Turn user mistakes into one line on stderr and a non-zero exit (a traceback only with --debug)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any):
        try:
            return func(*args, **kwargs)
        except AcdcError as exc:
            if _state["debug"]:
                raise
            from acdc_cli.training.distributed import env_rank

            if env_rank() != 0:
                # rank 0 reads the same settings and files and says it once; the launcher names a rank that
                # failed alone
                raise typer.Exit(exc.exit_code) from None
            # messages quote paths and file contents: never read them as rich markup
            err_console().print(f"[bold red]error:[/] {escape(one_line(str(exc)))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err_console().print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        print(f"acdc {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Train, prune, evaluate, export and inspect sparse image classifiers trained with AC/DC."""
    _state["debug"] = debug


PresetOpt = Annotated[
    Optional[str], typer.Option("--preset", "-p", help="Preset name from presets/ (default: quickstart).")
]


ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="A TOML file of settings (above the preset).")]


SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override one setting, e.g. --set optim.lr=0.02 (repeatable; value read as TOML)."),
]


JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]


ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", help="For a plain state dict (.safetensors or a torch file): the model it belongs to, "
                 "e.g. torchvision:resnet18 (with --num-classes)."),
]


NumClassesOpt = Annotated[
    Optional[int], typer.Option("--num-classes", help="For a plain state dict: the model's number of classes.")
]


def _resolved_json(settings) -> dict[str, Any]:
    from acdc_cli.sparsity.schedule import epoch_plan, plan

    return {
        "config": settings.model_dump(mode="json"),
        "phases": [p.as_dict() for p in plan(settings)],
        "epochs": [e.as_dict() for e in epoch_plan(settings)],
    }


def resolved_toml(settings) -> str:
    """The settings as a TOML document that ``--config`` reads back, the phase timeline, momentum resets and LR
    after them as TOML comments."""
    from acdc_cli.sparsity.schedule import epoch_plan, plan

    lines = [f"# acdc {__version__}: resolved settings; save them and run them with `acdc train --config FILE`",
             settings.to_toml().rstrip("\n"), "", "# phase timeline (epochs; end exclusive)",
             f"# {'start':>6} {'end':>6}  {'kind':<6}  sparsity"]
    lines += [f"# {p.start:>6} {p.end:>6}  {p.kind:<6}  {p.sparsity:.4g}" for p in plan(settings)]
    epochs = epoch_plan(settings)
    resets = [str(e.epoch) for e in epochs if e.reset_momentum]
    lines.append(f"# momentum zeroed at the start of epochs: {', '.join(resets) or 'none'} "
                 f"(schedule.reset_momentum = {settings.schedule.reset_momentum})")
    shown = epochs if len(epochs) <= 4 else [*epochs[:3], None, epochs[-1]]
    lrs = ", ".join("..." if e is None else f"{e.epoch}: {e.lr:.6g}" for e in shown)
    cadence = "at every step" if settings.optim.lr_per_step else "once per epoch"
    lines.append(f"# LR set {cadence}; at the start of epochs {lrs} (every epoch: --json, key \"epochs\")")
    return "\n".join(lines) + "\n"


def _print_resolved(settings, as_json: bool) -> None:
    if as_json:
        print_json(_resolved_json(settings), RESOLVED_SCHEMA)
        return
    # written as it is, never through rich: a terminal's wrapping or markup would make it stop being TOML
    sys.stdout.write(resolved_toml(settings))


@app.command()
@user_errors
def train(
    ctx: typer.Context,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Run dir (default: runs/<preset>-<timestamp>).")
    ] = None,
    resume: Annotated[
        Optional[Path], typer.Option("--resume", help="Continue the run in this run dir from its last checkpoint.")
    ] = None,
    from_: Annotated[
        Optional[Path],
        typer.Option("--from", help="Start from this checkpoint's weights (and masks, held if the plan starts sparse); "
                     "without --preset/--config, with the checkpoint's own settings (e.g. an `acdc prune` output)."),
    ] = None,
    data_dir: Annotated[Optional[Path], typer.Option("--data-dir", "-d", help="Dataset folder (data.dir).")] = None,
    download: Annotated[
        bool, typer.Option("--download", help="Fetch CIFAR into --data-dir if it is not there (data.download).")
    ] = False,
    device: Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda, cuda:N (runtime.device).")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Random seed (runtime.seed).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite a non-empty run dir.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the resolved settings as TOML (a file for --config) with the phase "
                           "timeline as comments, then exit.")
    ] = False,
    nproc: Annotated[
        Optional[int],
        typer.Option("--nproc", help="Data-parallel (DDP) over N processes on this machine, started through torchrun: "
                     "one per GPU, or on the CPU (gloo) at most one per core. data.batch_size stays the global batch."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Train with AC/DC (or GMP, or dense) from a preset plus overrides.

    With no options this runs the embedded quickstart: AC/DC to 90 % sparsity on scikit-learn's digits, on the CPU,
    in about ten seconds. Settings resolve as: defaults < preset < --config < ACDC_SECTION__KEY env < flags/--set.
    """
    from acdc_cli.config import load_settings, merge_layer
    from acdc_cli.training.loop import run, summary_panel
    from acdc_cli.training.rundir import (
        check_new_run_dir,
        default_run_dir,
        prepare_run_dir,
        run_lock,
        saved_settings,
    )

    flags = {"data.dir": str(data_dir) if data_dir else None, "runtime.device": device, "runtime.seed": seed,
             "data.download": True if download else None}
    if resume is not None:
        if preset or config or from_:
            raise AcdcError("--resume continues a run with its saved settings; drop --preset/--config/--from")
        if out is not None or force:
            raise AcdcError(f"--resume continues the run in {resume} in place; drop --out/--force (--out NEW_DIR "
                            f"--from {resume / 'last.safetensors'} starts a new run from its weights)")
        config_toml = saved_settings(resume)  # also: is it a run dir with a checkpoint
        recorded = _recorded_run_settings(resume)
        # config.toml (where a moved data.dir may be recorded) over the settings the checkpoint records, so that an
        # emptied config.toml still resumes; what it or a flag changes is checked against the checkpoint
        base = merge_layer(recorded.model_dump(mode="json"), config_toml)
        settings = load_settings(base=base, overrides=set_, flags=flags)
        _check_resume_settings(recorded, settings, resume)
        run_dir = resume
    else:
        # --from alone continues with the checkpoint's own settings (a pruned checkpoint's are compressed throughout)
        base = _checkpoint_settings(from_) if from_ is not None and preset is None and config is None else None
        settings = load_settings(preset, config, set_, flags, base=base)
        run_dir = out or default_run_dir(settings)
    if from_ is not None and settings.model.weights is not None:
        raise AcdcError("--from and model.weights both give the starting weights; keep one")
    _check_model(settings, check_weights=resume is None)
    if dry_run:
        _print_resolved(settings, as_json)
        return
    if from_ is not None and not from_.is_file():
        raise AcdcError(f"--from: no such checkpoint {from_}")
    if nproc is not None:
        from acdc_cli.training import distributed

        threads = distributed.check_nproc(nproc, settings)
        if settings.data.name in ("cifar10", "cifar100", "imagenet") and settings.data.dir is None:
            raise AcdcError(f"data.dir is not set: {settings.data.name} needs --data-dir PATH")
        if resume is None:
            check_new_run_dir(run_dir, force)  # before the lock file is made in it
        ctx.with_resource(run_lock(run_dir, for_ranks=True))  # held until this command returns
        if resume is None:
            prepare_run_dir(run_dir, force)
        # every rank gets this command's options, the run dir fixed here, and no --nproc
        argv = (["--debug"] if _state["debug"] else []) + ["train", *_forward_options(ctx, {"nproc", "out"})]
        if resume is None:
            argv += ["--out", str(run_dir)]
        code = distributed.launch(nproc, argv, threads)
        if code:
            raise typer.Exit(code)
        return
    from acdc_cli.training.distributed import env_rank

    # under torchrun only rank 0 touches the run dir and prints
    is_main = env_rank() == 0
    if resume is None and is_main:
        check_new_run_dir(run_dir, force)  # before the lock file is made in it
    if is_main:
        ctx.with_resource(run_lock(run_dir))  # held until this command returns
    if resume is None and is_main:
        prepare_run_dir(run_dir, force)
    console = err_console() if as_json else out_console()
    if resume is not None and is_main and _epochs_trained(resume) >= settings.schedule.epochs:
        console.print(f"note: {resume} has trained all {settings.schedule.epochs} epochs of its plan; nothing to "
                      "train (a longer run: --set schedule.epochs=N, see docs/runs.md, 'Extending a run')",
                      markup=False, highlight=False, soft_wrap=True)
    result = run(settings, run_dir, resume=resume is not None, from_checkpoint=from_, console=console)
    if not is_main:
        return
    if result.preempted is not None:
        from acdc_cli.training.distributed import mark_stopped

        mark_stopped()
    resume_command = f"acdc train --resume {shlex.quote(str(result.run_dir))}"
    if as_json:
        print_json({
            "run_dir": str(result.run_dir),
            "best_sparse": result.best_sparse,
            "best_dense": result.best_dense,
            "final_sparsity": result.final_sparsity,
            "flops": result.flops,
            "files": [str(p) for p in result.files],
            "preempted": result.preempted,
            "resume_command": resume_command if result.preempted else None,
        }, TRAIN_SCHEMA)
    elif result.preempted is not None:
        stopped = result.preempted
        console.print(f"stopped by {stopped['signal'] or 'a signal on another rank'}: checkpoint written at epoch "
                      f"{stopped['epoch']}, step {stopped['step']} ({result.run_dir / 'last.safetensors'})",
                      markup=False, highlight=False, soft_wrap=True)
        console.print(f"resume with: {resume_command}", markup=False, highlight=False, soft_wrap=True)
    else:
        # the panel quotes the run dir: a path holding "[/]" is text, not markup
        panel = summary_panel(result, settings.log.tensorboard)
        (err_console(markup=False) if as_json else out_console(markup=False)).print(panel)


def _check_model(settings, check_weights: bool) -> None:
    """The model name and (for a new run) the pretrained weights file, checked before anything runs (--dry-run
    too)."""
    from acdc_cli.models import lookup

    lookup(settings.model.name)
    if settings.model.name.startswith("torchvision:"):
        from acdc_cli.data.bundle import input_shape

        channels = input_shape(settings.data.name, settings.model.name)[0]
        if channels != 3:
            raise AcdcError(f"{settings.model.name} takes 3-channel images and data.name = "
                            f"{settings.data.name!r} has {channels}; use cifar10, cifar100, imagenet or synthetic "
                            "(--set data.name=...)")
    weights = settings.model.weights
    if check_weights and weights is not None and not weights.is_file():
        raise AcdcError(f"model.weights: no such file {weights}")


def _checkpoint_settings(path: Path) -> dict[str, Any]:
    from acdc_cli.files.checkpoint import load_checkpoint

    if not path.is_file():
        raise AcdcError(f"--from: no such checkpoint {path}")
    config = load_checkpoint(path).config
    if not config:
        raise AcdcError(f"--from {path} records no settings; give --preset or --config as well")
    # the pretrained weights that run started from are history: the checkpoint's own weights are the start now
    model = config.get("model")
    if isinstance(model, dict) and "weights" in model:
        config = {**config, "model": {k: v for k, v in model.items() if k != "weights"}}
    return config


def _epochs_done(epoch: Any) -> str:
    """A checkpoint's ``epoch`` counts completed epochs; metrics.jsonl numbers epochs from 0 (epoch 6 done = 7)."""
    if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch > 0:
        return f"after epoch {epoch - 1} ({epoch} done)"
    return f"epochs done: {epoch}"


def _forward_options(ctx: typer.Context, skip: set[str]) -> list[str]:
    """The options this command was given, as command-line arguments again (those named in ``skip`` left out)."""
    args: list[str] = []
    for param in ctx.command.params:
        if param.param_type_name != "option" or param.name in skip:
            continue
        value = ctx.params.get(param.name)
        if value is None or value == param.default or (param.multiple and not value):
            continue
        if param.is_flag:
            args.append(param.opts[0] if value else param.secondary_opts[0])
        elif param.multiple:
            for item in value:
                args += [param.opts[0], str(item)]
        else:
            args += [param.opts[0], str(value)]
    return args


# what a resumed run may change: where things are and how they run, never what is computed
_RESUME_MAY_CHANGE = {"data.dir", "data.num_workers", "data.eval_batch_size", "data.download"}


_RESUME_SECTIONS_MAY_CHANGE = {"runtime", "log"}


_RESUME_MUST_KEEP = {"runtime.seed", "runtime.sync_batchnorm"}


def _recorded_run_settings(run_dir: Path):
    """The settings the run's last checkpoint was computed with, as recorded inside last.safetensors (config.toml is
    a file anyone can edit, so it is not the reference)."""
    from pydantic import ValidationError

    from acdc_cli.config import Settings, format_validation_error
    from acdc_cli.files.checkpoint import recorded_config

    path = run_dir / "last.safetensors"
    config = recorded_config(path)
    if not config:
        raise AcdcError(f"{path} records no settings, so this run cannot be resumed; start a new run with --from {path}")
    try:
        return Settings(**config)
    except ValidationError as exc:
        raise AcdcError(f"{path}: recorded settings: {format_validation_error(exc)}") from None


# what extending a run may change besides: its length, the phase lengths and the LR schedule's shape, as long as every
# epoch it already trained keeps its phase, sparsity, momentum reset and LR (_check_extension)
_EXTEND_MAY_CHANGE = {
    "schedule.epochs", "schedule.warmup_epochs", "schedule.compressed_epochs", "schedule.decompressed_epochs",
    "schedule.final_decompressed_epochs", "schedule.final_compressed_epochs", "schedule.gmp_start_epoch",
    "schedule.gmp_end_epoch", "schedule.prune_every", "optim.lr_schedule", "optim.milestones", "optim.gamma",
    "optim.cosine_epochs", "optim.min_lr",
}


def _check_resume_settings(recorded, requested, run_dir: Path) -> None:
    """A resumed run continues the same computation: only locations and runtime/log knobs may change (from
    config.toml, flags, --set or ACDC_* variables alike); the seed, which fixes splits, data order and dropout, may
    not. It may also be extended (schedule.epochs and the phase lengths and LR shape that go with it) when the
    epochs it trained stay as planned. ``recorded``: the settings inside last.safetensors."""
    a, b = recorded.model_dump(mode="json"), requested.model_dump(mode="json")
    extended = []
    for section, values in a.items():
        keys = values.keys() if isinstance(values, dict) else [None]
        for key in keys:
            dotted = f"{section}.{key}" if key is not None else section
            old = values[key] if key is not None else values
            new = b[section].get(key) if key is not None else b[section]
            if old == new or dotted in _RESUME_MAY_CHANGE:
                continue
            if section in _RESUME_SECTIONS_MAY_CHANGE and dotted not in _RESUME_MUST_KEEP:
                continue
            if dotted in _EXTEND_MAY_CHANGE:
                extended.append(f"{dotted} {old!r} -> {new!r}")
                continue
            raise AcdcError(f"cannot change {dotted} when resuming ({old!r} in {run_dir / 'last.safetensors'} -> "
                            f"{new!r} from config.toml, flags, --set or ACDC_*); only locations (data.dir, ...), "
                            "runtime.* / log.* settings other than runtime.seed, and the schedule's length may change")
    if extended:
        _check_extension(recorded, requested, run_dir, ", ".join(extended))


def _epochs_trained(run_dir: Path) -> int:
    """Epochs the run's last checkpoint has trained, whole or in part (a mid-epoch checkpoint's epoch counts)."""
    from acdc_cli.files.jsonio import lenient_json
    from acdc_cli.files.tensors import read_metadata

    meta = read_metadata(run_dir / "last.safetensors")
    epoch, step = lenient_json(meta.get("epoch", "0")), lenient_json(meta.get("step", "0"))
    if not isinstance(epoch, int) or not isinstance(step, int):
        raise AcdcError(f"{run_dir / 'last.safetensors'}: malformed metadata (epoch / step)")
    return epoch + (1 if step else 0)


def _check_extension(recorded, requested, run_dir: Path, changes: str) -> None:
    """A schedule changed on resume (``changes``) is allowed when every epoch already trained keeps its planned
    phase, sparsity, momentum reset and LR; otherwise one line names the first epoch whose plan would change."""
    from acdc_cli.sparsity.schedule import epoch_plan, learning_rate

    trained = _epochs_trained(run_dir)
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


def _as_planned(epoch) -> str:
    return f"sparse at {epoch.sparsity:g}" if epoch.phase == "sparse" else "dense"


@app.command()
@user_errors
def bench(
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    steps: Annotated[
        Optional[int], typer.Option("--steps", help="Timed training steps per mode (default 50); with --inference, "
                                                    "timed passes per model and batch size (default 20).")
    ] = None,
    warmup: Annotated[
        Optional[int], typer.Option("--warmup", help="Untimed steps first (absorbs torch.compile and cudnn autotuning; "
                                                     "default 10, with --inference 3).")
    ] = None,
    batch_size: Annotated[
        Optional[int], typer.Option("--batch-size", "-b", help="Batch size (default: the preset's data.batch_size; "
                                                               "with --inference: 1 and this, default 64).")
    ] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda, cuda:N (runtime.device).")] = None,
    inference: Annotated[
        Optional[Path],
        typer.Option("--inference", help="Instead: dense vs sparse inference throughput of this checkpoint or export "
                                         "(.safetensors or .onnx), at batch 1 and 64."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure a preset's training speed on this device, in one run, on synthetic data.

    Times the reference-style step (fp32, NCHW, eager, gradient-mask hooks) against acdc's own step (bf16 autocast,
    channels_last and torch.compile as the settings say), plus a training epoch through the preset's loader, the
    global mask update and the input pipeline alone. Without --preset it measures the quickstart, in seconds on any
    machine. Use --set runtime.compile=true to time the compiled step.

    With --inference FILE: images/s of the file's model with dense weights against its sparse weights, side by side
    (median of --steps timed passes): on CUDA with PyTorch's 2:4 sparse kernels for 2:4 Linear layers, on ONNX
    Runtime (CPU) for .onnx files; each layer says whether it ran a sparse kernel.
    """
    status_console = err_console() if as_json else out_console()
    if inference is not None:
        if preset or config or set_:
            raise AcdcError("--inference times the file's own model: drop --preset/--config/--set")
        from acdc_cli.commands.bench_inference import BATCH_SIZES, run_inference_bench
        from acdc_cli.commands.bench_inference import render as render_inference

        sizes = BATCH_SIZES if batch_size is None else tuple(dict.fromkeys((1, batch_size)))  # batch 1 once
        with status_console.status("acdc bench --inference") as status:
            result = run_inference_bench(inference, device, 20 if steps is None else steps,
                                         3 if warmup is None else warmup, sizes,
                                         status=lambda message: status.update(f"acdc bench --inference: {message}"))
        if as_json:
            print_json(result)
        else:
            render_inference(result, out_console())
        return
    from acdc_cli.commands.bench import render, run_bench
    from acdc_cli.config import load_settings

    settings = load_settings(preset, config, set_, {"runtime.device": device})
    with status_console.status("acdc bench") as status:
        result = run_bench(settings, steps=50 if steps is None else steps, warmup=10 if warmup is None else warmup,
                           batch_size=batch_size, status=lambda message: status.update(f"acdc bench: {message}"))
    if as_json:
        print_json(result, "acdc.bench/1")
    else:
        render(result, out_console())


@presets_app.callback(invoke_without_command=True)
@user_errors
def presets_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List every preset: model, dataset, sparsity, structure, epochs and the paper's top-1."""
    if ctx.invoked_subcommand is not None:
        return
    from acdc_cli.config import load_settings, preset_names

    rows = []
    for name in preset_names():
        s = load_settings(preset=name)
        rows.append({
            "name": name,
            "model": s.model.name,
            "dataset": s.data.name,
            "method": s.schedule.method,
            "sparsity": 0.0 if s.schedule.method == "dense" else s.sparsity.target,
            "structure": s.sparsity.structure,
            "scope": s.sparsity.scope,
            "epochs": s.schedule.epochs,
            "paper_top1": s.paper_top1,
        })
    if as_json:
        print_json({"presets": rows}, PRESETS_SCHEMA)
        return
    from rich import box

    def table_of(columns: tuple[str, ...]) -> Table:
        table = Table(title="acdc presets", box=box.SIMPLE_HEAD)
        # names stay whole (they are what users type); the other cells are words that wrap at spaces
        for col in columns:
            table.add_column(col, no_wrap=col == "name", justify="right" if col in ("epochs", "paper") else "left",
                             min_width=len("unstructured,") if col == "pruning" else None)
        for r in rows:
            if r["method"] == "dense":
                pruning = "dense"
            else:
                # N:M shows the pattern; unstructured shows its scope (one global threshold, or per layer)
                structure = f"unstructured, {r['scope']}" if r["structure"] == "unstructured" else r["structure"]
                pruning = f"{r['method']} {100 * r['sparsity']:.0f} % {structure}"
            cells = {"name": r["name"], "model, data": f"{r['model']} {r['dataset']}", "pruning": pruning,
                     "epochs": str(r["epochs"]),
                     "paper": f"{100 * r['paper_top1']:.2f} %" if r["paper_top1"] is not None else "-"}
            table.add_row(*(cells[col] for col in columns))
        return table

    console = out_console()
    table = table_of(("name", "model, data", "pruning", "epochs", "paper"))
    if console.measure(table, options=console.options.update_width(_UNBOUNDED_WIDTH)).maximum > console.width:
        # a narrow terminal: the name already says the model family and the dataset (a pipe is never narrow)
        table = table_of(("name", "pruning", "epochs", "paper"))
    console.print(table)


@presets_app.command("show")
@user_errors
def presets_show(
    name: Annotated[str, typer.Argument(help="Preset name.")],
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print a preset fully resolved, as TOML that `acdc train --config FILE` reads back, with its phase timeline as
    comments; --json as for `train --dry-run`."""
    from acdc_cli.config import load_settings

    _print_resolved(load_settings(preset=name, overrides=set_), as_json)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f} %"


def _nm_text(valid: bool | None) -> str:
    if valid is None:
        return "n/a"  # the input channels are not a multiple of M
    return "[green]yes[/]" if valid else "[red]no[/]"


def _flops_text(flops: dict[str, Any] | None, note: str | None) -> str:
    """Inference multiply-accumulates per image as the paper counts them, or why there are none."""
    from acdc_cli.flops import si

    if flops is None:
        return f"- ({note})"
    shape = "×".join(map(str, flops["input_shape"]))
    return f"{si(flops['sparse'])} per {shape} image, {flops['ratio']:.4f} × dense ({si(flops['dense'])})"


@app.command("eval")
@user_errors
def eval_cmd(
    checkpoint: Annotated[
        Path, typer.Argument(help="A checkpoint (`acdc train`, `acdc prune`) or an export of any format "
                                  "(`acdc export`: sparse-24-bitmask, sparse-bitmask, dense, onnx).")
    ],
    data_dir: Annotated[
        Optional[Path],
        typer.Option("--data-dir", "-d", help="Dataset folder (default: the one saved in the checkpoint; digits need none)."),
    ] = None,
    split: Annotated[
        Optional[str], typer.Option("--split", help="val (held out of the training split) or test (default: the "
                                                    "split the run measured every epoch: val, or test for a run "
                                                    "with data.val_size = 0).")
    ] = None,
    batch_size: Annotated[
        Optional[int], typer.Option("--batch-size", "-b", min=1, help="Images per batch (default: data.eval_batch_size).")
    ] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda, cuda:N (default: as trained).")] = None,
    amp: Annotated[bool, typer.Option("--amp", help="bf16 autocast on CUDA (default: fp32; the CPU always runs "
                                                    "fp32).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Top-1, top-5 and loss of a checkpoint or export as saved, beside the paper's number when comparable.

    Evaluates the weights as saved (sparse or dense) in fp32 (--amp: bf16 autocast on CUDA) and reports their
    sparsity over the prunable weights. An .onnx export runs on ONNX Runtime's CPU provider, so the file you ship is
    the one measured. The paper's top-1 and the difference are shown only when model, dataset, sparsity, structure
    and epochs are still the preset's and the split is the test split; otherwise the output says why not. Model and
    dataset are rebuilt from the file's own metadata: no preset or flag is needed. Accuracies and sparsity are
    fractions in [0, 1] in --json output.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from acdc_cli.commands.evaluate import eval_checkpoint

    console = err_console()
    progress = None
    if console.is_terminal:
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), console=console, transient=True)
        progress.start()
    try:
        result = eval_checkpoint(checkpoint, split, data_dir, batch_size, device, progress, amp)
    finally:
        if progress is not None:
            progress.stop()
    if as_json:
        print_json(result)
        return
    # strings from the file's metadata and paths are shown as they are, never read as rich markup
    table = Table(title=escape(f"acdc eval: {checkpoint}"), show_header=False)
    table.add_column("", style="bold")
    table.add_column("", justify="right")
    table.add_row("model", escape(f"{result['arch']} ({result['preset'] or 'no preset'}), "
                                  f"{_epochs_done(result['epoch'])}, {result['phase']}"))
    table.add_row("file", escape(f"{result['kind']} ({result['format']}, {result['weights_dtype']} weights)"))
    table.add_row("split", f"{result['split']}, {result['images']:,} images on {result['device']}")
    table.add_row("precision", result["precision"])
    table.add_row("top-1", _pct(result["top1"]))
    table.add_row("top-5", _pct(result["top5"]))
    table.add_row("loss", f"{result['loss']:.4f}")
    table.add_row("sparsity", f"{_pct(result['sparsity'])} of prunable weights")
    table.add_row("FLOPs", escape(_flops_text(result["flops"], result["flops_note"])))
    recorded = result[f"recorded_{result['split']}_top1"]
    if recorded is not None:
        table.add_row(f"{result['split']} top-1 recorded in training", _pct(recorded))
    if result["paper_top1"] is not None:
        table.add_row("paper top-1", f"{_pct(result['paper_top1'])} ({100 * result['paper_diff']:+.2f} points)")
    console = out_console()
    console.print(table)
    if result["paper_note"] is not None:
        # on its own line: a table cell would fold the reason at the terminal's width
        console.print(escape(f"paper top-1 not shown: {result['paper_note']}"), highlight=False)


@app.command()
@user_errors
def prune(
    checkpoint: Annotated[Path, typer.Argument(help="The checkpoint to prune.")],
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Pruned checkpoint to write (*.safetensors); its fine-tune settings go beside "
                                         "it as *.toml."),
    ],
    sparsity: Annotated[
        Optional[float],
        typer.Option("--sparsity", help="Fraction of the selected weights to prune, e.g. 0.9 (N:M implies its own)."),
    ] = None,
    structure: Annotated[
        str, typer.Option("--structure", help="unstructured, or N:M such as 2:4 (N kept of every M input channels).")
    ] = "unstructured",
    scope: Annotated[
        str, typer.Option("--scope", help="global: one magnitude threshold over all layers; uniform: per layer.")
    ] = "global",
    include: Annotated[
        Optional[list[str]],
        typer.Option("--include", help="Glob over module names to prune (repeatable; default: the checkpoint's rules)."),
    ] = None,
    exclude: Annotated[
        Optional[list[str]], typer.Option("--exclude", help="Glob over module names to keep dense (repeatable).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUT (and its .toml) if they exist.")] = False,
    model: ModelOpt = None,
    num_classes: NumClassesOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One-shot magnitude pruning with the training engine: unstructured (global or uniform) or N:M.

    Prunes the weights the rules select (the checkpoint's own include/exclude unless given). OUT holds the weights,
    the masks and the checkpoint's settings with these sparsity rules and a schedule that is compressed throughout
    (also written beside it as OUT.toml, to edit), so `acdc train --from OUT` fine-tunes with the masks held (change
    the length with --set schedule.epochs=E --set schedule.final_compressed_epochs=E).
    """
    from acdc_cli.commands.prune import prune_checkpoint

    result = prune_checkpoint(checkpoint, out, sparsity, structure, scope, include, exclude, force, model,
                              num_classes)
    if as_json:
        print_json(result.as_dict(), PRUNE_SCHEMA)
        return
    # paths and layer names are text, never rich markup
    table = Table(title=escape(f"pruned {checkpoint} ({result.structure}, {result.scope})"))
    for col in ("layer", "shape", "sparsity"):
        table.add_column(col, justify="right" if col == "sparsity" else "left")
    for layer in result.layers:
        kept = _pct(layer["sparsity"]) if "sparsity" in layer else f"[dim]dense: {escape(layer['kept_dense'])}[/]"
        table.add_row(escape(layer["name"]), "×".join(map(str, layer["shape"])), kept)
    console = out_console()
    console.print(table)
    console.print(f"sparsity {_pct(result.sparsity)} of the selected weights; wrote {result.path} and "
                  f"{result.config_path}", highlight=False, markup=False)
    console.print(f"fine-tune with the masks held: acdc train --from {shlex.quote(str(result.path))}", highlight=False,
                  markup=False)


@app.command("export")
@user_errors
def export_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="The checkpoint to export.")],
    format_: Annotated[
        str,
        typer.Option("--format", "-f", help="sparse-24-bitmask (2:4 weights), sparse-bitmask (any sparsity), dense "
                                            "(a plain state dict, masks folded in) or onnx (for ONNX Runtime and "
                                            "TensorRT; needs the 'onnx' extra)."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="The .safetensors (or .onnx) file to write.")],
    dtype: Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or float16 (onnx: float32).")] = "float32",
    opset: Annotated[Optional[int], typer.Option("--opset", help="onnx: ONNX opset (18 or newer; default: the "
                                                                 "exporter's).")] = None,
    batch: Annotated[Optional[str], typer.Option("--batch", help="onnx: 'dynamic' (default) or a fixed batch "
                                                                 "size.")] = None,
    input_size: Annotated[Optional[int], typer.Option("--input-size", help="onnx: side of the square input image "
                                                                           "(default: the model's, e.g. 224).")] = None,
    fold_bn: Annotated[bool, typer.Option("--fold-bn", help="onnx: fold BatchNorm into the preceding convs (zeros "
                                                            "stay zero; the 2:4 pattern is re-checked).")] = False,
    conv_layout: Annotated[
        str,
        typer.Option("--conv-layout", help="sparse-bitmask: rows stores conv weights as (O, kh·kw·I) rows (compact); "
                                           "native in their own shape, which compressed-tensors' ModelCompressor "
                                           "restores by itself (bigger bitmask)."),
    ] = "rows",
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUT if it exists.")] = False,
    model: ModelOpt = None,
    num_classes: NumClassesOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a checkpoint as a sparse file that is really smaller, or as a dense state dict.

    sparse-24-bitmask and sparse-bitmask follow compressed-tensors (values + packed bitmask per layer, 2-D, conv
    weights as O×kh×kw×I); dense is a plain state dict with the masks folded in, which torchvision loads. Prints the
    mask statistics and the size against a dense export.

    onnx writes the model in eval mode (fp32, masks folded in, BatchNorm kept unless --fold-bn) with input `input`
    and output `logits`; it is written only after its initializers have been read back (pruned zeros intact) and
    ONNX Runtime's logits compared with PyTorch's.

    `acdc_cli.files.export.load(OUT)` turns any safetensors export back into the exact dense state dict.
    """
    from acdc_cli.commands.export import ONNX, export_checkpoint

    onnx_options = {"--opset": opset, "--batch": batch, "--input-size": input_size, "--fold-bn": fold_bn or None}
    if format_ == ONNX:
        if dtype != "float32" or conv_layout != "rows":
            raise AcdcError("--format onnx writes float32 weights in their own shape (drop --dtype/--conv-layout; "
                            "TensorRT builds fp16 engines with --fp16)")
        from acdc_cli.commands.export_onnx import export_onnx

        _render_onnx_export(export_onnx(checkpoint, out, opset, batch, input_size, fold_bn, force,
                                        model_name=model, num_classes=num_classes), as_json)
        return
    given = [flag for flag, value in onnx_options.items() if value is not None]
    if given:
        raise AcdcError(f"{given[0]} applies to --format onnx only")
    result = export_checkpoint(checkpoint, out, format_, dtype, force, model, num_classes,
                               conv_layout=conv_layout)
    summary = result.as_dict()
    if as_json:
        print_json(summary)
        return
    table = Table(title=f"{result.format} export ({result.dtype})")
    for col in ("layer", "shape", "kept", "sparsity", "2:4", "dense", "stored"):
        # long layer names fold; the other columns never wrap
        table.add_column(col, justify="left" if col in ("layer", "shape", "2:4") else "right",
                         overflow="fold", no_wrap=col != "layer")
    for layer in result.layers:
        table.add_row(escape(layer.name), "×".join(map(str, layer.shape)), f"{layer.kept:,}", _pct(layer.sparsity),
                      _nm_text(layer.nm_valid), _size(layer.dense_bytes), _size(layer.stored_bytes))
    kept = sum(layer.kept for layer in result.layers)
    table.add_row("total", "", f"{kept:,}", _pct(result.sparsity), "", _size(sum(x.dense_bytes for x in result.layers)),
                  _size(sum(x.stored_bytes for x in result.layers)), style="bold")
    console = out_console()
    console.print(table)
    console.print(f"wrote {result.path}: {_size(result.size_bytes)}, {summary['ratio_to_dense']:.3f} × a dense export "
                  f"({_size(result.dense_bytes)})", highlight=False, markup=False)


def _render_onnx_export(result, as_json: bool) -> None:
    if as_json:
        print_json(result.as_dict())
        return
    table = Table(title=f"onnx export (float32, opset {result.opset})")
    for col in ("initializer", "shape", "kept", "sparsity", "2:4", "as trained"):
        table.add_column(col, justify="right" if col in ("kept", "sparsity") else "left",
                         overflow="fold", no_wrap=col != "initializer")
    for layer in result.layers:
        same = "bit-exact" if layer.exact else ("zeros kept" if layer.zeros_kept else "[red]changed[/]")
        table.add_row(escape(layer.name), "×".join(map(str, layer.shape)), f"{layer.kept:,}", _pct(layer.sparsity),
                      _nm_text(layer.nm_valid), same)
    console = out_console()
    console.print(table)
    shape = "×".join(map(str, result.input_shape))
    console.print(f"wrote {escape(str(result.path))}: {_size(result.size_bytes)}, input [bold]input[/] {shape} -> "
                  f"[bold]logits[/], sparsity {_pct(result.sparsity)} ({escape(result.structure)})", highlight=False)
    if result.fold_bn:
        pattern = "2:4 kept in every 2:4 layer" if result.structure == "2:4" else "pruned zeros kept"
        console.print(f"folded {result.batchnorms_folded} of {result.batchnorms} BatchNorm layers into the conv "
                      f"before them (the others do not follow a conv); re-checked: {pattern}", highlight=False)
    console.print(f"ONNX Runtime (CPU) vs PyTorch: max |Δ logit| {result.max_abs_diff:.2e} "
                  f"(logits up to {result.max_abs_logit:.3g})", highlight=False)


@app.command("inspect")
@user_errors
def inspect_cmd(
    file: Annotated[Path, typer.Argument(help="A .safetensors file: acdc checkpoint, acdc export or plain state dict.")],
    layers: Annotated[bool, typer.Option("--layers", help="Also list every prunable layer.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """What is in a checkpoint or export: metadata, sparsity, N:M validity, bytes.

    Tells checkpoint, export and plain state dict apart; counts zeros in the file per prunable layer; checks N:M along
    input channels (the file's own N:M structure, else 2:4); compares the file's size with the same tensors stored
    dense. A layer that breaks the N:M structure the file claims is flagged.
    """
    from acdc_cli.commands.inspect_file import inspect_file

    info = inspect_file(file)
    if as_json:
        print_json(info, INSPECT_SCHEMA)
        return
    meta = info["metadata"]
    # strings from the file's metadata and paths are shown as they are, never read as rich markup
    table = Table(title=escape(f"acdc inspect: {file}"), show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("kind", escape(f"{info['kind']} ({info['format']})"))
    if info["kind"] != "state_dict":
        table.add_row("model", escape(f"{meta.get('arch')} ({meta.get('preset') or 'no preset'}), "
                                      f"{_epochs_done(meta.get('epoch'))}, {meta.get('phase')}"))
        table.add_row("acdc version", escape(str(meta.get("acdc_version"))))
        metrics = meta.get("metrics") if isinstance(meta.get("metrics"), dict) else {}
        keys = ("val_top1", "val_top5", "val_loss", "test_top1", "test_top5", "test_loss", "train_top1", "sparsity")
        shown = [f"{k} {metrics[k]:.4g}" for k in keys if isinstance(metrics.get(k), (int, float))]
        if shown:
            table.add_row("recorded metrics", ", ".join(shown))
    if info.get("dtype"):
        table.add_row("dtype", escape(str(info["dtype"])))
    table.add_row("structure", escape(str(info["structure"] or "-")))
    table.add_row("sparsity", f"{_pct(info['sparsity'])} of {info['prunable_weights']:,} prunable weights "
                              f"in {len(info['layers'])} layers")
    table.add_row("size", f"{_size(info['size_bytes'])}, {info['ratio_to_dense']:.3f} × the same stored dense "
                          f"({_size(info['dense_bytes'])})")
    table.add_row("FLOPs", escape(_flops_text(info["flops"], info["flops_note"])))
    console = out_console()
    console.print(table)
    if layers:
        detail = Table(title="prunable layers")
        nm = escape(info["layers"][0]["nm"]) if info["layers"] else "N:M"
        for col in ("layer", "shape", "sparsity", nm, "stored as", "stored"):
            detail.add_column(col, justify="right" if col in ("sparsity", "stored") else "left",
                              overflow="fold", no_wrap=col not in ("layer", "stored as"))
        for layer in info["layers"]:
            detail.add_row(escape(layer["name"]), "×".join(map(str, layer["shape"])), _pct(layer["sparsity"]),
                           _nm_text(layer["nm_valid"]), escape(layer["encoding"]),
                           _size(layer["stored_bytes"]))
        console.print(detail)
    if info["dense_layers"]:
        kept = ", ".join(f"{layer['name']} ({layer['reason']})" for layer in info["dense_layers"])
        console.print(f"left dense by rule: {escape(kept)}", highlight=False)
    for name in info["structure_violations"]:
        console.print(f"[bold red]warning:[/] {escape(name)} breaks the {escape(str(info['structure']))} structure "
                      "the file claims", highlight=False)
    for name in info["outside_mask"]:
        console.print(f"[bold red]warning:[/] {escape(name)} holds non-zero weights outside its mask; acdc reads "
                      "them as zeros (eval, export, prune and train --from apply the mask)", highlight=False)


@app.command()
@user_errors
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run dirs (`acdc train --out DIR`), finished or not.")],
    out: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", help="Folder for report.html and the PNGs (default: RUN_DIR/report for one run, "
                                         "./acdc-report for several); files of an earlier report there are replaced."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Pictures of runs, and a comparison of several: a self-contained report.html (images inline, nothing loaded
    from elsewhere) and the PNGs beside it.

    Per run: top-1 and train loss per epoch with the compressed phases shaded, sparsity and LR per epoch, the
    per-layer sparsity of best_sparse, the mask change of each compressed phase. With several runs (a sparsity
    sweep): their curves together and a sparsity-vs-top-1 table and plot with each run's best sparse and best dense
    top-1, and the paper's number where the preset has one. --json prints the table.
    """
    from acdc_cli.commands.report import (
        REPORT_SCHEMA,
        SUMMARY_HEADER,
        summary_rows,
        write_report,
    )

    result = write_report(run_dirs, out)
    if as_json:
        print_json(result.as_dict(), REPORT_SCHEMA)
        return
    from rich import box

    table = Table(title="acdc report", box=box.SIMPLE_HEAD)
    for col in SUMMARY_HEADER:
        # on a narrow terminal cells wrap, and a long word folds, rather than being cut to "quic…"
        table.add_column(col, justify="right" if "top-1" in col or col in ("target sparsity", "epochs done")
                         else "left", overflow="fold")
    for row in summary_rows(result.runs):
        table.add_row(*row)
    console = out_console(markup=False)  # run names and paths are text, never rich markup
    console.print(table)
    figures = len(result.figures)
    console.print(f"wrote {result.path} and {figures} PNG{'s' if figures != 1 else ''} beside it", highlight=False)


def _reflow(doc: str | None) -> str | None:
    """A command's docstring as --help shows it: each paragraph one line that rich wraps at the terminal's width
    (rich mode keeps a docstring's own line breaks, which wrap raggedly); indented lines and list items stay."""
    if not doc:
        return doc
    paragraphs = []
    for paragraph in inspect.cleandoc(doc).split("\n\n"):
        lines = paragraph.splitlines()
        if any(line.startswith((" ", "-", "*")) for line in lines):
            paragraphs.append(paragraph)
        else:
            paragraphs.append(" ".join(line.strip() for line in lines))
    return "\n\n".join(paragraphs)


for _typer_app in (app, presets_app):
    for _info in _typer_app.registered_commands:
        if _info.callback is not None:
            _info.callback.__doc__ = _reflow(_info.callback.__doc__)


class _PipeSafeStdout:
    """Standard output that outlives its reader: once the reader has gone (``acdc train | head``), writes are
    dropped instead of raising BrokenPipeError, so a training run is never lost to a closed display pipe. The
    descriptor is pointed at /dev/null, so the interpreter's final flush has nowhere to fail either."""

    def __init__(self, stream: Any, note: str | None):
        self._stream, self._note, self._gone = stream, note, False

    def write(self, text: str) -> int:
        if not self._gone:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._reader_gone()
        return len(text)

    def flush(self) -> None:
        if not self._gone:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._reader_gone()

    def _reader_gone(self) -> None:
        import os

        self._gone = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        except (OSError, ValueError):
            pass
        finally:
            os.close(devnull)
        if self._note:
            print(self._note, file=sys.stderr, flush=True)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _command_word(argv: list[str]) -> str | None:
    return next((arg for arg in argv if not arg.startswith("-")), None)


def main() -> None:
    """The ``acdc`` entry point. Click's own usage errors (an unknown option, a missing argument) are one line on
    stderr and exit 2, like every error acdc raises."""
    from typer._click import exceptions as click_errors

    argv = sys.argv[1:]
    if _command_word(argv) == "train":
        sys.stdout = _PipeSafeStdout(sys.stdout, "warning: standard output was closed; the run goes on without "
                                                 "printing (its rows are in RUN_DIR/metrics.jsonl)")
    else:
        sys.stdout = _PipeSafeStdout(sys.stdout, None)
    try:
        # one name however it was started (`python -m acdc_cli` too): in --help, and in the variable shell completion
        # asks through (_ACDC_COMPLETE)
        code = app(prog_name="acdc", standalone_mode=False)
    except click_errors.NoArgsIsHelpError as exc:
        exc.ctx.get_help()  # prints the help, as `acdc --help` does
        code = exc.exit_code
    except click_errors.ClickException as exc:
        ctx = getattr(exc, "ctx", None)
        where = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        print(f"error: {one_line(exc.format_message())}{where}", file=sys.stderr)
        code = exc.exit_code
    except typer.Abort:  # end of input at a prompt
        code = 130
    except KeyboardInterrupt:
        code = 130
    sys.stdout.flush()
    sys.exit(code if isinstance(code, int) else 0)
