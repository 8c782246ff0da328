"""Datasets and loaders: ``build(settings, ...)`` returns the train / val / test loaders of a run.
"""

from __future__ import annotations

import torch

from acdc_cli.config import Settings
from acdc_cli.data import cifar, digits, imagefolder
from acdc_cli.data.bundle import SYNTHETIC_MEAN, SYNTHETIC_STD, DataBundle, split_val
from acdc_cli.data.policies import build_policy
from acdc_cli.data.preprocessing import digits_mean_std
from acdc_cli.data.tensor_loader import TensorLoader
from acdc_cli.errors import AcdcError
from acdc_cli.models import lookup

# synthetic images are generated in memory (uint8): 4 GiB is ~900,000 CIFAR-sized or ~28,000 ImageNet-sized images
MAX_SYNTHETIC_BYTES = 4 * 2**30


def _digits(settings: Settings, device: torch.device, rank: int, world_size: int) -> DataBundle:
    images, labels = digits.load()
    pool, test = digits.split_test(len(labels))
    train_i, val_i = split_val(len(pool), settings.data.val_size, settings.runtime.seed)
    train_i, val_i = pool[train_i], pool[val_i]
    mean, std = digits_mean_std(settings.data.val_size, settings.runtime.seed)  # of the training images only
    d = settings.data
    common = dict(mean=mean, std=std, seed=settings.runtime.seed, device=device)
    return DataBundle(
        train=TensorLoader(
            images[train_i], labels[train_i], d.batch_size // world_size, shuffle=True, drop_last=True,
            augment=False, rank=rank, world_size=world_size, policy=build_policy(d), **common,
        ),
        val=TensorLoader(images[val_i], labels[val_i], d.eval_batch_size, **common) if len(val_i) else None,
        test=TensorLoader(images[test], labels[test], d.eval_batch_size, **common),
        num_classes=10,
        in_channels=1,
        image_size=8,
    )


def _synthetic(settings: Settings, device: torch.device, rank: int, world_size: int) -> DataBundle:
    """Random uint8 images (fixed seed) at the model's input size: for benchmarks and smoke tests."""
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

    mean, std = (SYNTHETIC_MEAN,) * c, (SYNTHETIC_STD,) * c
    common = dict(mean=mean, std=std, seed=settings.runtime.seed, device=device)
    d = settings.data
    train, val, test = split(n), split(max(n // 4, 1)), split(max(n // 4, 1))  # one draw order whatever val_size
    return DataBundle(
        train=TensorLoader(*train, d.batch_size // world_size, shuffle=True, drop_last=True, augment=d.augment,
                           rank=rank, world_size=world_size, policy=build_policy(d), **common),
        val=TensorLoader(*val, d.eval_batch_size, **common) if d.val_size else None,
        test=TensorLoader(*test, d.eval_batch_size, **common),
        num_classes=num_classes,
        in_channels=c,
        image_size=s,
    )


def _cifar(settings: Settings, device: torch.device, rank: int, world_size: int) -> DataBundle:

    return cifar.build(settings, device, rank, world_size)


def _imagefolder(settings: Settings, device: torch.device, rank: int, world_size: int) -> DataBundle:

    return imagefolder.build(settings, device, rank, world_size)


_BUILDERS = {
    "digits": _digits,
    "synthetic": _synthetic,
    "cifar10": _cifar,
    "cifar100": _cifar,
    "imagenet": _imagefolder,
    "imagefolder": _imagefolder,
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
