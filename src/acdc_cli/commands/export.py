"""``acdc export``: a checkpoint (or a plain state dict) written as a compressed sparse safetensors export in the
compressed-tensors layouts or as a dense state dict (the file format is :mod:`acdc_cli.files.export`), with each
prunable layer's mask statistics and the file's size against a dense export.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from acdc_cli.data.preprocessing import preprocessing
from acdc_cli.errors import AcdcError
from acdc_cli.files.atomic import atomic_write_text, check_writable
from acdc_cli.files.checkpoint import (
    Checkpoint,
    provenance,
)
from acdc_cli.files.export import (
    CONFIG_FILE,
    DENSE,
    EXPORT_FORMAT,
    FORMATS,
    WEIGHTS_FILE,
    is_directory_export,
    model_config,
)
from acdc_cli.files.jsonio import json_document
from acdc_cli.files.open import CHECKPOINT, PLAIN_STATE_DICT_HINT, open_any
from acdc_cli.files.tensors import dense_file_bytes, save_safetensors
from acdc_cli.schemas import EXPORT_SCHEMA
from acdc_cli.sparsity import formats
from acdc_cli.sparsity.masks import nm_compatible
from acdc_cli.sparsity.rules import (
    layer_prefix,
    layer_weight,
    natural_key,
    prunable_names,
)

ONNX = "onnx"


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    conv_layout: str = formats.NATIVE
    config_path: Path | None = None  # config.json of an export to a directory

    @property
    def sparsity(self) -> float:
        numel = sum(_numel(layer.shape) for layer in self.layers)
        return 1.0 - sum(layer.kept for layer in self.layers) / max(numel, 1)

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema": EXPORT_SCHEMA,
            "path": str(self.path),
            "config_path": None if self.config_path is None else str(self.config_path),
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


def _encode_24(name: str, weight: torch.Tensor, mask: torch.Tensor | None, source: Path) -> dict[str, torch.Tensor]:
    hint = f"prune it first: acdc prune {source} --structure 2:4 -o OUT"
    if not nm_compatible(weight, 4):
        raise AcdcError(f"{name} has {weight.shape[1]} input channels, not a multiple of 4, so it cannot be 2:4; {hint}")
    rows = formats.to_rows(weight)
    try:
        keep = formats.select_24(rows, None if mask is None else formats.to_rows(mask))
    except ValueError:
        raise AcdcError(f"{name} is not 2:4 sparse (a group of 4 input channels holds more than 2 non-zeros); "
                        f"{hint}") from None
    return formats.encode_24(rows, keep)


def _structure(fmt: str, ckpt: Checkpoint) -> str:
    if fmt == formats.BITMASK_24:
        return "2:4"
    if not ckpt.masks:
        return "dense"
    return str((ckpt.config.get("sparsity") or {}).get("structure", "unstructured"))


def export_checkpoint(source: Path, out: Path | str, fmt: str, dtype: str = "float32", force: bool = False,
                      model_name: str | None = None, num_classes: int | None = None, *,
                      conv_layout: str | None = None) -> ExportResult:
    """Write ``out`` in format ``fmt`` from the checkpoint ``source`` (or, with ``model_name`` and ``num_classes``, a
    plain state dict); returns the mask statistics and sizes.

    ``out`` is a file, or a directory (an existing one, or a new path without a suffix) that receives
    ``model.safetensors`` and the ``config.json`` compressed-tensors' ``ModelCompressor.from_pretrained`` reads.

    ``conv_layout`` (``sparse-bitmask`` only): ``native`` (the default) stores conv weights in their own shape, which
    compressed-tensors' decompressor puts back into the model as it is; ``rows`` as (O, kh·kw·I) rows (a smaller
    bitmask; files only, since the library would load the 2-D rows into conv modules). ``sparse-24-bitmask`` always
    uses rows, the only layout whose groups of 4 run along input channels.
    """
    as_directory = isinstance(out, str) and out.endswith(("/", os.sep))  # "-o new/" names a directory
    source, out = Path(source), Path(out)
    if fmt not in FORMATS:
        raise AcdcError(f"unknown export format '{fmt}' (choose {', '.join((*FORMATS, ONNX))})")
    if dtype not in DTYPES:
        raise AcdcError(f"unknown dtype '{dtype}' (choose {', '.join(DTYPES)})")
    if conv_layout is not None and conv_layout not in formats.CONV_LAYOUTS:
        raise AcdcError(f"unknown conv layout '{conv_layout}' (choose {', '.join(formats.CONV_LAYOUTS)})")
    if conv_layout is not None and fmt != formats.BITMASK and (fmt, conv_layout) != (formats.BITMASK_24, formats.ROWS):
        raise AcdcError(f"--conv-layout applies to sparse-bitmask only: {fmt} keeps conv weights "
                        + ("as (O, kh·kw·I) rows, the only layout whose groups of 4 run along input channels"
                           if fmt == formats.BITMASK_24 else "in their own shape"))
    conv_layout = conv_layout or (formats.ROWS if fmt == formats.BITMASK_24 else formats.NATIVE)
    directory = as_directory or is_directory_export(out)
    if directory:
        if out.exists() and not out.is_dir():
            raise AcdcError(f"{out} exists and is not a directory")
        if not out.parent.is_dir():
            raise AcdcError(f"folder {out.parent} does not exist")
        weights_path, config_path = out / WEIGHTS_FILE, out / CONFIG_FILE
        if out.is_dir():  # a new directory holds neither file yet
            for target in (weights_path, config_path):
                check_writable(target, force)
    else:
        if out.suffix != ".safetensors":
            raise AcdcError(f"{out}: a {fmt} export is a .safetensors file, or a directory (an existing one, a new "
                            "path without a suffix, or one ending in /); --format onnx writes .onnx files")
        check_writable(out, force)
        weights_path, config_path = out, None
    ckpt = open_any(source, (CHECKPOINT,), torch_files=True, model_name=model_name, num_classes=num_classes,
                    hint=PLAIN_STATE_DICT_HINT).checkpoint()
    cast = DTYPES[dtype]
    weights = {k: v.to(cast) if v.is_floating_point() else v
               for k, v in sorted(ckpt.weights.items(), key=lambda item: natural_key(item[0]))}
    # without masks, the saved rules pick the layers; a 2:4 export leaves those that cannot be 2:4 dense
    prunable = prunable_names(weights, ckpt.masks, ckpt.config, (2, 4) if fmt == formats.BITMASK_24 else None)

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
        if fmt == formats.BITMASK_24:
            parts = _encode_24(name, weight, ckpt.masks.get(name), source)
        else:
            stored = weight if conv_layout == formats.NATIVE else formats.to_rows(weight)
            parts = formats.encode_bitmask(stored, formats.bit_nonzero(stored))
        prefix = layer_prefix(name)
        for part, tensor in parts.items():
            key = f"{prefix}.{part}"
            if key in weights:
                raise AcdcError(f"cannot export: {key} is both a model tensor and a compressed part of {name}")
            tensors[key] = tensor
        stored_shape = [int(v) for v in parts["shape"].flatten().tolist()]
        if directory and stored_shape != list(weight.shape):
            raise AcdcError(f"{name} would be stored as {'×'.join(map(str, stored_shape))} "
                            f"rows, which compressed-tensors' decompress would load into the model as they are; "
                            + ("a 2:4 conv weight has no other layout: export it to a .safetensors file (acdc reads "
                               "it) or use --format sparse-bitmask" if fmt == formats.BITMASK_24
                               else "drop --conv-layout rows or export to a .safetensors file"))
        layers_meta[name] = {
            "shape": list(weight.shape),
            "layout": formats.layout_name(tuple(weight.shape), conv_layout),
            "stored_shape": stored_shape,
            "encoding": fmt,
        }
        stats.append(_stats(name, weight, parts, fmt))

    structure = _structure(fmt, ckpt)
    metadata: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "export_format": fmt,
        "dtype": dtype,
        "structure": structure,
        "conv_layout": conv_layout,
        **provenance(ckpt),
        # what a reader must do to an image before the model sees it: from the run's settings, not acdc's code
        "preprocessing": preprocessing(ckpt.config),
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
            "sparsity_structure": "2:4" if fmt == formats.BITMASK_24 else "unstructured",
            # compressed-tensors: "average sparsity of the entire model": zeros over every floating-point tensor
            "global_sparsity": _model_sparsity(weights),
            "targets": [layer_prefix(n) for n in layers_meta],
            "ignore": [layer_prefix(n) for n, t in weights.items() if layer_weight(n, t) and n not in layers_meta],
        }
    if directory:
        out.mkdir(exist_ok=True)
    save_safetensors(weights_path, tensors, metadata)
    if config_path is not None:
        atomic_write_text(config_path, json_document(model_config(metadata)))
    size = weights_path.stat().st_size
    dense_bytes = size if fmt == DENSE else dense_file_bytes(weights, metadata)
    return ExportResult(weights_path, fmt, dtype, structure, stats, size, dense_bytes, conv_layout, config_path)


def _model_sparsity(weights: dict[str, torch.Tensor]) -> float:
    floats = [t for t in weights.values() if t.is_floating_point()]
    total = sum(t.numel() for t in floats)
    return sum(int((t == 0).sum()) for t in floats) / max(total, 1)


def _stats(name: str, weight: torch.Tensor, parts: dict[str, torch.Tensor], encoding: str) -> LayerStats:
    kept = int((weight != 0).sum())
    return LayerStats(
        name=name,
        shape=list(weight.shape),
        kept=kept,
        sparsity=1.0 - kept / max(weight.numel(), 1),
        nm_valid=formats.nm_check(weight, 2, 4) if weight.numel() else None,  # a layer of no weights has no groups
        dense_bytes=weight.numel() * weight.element_size(),
        stored_bytes=formats.stored_bytes(parts),
        encoding=encoding,
    )
