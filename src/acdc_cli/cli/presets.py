"""``acdc presets``: the list of presets, and one preset resolved with its phase timeline."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.table import Table

from acdc_cli.cli.common import UNBOUNDED_WIDTH, JsonOpt, SetOpt, complete_preset, out_console, print_json, user_errors
from acdc_cli.schemas import PRESETS_SCHEMA, RESOLVED_SCHEMA

presets_app = typer.Typer(help="List the presets, or show one resolved with its phase timeline.")


def print_resolved(settings, as_json: bool) -> None:
    """Resolved settings as `acdc presets show` and `acdc train --dry-run` print them: TOML, or --json."""
    from acdc_cli.commands.presets import resolved_json, resolved_toml

    if as_json:
        print_json(resolved_json(settings), RESOLVED_SCHEMA)
        return
    # written as it is, never through rich: a terminal's wrapping or markup would make it stop being TOML
    sys.stdout.write(resolved_toml(settings))


@presets_app.callback(invoke_without_command=True)
@user_errors
def presets_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List every preset: model, dataset, sparsity, structure, epochs, the paper's top-1, and the settings whose
    values are inferred (taken by analogy: no reference run script gives them; docs/paper.md)."""
    if ctx.invoked_subcommand is not None:
        return
    from acdc_cli.commands.presets import preset_rows

    rows = preset_rows()
    if as_json:
        print_json({"presets": rows}, PRESETS_SCHEMA)
        return
    from rich import box

    def inferred(r) -> str:
        return ", ".join(name.split(".")[-1] for name in r["inferred"])

    def table_of(columns: tuple[str, ...]) -> Table:
        caption = None
        if "inferred" not in columns:
            # no room for a column: the presets with inferred values, below the table
            caption = "inferred (no reference run script gives them; `acdc presets show NAME` marks them): " + \
                "; ".join(f"{r['name']}: {inferred(r)}" for r in rows if r["inferred"])
        table = Table(title="acdc presets", box=box.SIMPLE_HEAD, caption=caption, caption_justify="left")
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
                     "paper": f"{100 * r['paper_top1']:.2f} %" if r["paper_top1"] is not None else "-",
                     "inferred": inferred(r) or "-"}
            table.add_row(*(cells[col] for col in columns))
        return table

    console = out_console()
    table = table_of(("name", "model, data", "pruning", "epochs", "paper", "inferred"))
    if console.measure(table, options=console.options.update_width(UNBOUNDED_WIDTH)).maximum > console.width:
        # a narrow terminal: the name already says the model family and the dataset (a pipe is never narrow)
        table = table_of(("name", "pruning", "epochs", "paper"))
    console.print(table)


@presets_app.command("show")
@user_errors
def presets_show(
    name: Annotated[str, typer.Argument(autocompletion=complete_preset, help="Preset name.")],
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print a preset fully resolved, as TOML that `acdc train --config FILE` reads back, with its phase timeline as
    comments; --json as for `train --dry-run`."""
    from acdc_cli.config import load_settings

    print_resolved(load_settings(preset=name, overrides=set_), as_json)
