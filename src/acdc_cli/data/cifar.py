"""CIFAR-10 / CIFAR-100 from the "python version" files, read straight into uint8 tensors.

Accepted layouts for ``data.dir`` (CIFAR-100 names in brackets):

- a folder holding ``cifar-10-batches-py/`` (``cifar-100-python/``), as torchvision and the reference download it;
- that ``cifar-10-batches-py/`` (``cifar-100-python/``) folder itself;
- a folder holding the original ``cifar-10-python.tar.gz`` (``cifar-100-python.tar.gz``), read without unpacking.

The batch files are Python pickles. They are read with an unpickler that only admits what a CIFAR batch holds
(dicts, lists, bytes and numpy uint8 arrays), so a file that tries to call anything else is refused, never run.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from acdc_cli.config import Settings
from acdc_cli.data.bundle import NORMALIZATION, DataBundle, split_val
from acdc_cli.data.policies import build_policy
from acdc_cli.data.random_labels import select_random_labels
from acdc_cli.data.tensor_loader import TensorLoader
from acdc_cli.errors import AcdcError


@dataclass(frozen=True)
class CifarFormat:
    title: str
    folder: str  # the "python version" folder name
    archive: str  # the original download's file name
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


FORMATS = {
    "cifar10": CifarFormat(
        "CIFAR-10", "cifar-10-batches-py", "cifar-10-python.tar.gz",
        tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "labels", 10,
        *NORMALIZATION["cifar10"],
    ),
    "cifar100": CifarFormat(
        "CIFAR-100", "cifar-100-python", "cifar-100-python.tar.gz", ("train",), ("test",), "fine_labels", 100,
        *NORMALIZATION["cifar100"],
    ),
}

# the only callables a CIFAR batch pickle needs: numpy array/dtype reconstruction (numpy 1.x and 2.x module names,
# pickle protocols 2-5) and the latin-1 bytes encoding Python 3 writes for bytes at protocol 2
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class RefusedPickle(pickle.UnpicklingError):
    """The pickle asked for something a CIFAR batch never holds."""


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise RefusedPickle(f"it asks for {module}.{name}, which a CIFAR batch never holds")
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedPickle("it holds a persistent id, which a CIFAR batch never does")


def read_batch(raw: bytes, source: str, fmt: CifarFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch file's bytes -> (uint8 images (N, 3, 32, 32), int64 labels (N,))."""
    try:
        obj = _BatchUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except RefusedPickle as exc:
        raise AcdcError(f"{source}: refused to load ({exc})") from None
    except Exception as exc:  # truncated or garbled pickles raise a zoo of types (EOFError, ValueError, ...)
        reason = f"unreadable pickle: {exc.__class__.__name__}"
        raise AcdcError(f"{source} is not a {fmt.title} batch file ({reason})") from None
    if not isinstance(obj, dict):
        raise AcdcError(f"{source} is not a {fmt.title} batch file (expected a dict, got {type(obj).__name__})")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    for key in ("data", fmt.label_key):
        if key not in batch:
            raise AcdcError(f"{source} is not a {fmt.title} batch file (no '{key}' entry)")
    data, labels = batch["data"], batch[fmt.label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise AcdcError(f"{source} is not a {fmt.title} batch file ('data' must be uint8 (N, 3072), got {got})")
    try:
        # no dtype here: asking numpy for int64 would truncate a label 0.5 to 0 without a word
        label_array = np.asarray(labels)
    except (TypeError, ValueError, OverflowError, RecursionError):
        label_array = None
    if label_array is None or label_array.dtype.kind not in "iu":
        raise AcdcError(f"{source} is not a {fmt.title} batch file ('{fmt.label_key}' is not a list of integers)")
    if label_array.ndim != 1:
        shape = " x ".join(map(str, label_array.shape)) or "()"
        raise AcdcError(f"{source}: '{fmt.label_key}' has shape {shape}; expected one list of {data.shape[0]} labels")
    if label_array.shape != (data.shape[0],):
        raise AcdcError(f"{source}: {data.shape[0]} images but {label_array.size} labels")
    label_array = label_array.astype(np.int64)
    if label_array.size and (label_array.min() < 0 or label_array.max() >= fmt.num_classes):
        raise AcdcError(f"{source}: labels outside 0..{fmt.num_classes - 1}")
    images = torch.from_numpy(np.ascontiguousarray(data)).view(-1, 3, 32, 32)
    return images, torch.from_numpy(label_array)


def _concat(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _read_folder(folder: Path, fmt: CifarFormat) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for split, names in (("train", fmt.train_files), ("test", fmt.test_files)):
        parts = []
        for name in names:
            path = folder / name
            if not path.is_file():
                raise AcdcError(f"{fmt.title}: missing {path} (expected {', '.join(names)} in {folder})")
            try:
                raw = path.read_bytes()
            except OSError as exc:
                raise AcdcError(f"{fmt.title}: cannot read {path}: {exc.strerror or exc}") from None
            parts.append(read_batch(raw, str(path), fmt))
        out[split] = _concat(parts)
    return out


def _read_archive(archive: Path, fmt: CifarFormat) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for split, names in (("train", fmt.train_files), ("test", fmt.test_files)):
                parts = []
                for name in names:
                    member = f"{fmt.folder}/{name}"
                    try:
                        fh = tar.extractfile(member)
                    except KeyError:
                        fh = None
                    if fh is None:
                        raise AcdcError(f"{fmt.title}: {archive} lacks {member}")
                    parts.append(read_batch(fh.read(), f"{archive}:{member}", fmt))
                out[split] = _concat(parts)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise AcdcError(f"{fmt.title}: {archive} is not a readable .tar.gz ({exc.__class__.__name__})") from None
    return out


def _download(root: Path, fmt: CifarFormat) -> None:
    """Fetch the original archive with torchvision's helper (checksum verified); only when data.download is set."""
    from torchvision.datasets import CIFAR10, CIFAR100
    from torchvision.datasets.utils import download_url

    source = CIFAR10 if fmt.folder == CIFAR10.base_folder else CIFAR100
    try:
        root.mkdir(parents=True, exist_ok=True)
        download_url(source.url, str(root), filename=fmt.archive, md5=source.tgz_md5)
    except Exception as exc:  # urllib, socket and checksum failures have no common base class
        first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise AcdcError(f"{fmt.title}: download into {root} failed ({first})") from None


def load(name: str, root: Path | None, download: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"train": (images, labels), "test": (images, labels)}`` from any of the accepted layouts."""
    fmt = FORMATS[name]
    if root is None:
        raise AcdcError(
            f"{fmt.title}: data.dir is not set; pass --data-dir PATH (a folder holding {fmt.folder}/ or {fmt.archive})"
        )
    root = Path(root).expanduser()
    if (root / fmt.folder).is_dir():
        return _read_folder(root / fmt.folder, fmt)
    if root.name == fmt.folder and root.is_dir():
        return _read_folder(root, fmt)
    if (root / fmt.archive).is_file():
        return _read_archive(root / fmt.archive, fmt)
    if download:
        _download(root, fmt)
        return _read_archive(root / fmt.archive, fmt)
    raise AcdcError(
        f"{fmt.title} not found: expected {root / fmt.folder}/ or {root / fmt.archive} "
        "(point --data-dir / data.dir at the folder that holds it, or set data.download=true to fetch it: "
        "acdc train --download)"
    )


def build(settings: Settings, device: torch.device, rank: int, world_size: int) -> DataBundle:
    """Train (minus a seeded held-out val split; every training image when ``data.val_size = 0``, then no val
    loader), val and test loaders; the splits live on ``device``.

    With ``data.random_labels = N``, N training images get uniformly random labels and augmentation is off for the
    whole training set (as the reference runs memorization); ``memorized`` yields (x, random label, true label).
    """
    d, seed = settings.data, settings.runtime.seed
    fmt = FORMATS[d.name]
    splits = load(d.name, d.dir, d.download)
    images, labels = splits["train"]
    train_i, val_i = split_val(len(labels), d.val_size, seed)
    train_labels = labels[train_i]
    augment = d.augment
    memorized = None
    common = dict(mean=fmt.mean, std=fmt.std, seed=seed, device=device)
    if d.random_labels:
        positions, random = select_random_labels(train_i, d.random_labels, fmt.num_classes, seed)
        memorized = TensorLoader(images[train_i[positions]], random, d.eval_batch_size,
                                 extra=labels[train_i[positions]], **common)
        train_labels = train_labels.clone()
        train_labels[positions] = random
        augment = False
    return DataBundle(
        train=TensorLoader(images[train_i], train_labels, d.batch_size // world_size, shuffle=True, drop_last=True,
                           augment=augment, rank=rank, world_size=world_size,
                           policy=build_policy(d) if augment else None, **common),
        val=TensorLoader(images[val_i], labels[val_i], d.eval_batch_size, **common) if len(val_i) else None,
        test=TensorLoader(*splits["test"], d.eval_batch_size, **common),
        num_classes=fmt.num_classes,
        in_channels=3,
        image_size=32,
        memorized=memorized,
    )
