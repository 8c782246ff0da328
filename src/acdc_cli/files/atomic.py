"""Atomic writes: every file acdc writes goes to a temporary file beside its target, is fsynced and renamed over
it, so a crash or a full disk mid-write leaves the previous file intact; and the check that an output may be
written (no silent overwrite without --force)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from acdc_cli import testing_hooks
from acdc_cli.errors import AcdcError

# bytes, a memoryview or a NumPy uint8 array: anything memoryview() reads (collections.abc.Buffer is Python 3.12+)
Buffer = Any


def atomic_write_bytes(path: Path, data: bytes | Sequence[Buffer]) -> None:
    """Write ``data`` (bytes, or a sequence of byte buffers written one after the other) to a temporary file beside
    ``path``, fsync it, rename it over ``path``. An unwritable place is a one-line AcdcError; the previous file, if
    any, is untouched."""
    path = Path(path)
    try:
        _atomic_write(path, data)
    except OSError as exc:
        raise AcdcError(f"cannot write {path}: {exc.strerror or exc.__class__.__name__}") from None


def _atomic_write(path: Path, data: bytes | Sequence[Buffer]) -> None:
    faults = testing_hooks.faults_for_write(path)  # None unless a test asks for a crash or a full disk
    # one write per piece: each releases the interpreter lock while the kernel copies it
    pieces = [memoryview(piece).cast("B") for piece in ([data] if isinstance(data, (bytes, bytearray)) else data)]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; give the file the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            if faults:
                first, second = _split_at(pieces, sum(len(piece) for piece in pieces) // 2)
                for piece in first:
                    fh.write(piece)
                fh.flush()
                testing_hooks.fault_point(faults, "write", path)
                for piece in second:
                    fh.write(piece)
            else:
                for piece in pieces:
                    fh.write(piece)
            fh.flush()
            os.fsync(fh.fileno())
        testing_hooks.fault_point(faults, "rename", path)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    testing_hooks.fault_point(faults, "renamed", path)
    _fsync_dir(path.parent)


def _split_at(pieces: list[memoryview], offset: int) -> tuple[list[memoryview], list[memoryview]]:
    """The byte pieces before and after ``offset`` of their concatenation."""
    first: list[memoryview] = []
    for index, piece in enumerate(pieces):
        if offset <= len(piece):
            return first + [piece[:offset]], [piece[offset:], *pieces[index + 1:]]
        first.append(piece)
        offset -= len(piece)
    return first, []


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def remove_stale_temps(folder: Path) -> None:
    """Delete the temporary files of atomic writes that a killed process left in ``folder``. One that cannot be
    deleted (a read-only file system) is left: it is never read, and the run's next write names the real problem."""
    for tmp in Path(folder).glob(".*.tmp"):
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_writable(out: Path, force: bool) -> None:
    if out.is_dir():
        raise AcdcError(f"{out} is a directory: give the path of a file to write")
    if out.exists() and not out.is_file():
        raise AcdcError(f"{out} exists and is not a file")
    if out.exists() and not force:
        raise AcdcError(f"{out} exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise AcdcError(f"folder {out.parent} does not exist")
