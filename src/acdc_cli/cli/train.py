"""``acdc train``: parse the options, call :mod:`acdc_cli.training.start`, render the result."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Optional

import typer

from acdc_cli.cli.common import (
    ConfigOpt,
    JsonOpt,
    PresetOpt,
    SetOpt,
    debugging,
    err_console,
    out_console,
    print_json,
    user_errors,
)
from acdc_cli.cli.presets import print_resolved
from acdc_cli.schemas import TRAIN_SCHEMA


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
    auto_resume: Annotated[
        bool, typer.Option("--auto-resume", help="With --out DIR: start the run, or continue the one DIR holds "
                           "(the checks of --resume); the same command line after a torchrun restart or a requeue. "
                           "A signal's stop then exits 75 (runtime.auto_resume).")
    ] = False,
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
    from acdc_cli.training import start

    flags = {"data.dir": str(data_dir) if data_dir else None, "runtime.device": device, "runtime.seed": seed,
             "data.download": True if download else None, "runtime.auto_resume": True if auto_resume else None}
    settings = start.resolve_settings(preset, config, set_, flags, resume=resume, from_checkpoint=from_, out=out,
                                      force=force)
    if dry_run:
        print_resolved(settings, as_json)
        return
    # every rank of --nproc gets this command's options and no --nproc (the run dir is added below the CLI)
    launch_argv = None
    if nproc is not None:
        launch_argv = (["--debug"] if debugging() else []) + ["train", *_forward_options(ctx, {"nproc", "out"})]
    console = err_console() if as_json else out_console()
    try:
        result = start.train(settings, out=resume if resume is not None else out, resume=resume is not None,
                             force=force, from_checkpoint=from_, nproc=nproc, console=console,
                             launch_argv=launch_argv)
    except (start.RanksFailed, start.RunStopped) as exc:
        raise typer.Exit(exc.exit_code) from None
    if result is None:  # the ranks reported, or this is a rank other than 0
        return
    from acdc_cli.training.loop import summary_panel

    resume_command = f"acdc train --resume {shlex.quote(str(result.run_dir))}"
    if as_json:
        print_json({
            "run_dir": str(result.run_dir),
            "best_sparse": result.best_sparse,
            "best_dense": result.best_dense,
            "final_sparsity": result.final_sparsity,
            "flops": result.flops,
            "paper": result.paper,
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
    if result.preempted is not None and settings.runtime.auto_resume:
        raise typer.Exit(start.STOPPED_EXIT_CODE)


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
