"""Checkpoints: one ``.safetensors`` per model (weights, ``mask.<name>`` uint8, JSON metadata) plus a sibling
``.state.pt`` for resume (optimizer, progress, RNG), loaded with ``torch.load(weights_only=True)``.

Every write goes to a temporary file in the same folder, is fsynced, then renamed over the target, so a crash
mid-write leaves the previous file intact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from acdc_cli.errors import AcdcError
from acdc_cli.files.jsonio import FORMAT_VERSION, check_format_version, meta_field
from acdc_cli.files.tensors import (
    read_metadata,
    read_safetensors,
    save_safetensors,
)
from acdc_cli.models import create
from acdc_cli.models.registry import check_fit
from acdc_cli.version import __version__

CHECKPOINT_FORMAT = "acdc-checkpoint"





MASK_PREFIX = "mask."


def host_copy(value: Any) -> Any:
    """``value`` with every tensor copied to the CPU (nested dicts, lists and tuples rebuilt): a snapshot that shares
    no memory with the training state, so it can be written while training goes on."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: host_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [host_copy(v) for v in value]
    if isinstance(value, tuple):
        return tuple(host_copy(v) for v in value)
    return value


def recorded_config(path: Path) -> dict[str, Any]:
    """The settings an acdc checkpoint records (from its header alone); empty when it records none."""
    path = Path(path)
    meta = read_metadata(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise AcdcError(f"{path} is not an acdc checkpoint (format: {meta.get('format', 'no acdc metadata')})")
    check_format_version(meta_field(meta, "format_version", path), path)
    config = meta_field(meta, "config", path, default={})
    if not isinstance(config, dict):
        raise AcdcError(f"{path}: malformed metadata (epoch / config / metrics)")
    _check_config(config, path)
    return config


@dataclass
class Checkpoint:
    weights: dict[str, torch.Tensor]  # the model's state_dict
    masks: dict[str, torch.Tensor]  # weight name -> bool mask (empty in a dense checkpoint)
    arch: str
    model_kwargs: dict[str, Any]  # num_classes, in_channels, dropout, ...
    config: dict[str, Any]  # resolved settings
    epoch: int  # epochs completed
    phase: str  # "dense" | "sparse"
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # other metadata (preset, paper_top1, kind, ...)


def save_checkpoint(path: Path, ckpt: Checkpoint) -> None:
    tensors = dict(ckpt.weights)
    for name, mask in ckpt.masks.items():
        # -0.0 from masking is stored as +0.0 so the file holds plain zeros
        tensors[name] = tensors[name] + 0.0 if tensors[name].is_floating_point() else tensors[name]
        tensors[MASK_PREFIX + name] = mask.to(torch.uint8)
    save_safetensors(path, tensors, {"format": CHECKPOINT_FORMAT, **provenance(ckpt), **ckpt.extra})


def provenance(ckpt: Checkpoint) -> dict[str, Any]:
    """The metadata that every file made from a checkpoint carries: acdc version, model, settings and progress."""
    return {
        "format_version": FORMAT_VERSION,
        "acdc_version": __version__,
        "arch": ckpt.arch,
        "model_kwargs": ckpt.model_kwargs,
        "config": ckpt.config,
        "epoch": ckpt.epoch,
        "phase": ckpt.phase,
        "metrics": ckpt.metrics,
    }


def load_checkpoint(path: Path) -> Checkpoint:
    path = Path(path)
    tensors, meta = read_safetensors(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        found = meta.get("format", "no acdc metadata")
        raise AcdcError(f"{path} is not an acdc checkpoint (format: {found})")
    check_format_version(meta_field(meta, "format_version", path), path)
    stored_masks = {k[len(MASK_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MASK_PREFIX)}
    weights = {k: v for k, v in tensors.items() if not k.startswith(MASK_PREFIX)}
    stray = set(stored_masks) - set(weights)
    if stray:
        raise AcdcError(f"{path}: mask for unknown weight {sorted(stray)[0]}")
    masks = {}
    for name, mask in stored_masks.items():
        if mask.shape != weights[name].shape:
            raise AcdcError(f"{path}: mask shape of {name} does not match its weight")
        if weights[name].dim() < 2 or not weights[name].is_floating_point():
            raise AcdcError(f"{path}: mask for {name}, which is not a conv or linear weight")
        # a mask is 0/1: reading 2, 255 or 0.5 as "keep" would trust a file that is not what acdc wrote
        if mask.dtype not in (torch.uint8, torch.bool):
            raise AcdcError(f"{path}: mask of {name} is {str(mask.dtype).removeprefix('torch.')}; acdc masks are "
                            "0/1 uint8")
        if bool((mask.view(torch.uint8) > 1).any()):
            raise AcdcError(f"{path}: mask of {name} holds values other than 0 and 1")
        masks[name] = mask.bool()
        # weights outside their mask count as pruned everywhere: eval scores, inspect counts and export writes the
        # same tensors (acdc writes zeros there; a file that does not is read as if it did)
        weights[name] = torch.where(masks[name], weights[name], torch.zeros((), dtype=weights[name].dtype))
    arch = meta.get("arch")
    model_kwargs = meta_field(meta, "model_kwargs", path, default={})
    if not isinstance(arch, str) or not isinstance(model_kwargs, dict):
        raise AcdcError(f"{path}: metadata lacks a valid arch / model_kwargs")
    known = {"format", "format_version", "acdc_version", "arch", "model_kwargs", "config", "epoch", "phase", "metrics"}
    extra = {k: meta_field(meta, k, path, text=True) for k in meta if k not in known}
    epoch = meta_field(meta, "epoch", path, default=0)
    config = meta_field(meta, "config", path, default={})
    metrics = meta_field(meta, "metrics", path, default={})
    if (not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0 or not isinstance(config, dict)
            or not isinstance(metrics, dict)):
        raise AcdcError(f"{path}: malformed metadata (epoch / config / metrics)")
    _check_config(config, path)
    return Checkpoint(
        weights=weights,
        masks=masks,
        arch=arch,
        model_kwargs=model_kwargs,
        config=config,
        epoch=epoch,
        phase=str(meta.get("phase", "dense")),
        metrics=metrics,
        extra=extra,
    )


_SECTIONS = ("data", "model", "optim", "schedule", "sparsity", "runtime", "log")


def _check_config(config: dict[str, Any], path: Path) -> None:
    """The saved settings' shape, as far as readers use them before (or without) validating them as settings:
    sections are tables and the sparsity rules are strings."""
    for section in _SECTIONS:
        if not isinstance(config.get(section, {}), dict):
            raise AcdcError(f"{path}: malformed metadata (config section '{section}' is not a table)")
    rules = config.get("sparsity", {})
    if not isinstance(rules.get("structure", ""), str):
        raise AcdcError(f"{path}: malformed metadata (config sparsity.structure is not a string)")
    for key in ("include", "exclude"):
        patterns = rules.get(key, [])
        if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
            raise AcdcError(f"{path}: malformed metadata (config sparsity.{key} is not a list of strings)")


def build_model(ckpt: Checkpoint) -> nn.Module:
    """Rebuild the model a checkpoint describes and load its weights (strict)."""
    return rebuild_model(ckpt.arch, ckpt.model_kwargs, ckpt.weights, f"a {ckpt.arch} checkpoint")


def rebuild_model(arch: str, model_kwargs: dict[str, Any], weights: dict[str, torch.Tensor], source: str) -> nn.Module:
    """The model that a file's metadata describes, with the file's ``weights`` loaded (strict).

    The metadata is checked first on a model built on the meta device, which allocates nothing: a file asking for a
    huge model (num_classes = 10**9) is refused by shape before any memory is spent on it.
    """
    num_classes, kwargs = check_model_fit(arch, model_kwargs, weights, source)
    model = create(arch, num_classes=num_classes, **kwargs)
    model.load_state_dict(weights)
    return model


def check_model_fit(arch: str, model_kwargs: dict[str, Any], weights: dict[str, torch.Tensor],
                    source: str) -> tuple[int, dict[str, Any]]:
    """Raise unless ``weights`` fit, name for name and shape for shape, the model that ``arch`` and ``model_kwargs``
    build (built on the meta device: nothing allocated). Returns num_classes and the other keyword arguments."""
    kwargs = dict(model_kwargs)
    num_classes = kwargs.pop("num_classes", None)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool):
        raise AcdcError(f"{source}: metadata lacks num_classes")
    with torch.device("meta"):
        check_fit(create(arch, num_classes=num_classes, **kwargs).state_dict(), weights, source)
    return num_classes, kwargs


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    check_fit(model.state_dict(), weights, source)
    model.load_state_dict(weights)










def fold_masks(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """The state dict with every masked weight set to +0.0 outside its mask."""
    out = {}
    for name, tensor in ckpt.weights.items():
        mask = ckpt.masks.get(name)
        out[name] = tensor if mask is None else torch.where(mask, tensor, torch.zeros((), dtype=tensor.dtype))
    return out


STATE_FORMAT = "acdc-engine"
