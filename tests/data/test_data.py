"""CIFAR readers on folders in the real "python version" pickle format (and the .tar.gz), ImageFolder on generated
JPEGs, held-out and random-label splits, and rank sharding."""

import io
import os
import pickle
import shlex
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import write_cifar10, write_cifar100, write_imagefolder

from acdc_cli.config import load_settings
from acdc_cli.data import build, cifar
from acdc_cli.data.bundle import split_val
from acdc_cli.data.imagefolder import ImageDataset, ImageLoader
from acdc_cli.data.random_labels import select_random_labels
from acdc_cli.data.tensor_loader import TensorLoader
from acdc_cli.errors import AcdcError

CPU = torch.device("cpu")
# torchvision 0.29 warns on each call to its codecs; acdc silences that at import, pytest restores warnings per test
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


def _settings(name: str, data_dir: Path, *extra: str):
    return load_settings(overrides=[f"data.name='{name}'", f"data.dir='{data_dir}'", *extra])


# ----------------------------------------------------------------------------------------------------------------
# CIFAR readers


def test_cifar10_folder_reads_every_batch_in_order(tmp_path):
    write_cifar10(tmp_path)
    splits = cifar.load("cifar10", tmp_path)
    images, labels = splits["train"]
    assert images.dtype == torch.uint8 and images.shape == (250, 3, 32, 32)
    assert splits["test"][0].shape == (50, 3, 32, 32)
    # the reader keeps the file order and the row layout: 1024 red, then green, then blue values
    first = pickle.loads((tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    last = pickle.loads((tmp_path / "cifar-10-batches-py" / "data_batch_5").read_bytes())
    assert labels[:50].tolist() == first[b"labels"] and labels[-50:].tolist() == last[b"labels"]
    row = first[b"data"][3]
    assert images[3, 0, 0, 5] == row[5] and images[3, 1, 2, 7] == row[1024 + 2 * 32 + 7]
    assert images[3, 2, 31, 31] == row[3071]


def test_cifar100_folder_uses_fine_labels(tmp_path):
    write_cifar100(tmp_path)
    raw = pickle.loads((tmp_path / "cifar-100-python" / "train").read_bytes())
    images, labels = cifar.load("cifar100", tmp_path)["train"]
    assert images.shape == (300, 3, 32, 32)
    assert labels.tolist() == raw[b"fine_labels"]
    assert torch.equal(images.flatten(1), torch.from_numpy(raw[b"data"]))


def test_the_python_folder_itself_is_accepted(tmp_path):
    write_cifar100(tmp_path)
    direct = cifar.load("cifar100", tmp_path / "cifar-100-python")
    assert torch.equal(direct["test"][0], cifar.load("cifar100", tmp_path)["test"][0])


@pytest.mark.parametrize("name, writer", [("cifar10", write_cifar10), ("cifar100", write_cifar100)])
def test_original_tar_gz_reads_like_the_folder(tmp_path, name, writer):
    unpacked = writer(tmp_path / "unpacked")
    fmt = cifar.FORMATS[name]
    packed = tmp_path / "packed"
    packed.mkdir()
    with tarfile.open(packed / fmt.archive, "w:gz") as tar:
        tar.add(unpacked / fmt.folder, arcname=fmt.folder)
    from_tar, from_folder = cifar.load(name, packed), cifar.load(name, unpacked)
    for split in ("train", "test"):
        assert torch.equal(from_tar[split][0], from_folder[split][0])
        assert torch.equal(from_tar[split][1], from_folder[split][1])


def test_missing_dataset_names_what_was_expected_where(tmp_path):
    with pytest.raises(AcdcError) as err:
        cifar.load("cifar100", tmp_path)
    assert f"{tmp_path / 'cifar-100-python'}/" in str(err.value) and "cifar-100-python.tar.gz" in str(err.value)
    with pytest.raises(AcdcError, match="--data-dir"):
        cifar.load("cifar10", None)


def test_missing_batch_file_is_named(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(AcdcError, match=r"missing .*cifar-10-batches-py/data_batch_3"):
        cifar.load("cifar10", tmp_path)


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"\x80\x02}q\x00(X\x04\x00\x00\x00da", "unreadable pickle"),  # truncated
        (b"not a pickle at all", "unreadable pickle"),
        (pickle.dumps([1, 2, 3]), "expected a dict"),
        (pickle.dumps({b"data": np.zeros((4, 3072), np.uint8)}), "no 'labels' entry"),
        (pickle.dumps({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}), "uint8 \\(N, 3072\\)"),
        (pickle.dumps({b"data": np.zeros((4, 3072), np.float32), b"labels": [0] * 4}), "uint8 \\(N, 3072\\)"),
        (pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3}), "4 images but 3 labels"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}), "labels outside 0..9"),
    ],
)
def test_malformed_batches_are_one_line_errors(tmp_path, payload, message):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(payload)
    with pytest.raises(AcdcError, match=message) as err:
        cifar.load("cifar10", tmp_path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


class _Payload:
    """Unpickling this calls os.system, which would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))  # quoted: temp paths may hold spaces


def test_a_pickle_that_calls_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    # the marker really is created when the payload is unpickled without restrictions
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()
    marker.unlink()

    write_cifar100(tmp_path)
    evil = {b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [0], b"filenames": [_Payload(marker)]}
    (tmp_path / "cifar-100-python" / "train").write_bytes(pickle.dumps(evil))
    with pytest.raises(AcdcError, match=r"refused to load .*(posix|os)\.system") as err:
        cifar.load("cifar100", tmp_path)
    assert "train" in str(err.value)
    assert not marker.exists()


def test_refused_inside_the_archive_too(tmp_path):
    marker = tmp_path / "payload-ran"
    write_cifar10(tmp_path / "src")
    (tmp_path / "src" / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(_Payload(marker)))
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    with pytest.raises(AcdcError, match="refused to load"):
        cifar.load("cifar10", tmp_path)
    assert not marker.exists()


def test_corrupt_archive_is_a_one_line_error(tmp_path):
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(AcdcError, match="not a readable .tar.gz"):
        cifar.load("cifar100", tmp_path)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz"):
        pass
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(buffer.getvalue())
    with pytest.raises(AcdcError, match="lacks cifar-100-python/train"):
        cifar.load("cifar100", tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# bundles, splits and memorization


def test_cifar_bundle_splits_normalizes_and_augments(tmp_path):
    write_cifar100(tmp_path)
    settings = _settings("cifar100", tmp_path, "data.val_size=40", "data.batch_size=32", "runtime.seed=3")
    bundle = build(settings, CPU)
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (100, 3, 32)
    assert len(bundle.train.labels) == 260 and len(bundle.val.labels) == 40 and len(bundle.test.labels) == 60
    assert bundle.train.augment and bundle.memorized is None
    assert torch.allclose(bundle.train.mean.flatten() / 255, torch.tensor([0.5071, 0.4867, 0.4408]))
    assert torch.allclose(bundle.train.std.flatten() / 255, torch.tensor([0.2675, 0.2565, 0.2761]))
    # val and train are disjoint pieces of the training file, chosen by the seed
    images, _ = cifar.load("cifar100", tmp_path)["train"]
    train_i, val_i = split_val(300, 40, 3)
    assert torch.equal(bundle.val.images, images[val_i]) and torch.equal(bundle.train.images, images[train_i])
    x, y = next(iter(bundle.train))
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    cifar10 = build(_settings("cifar10", write_cifar10(tmp_path / "c10"), "data.val_size=10"), CPU)
    assert torch.allclose(cifar10.train.mean.flatten() / 255, torch.tensor([0.4914, 0.4822, 0.4465]))


def test_split_val_is_seeded_and_disjoint():
    a_train, a_val = split_val(1000, 100, seed=1)
    b_train, b_val = split_val(1000, 100, seed=1)
    assert torch.equal(a_val, b_val) and not torch.equal(a_val, split_val(1000, 100, seed=2)[1])
    assert len(set(a_val.tolist()) | set(a_train.tolist())) == 1000
    assert not set(a_val.tolist()) & set(a_train.tolist())


def test_random_label_selection_is_seeded_and_disjoint_from_val():
    train_i, val_i = split_val(2000, 300, seed=5)
    positions, labels = select_random_labels(train_i, 500, 10, seed=5)
    again_positions, again_labels = select_random_labels(train_i, 500, 10, seed=5)
    assert torch.equal(positions, again_positions) and torch.equal(labels, again_labels)
    other, _ = select_random_labels(train_i, 500, 10, seed=6)
    assert not torch.equal(positions, other)
    picked = set(train_i[positions].tolist())
    assert len(picked) == 500 and not picked & set(val_i.tolist())
    assert labels.min() >= 0 and labels.max() <= 9
    # uniform over the classes: every class drawn, none far from 50 of 500
    counts = torch.bincount(labels, minlength=10)
    assert counts.min() > 25 and counts.max() < 80
    with pytest.raises(AcdcError, match="exceeds the 1700 images"):
        select_random_labels(train_i, 1701, 10, seed=5)


def test_memorization_bundle(tmp_path):
    write_cifar10(tmp_path)
    settings = _settings("cifar10", tmp_path, "data.val_size=50", "data.random_labels=60", "runtime.seed=4")
    bundle = build(settings, CPU)
    images, labels = cifar.load("cifar10", tmp_path)["train"]
    train_i, val_i = split_val(250, 50, 4)
    positions, random = select_random_labels(train_i, 60, 10, 4)
    # augmentation is off for the whole training set; the chosen samples carry their random labels there
    assert not bundle.train.augment
    assert torch.equal(bundle.train.labels[positions], random)
    untouched = torch.ones(len(train_i), dtype=torch.bool)
    untouched[positions] = False
    assert torch.equal(bundle.train.labels[untouched], labels[train_i][untouched])
    # the memorized loader yields (x, random label, true label) of exactly those samples
    x, random_labels, true_labels = next(iter(bundle.memorized))
    assert x.shape[0] == 60 and torch.equal(random_labels, random)
    assert torch.equal(true_labels, labels[train_i[positions]])
    assert torch.equal(bundle.memorized.images, images[train_i[positions]])
    assert not set(train_i[positions].tolist()) & set(val_i.tolist())


def test_missing_data_dir_is_one_line(tmp_path):
    with pytest.raises(AcdcError, match="data.dir is not set"):
        build(load_settings(overrides=["data.name='cifar100'"]), CPU)
    with pytest.raises(AcdcError, match="CIFAR-100 not found: expected"):
        build(_settings("cifar100", tmp_path / "nowhere"), CPU)
    with pytest.raises(AcdcError, match="ImageFolder: data.dir is not set"):
        build(load_settings(overrides=["data.name='imagenet'"]), CPU)


def test_tensor_loader_shards_by_rank():
    images = torch.zeros(10, 1, 2, 2, dtype=torch.uint8)
    seen = []
    for rank in (0, 1):
        loader = TensorLoader(images, torch.arange(10), 2, (0.0,), (1.0,), shuffle=True, seed=1, rank=rank,
                              world_size=2)
        loader.set_epoch(3)
        seen.append(torch.cat([y for _, y in loader]).tolist())
    assert len(seen[0]) == len(seen[1]) == 5 and sorted(seen[0] + seen[1]) == list(range(10))


# ----------------------------------------------------------------------------------------------------------------
# ImageFolder


def test_imagefolder_bundle_splits_and_shapes(tmp_path):
    write_imagefolder(tmp_path)
    settings = _settings("imagenet", tmp_path, "data.val_size=6", "data.batch_size=4", "data.num_workers=0")
    bundle = build(settings, CPU)
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (3, 3, 224)
    assert len(bundle.train.dataset) == 18 and len(bundle.val.dataset) == 6 and len(bundle.test.dataset) == 6
    paths = {split: [getattr(bundle, split).dataset.path(i) for i in range(len(getattr(bundle, split).dataset))]
             for split in ("train", "val", "test")}
    assert not set(paths["train"]) & set(paths["val"])
    assert all("/train/" in p for p in paths["train"] + paths["val"]) and all("/val/" in p for p in paths["test"])
    # 18 training images in whole batches of 4: the last 2 wait for the next epoch's shuffle
    assert len(bundle.train) == 4 and bundle.train.num_samples == 16
    assert [len(y) for _, y in bundle.train] == [4, 4, 4, 4]
    x, y = next(iter(bundle.train))
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32 and y.dtype == torch.long
    # normalized with ImageNet statistics: a generated image's pixel values map back into 0..255
    pixels = x * bundle.train.std / 255 * 255 + bundle.train.mean
    assert pixels.min() >= -1e-3 and pixels.max() <= 255 + 1e-3
    images, labels = next(iter(bundle.test))
    assert images.shape == (6, 3, 224, 224) and labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_imagefolder_epochs_are_seeded_and_independent_of_workers(tmp_path):
    write_imagefolder(tmp_path, classes=2, train=6)
    settings = _settings("imagenet", tmp_path, "data.val_size=2", "data.batch_size=5", "data.num_workers=0")
    serial = build(settings, CPU).train
    parallel = build(_settings("imagenet", tmp_path, "data.val_size=2", "data.batch_size=5",
                               "data.num_workers=2"), CPU).train
    serial.set_epoch(1)
    parallel.set_epoch(1)
    a, b = list(serial), list(parallel)
    assert len(a) == 2 and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    # a mid-epoch restart yields the rest of the same epoch; the next epoch differs
    assert torch.equal(next(serial.iterate(start_batch=1))[0], a[1][0])
    serial.set_epoch(2)
    assert not torch.equal(next(iter(serial))[0], a[0][0])


def test_imagefolder_shards_by_rank(tmp_path):
    write_imagefolder(tmp_path, classes=2, train=5, val=1)
    paths = sorted(str(p) for p in (tmp_path / "train").rglob("*.JPEG"))
    dataset = ImageDataset(paths, np.zeros(len(paths), dtype=np.int64), augment=False)
    orders = []
    for rank in (0, 1):
        loader = ImageLoader(dataset, 2, (0.5,) * 3, (0.25,) * 3, shuffle=True, seed=7, rank=rank, world_size=2)
        loader.set_epoch(4)
        orders.append(loader.indices().tolist())
        assert len(loader) == 3
    assert len(orders[0]) == len(orders[1]) == 5 and sorted(orders[0] + orders[1]) == list(range(10))


@pytest.mark.parametrize("workers", [0, 2])
def test_imagefolder_errors(tmp_path, workers):
    with pytest.raises(AcdcError, match=r"expected the folder .*/train"):
        build(_settings("imagenet", tmp_path), CPU)
    (tmp_path / "train" / "n0").mkdir(parents=True)
    (tmp_path / "val").mkdir()
    with pytest.raises(AcdcError, match=r"ImageFolder .*/train: .*expected"):
        build(_settings("imagenet", tmp_path), CPU)
    write_imagefolder(tmp_path / "ok", classes=2, train=4, val=1)
    (tmp_path / "ok" / "train" / "n00000001" / "img_0.JPEG").write_bytes(b"not a jpeg")
    settings = _settings("imagenet", tmp_path / "ok", "data.val_size=1", "data.batch_size=8",
                         f"data.num_workers={workers}")
    # from a worker process the error arrives wrapped in its traceback; it still reads as one line
    with pytest.raises(AcdcError, match=r"cannot read image .*img_0.JPEG") as err:
        for _ in build(settings, CPU).train:
            pass
    assert "\n" not in str(err.value)


def test_digits_statistics_are_exact_and_independent_of_the_thread_count():
    """The files record the digits' mean and std: the same value whatever torch's thread count, equal to float64
    statistics of the training pixels / 255 (unbiased std)."""
    from acdc_cli.data import digits
    from acdc_cli.data.preprocessing import digits_mean_std

    threads = torch.get_num_threads()
    try:
        values = set()
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            values.add(digits_mean_std(270, 0))
    finally:
        torch.set_num_threads(threads)
    assert len(values) == 1
    (mean,), (std,) = values.pop()
    images, labels = digits.load()
    pool, _ = digits.split_test(len(labels))
    train_i, _ = split_val(len(pool), 270, 0)
    pixels = images[pool[train_i]].numpy().astype(np.float64) / 255
    assert mean == pytest.approx(pixels.mean(), rel=1e-13) and std == pytest.approx(pixels.std(ddof=1), rel=1e-12)
    assert digits_mean_std(0, 0) != digits_mean_std(270, 0)  # of the training images only


def test_data_augment_off_turns_the_policy_off_on_every_dataset():
    from acdc_cli.data.policies import build_policy

    for name in ("digits", "synthetic", "cifar10", "imagefolder"):
        on = load_settings(overrides=[f"data.name={name}", "data.augment_policy=trivialaugment"]).data
        off = load_settings(overrides=[f"data.name={name}", "data.augment_policy=trivialaugment",
                                       "data.augment=false"]).data
        assert build_policy(on) is not None and build_policy(off) is None, name
