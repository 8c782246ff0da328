"""JSON as acdc reads and writes it: strict on the way out (a non-finite number is null, never bare NaN), one
reader for the metadata fields of acdc's files, and JSON-lines logs that survive a torn line.
"""

from __future__ import annotations

import json
import math
import stat
from pathlib import Path
from typing import Any

from acdc_cli.errors import AcdcError


def parse_json(text: str) -> Any:
    """``json.loads`` for text from a file: ValueError on anything it cannot read (not JSON, an integer of more than
    4,300 digits, nesting beyond the recursion limit)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


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


def json_document(value: Any) -> str:
    """``value`` as an indented strict JSON document ending in a newline (a config file other tools read)."""
    return json.dumps(finite_or_null(value), allow_nan=False, indent=2) + "\n"


def meta_text(value: Any) -> str:
    """A metadata value as a file stores it: a string as it is (free text: preset, phase), anything else as strict
    JSON."""
    return value if isinstance(value, str) else json_line(value)


def meta_field(meta: dict[str, str], key: str, where: Any, kind: type | tuple[type, ...] | None = None,
               default: Any = None, *, required: bool = False, text: bool = False) -> Any:
    """The value of metadata field ``key`` of the file ``where``: its JSON, read back.

    Missing: ``default``, or for a ``required`` field "metadata lacks a valid 'key'". Not JSON: the text itself for a
    ``text`` field (free text is stored raw), else one line ("lacks a valid" for a required field, "is not valid
    JSON" for another). Not of ``kind``: "metadata field 'key' is malformed"."""
    if key not in meta:
        if required:
            raise AcdcError(f"{where}: metadata lacks a valid '{key}'")
        return default
    try:
        value = parse_json(meta[key])
    except ValueError:  # not JSON, or an integer of more than 4,300 digits
        if not text:
            raise AcdcError(f"{where}: metadata lacks a valid '{key}'" if required
                            else f"{where}: metadata field '{key}' is not valid JSON") from None
        value = meta[key]
    if kind is not None and not isinstance(value, kind):
        raise AcdcError(f"{where}: metadata field '{key}' is malformed")
    return value


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


# the layout of every file acdc writes (checkpoint, export, resume state, engine state); a reader refuses a newer one
# rather than misread it. A file without one is read as version 1.
FORMAT_VERSION = 1


def check_format_version(version: Any, source: object) -> None:
    """Refuse a file whose ``format_version`` (None: not recorded) this acdc does not know."""
    if version is None or (type(version) is int and version == FORMAT_VERSION):
        return
    if type(version) is not int or version < 1:
        raise AcdcError(f"{source}: malformed metadata (format_version {str(version)[:40]!r} is not a version number)")
    raise AcdcError(f"{source} was written by a newer acdc (format_version {version}); this acdc reads "
                    f"format_version {FORMAT_VERSION}")
