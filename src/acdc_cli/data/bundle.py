"""What every dataset hands a run (the DataBundle of loaders), its validation split, and what a model must take to be
evaluated on it.
"""

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
SYNTHETIC_MEAN, SYNTHETIC_STD = 0.5, 0.29  # of uniform random uint8 pixels scaled to [0, 1]
# per-channel (mean, std) of the pixels in [0, 1] of the datasets with fixed statistics: the reference's (and the
# usual) CIFAR ones, and ImageNet's
NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def selection_split(settings: Settings) -> str:
    """"val" when the run holds a validation split out of its training images; "test" for ``data.val_size = 0``,
    the paper's protocol: every training image trains, and the per-epoch metrics (``test_*``) and the choice of
    best_sparse / best_dense come from the test split."""
    return "test" if settings.data.val_size == 0 else "val"  # None: a folder's own share, never 0


def split_val(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (train, val) indices of a pool of ``n`` samples; ``val_size = 0``: every sample, in order, trains."""
    if val_size == 0:
        return torch.arange(n), torch.arange(0)
    if val_size >= n:
        raise AcdcError(f"data.val_size ({val_size}) must be smaller than the training split ({n} images)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    return order[val_size:], order[:val_size]


def crop_sizes(image_size: int | None) -> tuple[int, int]:
    """(crop, resize) of an ImageFolder pipeline: the crop side (224 unless data.image_size) and the shorter side
    evaluation resizes to first, in the reference's 256:224 ratio."""
    crop = image_size or CROP
    return crop, round(crop * RESIZE / CROP)


def input_shape(data_name: str, model_name: str, image_size: int | None) -> tuple[int, int, int]:
    """(channels, height, width) of the images a dataset feeds the model, known without reading any data: what FLOPs
    are counted at. ``image_size`` is ``data.image_size`` (None: the folder datasets' default); no default here, so
    that no caller checks a folder model at a size the run will not use."""
    if data_name == "digits":
        return 1, 8, 8
    if data_name in ("cifar10", "cifar100"):
        return 3, 32, 32
    if data_name in ("imagenet", "imagefolder"):
        return 3, crop_sizes(image_size)[0], crop_sizes(image_size)[0]

    entry, _ = lookup(model_name)  # synthetic images come at the model's own input size
    return entry.in_channels, entry.input_size, entry.input_size


# classes of the datasets whose class count is known without reading them (an ImageFolder tree has as many as folders)
KNOWN_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100}


def check_model_fits(model: torch.nn.Module, shape: tuple[int, int, int], num_classes: int | None,
                     device: torch.device | str, source: str, data_name: str) -> None:
    """One line naming both sides when ``model`` cannot take the dataset's images of ``shape`` (channels, input size)
    or predicts another number of classes than ``num_classes`` (None: not known yet); found with one forward pass of a
    single blank image, so any model (ONNX Runtime too) is checked the way it will be used."""
    c, h, w = shape
    data = f"data.name '{data_name}' ({c}x{h}x{w} images" + (f", {num_classes} classes)" if num_classes else ")")
    hint = "name the data the model was trained on with --data NAME (and --data-dir PATH)"
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros((1, c, h, w), device=device))
    except AcdcError:
        raise
    except Exception as exc:  # torch's shape errors are RuntimeErrors, ONNX Runtime's are its own types
        text = str(exc).strip()
        reason = text.splitlines()[0][:200] if text else exc.__class__.__name__
        raise AcdcError(f"the model of {source} does not take the images of {data}: {reason}; {hint}") from None
    finally:
        model.train(was_training)
    if out.ndim != 2 or (num_classes is not None and out.shape[1] != num_classes):
        raise AcdcError(f"the model of {source} predicts {out.shape[-1]} classes, but {data}; {hint}")


def model_input(arch: str, model_kwargs: dict[str, Any], input_size: int | None) -> tuple[int, int]:
    """(channels, side) of the images the model takes: the registry's defaults unless ``input_size`` is given."""
    entry, _ = lookup(arch)
    channels = model_kwargs.get("in_channels") or entry.in_channels
    side = entry.input_size if input_size is None else input_size
    if not isinstance(side, int) or side < 1:
        raise AcdcError(f"--input-size expects a positive integer, got {input_size!r}")
    return int(channels), side
