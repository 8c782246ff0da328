"""The ``acdc`` command line: parse, call a plain function, render. No training logic lives here."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from acdc_cli import __version__
from acdc_cli.errors import AcdcError

app = typer.Typer(
    help="Train sparse image classifiers with AC/DC (Alternating Compressed/DeCompressed training).",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
presets_app = typer.Typer(help="List the presets, or show one resolved with its phase timeline.")
app.add_typer(presets_app, name="presets")

_state = {"debug": False}


def out_console() -> Console:
    return Console()


def err_console() -> Console:
    return Console(stderr=True)


def user_errors(func):
    """Turn user mistakes into one line on stderr and a non-zero exit (a traceback only with --debug)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any):
        try:
            return func(*args, **kwargs)
        except AcdcError as exc:
            if _state["debug"]:
                raise
            err_console().print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
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


# ----------------------------------------------------------------------------------------------------------------
# shared option types

PresetOpt = Annotated[
    Optional[str], typer.Option("--preset", "-p", help="Preset name from presets/ (default: quickstart).")
]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="A TOML file of settings (above the preset).")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override one setting, e.g. --set optim.lr=0.02 (repeatable; value read as TOML)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]


def _phases_table(phases) -> Table:
    table = Table(title="phase timeline", show_lines=False)
    for col in ("start", "end (excl.)", "kind", "sparsity"):
        table.add_column(col, justify="right" if col != "kind" else "left")
    for p in phases:
        table.add_row(str(p.start), str(p.end), p.kind, f"{p.sparsity:.4g}", style="cyan" if p.kind == "sparse" else None)
    return table


def _resolved_json(settings) -> dict[str, Any]:
    from acdc_cli.sparsity.schedule import plan

    return {"config": settings.model_dump(mode="json"), "phases": [p.as_dict() for p in plan(settings)]}


def _print_resolved(settings, as_json: bool) -> None:
    from acdc_cli.sparsity.schedule import plan

    if as_json:
        print(json.dumps(_resolved_json(settings), indent=2))
        return
    console = out_console()
    console.print(settings.to_toml(), highlight=False, markup=False)
    console.print(_phases_table(plan(settings)))


# ----------------------------------------------------------------------------------------------------------------
# train


@app.command()
@user_errors
def train(
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
        typer.Option("--from", help="Start from this checkpoint's weights (and masks, held if the plan starts sparse)."),
    ] = None,
    data_dir: Annotated[Optional[Path], typer.Option("--data-dir", "-d", help="Dataset folder (data.dir).")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda, cuda:N (runtime.device).")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Random seed (runtime.seed).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite a non-empty run dir.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved settings and phases, then exit.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Train with AC/DC (or GMP, or dense) from a preset plus overrides.

    With no options this runs the embedded quickstart: AC/DC to 90 % sparsity on scikit-learn's digits, on the CPU,
    in about half a minute. Settings resolve as: defaults < preset < --config < ACDC_SECTION__KEY env < flags/--set.
    """
    from acdc_cli.config import load_settings
    from acdc_cli.train import default_run_dir, prepare_run_dir, run, saved_settings, summary_panel

    flags = {"data.dir": str(data_dir) if data_dir else None, "runtime.device": device, "runtime.seed": seed}
    if resume is not None:
        if preset or config or from_:
            raise AcdcError("--resume continues a run with its saved settings; drop --preset/--config/--from")
        base = saved_settings(resume)
        settings = load_settings(base=base, overrides=set_, flags=flags)
        _check_resume_settings(load_settings(base=base), settings)
        run_dir = resume
    else:
        settings = load_settings(preset, config, set_, flags)
        run_dir = out or default_run_dir(settings)
    if dry_run:
        _print_resolved(settings, as_json)
        return
    if from_ is not None and not from_.is_file():
        raise AcdcError(f"--from: no such checkpoint {from_}")
    if resume is None:
        prepare_run_dir(run_dir, force)
    console = err_console() if as_json else out_console()
    result = run(settings, run_dir, resume=resume is not None, from_checkpoint=from_, console=console)
    if as_json:
        print(json.dumps({
            "run_dir": str(result.run_dir),
            "best_sparse": result.best_sparse,
            "best_dense": result.best_dense,
            "final_sparsity": result.final_sparsity,
            "files": [str(p) for p in result.files],
        }))
    else:
        console.print(summary_panel(result))


def _check_resume_settings(saved, requested) -> None:
    """Only runtime.* and log.* may change when resuming; anything else would not continue the same run."""
    a, b = saved.model_dump(mode="json"), requested.model_dump(mode="json")
    for section in a:
        if section in ("runtime", "log"):
            continue
        if a[section] != b[section]:
            key = section
            if isinstance(a[section], dict):
                key = next(f"{section}.{k}" for k in a[section] if a[section][k] != b[section].get(k))
            raise AcdcError(f"cannot change {key} when resuming (only runtime.* and log.* may change)")


# ----------------------------------------------------------------------------------------------------------------
# presets


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
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="acdc presets")
    for col in ("name", "model", "dataset", "method", "sparsity", "structure", "epochs", "paper top-1"):
        table.add_column(col, justify="right" if col in ("sparsity", "epochs", "paper top-1") else "left")
    for r in rows:
        paper = f"{100 * r['paper_top1']:.2f} %" if r["paper_top1"] is not None else "-"
        table.add_row(r["name"], r["model"], r["dataset"], r["method"], f"{100 * r['sparsity']:.0f} %",
                      r["structure"] + ("" if r["scope"] == "global" else f" ({r['scope']})"), str(r["epochs"]), paper)
    out_console().print(table)


@presets_app.command("show")
@user_errors
def presets_show(
    name: Annotated[str, typer.Argument(help="Preset name.")],
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print a preset fully resolved (TOML) and its phase timeline; --json as for `train --dry-run`."""
    from acdc_cli.config import load_settings

    _print_resolved(load_settings(preset=name, overrides=set_), as_json)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
