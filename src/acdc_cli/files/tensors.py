"""safetensors files: written piece by piece and atomically, read with every header field bounded before a tensor
is touched."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from acdc_cli.errors import AcdcError
from acdc_cli.files.atomic import Buffer, atomic_write_bytes
from acdc_cli.files.jsonio import meta_text


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Write tensors (made contiguous, on CPU) with metadata values encoded as JSON strings."""
    meta = {k: meta_text(v) for k, v in metadata.items()}
    atomic_write_bytes(path, safetensors_pieces({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, meta))


# the safetensors names of the dtypes acdc's files hold
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def safetensors_pieces(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> list[Buffer]:
    """A safetensors file as its header followed by one buffer per tensor (views of the contiguous CPU tensors, no
    copy). ``safetensors.torch.save`` builds the whole file in one bytes object while holding the interpreter lock
    (76-79 ms for a WRN-28-10 checkpoint, stalling the training thread); written piece by piece, the lock is free
    during each write. The same format and size as ``safetensors.torch.save``: a little-endian u64 header length,
    the JSON header (``__metadata__`` first, then each tensor's dtype, shape and byte offsets) padded with spaces to
    a multiple of 8, then the tensors' bytes; tensors ordered by element size, largest first, then name, so each
    starts aligned to its element size."""
    if any(t.dtype not in _SAFETENSORS_DTYPES for t in tensors.values()):
        return [st_save(tensors, metadata=metadata)]
    names = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in names:
        size = tensors[name].numel() * tensors[name].element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensors[name].dtype], "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    pieces: list[Buffer] = [struct.pack("<Q", len(text)), text]
    pieces += [tensors[name].reshape(-1).view(torch.uint8).numpy() for name in names if tensors[name].numel()]
    return pieces


# acdc's own metadata nests 4 levels; a file nesting hundreds would make json.loads hit Python's recursion limit
MAX_METADATA_DEPTH = 32


# No layer of an image classifier comes near these. A tensor's bytes always lie inside the file (safe_open checks
# that), but a tensor of no elements may still declare [0, 2**40], which readers would carry into reshapes and
# divisions.
MAX_TENSOR_DIM = 2**31


MAX_TENSOR_DIMS = 8


def _json_depth(text: str) -> int:
    """Deepest bracket nesting of a JSON text (brackets inside strings do not count); plain strings give 0."""
    deepest = depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the raw metadata of a safetensors file; any defect is a one-line AcdcError."""
    path = Path(path)
    if not path.is_file():
        raise AcdcError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            # the header first: safe_open has checked that every declared tensor's bytes lie inside the file, and
            # the shapes are checked here before any tensor is read
            meta = _checked_metadata(fh, path)
            names = list(fh.keys())
            for name in names:
                shape = fh.get_slice(name).get_shape()
                if len(shape) > MAX_TENSOR_DIMS or any(size > MAX_TENSOR_DIM for size in shape):
                    raise AcdcError(f"{path}: tensor {name} declares shape {shape}, beyond any layer acdc reads "
                                    f"(at most {MAX_TENSOR_DIMS} dimensions of at most 2**31)")
            tensors = {name: fh.get_tensor(name) for name in names}
    except MemoryError:
        raise _unmappable(path) from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise AcdcError(f"{path} is not a readable safetensors file ({first})") from None
    return tensors, meta


def _unmappable(path: Path) -> AcdcError:
    """safe_open maps the whole file; under an address-space limit (``ulimit -v``) a large one cannot be mapped."""
    size = path.stat().st_size
    return AcdcError(f"{path} ({size / 2**30:.1f} GiB) cannot be mapped into memory: the process's address space is "
                     "limited (ulimit -v) or exhausted")


def _checked_metadata(fh: Any, path: Path) -> dict[str, str]:
    meta = fh.metadata() or {}
    for key, text in meta.items():
        if _json_depth(text) > MAX_METADATA_DEPTH:
            raise AcdcError(f"{path}: metadata field '{key}' is nested deeper than {MAX_METADATA_DEPTH} levels")
    return meta


def read_metadata(path: Path) -> dict[str, str]:
    """The raw metadata of a safetensors file, from its header alone: no tensor is read."""
    path = Path(path)
    if not path.is_file():
        raise AcdcError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return _checked_metadata(fh, path)
    except MemoryError:
        raise _unmappable(path) from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise AcdcError(f"{path} is not a readable safetensors file ({first})") from None


def dense_file_bytes(weights: dict[str, torch.Tensor], metadata: dict[str, Any]) -> int:
    """Size of a safetensors file holding these tensors dense with this metadata, i.e. of a dense export."""
    meta = {k: meta_text(v) for k, v in metadata.items()}
    return len(st_save({k: v.contiguous() for k, v in weights.items()}, metadata=meta))
