"""Exports of a checkpoint: compressed sparse safetensors in the compressed-tensors layouts, or a dense state dict
(ONNX lives in :mod:`acdc_cli.onnx_export`).

``sparse-24-bitmask`` and ``sparse-bitmask`` replace each prunable weight ``<layer>.weight`` by ``<layer>.compressed``,
``<layer>.bitmask`` and ``<layer>.shape`` (plus ``<layer>.row_offsets`` for ``sparse-bitmask``): 2-D with conv weights
in (O, kh, kw, I) order by default, or, for ``sparse-bitmask`` with ``conv_layout="native"``, in the weight's own
shape (see :mod:`acdc_cli.sparsity.formats`); every other tensor is stored as it is. ``dense`` is a plain state dict
with the masks folded in. ``__metadata__`` records the format, dtype, structure, each compressed layer's original
shape and layout, the state-dict order, the checkpoint's own metadata and compressed-tensors' ``sparsity_config``
(``targets``: the compressed modules by name, ``ignore``: the conv/linear modules left dense), so :func:`load`
rebuilds the exact dense state dict and :func:`load_model` the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from acdc_cli.errors import AcdcError
from acdc_cli.files.checkpoint import (
    CHECKPOINT_FORMAT,
    check_format_version,
    fold_masks,
    load_checkpoint,
    rebuild_model,
)
from acdc_cli.files.jsonio import parse_json
from acdc_cli.files.tensors import _json_field, read_safetensors
from acdc_cli.sparsity import formats as F
from acdc_cli.sparsity.rules import layer_prefix

EXPORT_FORMAT = "acdc-export"


# the tensors each compressed layer is stored as, by encoding (compressed-tensors' COMPRESSION_PARAM_NAMES)
PARTS = {F.BITMASK_24: ("shape", "compressed", "bitmask"), F.BITMASK: ("shape", "compressed", "bitmask", "row_offsets")}


def _meta_json(meta: dict[str, str], key: str, path: Path, kind: type) -> Any:
    try:
        value = parse_json(meta[key])
    except (KeyError, ValueError):  # ValueError: not JSON, or an integer of more than 4,300 digits
        raise AcdcError(f"{path}: metadata lacks a valid '{key}'") from None
    if not isinstance(value, kind):
        raise AcdcError(f"{path}: metadata field '{key}' is malformed")
    return value


def decode_export(tensors: dict[str, torch.Tensor], meta: dict[str, str],
                  path: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """(dense state dict in the saved order, the stored parts of each compressed layer) of an export's contents."""
    check_format_version(_json_field(meta, "format_version", path), path)
    fmt = meta.get("export_format")
    if fmt not in FORMATS:
        raise AcdcError(f"{path}: unknown export format {fmt!r}")
    layers = _meta_json(meta, "layers", path, dict)
    order = _meta_json(meta, "tensors", path, list)
    if not all(isinstance(name, str) for name in order):
        raise AcdcError(f"{path}: metadata field 'tensors' is malformed")
    dense: dict[str, torch.Tensor] = {}
    parts_of: dict[str, dict[str, torch.Tensor]] = {}
    for name, info in layers.items():
        encoding = info.get("encoding") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        layout = info.get("layout") if isinstance(info, dict) else None
        if (not isinstance(encoding, str) or encoding not in PARTS or not isinstance(shape, list) or len(shape) < 2
                or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)
                or not isinstance(layout, str)):
            raise AcdcError(f"{path}: malformed layer entry for {name}")
        rows_layout = F.is_rows_layout(layout, shape)
        prefix = layer_prefix(name)
        missing = [p for p in PARTS[encoding] if f"{prefix}.{p}" not in tensors]
        if missing:
            raise AcdcError(f"{path}: {name} lacks its '{prefix}.{missing[0]}' tensor")
        parts = {p: tensors[f"{prefix}.{p}"] for p in PARTS[encoding]}
        decode = F.decode_24 if encoding == F.BITMASK_24 else F.decode_bitmask
        try:
            decoded = decode(parts["compressed"], parts["bitmask"], parts["shape"])
            if rows_layout:
                decoded = F.from_rows(decoded, shape)
            elif list(decoded.shape) != shape or layout != F.layout_name(shape, F.NATIVE):
                raise ValueError(f"stored as {layout!r} of shape {list(decoded.shape)}, not {shape}")
            dense[name] = decoded
        except (ValueError, RuntimeError, TypeError, IndexError, OverflowError) as exc:  # shapes from the file
            raise AcdcError(f"{path}: cannot decode {name} ({exc})") from None
        parts_of[name] = parts
    consumed = {f"{layer_prefix(n)}.{p}" for n, parts in parts_of.items() for p in parts}
    for key, tensor in tensors.items():
        if key not in consumed:
            dense[key] = tensor
    if set(order) != set(dense):
        stray = sorted(set(order) ^ set(dense))[0]
        raise AcdcError(f"{path}: tensor list in the metadata does not match the file (at {stray})")
    return {name: dense[name] for name in order}, parts_of


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    tensors, meta = read_safetensors(path)
    if meta.get("format") == CHECKPOINT_FORMAT:
        return fold_masks(load_checkpoint(path)), meta
    if meta.get("format") != EXPORT_FORMAT:
        raise AcdcError(f"{path} is not an acdc export or checkpoint (format: {meta.get('format', 'no acdc metadata')})")
    return decode_export(tensors, meta, path)[0], meta


def load(path: Path) -> dict[str, torch.Tensor]:
    """The exact dense state dict of an export (any format), in the dtype it was exported in.

    A checkpoint is accepted too: its weights with the masks folded in.
    """
    return _load(path)[0]


def load_model(path: Path) -> nn.Module:
    """The model an export (or checkpoint) describes, rebuilt from its metadata, with the weights loaded (and cast
    to the model's float32 parameters)."""
    path = Path(path)
    state, meta = _load(path)
    arch = meta.get("arch")
    kwargs = dict(_meta_json(meta, "model_kwargs", path, dict))
    if not isinstance(arch, str):
        raise AcdcError(f"{path}: metadata lacks arch, so the model cannot be rebuilt")
    return rebuild_model(arch, kwargs, state, str(path))


DENSE = "dense"


FORMATS = (F.BITMASK_24, F.BITMASK, DENSE)  # the safetensors formats; ONNX is written by acdc_cli.onnx_export
