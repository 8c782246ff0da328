"""What every ``acdc`` command shares: its consoles, ``--json`` output, the common options, user errors as one
line, the ``--help`` reflow, and running the app with a standard output that survives a closed pipe."""

from __future__ import annotations

import functools
import inspect
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperArgument, TyperOption

from acdc_cli.errors import AcdcError, one_line

_state = {"debug": False}


def _shown_type(original: Any) -> Any:
    # this Typer prints a type beside every option and argument, so --force read as "--force <bool>" (as if it took a
    # value), --set as "<list[str]>" and report's run dirs as "<list[Path]>": a flag shows none, a repeatable option
    # or argument its value once, marked repeatable
    def shown_type(self: Any, ctx: Any) -> str | None:
        if getattr(self, "is_flag", False):
            return None
        shown = original(self, ctx)
        if (self.multiple or getattr(self, "nargs", 1) == -1) and shown:
            return (shown.replace("<list[", "<", 1).replace("]>", ">") if shown.startswith("<list[") else shown) + " ..."
        return shown

    return shown_type


TyperOption.display_type_rich = _shown_type(TyperOption.display_type_rich)
TyperArgument.display_type_rich = _shown_type(TyperArgument.display_type_rich)


def set_debug(debug: bool) -> None:
    """``acdc --debug``: errors keep their traceback instead of becoming one line."""
    _state["debug"] = debug


def debugging() -> bool:
    return _state["debug"]


# a pipe, a file or a batch log has no width: tables there take the width their cells need (rich reads COLUMNS, or
# assumes 80, and would cut cells to "mo…")
UNBOUNDED_WIDTH = 100_000


def _console(stderr: bool = False, markup: bool = True) -> Console:
    """A terminal gets rich's wrapping at its width; a pipe, a file or a batch log gets each message on one line and
    each table at its natural width, never a cell cut short (hard-wrapping at an assumed 80 columns would split
    paths and words that scripts and tests look for). ``markup=False``: nothing printed is read as rich markup, not
    even the text inside a panel."""
    console = Console(stderr=stderr, markup=markup)
    if not console.is_terminal:
        console.soft_wrap = True
        console.width = UNBOUNDED_WIDTH
    return console


def out_console(markup: bool = True) -> Console:
    return _console(markup=markup)


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


def complete_from(values: Any):
    """A shell-completion callback offering ``values`` (a tuple, or a function returning them) that start with what
    has been typed."""

    def complete(incomplete: str) -> list[str]:
        return [v for v in (values() if callable(values) else values) if v.startswith(incomplete)]

    return complete


def _preset_names() -> list[str]:
    from acdc_cli.config import preset_names

    return preset_names()


complete_preset = complete_from(_preset_names)


PresetOpt = Annotated[
    Optional[str], typer.Option("--preset", "-p", autocompletion=complete_preset, help="Preset name from presets/ (default: quickstart).")
]


ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="A TOML file of settings (above the preset).")]


SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", metavar="KEY=VALUE", help="Override one setting, e.g. --set optim.lr=0.02 (repeatable; value read as TOML)."),
]


JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the text output.")]


ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", help="For a plain state dict (.safetensors or a torch file): the model it belongs to, "
                 "e.g. torchvision:resnet18 (with --num-classes)."),
]


DataOpt = Annotated[
    Optional[str],
    typer.Option("--data", help="The dataset the model takes (data.name: digits, cifar10, cifar100, imagenet, "
                 "imagefolder, synthetic); default: the one the file records."),
]


NumClassesOpt = Annotated[
    Optional[int], typer.Option("--num-classes", help="For a plain state dict: the model's number of classes.")
]


def reflow(doc: str | None) -> str | None:
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


def run_app(app: typer.Typer) -> None:
    """Run ``app`` as the ``acdc`` command. Click's own usage errors (an unknown option, a missing argument) are one line on
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
