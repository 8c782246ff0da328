"""TODO docstring
"""

from __future__ import annotations

import json
import math
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from acdc_cli.errors import AcdcError

if TYPE_CHECKING:
    pass


def parse_json(text: str) -> Any:
    """``json.loads`` for text from a file: ValueError on anything it cannot read (not JSON, an integer of more than
    4,300 digits, nesting beyond the recursion limit)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def lenient_json(text: str) -> Any:
    """Metadata strings are stored raw, everything else as JSON; read both back."""
    try:
        return parse_json(text)
    except ValueError:
        return text


def finite_or_null(value: Any) -> Any:
    """``value`` with every NaN and infinity (in nested dicts, lists and tuples) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def json_line(value: Any) -> str:
    """``value`` as one line of strict JSON: a non-finite number is written as null, never as bare NaN."""
    return json.dumps(finite_or_null(value), allow_nan=False)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every row of ``path`` that is a JSON object (damaged lines skipped)."""
    return read_rows(path)[0]


# A run of 10,000 epochs (the settings' maximum) writes a few MB of metrics; anything far larger is not a run's
MAX_ROWS_BYTES = 64 * 2**20
MAX_ROW_BYTES = 2**20


def read_rows(path: Path) -> tuple[list[dict[str, Any]], list[bytes]]:
    """(every row of ``path`` that is a JSON object, every other non-empty line as its bytes): a line torn by a crash
    or damaged by hand costs that line alone. Only a regular file is read (a FIFO would block, a device such as
    /dev/zero never ends), of at most MAX_ROWS_BYTES; a line longer than MAX_ROW_BYTES counts as damaged, unparsed."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        return [], []
    except OSError as exc:
        raise AcdcError(f"cannot read {path}: {exc.strerror or exc.__class__.__name__}") from None
    if not stat.S_ISREG(info.st_mode):
        raise AcdcError(f"{path} is not a regular file (acdc reads metrics only from the file a run wrote)")
    if info.st_size > MAX_ROWS_BYTES:
        raise AcdcError(f"{path} is {info.st_size / 2**20:.0f} MiB, more than any run writes "
                        f"(at most {MAX_ROWS_BYTES // 2**20} MiB are read)")
    rows, damaged = [], []
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_ROWS_BYTES + 1)  # bounded even if the file grew since stat()
        for line in data[:MAX_ROWS_BYTES].split(b"\n"):
            if not line.strip():
                continue
            row = None
            if len(line) <= MAX_ROW_BYTES:  # acdc's rows are a few kB; a longer line is damage, left unparsed
                try:
                    row = json.loads(line)
                except (ValueError, RecursionError):  # not JSON or UTF-8, an int of over 4,300 digits, too deep
                    pass
            if isinstance(row, dict):
                rows.append(row)
            else:
                damaged.append(line)
    except OSError as exc:
        raise AcdcError(f"cannot read {path}: {exc.strerror or exc.__class__.__name__}") from None
    return rows, damaged


def finite_number(value: Any) -> bool:
    """A real number (not a bool), neither NaN nor infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
