"""Weights from files acdc did not write: local pretrained weights (``model.weights``) and plain state dicts handed to
``acdc prune`` / ``acdc export`` with ``--model NAME --num-classes N``.

What a file holds is :mod:`acdc_cli.files.open`'s to say; here are the tensors once read: a torch file read with
``torch.load(weights_only=True)``, which refuses pickled Python objects; the ``module.`` (DistributedDataParallel) and
``_orig_mod.`` (torch.compile) prefixes that wrapped models leave in key names stripped; a state dict checked against
a model and loaded into it, or made into a dense checkpoint.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from acdc_cli.errors import AcdcError
from acdc_cli.files.torchfile import torch_load_plain

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


def unwrapped(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """``tensors`` keyed by their unwrapped names (:func:`strip_wrappers`); two keys naming one are an AcdcError."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        key = strip_wrappers(name)
        if key in out:
            raise AcdcError(f"{path}: {name} and another key both name {key} once prefixes are stripped")
        out[key] = tensor
    return out


def read_torch_state(path: Path) -> dict[str, torch.Tensor]:
    loaded = torch_load_plain(path, "a readable torch state dict")
    for key in _NESTED_KEYS:
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
            break
    if not isinstance(loaded, Mapping) or not loaded or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()):
        raise AcdcError(f"{path} holds no state dict (a mapping of parameter names to tensors)")
    return dict(loaded)


def fit_pretrained(model: nn.Module, state: dict[str, torch.Tensor], path: Path, skip: list[str],
                   model_name: str) -> list[str]:
    """Load ``state`` (read from ``path``) into ``model``, leaving the keys that match a ``skip`` glob as
    initialised. Every other key of the model must be in the file with its shape, and the file may hold no other key
    (a mismatch is one line naming the first mismatched key). Returns the keys left as initialised."""
    path = Path(path)
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


def check_num_classes(num_classes: int) -> None:
    if num_classes < 1:
        raise AcdcError(f"--num-classes must be at least 1, got {num_classes}")


