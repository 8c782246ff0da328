"""The ``acdc`` command line: each command parses its options, calls one plain function of
:mod:`acdc_cli.commands` or :mod:`acdc_cli.training`, and renders what it returns. No policy lives here.

The commands are grouped in modules of their own (train, the file commands, presets, report and bench) and put
together here; ``main`` is the console script.
"""

from __future__ import annotations

from typing import Annotated

import typer

from acdc_cli import __version__
from acdc_cli.cli import files, report_bench
from acdc_cli.cli import train as train_cli
from acdc_cli.cli.common import reflow, run_app, set_debug
from acdc_cli.cli.presets import presets_app

app = typer.Typer(
    help="Train sparse image classifiers with AC/DC (Alternating Compressed/DeCompressed training).",
    add_completion=True,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


app.add_typer(presets_app, name="presets")


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
    set_debug(debug)


# in the order `acdc --help` lists them
app.command()(train_cli.train)
app.command()(report_bench.bench)
app.command("eval")(files.eval_cmd)
app.command()(files.prune)
app.command("export")(files.export_cmd)
app.command("inspect")(files.inspect_cmd)
app.command()(report_bench.report)


for _typer_app in (app, presets_app):
    for _info in _typer_app.registered_commands:
        if _info.callback is not None:
            _info.callback.__doc__ = reflow(_info.callback.__doc__)


def main() -> None:
    """The ``acdc`` entry point."""
    run_app(app)
