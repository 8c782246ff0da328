"""User-facing errors: the CLI prints them as one line and exits non-zero, without a traceback."""


class AcdcError(Exception):
    """A mistake in what the user handed us (a flag, a file, a dataset). Exit code 2."""

    exit_code = 2


class TrainingFault(AcdcError):
    """The run itself failed (for example a non-finite loss). Exit code 1."""

    exit_code = 1


def one_line(message: str) -> str:
    """``message`` as one line of plain text: control characters (a newline in a file's metadata) are escaped."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in message)
