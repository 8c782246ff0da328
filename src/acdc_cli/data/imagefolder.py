"""ImageNet (or any dataset) in the ImageFolder layout: ``<dir>/train/<class>/<image>`` and ``<dir>/val/<class>/...``.

The reference pipeline: RandomResizedCrop 224 + horizontal flip for training, resize 256 + center crop 224 for
evaluation. Workers decode and crop to uint8; normalization happens on the training device (4x fewer bytes through
pinned memory). The held-out validation split is carved from ``train/``; ``val/`` is the test split.

``ImageLoader`` offers TensorLoader's interface (``len``, ``set_epoch``, ``iterate(start_batch)``, batches on the
device): the epoch's order comes from (seed, epoch) and is sharded by rank, and each image's augmentation is drawn
from a generator seeded by (seed, epoch, image index), so batches depend neither on the worker count nor on where a
resumed epoch restarts.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from acdc_cli.config import Settings
from acdc_cli.data import DataBundle, split_val
from acdc_cli.data.random_labels import select_random_labels
from acdc_cli.errors import AcdcError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP, RESIZE = 224, 256


def train_transform() -> Callable:
    from torchvision import transforms as T

    return T.Compose([T.RandomResizedCrop(CROP), T.RandomHorizontalFlip(), T.PILToTensor()])


def eval_transform() -> Callable:
    from torchvision import transforms as T

    return T.Compose([T.Resize(RESIZE), T.CenterCrop(CROP), T.PILToTensor()])


def scan(folder: Path) -> tuple[list[str], np.ndarray, list[str]]:
    """(image paths, labels, class names) of one ImageFolder tree; a missing or empty tree is a one-line error."""
    from torchvision.datasets import ImageFolder

    if not folder.is_dir():
        raise AcdcError(f"ImageFolder: expected the folder {folder} (one subfolder of images per class)")
    try:
        tree = ImageFolder(str(folder))
    except FileNotFoundError as exc:
        reason = str(exc).splitlines()[0]
        raise AcdcError(f"ImageFolder {folder}: {reason} (expected {folder}/<class>/<image>.JPEG)") from None
    except OSError as exc:
        raise AcdcError(f"ImageFolder {folder}: cannot read it ({exc.strerror or exc})") from None
    paths = [p for p, _ in tree.samples]
    return paths, np.array([c for _, c in tree.samples], dtype=np.int64), list(tree.classes)


class ImageDataset(Dataset):
    """Images by index; ``__getitem__`` takes (index, augmentation seed) so augmentation is reproducible."""

    def __init__(self, paths: list[str], labels: np.ndarray, transform: Callable, extra: np.ndarray | None = None):
        # one numpy bytes array rather than a list of str: worker processes share its pages instead of copying them
        # (Python objects are copied as soon as their reference counts change), at one byte per character
        self.paths = np.array([os.fsencode(p) for p in paths])
        self.labels = np.asarray(labels, dtype=np.int64)
        self.extra = None if extra is None else np.asarray(extra, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, index: int) -> str:
        return os.fsdecode(self.paths[index])

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, ...]:
        from PIL import Image, UnidentifiedImageError

        index, aug_seed = key
        path = self.path(index)
        try:
            with Image.open(path) as img:
                image = img.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise AcdcError(f"cannot read image {path} ({exc.__class__.__name__})") from None
        # a private RNG state per image, so the main process's stream is untouched when num_workers is 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(aug_seed)
            x = self.transform(image)
        out = (x, int(self.labels[index]))
        return out + (int(self.extra[index]),) if self.extra is not None else out


class _Keys(Sampler):
    """Yields the (index, augmentation seed) keys set for the current pass."""

    def __init__(self) -> None:
        self.keys: list[tuple[int, int]] = []

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


class ImageLoader:
    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        *,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        num_workers: int = 0,
        persistent: bool = False,
    ):
        self.dataset = dataset
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1) * 255.0
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.epoch = 0
        self._keys = _Keys()
        self._loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self._keys,
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
            # the training loader keeps its workers between epochs; evaluation passes start theirs per pass
            persistent_workers=persistent and num_workers > 0,
        )

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch (ranks get equal shares; a remainder < world_size is dropped)."""
        n = len(self.dataset)
        return n // self.world_size if self.world_size > 1 else n

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> torch.Tensor:
        """This rank's sample order for the current epoch."""
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch * 7_919) % (2**63))
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            order = order[: self.num_samples * self.world_size][self.rank :: self.world_size]
        return order

    def _aug_seed(self, index: int) -> int:
        return ((self.seed * 1_000_003 + self.epoch) * 1_000_000_007 + index) % (2**63)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        return self.iterate()

    def iterate(self, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        """Yield (images float normalized on the device, labels[, extra]) from batch ``start_batch`` of the epoch."""
        order = self.indices()[start_batch * self.batch_size :].tolist()
        self._keys.keys = [(i, self._aug_seed(i)) for i in order]
        batches = iter(self._loader)
        try:
            for batch in batches:
                images = self.normalize(batch[0].to(self.device, non_blocking=True))
                yield (images,) + tuple(t.to(self.device, non_blocking=True) for t in batch[1:])
        except AcdcError as exc:
            # stop the workers now: left to garbage collection, each one holds the exit up for 5 s
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            # a worker's error arrives wrapped with its traceback; keep the one line that names the image
            raise AcdcError(str(exc).strip().splitlines()[-1].removeprefix("acdc_cli.errors.AcdcError: ")) from None


def build(settings: Settings, device: torch.device, rank: int, world_size: int) -> DataBundle:
    """Train (minus a seeded held-out val split) and val loaders from ``train/``; the test loader from ``val/``."""
    d, seed = settings.data, settings.runtime.seed
    if d.dir is None:
        raise AcdcError("ImageFolder: data.dir is not set; pass --data-dir PATH (a folder holding train/ and val/)")
    root = Path(d.dir).expanduser()
    if not root.is_dir():
        raise AcdcError(f"ImageFolder: data.dir {root} is not a folder (expected {root}/train and {root}/val)")
    paths, labels, classes = scan(root / "train")
    test_paths, test_labels, test_classes = scan(root / "val")
    if test_classes != classes:
        raise AcdcError(f"ImageFolder: {root}/val has other class folders than {root}/train")
    train_i, val_i = (t.numpy() for t in split_val(len(labels), d.val_size, seed))
    train_labels = labels[train_i]
    augment = d.augment
    memorized = None
    common = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, seed=seed, device=device, num_workers=d.num_workers)
    if d.random_labels:
        positions, random = (t.numpy() for t in select_random_labels(
            torch.from_numpy(train_i), d.random_labels, len(classes), seed))
        picked = train_i[positions]
        memorized = ImageLoader(
            ImageDataset([paths[i] for i in picked], random, eval_transform(), extra=labels[picked]),
            d.eval_batch_size, **common,
        )
        train_labels = train_labels.copy()
        train_labels[positions] = random
        augment = False
    train_set = ImageDataset([paths[i] for i in train_i], train_labels,
                             train_transform() if augment else eval_transform())
    return DataBundle(
        train=ImageLoader(train_set, d.batch_size // world_size, shuffle=True, rank=rank, world_size=world_size,
                          persistent=True, **common),
        val=ImageLoader(ImageDataset([paths[i] for i in val_i], labels[val_i], eval_transform()),
                        d.eval_batch_size, **common),
        test=ImageLoader(ImageDataset(test_paths, test_labels, eval_transform()), d.eval_batch_size, **common),
        num_classes=len(classes),
        in_channels=3,
        image_size=CROP,
        memorized=memorized,
    )
