"""Torch files that acdc reads with ``torch.load(weights_only=True)``: its resume states and plain state dicts
handed to it. Tensors and plain data only: a pickled Python object is refused in one line, never run."""

from __future__ import annotations

import io
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from acdc_cli.errors import AcdcError
from acdc_cli.files.atomic import atomic_write_bytes


def save_state(path: Path, state: dict[str, Any]) -> None:

    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, [buffer.getbuffer()])  # getvalue() would copy it all again, holding the lock


def torch_load_plain(path: Path, expected: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain data only. A file holding anything else,
    or no torch file at all, is one AcdcError saying it is not ``expected`` (e.g. "a valid acdc resume state");
    FileNotFoundError passes through for the caller to word."""
    try:
        with warnings.catch_warnings():
            # a foreign pickle makes torch warn about its protocol before refusing it: the error line is enough
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as exc:  # weights_only met something other than tensors and plain data
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"a pickled {found.group(1)}" if found else "pickled Python objects"
        raise AcdcError(f"{path} is not {expected}: refused, it holds {what} (only tensors and plain data are "
                        "read)") from None
    except Exception as exc:  # corrupt zips and foreign files raise various errors
        first = str(exc).splitlines()[0].split(". ")[0][:200] if str(exc) else ""
        raise AcdcError(f"{path} is not {expected} ({exc.__class__.__name__} {first})") from None


def load_state(path: Path) -> dict[str, Any]:
    try:
        state = torch_load_plain(path, "a valid acdc resume state")
    except FileNotFoundError:
        raise AcdcError(f"resume state not found: {path}") from None
    if not isinstance(state, dict):
        raise AcdcError(f"{path} is not a valid acdc resume state")
    return state
