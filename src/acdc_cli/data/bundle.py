"""What every dataset builder returns (``DataBundle``: train / val / test loaders and what the model needs to
know), the validation split held out of the training images, and the input shapes known without reading data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from acdc_cli.config import Settings
from acdc_cli.errors import AcdcError
from acdc_cli.models import lookup


@dataclass
class DataBundle:
    train: Any  # TensorLoader or ImageLoader: whole batches only (drop_last), set_epoch(), iterate(start_batch)
    val: Any  # None when data.val_size = 0: every training image trains
    test: Any
    num_classes: int
    in_channels: int
    image_size: int
    # memorization: loader over the random-label training samples yielding (x, random_label, true_label)
    memorized: Any = None


CROP, RESIZE = 224, 256


def selection_split(settings: Settings) -> str:
    """"val" when the run holds a validation split out of its training images; "test" for ``data.val_size = 0``,
    the paper's protocol: every training image trains, and the per-epoch metrics (``test_*``) and the choice of
    best_sparse / best_dense come from the test split."""
    return "val" if settings.data.val_size else "test"


def split_val(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (train, val) indices of a pool of ``n`` samples; ``val_size = 0``: every sample, in order, trains."""
    if val_size == 0:
        return torch.arange(n), torch.arange(0)
    if val_size >= n:
        raise AcdcError(f"data.val_size ({val_size}) must be smaller than the training split ({n} images)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    return order[val_size:], order[:val_size]


def input_shape(data_name: str, model_name: str) -> tuple[int, int, int]:
    """(channels, height, width) of the images a dataset feeds the model, known without reading any data: what FLOPs
    are counted at."""
    if data_name == "digits":
        return 1, 8, 8
    if data_name in ("cifar10", "cifar100"):
        return 3, 32, 32
    if data_name == "imagenet":
        return 3, CROP, CROP

    entry, _ = lookup(model_name)  # synthetic images come at the model's own input size
    return entry.in_channels, entry.input_size, entry.input_size


def model_input(arch: str, model_kwargs: dict[str, Any], input_size: int | None) -> tuple[int, int]:
    """(channels, side) of the images the model takes: the registry's defaults unless ``input_size`` is given."""
    entry, _ = lookup(arch)
    channels = model_kwargs.get("in_channels") or entry.in_channels
    side = entry.input_size if input_size is None else input_size
    if not isinstance(side, int) or side < 1:
        raise AcdcError(f"--input-size expects a positive integer, got {input_size!r}")
    return int(channels), side
