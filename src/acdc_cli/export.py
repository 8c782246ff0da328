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

import fnmatch
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import nn

from acdc_cli.checkpoint import (
    CHECKPOINT_FORMAT,
    Checkpoint,
    load_checkpoint,
    parse_json,
    provenance,
    read_safetensors,
    rebuild_model,
    save_safetensors,
)
from acdc_cli.errors import AcdcError
from acdc_cli.sparsity import formats as F
from acdc_cli.sparsity.masks import nm_compatible

EXPORT_FORMAT = "acdc-export"
EXPORT_SCHEMA = "acdc.export/1"
DENSE = "dense"
ONNX = "onnx"
FORMATS = (F.BITMASK_24, F.BITMASK, DENSE)  # the safetensors formats; ONNX is written by acdc_cli.onnx_export
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# the tensors each compressed layer is stored as, by encoding (compressed-tensors' COMPRESSION_PARAM_NAMES)
PARTS = {F.BITMASK_24: ("shape", "compressed", "bitmask"), F.BITMASK: ("shape", "compressed", "bitmask", "row_offsets")}


@dataclass
class LayerStats:
    name: str
    shape: list[int]
    kept: int  # non-zero weights
    sparsity: float  # zeros / weights
    nm_valid: bool | None  # 2:4 along input channels; None when the input channels are not a multiple of 4
    dense_bytes: int
    stored_bytes: int
    encoding: str  # the sparse format, or "dense" for a prunable weight stored as it is


@dataclass
class ExportResult:
    path: Path
    format: str
    dtype: str
    structure: str
    layers: list[LayerStats]
    size_bytes: int  # the file on disk
    dense_bytes: int  # size of a dense export of the same checkpoint in the same dtype
    conv_layout: str = F.ROWS

    @property
    def sparsity(self) -> float:
        numel = sum(_numel(layer.shape) for layer in self.layers)
        return 1.0 - sum(layer.kept for layer in self.layers) / max(numel, 1)

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema": EXPORT_SCHEMA,
            "path": str(self.path),
            "format": self.format,
            "dtype": self.dtype,
            "structure": self.structure,
            "conv_layout": self.conv_layout,
            "sparsity": self.sparsity,
            "size_bytes": self.size_bytes,
            "dense_bytes": self.dense_bytes,
            "ratio_to_dense": self.size_bytes / max(self.dense_bytes, 1),
            "layers": [asdict(layer) for layer in self.layers],
        }


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def natural_key(name: str) -> list[Any]:
    """Sort key that puts layer2 before layer10 (safetensors files list tensors alphabetically)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def layer_prefix(name: str) -> str:
    """compressed-tensors names a compressed ``<layer>.weight`` by ``<layer>``."""
    return name[: -len(".weight")] if name.endswith(".weight") else name


def fold_masks(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """The state dict with every masked weight set to +0.0 outside its mask."""
    out = {}
    for name, tensor in ckpt.weights.items():
        mask = ckpt.masks.get(name)
        out[name] = tensor if mask is None else torch.where(mask, tensor, torch.zeros((), dtype=tensor.dtype))
    return out


def layer_weight(name: str, tensor: torch.Tensor) -> bool:
    """A Conv/Linear-like weight of a state dict: a floating tensor of 2+ dimensions named ``*.weight``."""
    return name.endswith("weight") and tensor.dim() >= 2 and tensor.is_floating_point()


def rule_reason(name: str, include: list[str], exclude: list[str]) -> str | None:
    """Why the sparsity.include/exclude globs (over module names) leave weight ``name`` dense; None when they
    select it."""
    module = layer_prefix(name)
    if not any(fnmatch.fnmatchcase(module, p) for p in include):
        return "not in sparsity.include"
    if any(fnmatch.fnmatchcase(module, p) for p in exclude):
        return "excluded by sparsity.exclude"
    return None


def rule_patterns(config: Any) -> tuple[list[str], list[str]]:
    """The sparsity.include / exclude globs a file's saved settings hold. Metadata is not trusted: a section or a
    list that is not one (null, a number) reads as the default (every layer included, none excluded)."""
    rules = config.get("sparsity") if isinstance(config, dict) else None
    rules = rules if isinstance(rules, dict) else {}

    def patterns(value: Any, default: list[str]) -> list[str]:
        return [p for p in value if isinstance(p, str)] if isinstance(value, list) else default

    return patterns(rules.get("include"), ["*"]), patterns(rules.get("exclude"), [])


def prunable_names(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                   config: dict[str, Any]) -> list[str]:
    """The weights sparsity is about: those with a mask; in a checkpoint without masks, the Conv/Linear weights
    (:func:`layer_weight`) that the saved sparsity.include/exclude globs select."""
    if masks:
        return sorted((n for n in weights if n in masks), key=natural_key)
    include, exclude = rule_patterns(config)
    names = [n for n, t in weights.items() if layer_weight(n, t) and rule_reason(n, include, exclude) is None]
    return sorted(names, key=natural_key)


def _encode_24(name: str, weight: torch.Tensor, mask: torch.Tensor | None, source: Path) -> dict[str, torch.Tensor]:
    hint = f"prune it first: acdc prune {source} --structure 2:4 -o OUT"
    if not nm_compatible(weight, 4):
        raise AcdcError(f"{name} has {weight.shape[1]} input channels, not a multiple of 4, so it cannot be 2:4; {hint}")
    rows = F.to_rows(weight)
    try:
        keep = F.select_24(rows, None if mask is None else F.to_rows(mask))
    except ValueError:
        raise AcdcError(f"{name} is not 2:4 sparse (a group of 4 input channels holds more than 2 non-zeros); "
                        f"{hint}") from None
    return F.encode_24(rows, keep)


def _structure(fmt: str, ckpt: Checkpoint) -> str:
    if fmt == F.BITMASK_24:
        return "2:4"
    if not ckpt.masks:
        return "dense"
    return str((ckpt.config.get("sparsity") or {}).get("structure", "unstructured"))


def export_checkpoint(source: Path, out: Path, fmt: str, dtype: str = "float32", force: bool = False,
                      model_name: str | None = None, num_classes: int | None = None, *,
                      conv_layout: str = F.ROWS) -> ExportResult:
    """Write ``out`` in format ``fmt`` from the checkpoint ``source`` (or, with ``model_name`` and ``num_classes``, a
    plain state dict); returns the mask statistics and sizes.

    ``conv_layout`` (``sparse-bitmask`` only): ``rows`` stores conv weights as (O, kh·kw·I) rows, ``native`` in
    their own shape, which compressed-tensors' decompressor restores as it is (at the cost of a bigger bitmask).
    """
    from acdc_cli.weights import load_source

    source, out = Path(source), Path(out)
    if fmt not in FORMATS:
        raise AcdcError(f"unknown export format '{fmt}' (choose {', '.join((*FORMATS, ONNX))})")
    if dtype not in DTYPES:
        raise AcdcError(f"unknown dtype '{dtype}' (choose {', '.join(DTYPES)})")
    if conv_layout not in F.CONV_LAYOUTS:
        raise AcdcError(f"unknown conv layout '{conv_layout}' (choose {', '.join(F.CONV_LAYOUTS)})")
    if conv_layout == F.NATIVE and fmt != F.BITMASK:
        raise AcdcError(f"--conv-layout native applies to sparse-bitmask only: {fmt} keeps conv weights "
                        + ("as (O, kh·kw·I) rows, the only layout whose groups of 4 run along input channels"
                           if fmt == F.BITMASK_24 else "in their own shape already"))
    check_writable(out, force)
    ckpt = load_source(source, model_name, num_classes)
    cast = DTYPES[dtype]
    weights = {k: v.to(cast) if v.is_floating_point() else v
               for k, v in sorted(fold_masks(ckpt).items(), key=lambda item: natural_key(item[0]))}
    prunable = prunable_names(weights, ckpt.masks, ckpt.config)
    if fmt == F.BITMASK_24 and not ckpt.masks:
        # as the N:M rules do, leave layers that cannot be 2:4 (input channels not a multiple of 4) dense
        prunable = [n for n in prunable if nm_compatible(weights[n], 4)]

    selected = set(prunable)
    tensors: dict[str, torch.Tensor] = {}
    layers_meta: dict[str, dict[str, Any]] = {}
    stats: list[LayerStats] = []
    for name, weight in weights.items():
        if name not in selected or fmt == DENSE:
            tensors[name] = weight
            if name in selected:
                stats.append(_stats(name, weight, {name: weight}, DENSE))
            continue
        if fmt == F.BITMASK_24:
            parts = _encode_24(name, weight, ckpt.masks.get(name), source)
        else:
            stored = weight if conv_layout == F.NATIVE else F.to_rows(weight)
            parts = F.encode_bitmask(stored, F.bit_nonzero(stored))
        prefix = layer_prefix(name)
        for part, tensor in parts.items():
            key = f"{prefix}.{part}"
            if key in weights:
                raise AcdcError(f"cannot export: {key} is both a model tensor and a compressed part of {name}")
            tensors[key] = tensor
        layers_meta[name] = {
            "shape": list(weight.shape),
            "layout": F.layout_name(tuple(weight.shape), conv_layout),
            "stored_shape": [int(v) for v in parts["shape"].flatten()],
            "encoding": fmt,
        }
        stats.append(_stats(name, weight, parts, fmt))

    structure = _structure(fmt, ckpt)
    zeros = sum(_numel(s.shape) - s.kept for s in stats)
    numel = sum(_numel(s.shape) for s in stats)
    metadata: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "export_format": fmt,
        "dtype": dtype,
        "structure": structure,
        "conv_layout": conv_layout,
        **provenance(ckpt),
        "source": source.name,
        "tensors": list(weights),
        "prunable": prunable,
        "layers": layers_meta,
        **{k: v for k, v in ckpt.extra.items() if k in ("preset", "paper_top1")},
    }
    if fmt != DENSE:
        # compressed-tensors' sparsity config: its module matching compares targets and ignore with module names
        # (model.named_modules()), so both list modules, never parameter names
        metadata["sparsity_config"] = {
            "format": fmt,
            "sparsity_structure": "2:4" if fmt == F.BITMASK_24 else "unstructured",
            "global_sparsity": zeros / max(numel, 1),
            "targets": [layer_prefix(n) for n in layers_meta],
            "ignore": [layer_prefix(n) for n, t in weights.items() if layer_weight(n, t) and n not in layers_meta],
        }
    save_safetensors(out, tensors, metadata)
    size = out.stat().st_size
    dense_bytes = size if fmt == DENSE else dense_file_bytes(weights, metadata)
    return ExportResult(out, fmt, dtype, structure, stats, size, dense_bytes, conv_layout)


def dense_file_bytes(weights: dict[str, torch.Tensor], metadata: dict[str, Any]) -> int:
    """Size of a safetensors file holding these tensors dense with this metadata, i.e. of a dense export."""
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    return len(st_save({k: v.contiguous() for k, v in weights.items()}, metadata=meta))


def _stats(name: str, weight: torch.Tensor, parts: dict[str, torch.Tensor], encoding: str) -> LayerStats:
    kept = int((weight != 0).sum())
    return LayerStats(
        name=name,
        shape=list(weight.shape),
        kept=kept,
        sparsity=1.0 - kept / max(weight.numel(), 1),
        nm_valid=F.nm_check(weight, 2, 4) if weight.numel() else None,  # a layer of no weights has no groups
        dense_bytes=weight.numel() * weight.element_size(),
        stored_bytes=F.stored_bytes(parts),
        encoding=encoding,
    )


def check_writable(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise AcdcError(f"{out} exists; pass --force to overwrite it")
    if out.exists() and not out.is_file():
        raise AcdcError(f"{out} exists and is not a file")
    if not out.parent.is_dir():
        raise AcdcError(f"folder {out.parent} does not exist")


# ----------------------------------------------------------------------------------------------------------------
# loading


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
        if (not isinstance(encoding, str) or encoding not in PARTS or not isinstance(shape, list) or len(shape) < 2
                or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)):
            raise AcdcError(f"{path}: malformed layer entry for {name}")
        # files written before the layout was a choice record "OHWI" / "OI" ..., which are rows layouts
        rows_layout = F.is_rows_layout(str(info.get("layout", F.layout_name(shape))), shape)
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
            elif list(decoded.shape) != shape or info.get("layout") != F.layout_name(shape, F.NATIVE):
                raise ValueError(f"stored as {info.get('layout')!r} of shape {list(decoded.shape)}, not {shape}")
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
