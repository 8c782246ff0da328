"""Exports of a checkpoint: compressed sparse safetensors in the compressed-tensors layouts, or a dense state dict
(ONNX lives in :mod:`acdc_cli.commands.export_onnx`).

``sparse-24-bitmask`` and ``sparse-bitmask`` replace each prunable weight ``<layer>.weight`` by ``<layer>.compressed``,
``<layer>.bitmask`` and ``<layer>.shape`` (plus ``<layer>.row_offsets`` for ``sparse-bitmask``): 2-D with conv weights
in (O, kh, kw, I) order by default, or, for ``sparse-bitmask`` with ``conv_layout="native"``, in the weight's own
shape (see :mod:`acdc_cli.sparsity.formats`); every other tensor is stored as it is. ``dense`` is a plain state dict
with the masks folded in. ``__metadata__`` records the format, dtype, structure, each compressed layer's original
shape and layout, the state-dict order, the checkpoint's own metadata and compressed-tensors' ``sparsity_config``
(``targets``: the compressed modules by name, ``ignore``: the conv/linear modules left dense), so
:func:`decode_export` rebuilds the exact dense state dict (``acdc_cli.files.open`` opens any file with it).

An export to a directory is a model directory as compressed-tensors and transformers read one: the tensors in
``model.safetensors`` and ``config.json`` beside them (:func:`model_config`), whose ``quantization_config`` holds the
``sparsity_config``, so ``ModelCompressor.from_pretrained(dir)`` builds the decompressor and its
``decompress(dir, model)`` puts every weight back into the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from acdc_cli.errors import AcdcError
from acdc_cli.files.jsonio import check_format_version, meta_field
from acdc_cli.sparsity import formats
from acdc_cli.sparsity.rules import layer_prefix

EXPORT_FORMAT = "acdc-export"


# the tensors each compressed layer is stored as, by encoding (compressed-tensors' COMPRESSION_PARAM_NAMES)
PARTS = {
    formats.BITMASK_24: ("shape", "compressed", "bitmask"),
    formats.BITMASK: ("shape", "compressed", "bitmask", "row_offsets"),
}


def decode_export(tensors: dict[str, torch.Tensor], meta: dict[str, str],
                  path: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """(dense state dict in the saved order, the stored parts of each compressed layer) of an export's contents."""
    check_format_version(meta_field(meta, "format_version", path), path)
    fmt = meta.get("export_format")
    if fmt not in FORMATS:
        raise AcdcError(f"{path}: unknown export format {fmt!r}")
    layers = meta_field(meta, "layers", path, dict, required=True)
    order = meta_field(meta, "tensors", path, list, required=True)
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
        rows_layout = formats.is_rows_layout(layout, shape)
        prefix = layer_prefix(name)
        missing = [p for p in PARTS[encoding] if f"{prefix}.{p}" not in tensors]
        if missing:
            raise AcdcError(f"{path}: {name} lacks its '{prefix}.{missing[0]}' tensor")
        parts = {p: tensors[f"{prefix}.{p}"] for p in PARTS[encoding]}
        decode = formats.decode_24 if encoding == formats.BITMASK_24 else formats.decode_bitmask
        try:
            decoded = decode(parts["compressed"], parts["bitmask"], parts["shape"])
            if rows_layout:
                decoded = formats.from_rows(decoded, shape)
            elif list(decoded.shape) != shape or layout != formats.layout_name(shape, formats.NATIVE):
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


DENSE = "dense"

# a directory export: the names compressed-tensors (and transformers) look for in a model directory
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# transformers' AutoConfig, through which ModelCompressor.from_pretrained reads config.json, needs a model_type it
# knows; timm_wrapper's config is timm's own config.json of an image classifier (architecture, num_classes,
# label_names, pretrained_cfg with the input size and normalization), the nearest fit for acdc's models
MODEL_TYPE = "timm_wrapper"
# what compressed-tensors writes as quant_method for its own configs (sparsity only: no quantization fields)
QUANT_METHOD = "compressed-tensors"


def is_directory_export(out: Path) -> bool:
    """An export goes to a directory when OUT is an existing directory, or does not exist and has no suffix."""
    return out.is_dir() or (not out.exists() and out.suffix == "")


def model_config(metadata: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` of a directory export, from the export's metadata: timm's fields for an image classifier,
    compressed-tensors' ``quantization_config`` (sparse formats only) and acdc's own record under ``acdc``."""
    kwargs = metadata.get("model_kwargs") or {}
    num_classes = kwargs.get("num_classes")
    prep = metadata.get("preprocessing")
    config: dict[str, Any] = {
        "model_type": MODEL_TYPE,
        # acdc's model name: build the model with acdc (acdc_cli.files.open.load_model) or its own library
        "architecture": metadata["arch"],
        "num_classes": num_classes,
        # acdc records class indices, not class names; transformers needs a list to skip timm's ImageNet labels
        "label_names": [str(i) for i in range(num_classes)] if isinstance(num_classes, int) else None,
    }
    if prep:
        folder = prep.get("resize_shorter_side") is not None
        config["pretrained_cfg"] = {
            "input_size": prep["input_shape"],
            "interpolation": "bilinear",
            "crop_pct": prep["center_crop"] / prep["resize_shorter_side"] if folder else 1.0,
            "crop_mode": "center",
            "mean": prep["mean"],
            "std": prep["std"],
            "num_classes": num_classes,
        }
    if metadata.get("sparsity_config"):
        config["quantization_config"] = {"quant_method": QUANT_METHOD,
                                         "sparsity_config": metadata["sparsity_config"]}
    config["acdc"] = {
        "format_version": metadata["format_version"],
        "acdc_version": metadata["acdc_version"],
        "weights": WEIGHTS_FILE,
        "export_format": metadata["export_format"],
        "dtype": metadata["dtype"],
        "conv_layout": metadata["conv_layout"],
        "model_kwargs": kwargs,
        "preprocessing": prep,
    }
    return config


# the safetensors formats; ONNX is written by acdc_cli.commands.export_onnx
FORMATS = (formats.BITMASK_24, formats.BITMASK, DENSE)
