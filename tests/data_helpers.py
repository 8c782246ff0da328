"""Small datasets the tests write for the real loaders: CIFAR's python folders and ImageFolder trees of generated
JPEGs. Every test that needs data on disk imports these (nothing is downloaded)."""

import pickle
from pathlib import Path

import numpy as np


def _batch(rng: np.random.Generator, n: int, classes: int, label_key: bytes) -> dict:
    labels = rng.integers(0, classes, n)
    # a class-dependent brightness so that the images carry some signal
    data = (rng.integers(0, 64, (n, 3 * 32 * 32)) + (labels[:, None] * 37) % 192).astype(np.uint8)
    batch = {b"batch_label": b"fixture batch", label_key: labels.tolist(), b"data": data,
             b"filenames": [b"img_%05d.png" % i for i in range(n)]}
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = (labels // 5).tolist()
    return batch


def write_cifar10(root: Path, train: int = 250, test: int = 50, seed: int = 0) -> Path:
    """``root/cifar-10-batches-py/`` with data_batch_1..5, test_batch and batches.meta; returns root."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        # protocol 2 as the original (Python 2) files; bytes then go through _codecs.encode
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(_batch(rng, train // 5, 10, b"labels"), protocol=2))
    (folder / "test_batch").write_bytes(pickle.dumps(_batch(rng, test, 10, b"labels"), protocol=2))
    meta = {b"label_names": [b"c%d" % i for i in range(10)], b"num_cases_per_batch": train // 5}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


def write_cifar100(root: Path, train: int = 300, test: int = 60, seed: int = 0) -> Path:
    """``root/cifar-100-python/`` with train, test and meta (current pickle protocol); returns root."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train").write_bytes(pickle.dumps(_batch(rng, train, 100, b"fine_labels")))
    (folder / "test").write_bytes(pickle.dumps(_batch(rng, test, 100, b"fine_labels")))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"f%d" % i for i in range(100)]}))
    return root


def write_imagefolder(root: Path, classes: int = 3, train: int = 8, val: int = 2, seed: int = 0) -> Path:
    """``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG`` of small generated images; returns root."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = rng.integers(40, 72, 2)
                pixels = (rng.integers(0, 80, (h, w, 3)) + 60 * c).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"img_{i}.JPEG", quality=90)
    return root
