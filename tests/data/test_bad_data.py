"""The bad-input catalogue for CIFAR and ImageFolder data, 2:4 export and --nproc. Same rules as the rest of the
catalogue: one line on stderr, non-zero exit, no traceback, nothing overwritten, no code run."""

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import fails

from acdc_cli.files.checkpoint import Checkpoint, save_checkpoint
from acdc_cli.models import create

NO_LOGS = ["--set", "log.tensorboard=false", "--set", "log.progress=false"]


# ----------------------------------------------------------------------------------------------------------------
# CIFAR


def cifar_folder(root: Path) -> Path:
    """A CIFAR-10 "python version" folder with two images per batch file."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": np.full((2, 3072), 7, dtype=np.uint8), b"labels": [0, 1]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder


CIFAR = ["--set", "data.name=cifar10", "--set", "model.name=resnet20", "--set", "data.val_size=1", *NO_LOGS]


def test_cifar_folder_with_a_missing_batch_file(tmp_path):
    folder = cifar_folder(tmp_path / "data")
    (folder / "data_batch_3").unlink()
    line = fails(["train", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "r"), *CIFAR])
    assert "missing" in line and "data_batch_3" in line


@pytest.mark.parametrize("damage", ["truncated", "not a pickle", "wrong contents"])
def test_cifar_folder_with_a_corrupt_batch_file(tmp_path, damage):
    folder = cifar_folder(tmp_path / "data")
    batch = folder / "data_batch_2"
    if damage == "truncated":
        batch.write_bytes(batch.read_bytes()[:40])
    elif damage == "not a pickle":
        batch.write_bytes(b"\x00garbage" * 10)
    else:
        batch.write_bytes(pickle.dumps({b"data": np.zeros((2, 10), dtype=np.uint8), b"labels": [0, 1]}))
    before = hashlib.sha256(batch.read_bytes()).hexdigest()
    line = fails(["train", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "r"), *CIFAR])
    assert "data_batch_2" in line and "CIFAR-10 batch file" in line
    assert hashlib.sha256(batch.read_bytes()).hexdigest() == before


class Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_cifar_batch_file_with_a_pickle_payload_never_runs(tmp_path):
    """The CIFAR unpickler, reached through `acdc train`: a batch file with the real entries (uint8 data, labels)
    and the payload where the original files keep image names is refused by name, and the payload never runs."""
    folder = cifar_folder(tmp_path / "data")
    marker = tmp_path / "ran"
    batch = {b"data": np.full((2, 3072), 7, dtype=np.uint8), b"labels": [0, 1], b"filenames": [Payload(marker)]}
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    pickle.loads(pickle.dumps(Payload(marker)))  # the payload is live when unpickled without restrictions
    assert marker.is_dir()
    marker.rmdir()
    line = fails(["train", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "r"), *CIFAR])
    assert f"{folder / 'test_batch'}: refused to load (it asks for posix.mkdir" in line
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------------
# ImageFolder

IMAGENET = ["--set", "data.name=imagenet", "--set", "model.name=tiny-test", "--set", "schedule.method=dense",
            "--set", "schedule.epochs=1", "--set", "data.batch_size=2", "--set", "data.eval_batch_size=2",
            "--set", "data.val_size=1", *NO_LOGS]


def image_tree(root: Path, per_class: int = 2) -> Path:
    from PIL import Image

    for split in ("train", "val"):
        for label in ("cat", "dog"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (16, 16), (40 * i, 90, 200)).save(folder / f"{i}.png")
    return root


def test_imagefolder_with_no_images(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "val"):
        (root / split / "cat").mkdir(parents=True)
    line = fails(["train", "--data-dir", str(root), "--out", str(tmp_path / "r"), *IMAGENET])
    assert "ImageFolder" in line and str(root / "train") in line


@pytest.mark.parametrize("workers", [0, 1])
def test_imagefolder_with_an_unreadable_image(tmp_path, workers):
    root = image_tree(tmp_path / "data")
    bad = root / "train" / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    line = fails(["train", "--data-dir", str(root), "--out", str(tmp_path / "r"), *IMAGENET,
                  "--set", f"data.num_workers={workers}"])
    assert "cannot read image" in line and str(bad) in line


# ----------------------------------------------------------------------------------------------------------------
# export


@pytest.fixture
def unstructured_checkpoint(tmp_path) -> Path:
    """tiny-test with half of conv and fc pruned at random: sparse, but not 2:4."""
    torch.manual_seed(0)
    model = create("tiny-test", num_classes=10, in_channels=3)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    masks = {}
    for name in ("conv.weight", "fc.weight"):
        masks[name] = torch.rand(weights[name].shape) < 0.5
        weights[name] *= masks[name]
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, Checkpoint(weights=weights, masks=masks, arch="tiny-test",
                                     model_kwargs={"num_classes": 10, "in_channels": 3}, config={}, epoch=1,
                                     phase="sparse"))
    return path


def test_export_of_non_24_weights_to_a_24_format(unstructured_checkpoint, tmp_path):
    out = tmp_path / "out.safetensors"
    line = fails(["export", str(unstructured_checkpoint), "--format", "sparse-24-bitmask", "--out", str(out)])
    assert "not 2:4 sparse" in line
    assert not out.exists()


def test_export_to_an_existing_file_without_force(unstructured_checkpoint, tmp_path):
    out = tmp_path / "out.safetensors"
    out.write_text("keep me")
    assert "--force" in fails(["export", str(unstructured_checkpoint), "--format", "dense", "--out", str(out)])
    assert out.read_text() == "keep me"


# ----------------------------------------------------------------------------------------------------------------
# --nproc


def test_nproc_larger_than_the_devices_available(tmp_path):
    if torch.cuda.is_available():
        args, expected = ["--device", "cuda", "--nproc", str(torch.cuda.device_count() + 1)], "CUDA device"
    else:
        args, expected = ["--device", "cpu", "--nproc", str((os.cpu_count() or 1) + 1)], "CPU cores"
    line = fails(["train", "--out", str(tmp_path / "r"), *args])
    assert "--nproc" in line and expected in line
    assert not (tmp_path / "r").exists()
