"""Weights from files acdc did not write: local pretrained weights (``model.weights``) and plain state dicts handed to
``acdc prune`` / ``acdc export`` with ``--model NAME --num-classes N``.

A state dict is read from ``.safetensors`` (an acdc checkpoint or export too) or from a torch file with
``torch.load(weights_only=True)``, which refuses pickled Python objects. The ``module.`` (DistributedDataParallel) and
``_orig_mod.`` (torch.compile) prefixes that wrapped models leave in key names are stripped.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from acdc_cli.errors import AcdcError
from acdc_cli.files.checkpoint import (
    CHECKPOINT_FORMAT,
    MASK_PREFIX,
    Checkpoint,
    check_fit,
    load_checkpoint,
    torch_load_plain,
)
from acdc_cli.files.export import EXPORT_FORMAT
from acdc_cli.files.export import load as load_export
from acdc_cli.files.tensors import read_safetensors
from acdc_cli.models import create, lookup

WRAPPER_PREFIXES = ("module.", "_orig_mod.")


# where training scripts commonly nest the state dict inside a saved dict
_NESTED_KEYS = ("state_dict", "model", "model_state_dict")


def strip_wrappers(name: str) -> str:
    """``name`` without the leading ``module.`` / ``_orig_mod.`` prefixes of DDP- or compile-wrapped models."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a state-dict file, keyed by their unwrapped names. Any defect is a one-line AcdcError."""
    path = Path(path)
    if not path.is_file():
        raise AcdcError(f"no such file: {path}")
    if path.suffix == ".safetensors":
        tensors = _read_safetensors_state(path)
    else:
        tensors = _read_torch_state(path)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        key = strip_wrappers(name)
        if key in out:
            raise AcdcError(f"{path}: {name} and another key both name {key} once prefixes are stripped")
        out[key] = tensor
    return out


def _read_safetensors_state(path: Path) -> dict[str, torch.Tensor]:
    tensors, meta = read_safetensors(path)
    if meta.get("format") == CHECKPOINT_FORMAT:  # masked weights are stored as zeros already
        return {k: v for k, v in tensors.items() if not k.startswith(MASK_PREFIX)}

    if meta.get("format") == EXPORT_FORMAT:
        return load_export(path)
    return tensors


def _read_torch_state(path: Path) -> dict[str, torch.Tensor]:
    loaded = torch_load_plain(path, "a readable torch state dict")
    for key in _NESTED_KEYS:
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
            break
    if not isinstance(loaded, Mapping) or not loaded or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()):
        raise AcdcError(f"{path} holds no state dict (a mapping of parameter names to tensors)")
    return dict(loaded)


def load_pretrained(model: nn.Module, path: Path, skip: list[str], model_name: str) -> list[str]:
    """Load the state dict in ``path`` into ``model``, leaving the keys that match a ``skip`` glob as initialised.
    Every other key of the model must be in the file with its shape, and the file may hold no other key (a mismatch
    is one line naming the first mismatched key). Returns the keys left as initialised."""
    path = Path(path)
    state = read_state_dict(path)
    own = model.state_dict()

    def skipped(key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, pattern) for pattern in skip)

    for pattern in skip:
        if not any(fnmatch.fnmatchcase(k, pattern) for k in [*own, *state]):
            raise AcdcError(f"model.weights_skip pattern '{pattern}' matches no key of {model_name} or {path.name}")
    source = f"model.weights {path}"
    for key, tensor in own.items():
        if skipped(key):
            continue
        if key not in state:
            raise AcdcError(f"{source} does not fit {model_name}: it lacks {key}")
        if state[key].shape != tensor.shape:
            module = key.rsplit(".", 1)[0]
            raise AcdcError(f"{source} does not fit {model_name}: {key} is {tuple(state[key].shape)} in the file, "
                            f"{tuple(tensor.shape)} in the model (to leave it as initialised: "
                            f"model.weights_skip = [\"{module}.*\"])")
    unexpected = [k for k in state if k not in own and not skipped(k)]
    if unexpected:
        raise AcdcError(f"{source} does not fit {model_name}: it has {unexpected[0]}, which the model lacks")
    model.load_state_dict({k: v for k, v in state.items() if not skipped(k)}, strict=False)
    return [k for k in own if skipped(k)]


def import_state_dict(path: Path, model_name: str, num_classes: int) -> Checkpoint:
    """A plain state dict as a dense checkpoint of ``model_name`` at ``num_classes`` classes (the model is built to
    check every name and shape), for the commands that read checkpoints."""
    if num_classes < 1:
        raise AcdcError(f"--num-classes must be at least 1, got {num_classes}")
    path = Path(path)
    state = read_state_dict(path)
    entry, _ = lookup(model_name)
    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_channels": entry.in_channels}
    with torch.device("meta"):  # names and shapes first, before any memory is spent on the model
        check_fit(create(model_name, **kwargs).state_dict(), state, f"{path} (as {model_name})")
    model = create(model_name, **kwargs)
    model.load_state_dict(state)
    return Checkpoint(
        weights={k: v.detach() for k, v in model.state_dict().items()},
        masks={},
        arch=model_name,
        model_kwargs=kwargs,
        config={},
        epoch=0,
        phase="dense",
        extra={"kind": "import", "imported_from": path.name},
    )


def load_source(path: Path, model_name: str | None = None, num_classes: int | None = None) -> Checkpoint:
    """What ``acdc prune`` and ``acdc export`` read: an acdc checkpoint, or with ``model_name`` and ``num_classes``
    a plain state dict (``.safetensors`` or a torch file)."""
    path = Path(path)
    if model_name is None and num_classes is None:
        found = _safetensors_format(path)
        hint = "for a plain state dict give --model NAME --num-classes N"
        if found is not None and found != CHECKPOINT_FORMAT:
            raise AcdcError(f"{path} is not an acdc checkpoint (format: {found or 'no acdc metadata'}); {hint}")
        if found is None and path.is_file() and path.suffix != ".safetensors":
            raise AcdcError(f"{path} is not an acdc checkpoint (a .safetensors file); {hint}")
        return load_checkpoint(path)
    if model_name is None or num_classes is None:
        raise AcdcError("a plain state dict needs both --model NAME and --num-classes N")
    if _safetensors_format(path) == CHECKPOINT_FORMAT:
        raise AcdcError(f"{path} is an acdc checkpoint, which records its own model: drop --model and --num-classes")
    return import_state_dict(path, model_name, num_classes)


def _safetensors_format(path: Path) -> str | None:
    """The ``format`` metadata of a readable safetensors file ("" when it has none); None for anything else."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return (fh.metadata() or {}).get("format", "")
    except Exception:  # not a safetensors file: the reader that follows says what is wrong with it
        return None
