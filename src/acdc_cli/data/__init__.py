"""Datasets and loaders: ``build(settings, ...)`` returns the train / val / test loaders of a run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from acdc_cli.config import Settings
from acdc_cli.data import digits
from acdc_cli.data.tensor_loader import TensorLoader
from acdc_cli.errors import AcdcError


# synthetic images are generated in memory (uint8): 4 GiB is ~900,000 CIFAR-sized or ~28,000 ImageNet-sized images
MAX_SYNTHETIC_BYTES = 4 * 2**30


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
        from acdc_cli.data.imagefolder import CROP

        return 3, CROP, CROP
    from acdc_cli.models import lookup

    entry, _ = lookup(model_name)  # synthetic images come at the model's own input size
    return entry.in_channels, entry.input_size, entry.input_size


def _digits(settings: Settings, device: torch.device, rank: int, world_size: int) -> DataBundle:
    images, labels = digits.load()
    pool, test = digits.split_test(len(labels))
    train_i, val_i = split_val(len(pool), settings.data.val_size, settings.runtime.seed)
    train_i, val_i = pool[train_i], pool[val_i]
    # normalization statistics of the training images only
    train_float = images[train_i].float() / 255.0
    mean, std = (train_float.mean().item(),), (train_float.std().item(),)
    d = settings.data
    common = dict(mean=mean, std=std, seed=settings.runtime.seed, device=device)
    return DataBundle(
        train=TensorLoader(
            images[train_i], labels[train_i], d.batch_size // world_size, shuffle=True, drop_last=True,
            augment=False, rank=rank, world_size=world_size, **common,
        ),
        val=TensorLoader(images[val_i], labels[val_i], d.eval_batch_size, **common) if len(val_i) else None,
        test=TensorLoader(images[test], labels[test], d.eval_batch_size, **common),
        num_classes=10,
        in_channels=1,
        image_size=8,
    )


def _synthetic(settings: Settings, device: torch.device, rank: int, world_size: int) -> DataBundle:
    """Random uint8 images (fixed seed) at the model's input size: for benchmarks and smoke tests."""
    from acdc_cli.models import lookup

    entry, _ = lookup(settings.model.name)
    n, c, s = settings.data.synthetic_size, entry.in_channels, entry.input_size
    images = n + 2 * max(n // 4, 1)  # train, val, test
    if images * c * s * s > MAX_SYNTHETIC_BYTES:
        raise AcdcError(f"data.synthetic_size {n}: {images:,} images of {c}x{s}x{s} bytes for {settings.model.name} "
                        f"exceed the {MAX_SYNTHETIC_BYTES // 2**30} GiB acdc generates; lower it")
    g = torch.Generator().manual_seed(settings.runtime.seed)
    num_classes = 10

    def split(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randint(0, 256, (count, c, s, s), generator=g, dtype=torch.uint8),
                torch.randint(0, num_classes, (count,), generator=g))

    mean, std = (0.5,) * c, (0.29,) * c
    common = dict(mean=mean, std=std, seed=settings.runtime.seed, device=device)
    d = settings.data
    train, val, test = split(n), split(max(n // 4, 1)), split(max(n // 4, 1))  # one draw order whatever val_size
    return DataBundle(
        train=TensorLoader(*train, d.batch_size // world_size, shuffle=True, drop_last=True, augment=d.augment,
                           rank=rank, world_size=world_size, **common),
        val=TensorLoader(*val, d.eval_batch_size, **common) if d.val_size else None,
        test=TensorLoader(*test, d.eval_batch_size, **common),
        num_classes=num_classes,
        in_channels=c,
        image_size=s,
    )


def _cifar(settings: Settings, device: torch.device, rank: int, world_size: int) -> DataBundle:
    from acdc_cli.data import cifar  # imported on use: it builds on this module's DataBundle

    return cifar.build(settings, device, rank, world_size)


def _imagefolder(settings: Settings, device: torch.device, rank: int, world_size: int) -> DataBundle:
    from acdc_cli.data import imagefolder  # imported on use: it builds on this module's DataBundle

    return imagefolder.build(settings, device, rank, world_size)


_BUILDERS = {
    "digits": _digits,
    "synthetic": _synthetic,
    "cifar10": _cifar,
    "cifar100": _cifar,
    "imagenet": _imagefolder,
}


def build(settings: Settings, device: torch.device, rank: int = 0, world_size: int = 1) -> DataBundle:
    if settings.data.batch_size % world_size:
        raise AcdcError(
            f"data.batch_size {settings.data.batch_size} does not divide across {world_size} processes"
        )
    builder = _BUILDERS.get(settings.data.name)
    if builder is None:
        raise AcdcError(f"dataset '{settings.data.name}' is not available in this build")
    return builder(settings, device, rank, world_size)
