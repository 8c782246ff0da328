"""What is in a ``.safetensors`` file: an acdc checkpoint, an acdc export, or a plain state dict written by another
tool. Per-layer sparsity and N:M validity are counted from the tensors in the file, never taken from metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from acdc_cli.config import load_settings, preset_label
from acdc_cli.data.bundle import input_shape as data_input_shape
from acdc_cli.data.bundle import model_input
from acdc_cli.errors import AcdcError
from acdc_cli.files.checkpoint import MASK_PREFIX
from acdc_cli.files.open import CHECKPOINT, EXPORT, STATE_DICT, open_any
from acdc_cli.files.tensors import dense_file_bytes
from acdc_cli.flops import output_positions, weights_flops
from acdc_cli.models import create
from acdc_cli.sparsity import formats
from acdc_cli.sparsity.rules import (
    layer_weight,
    natural_key,
    prunable_names,
    rule_patterns,
    rule_reason,
)


def _nm_of(structure: str | None) -> tuple[int, int]:
    """The N:M pattern to check: the file's own structure when it is N:M, else 2:4 (what sparse kernels run)."""
    if structure and ":" in structure:
        n, m = structure.split(":", 1)
        if n.isdigit() and m.isdigit() and 0 < int(n) < int(m):
            return int(n), int(m)
    return 2, 4


def _claims_nm(structure: str | None) -> bool:
    return bool(structure) and ":" in structure


def _layer(name: str, weight: torch.Tensor, stored: int, encoding: str, nm: tuple[int, int]) -> dict[str, Any]:
    zeros = int((weight == 0).sum())
    return {
        "name": name,
        "shape": list(weight.shape),
        "numel": weight.numel(),
        "zeros": zeros,
        "sparsity": zeros / max(weight.numel(), 1),
        "nm": f"{nm[0]}:{nm[1]}",
        "nm_valid": formats.nm_check(weight, *nm) if weight.numel() else None,  # a layer of no weights has no groups
        "encoding": encoding,
        "dense_bytes": weight.numel() * weight.element_size(),
        "stored_bytes": stored,
    }


def _dense_by_rule(weights: dict[str, torch.Tensor], pruned: list[str], config: Any,
                   structure: str | None) -> list[dict[str, Any]]:
    """Conv/Linear-like weights the file keeps dense, each with the reason the saved sparsity rules give."""
    include, exclude = rule_patterns(config)
    nm = _nm_of(structure) if _claims_nm(structure) else None
    out = []
    for name, tensor in weights.items():
        if name in pruned or not layer_weight(name, tensor):
            continue
        reason = rule_reason(name, include, exclude, tensor, nm)
        out.append({"name": name, "shape": list(tensor.shape), "reason": reason or "no mask"})
    return sorted(out, key=lambda layer: natural_key(layer["name"]))


def file_flops(arch: Any, model_kwargs: Any, config: Any, weights: dict[str, torch.Tensor],
               input_shape: tuple[int, int, int] | None = None) -> tuple[dict[str, Any] | None, str | None]:
    """(``{"dense", "sparse", "ratio", "input_shape"}``, None): multiply-accumulates per image of a file's weights as
    the paper counts them (``acdc_cli.flops``), at ``input_shape`` or else the size the file's dataset feeds the
    model (the model's own input size when it records none); (None, why not) when the file does not say which model
    it holds, or its weights are not that model's.

    The model is built on the meta device, so finding its layers' output positions allocates and computes nothing;
    the non-zeros are counted in ``weights`` (a state dict, a decoded export or an ONNX model's initializers)."""
    if not isinstance(arch, str) or not isinstance(model_kwargs, dict) or not isinstance(
            model_kwargs.get("num_classes"), int):
        return None, "the file names no acdc model"
    try:
        with torch.device("meta"):
            model = create(arch, **model_kwargs)
        if input_shape is None:
            data = config.get("data") if isinstance(config, dict) else None
            if isinstance(data, dict) and isinstance(data.get("name"), str):
                size = data.get("image_size")
                input_shape = data_input_shape(data["name"], arch, size if isinstance(size, int) else None)
            else:
                channels, side = model_input(arch, model_kwargs, None)
                input_shape = (channels, side, side)
    except AcdcError as exc:
        return None, str(exc)
    except TypeError:  # keywords the model's factory does not take, from a file's metadata
        return None, f"the file's model_kwargs {model_kwargs} do not build {arch}"
    try:
        positions = output_positions(model, input_shape)
    except RuntimeError:
        return None, f"{arch} {model_kwargs} does not take images of shape {list(input_shape)}"
    modules = dict(model.named_modules())
    for name in positions:
        weight = weights.get(f"{name}.weight")
        if weight is None or weight.shape != modules[name].weight.shape:
            return None, f"the file's {name}.weight is not the weight of {arch}'s layer {name}"
    return {**weights_flops(positions, weights).as_dict(), "input_shape": list(input_shape)}, None


def _preset_label(config: dict[str, Any]) -> str | None:
    """config.preset_label of the file's settings (None where they record no preset or do not load)."""
    try:
        settings = load_settings(base=config)
    except AcdcError:
        return None
    return preset_label(settings) if settings.preset else None


def inspect_file(path: Path) -> dict[str, Any]:
    """A JSON-ready description: kind, format, metadata, per-layer sparsity and N:M validity, sizes."""
    path = Path(path)
    opened = open_any(path, (CHECKPOINT, EXPORT, STATE_DICT))
    # a directory export is measured by the model file in it (opened.path), not by the directory entry
    info: dict[str, Any] = {"path": str(path), "size_bytes": opened.path.stat().st_size}
    dense = opened.weights
    if opened.kind == CHECKPOINT:
        tensors, masks = opened.stored, opened.masks
        structure = opened.structure
        nm = _nm_of(structure)
        names = prunable_names(dense, masks, opened.config)
        layers = []
        for n in names:
            mask = tensors.get(MASK_PREFIX + n)
            stored = dense[n].numel() * dense[n].element_size() + (mask.numel() if mask is not None else 0)
            layers.append(_layer(n, dense[n], stored, "checkpoint", nm))
        info.update(kind="checkpoint", format=opened.format,
                    structure=structure or ("unstructured" if masks else "dense"))
        info["dense_layers"] = _dense_by_rule(dense, names, opened.config, structure) if masks else []
        # the opened weights are masked; say so where the file itself holds weights outside the masks
        info["outside_mask"] = [n for n in names if n in masks
                                and bool((formats.bit_nonzero(tensors[n]) & ~masks[n]).any())]
        info["metadata"] = {
            "arch": opened.arch,
            "preset": opened.preset,
            "epoch": opened.epoch,
            "phase": opened.phase,
            "metrics": opened.metrics,
            "acdc_version": opened.raw_meta.get("acdc_version"),
            "masks": len(masks),
            "selection_split": opened.extra.get("selection_split"),
        }
    elif opened.kind == EXPORT:
        structure = opened.structure
        nm = _nm_of(structure)
        names = opened.prunable or []
        layers = []
        for n in names:
            parts = opened.parts.get(n, {n: dense[n]})
            layers.append(_layer(n, dense[n], formats.stored_bytes(parts), opened.format if n in opened.parts
                                 else "dense", nm))
        info.update(kind="export", format=opened.format, structure=structure, dtype=opened.dtype, outside_mask=[])
        info["dense_layers"] = _dense_by_rule(dense, names, opened.config, structure)
        meta = opened.meta
        info["metadata"] = {k: meta.get(k) for k in ("arch", "preset", "epoch", "phase", "metrics", "acdc_version",
                                                     "source")}
    else:
        nm = (2, 4)
        layers = [_layer(n, dense[n], dense[n].numel() * dense[n].element_size(), "dense", nm)
                  for n in prunable_names(dense, {}, {})]
        info.update(kind="state_dict", format="dense", structure=None, dense_layers=[], outside_mask=[], flops=None,
                    flops_note="a plain state dict does not say which model it holds")
        info["metadata"] = dict(opened.raw_meta)
    if opened.kind != STATE_DICT:
        info["metadata"]["preset_label"] = _preset_label(opened.config)
    # what an image needs before the model sees it, as the file records it (None: not recorded)
    recorded = opened.meta.get("preprocessing") if opened.kind != STATE_DICT else None
    info["preprocessing"] = recorded if isinstance(recorded, dict) else None
    if opened.kind != STATE_DICT:
        info["flops"], info["flops_note"] = file_flops(opened.arch, opened.model_kwargs, opened.config, dense)

    zeros = sum(layer["zeros"] for layer in layers)
    numel = sum(layer["numel"] for layer in layers)
    # the reference is the same tensors and metadata stored dense (a checkpoint's masks are not part of it)
    dense_bytes = dense_file_bytes(dense, opened.raw_meta)
    info.update(
        sparsity=zeros / max(numel, 1),
        prunable_weights=numel,
        zeros=zeros,
        dense_bytes=dense_bytes,
        ratio_to_dense=info["size_bytes"] / max(dense_bytes, 1),
        # layers that break the N:M structure the file claims (an unstructured file claims none)
        structure_violations=[layer["name"] for layer in layers if layer["nm_valid"] is False]
        if _claims_nm(info["structure"]) else [],
        layers=layers,
    )
    return info
