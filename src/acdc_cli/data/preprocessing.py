"""What a model trained by acdc expects of an image, written into every checkpoint and export so that another tool
(ONNX Runtime, a serving stack) can prepare its inputs without acdc: input shape, channel order, resizing and the
normalization ``(pixels / 255 - mean) / std``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import ValidationError

from acdc_cli.config import Settings
from acdc_cli.data import digits
from acdc_cli.data.bundle import NORMALIZATION, SYNTHETIC_MEAN, SYNTHETIC_STD, crop_sizes, input_shape, split_val
from acdc_cli.errors import AcdcError


def digits_mean_std(val_size: int, seed: int) -> tuple[tuple[float], tuple[float]]:
    """The digits' normalization: mean and (unbiased) standard deviation of the training images only (not val, not
    test), of pixels / 255. Computed from exact integer sums of the uint8 pixels, so the value is the same whatever
    torch's thread count (a float reduction's last bit depends on it, and the files record this value)."""
    images, labels = digits.load()
    pool, _ = digits.split_test(len(labels))
    train_i, _ = split_val(len(pool), val_size, seed)
    pixels = images[pool[train_i]].to(torch.int64)
    n, s1, s2 = pixels.numel(), int(pixels.sum()), int((pixels * pixels).sum())
    mean = s1 / (n * 255)
    std = math.sqrt((n * s2 - s1 * s1) / (n * (n - 1))) / 255
    return (mean,), (std,)


def mean_std(settings: Settings) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The per-channel mean and std a run normalizes with; None for a folder whose statistics are not measured yet."""
    d = settings.data
    if d.name == "digits":
        return digits_mean_std(d.val_size or 0, settings.runtime.seed)
    if d.name in ("cifar10", "cifar100"):
        return NORMALIZATION[d.name]
    if d.name == "synthetic":
        channels = input_shape(d.name, settings.model.name, d.image_size)[0]
        return (SYNTHETIC_MEAN,) * channels, (SYNTHETIC_STD,) * channels
    if d.mean is not None and d.std is not None:  # imagenet or imagefolder: given, or measured by the run
        return tuple(d.mean), tuple(d.std)
    if d.name == "imagenet":
        return NORMALIZATION["imagenet"]
    return None


def preprocessing(config: dict[str, Any]) -> dict[str, Any] | None:
    """The preprocessing recorded beside a model: from the run's settings (a checkpoint's ``config``); None when the
    file records no dataset (a plain state dict imported without ``--data``)."""
    if not isinstance(config, dict) or not isinstance(config.get("data"), dict):
        return None
    try:
        settings = Settings(**config)
        channels, height, width = input_shape(settings.data.name, settings.model.name, settings.data.image_size)
        stats = mean_std(settings)
    except (ValidationError, AcdcError):
        return None
    folder = settings.data.name in ("imagenet", "imagefolder")
    return {
        "input_shape": [channels, height, width],  # (C, H, W) of one image; batches are NCHW float32
        "channel_order": "RGB" if channels == 3 else "gray" if channels == 1 else f"{channels} channels",
        "pixel_scale": 1 / 255,  # uint8 pixels to [0, 1] before the normalization
        "mean": list(stats[0]) if stats else None,
        "std": list(stats[1]) if stats else None,
        "normalize": "(pixels * pixel_scale - mean) / std, per channel",
        # evaluation's resize: the shorter side to resize_shorter_side (bilinear, antialiased), then the centre crop
        "resize_shorter_side": crop_sizes(settings.data.image_size)[1] if folder else None,
        "center_crop": height if folder else None,
        "dataset": settings.data.name,
    }
