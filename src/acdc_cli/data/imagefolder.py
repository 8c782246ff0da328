"""ImageNet (or any dataset) in the ImageFolder layout: ``<dir>/train/<class>/<image>`` and ``<dir>/val/<class>/...``.

The reference pipeline: RandomResizedCrop 224 (scale 0.08-1, aspect 3/4-4/3) + horizontal flip for training, resize
256 + center crop 224 for evaluation, bilinear with antialiasing. Images become uint8 (3, 224, 224); normalization
happens on the training device (4x fewer bytes through pinned memory). The held-out validation split is carved from
``train/``; ``val/`` is the test split.

Decoding (``data.decode``):

- ``cpu``: the workers decode JPEGs with ``torchvision.io.decode_jpeg`` (libjpeg-turbo) and crop and resize the uint8
  tensor with ``transforms.v2`` kernels;
- ``gpu``: the workers only read the files and draw the crops; the training process decodes each batch with nvJPEG
  (``decode_jpeg(..., device="cuda")``) and crops and resizes on the GPU;
- ``pil``: PIL decodes and resizes in the workers (the previous pipeline; kept for comparison and odd formats).

Files that are not 8-bit JPEGs with 1 or 3 channels (PNG, CMYK JPEGs, ...) are decoded by PIL in every mode, and an
image with more than ``data.max_image_pixels`` pixels is refused from its header, before anything is decoded.

``ImageLoader`` offers TensorLoader's interface (``len``, ``set_epoch``, ``iterate(start_batch)``, batches on the
device): the epoch's order comes from (seed, epoch) and is sharded by rank, and each image's crop and flip are drawn
from a generator reseeded with (seed, epoch, image index), so batches depend neither on the worker count nor on where
a resumed epoch restarts.
"""

from __future__ import annotations

import math
import os
import random
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from acdc_cli.config import Settings
from acdc_cli.data.bundle import CROP, NORMALIZATION, DataBundle, crop_sizes, split_val
from acdc_cli.data.jpeg import (
    DEFAULT_MAX_PIXELS,
    _decodable_jpeg,
    decode_on_host,
    open_with_pil,
    read_bytes,
)
from acdc_cli.data.policies import build_policy
from acdc_cli.data.random_labels import select_random_labels
from acdc_cli.data.tensor_loader import EpochBatches
from acdc_cli.errors import AcdcError

IMAGENET_MEAN, IMAGENET_STD = NORMALIZATION["imagenet"]




# the reference's RandomResizedCrop (torchvision's defaults): area fraction and aspect ratio ranges
CROP_SCALE = (0.08, 1.0)


CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


# torchvision.datasets.ImageFolder's list, so that a tree holds the same images as it did for the reference
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


DECODERS = ("cpu", "gpu", "pil")


# torchvision 0.29 deprecates its image codecs in favour of TorchCodec and warns on every call; acdc uses them on
# purpose (they ship with the pinned torchvision) and would otherwise repeat the warning once per image
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated",
                        category=DeprecationWarning)


def default_num_workers() -> int:
    """Loader workers per training process when ``data.num_workers`` is unset: the cores this process may run on,
    shared among the processes of this machine (torchrun's LOCAL_WORLD_SIZE), minus one for the training process."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_processes = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1), 1)
    return max(cores // local_processes - 1, 0)


class CropPlan(NamedTuple):
    """Where a training image is cropped, and whether it is flipped."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


def draw_crop(height: int, width: int, rng: random.Random) -> CropPlan:
    """RandomResizedCrop's window and RandomHorizontalFlip's coin for one image, drawn from ``rng``: the same
    distribution as torchvision's ``RandomResizedCrop.get_params`` (ten tries at a random area and log-uniform aspect,
    then the largest centred window of an allowed aspect) followed by a fair coin."""
    area = height * width
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*CROP_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return CropPlan(top, left, h, w, rng.random() < 0.5)
    aspect = width / height
    if aspect < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif aspect > CROP_RATIO[1]:
        h, w = height, int(round(height * CROP_RATIO[1]))
    else:
        w, h = width, height
    return CropPlan((height - h) // 2, (width - w) // 2, h, w, rng.random() < 0.5)


def _interleaved(image: torch.Tensor) -> torch.Tensor:
    """The same (3, H, W) values with the channels interleaved in memory (H, W, 3), as decoders write them."""
    return image.permute(1, 2, 0).contiguous().permute(2, 0, 1)


def train_pixels(image: torch.Tensor, plan: CropPlan, size: int = CROP) -> torch.Tensor:
    """uint8 (3, H, W) on any device -> the planned crop resized to (3, size, size), flipped when planned (on the CPU
    with the channels interleaved in memory)."""
    from torchvision.transforms.v2 import functional as F

    crop = image[:, plan.top : plan.top + plan.height, plan.left : plan.left + plan.width]
    if crop.device.type == "cpu":
        # the CPU's uint8 resize kernel works on interleaved channels: a copied crop in that layout comes back in it,
        # where a strided view of the crop costs a repacking on the way in and another on the way out (30 % of it)
        crop = _interleaved(crop)
    out = F.resize(crop, [size, size], antialias=True)
    return out.flip(-1) if plan.flip else out


def eval_pixels(image: torch.Tensor, size: int = CROP) -> torch.Tensor:
    """uint8 (3, H, W) on any device -> shorter side resized to 256, centre 224x224 (for another crop ``size``, the
    same 256:224 ratio)."""
    from torchvision.transforms.v2 import functional as F

    crop, resize = crop_sizes(size)
    return F.center_crop(F.resize(image, [resize], antialias=True), [crop, crop])


def _pil_pixels(image: Any, plan: CropPlan | None, size: int = CROP) -> torch.Tensor:
    """The same augmentation with PIL's resampling (data.decode = "pil"), as the reference's torchvision transforms
    apply it to PIL images."""
    from PIL import Image
    from torchvision.transforms.v2.functional import pil_to_tensor

    if plan is not None:
        # crop, then resize: resize(box=...) would let the filter reach pixels outside the crop
        box = (plan.left, plan.top, plan.left + plan.width, plan.top + plan.height)
        image = image.crop(box).resize((size, size), Image.BILINEAR)
        if plan.flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return pil_to_tensor(image)
    width, height = image.size
    crop, resize = crop_sizes(size)
    # torchvision's Resize(256): the shorter side becomes 256, the longer keeps the aspect (rounded down)
    if width <= height:
        shape = (resize, int(resize * height / width))
    else:
        shape = (int(resize * width / height), resize)
    image = image.resize(shape, Image.BILINEAR)
    top, left = int(round((shape[1] - crop) / 2.0)), int(round((shape[0] - crop) / 2.0))
    return pil_to_tensor(image.crop((left, top, left + crop, top + crop)))


class EncodedJpeg(NamedTuple):
    """A JPEG the training process decodes on its device (data.decode = "gpu"), with its crop (None: evaluation)."""

    data: bytearray  # the file's bytes
    plan: CropPlan | None
    path: str


class DeviceBatch(NamedTuple):
    """One batch before device decoding: JPEG bytes for the device, host-decoded pixels for every other file. The
    files travel from a worker as one flat tensor: one shared-memory block per batch instead of one per image."""

    data: torch.Tensor  # uint8: the JPEG files, one after the other
    lengths: list[int]
    plans: list[CropPlan | None]
    paths: list[str]
    encoded_at: torch.Tensor  # positions of the JPEGs in the batch
    pixels: torch.Tensor  # uint8 (k, 3, size, size)
    pixels_at: torch.Tensor

    @property
    def count(self) -> int:
        return len(self.lengths) + len(self.pixels)

    def files(self) -> list[torch.Tensor]:
        """Each JPEG's bytes, as views into ``data``."""
        return list(self.data.split(self.lengths)) if self.lengths else []


def collate_interleaved(items: list[tuple[Any, ...]]) -> list[Any]:
    """Batches of (uint8 (3, 224, 224) image, label[, extra]) items as the default collate makes them, but the
    images stacked with interleaved channels (channels_last): each image is then one contiguous copy, and a
    channels_last model takes the batch as it is."""
    batch = default_collate([(item[0].permute(1, 2, 0),) + tuple(item[1:]) for item in items])
    return [batch[0].permute(0, 3, 1, 2)] + batch[1:]


def collate_for_device(items: list[tuple[Any, ...]]) -> tuple[Any, ...]:
    """Batches of (EncodedJpeg or pixels, label[, extra]) items: labels stacked, JPEGs left for the device."""
    encoded: list[EncodedJpeg] = []
    encoded_at, pixels, pixels_at = [], [], []
    for position, (image, *_) in enumerate(items):
        if isinstance(image, EncodedJpeg):
            encoded.append(image)
            encoded_at.append(position)
        else:
            pixels.append(image)
            pixels_at.append(position)
    flat = bytearray().join(e.data for e in encoded)
    batch = DeviceBatch(
        data=torch.frombuffer(flat, dtype=torch.uint8) if flat else torch.empty(0, dtype=torch.uint8),
        lengths=[len(e.data) for e in encoded],
        plans=[e.plan for e in encoded],
        paths=[e.path for e in encoded],
        encoded_at=torch.tensor(encoded_at, dtype=torch.long),
        pixels=torch.stack(pixels) if pixels else torch.empty(0, dtype=torch.uint8),
        pixels_at=torch.tensor(pixels_at, dtype=torch.long),
    )
    columns = zip(*(item[1:] for item in items))
    return (batch,) + tuple(torch.tensor(column, dtype=torch.long) for column in columns)


def decode_batch(batch: DeviceBatch, device: torch.device, max_pixels: int, size: int = CROP) -> torch.Tensor:
    """uint8 (n, 3, size, size) on ``device``: the JPEGs decoded there in one batched call and cropped there, the
    host-decoded images copied in at their positions."""
    from torchvision.io import ImageReadMode, decode_jpeg

    out = torch.empty((batch.count, 3, size, size), dtype=torch.uint8, device=device)
    if batch.lengths:
        files = batch.files()
        try:
            images = decode_jpeg(files, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            # one file the device decoder refuses fails the whole call: decode one at a time, with the host's
            # decoders (which name the file when they fail too) for those the device refuses
            images = []
            for data, path in zip(files, batch.paths):
                try:
                    images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    images.append(decode_on_host(bytearray(data.numpy().tobytes()), path, max_pixels).to(device))
        crops = [train_pixels(image, plan, size) if plan is not None else eval_pixels(image, size)
                 for image, plan in zip(images, batch.plans)]
        out[batch.encoded_at.to(device)] = torch.stack(crops)
    if len(batch.pixels):
        out[batch.pixels_at.to(device)] = batch.pixels.to(device)
    return out


class ImageDataset(Dataset):
    """Images by index; ``__getitem__`` takes (index, augmentation seed) so augmentation is reproducible."""

    def __init__(self, paths: Sequence[str], labels: np.ndarray, *, augment: bool, decode: str = "cpu",
                 max_pixels: int = DEFAULT_MAX_PIXELS, extra: np.ndarray | None = None, policy: Any = None,
                 size: int = CROP):
        if decode not in DECODERS:
            raise ValueError(f"decode must be one of {DECODERS}, got {decode!r}")
        # one numpy bytes array rather than a list of str: worker processes share its pages instead of copying them
        # (Python objects are copied as soon as their reference counts change), at one byte per character
        self.paths = np.array([os.fsencode(p) for p in paths])
        self.labels = np.asarray(labels, dtype=np.int64)
        self.extra = None if extra is None else np.asarray(extra, dtype=np.int64)
        self.augment, self.decode, self.max_pixels, self.size = augment, decode, max_pixels, size
        self.policy = policy  # data.augment_policy's (policies.AugmentPolicy), after crop and flip (decode cpu, pil)
        # reseeded for every image: each worker process has its own copy, and seeding it costs microseconds where
        # torch.manual_seed cost a tenth of a worker's time
        self._rng = random.Random()

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, index: int) -> str:
        return os.fsdecode(self.paths[index])

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, ...]:
        index, aug_seed = key
        path = self.path(index)
        if self.augment:
            self._rng.seed(aug_seed)
        data = read_bytes(path)
        if self.decode == "pil":
            image = open_with_pil(data, path, self.max_pixels)
            plan = draw_crop(image.height, image.width, self._rng) if self.augment else None
            pixels: Any = _pil_pixels(image, plan, self.size)
        elif self.decode == "gpu" and (header := _decodable_jpeg(data, path, self.max_pixels)) is not None:
            plan = draw_crop(header.height, header.width, self._rng) if self.augment else None
            pixels = EncodedJpeg(data, plan, path)
        else:
            image = decode_on_host(data, path, self.max_pixels)
            if self.augment:
                pixels = train_pixels(image, draw_crop(image.shape[1], image.shape[2], self._rng), self.size)
            else:
                pixels = eval_pixels(image, self.size)
        if self.policy is not None and self.augment and isinstance(pixels, torch.Tensor):
            pixels = self.policy(pixels[None], aug_seed, 0, index)[0]
        out = (pixels, int(self.labels[index]))
        return out + (int(self.extra[index]),) if self.extra is not None else out


class _Keys(Sampler):
    """Yields the (index, augmentation seed) keys set for the current pass."""

    def __init__(self) -> None:
        self.keys: list[tuple[int, int]] = []

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


class ImageLoader(EpochBatches):
    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        *,
        shuffle: bool = False,
        drop_last: bool = False,
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
        self.shuffle, self.drop_last = shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self._keys = _Keys()
        on_device = dataset.decode == "gpu"
        self._loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self._keys,
            num_workers=num_workers,
            collate_fn=collate_for_device if on_device else collate_interleaved,
            # JPEG bytes go to the device decoder from pageable memory; pinning them would cost more than it saves
            pin_memory=self.device.type == "cuda" and not on_device,
            # the training loader keeps its workers between epochs; evaluation passes start theirs per pass
            persistent_workers=persistent and num_workers > 0,
        )

    def _pool_size(self) -> int:
        return len(self.dataset)

    def indices(self) -> torch.Tensor:
        """This rank's sample order for the current epoch."""
        return self.epoch_order()

    def _aug_seed(self, index: int) -> int:
        return ((self.seed * 1_000_003 + self.epoch) * 1_000_000_007 + index) % (2**63)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().sub_(self.mean).div_(self.std)  # in place: one float batch allocated, not three

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        return self.iterate()

    def iterate(self, start_batch: int = 0, *, normalized: bool = True) -> Iterator[tuple[torch.Tensor, ...]]:
        """Yield (images float normalized on the device, labels[, extra]) from batch ``start_batch`` of the epoch;
        ``normalized=False`` yields the uint8 images as they reach the device (what the decoders produce)."""
        order = self.indices()
        if self.drop_last:
            order = order[: self.num_samples]
        order = order[start_batch * self.batch_size :].tolist()
        self._keys.keys = [(i, self._aug_seed(i)) for i in order]
        batches = iter(self._loader)
        try:
            for batch in batches:
                if isinstance(batch[0], DeviceBatch):
                    images = decode_batch(batch[0], self.device, self.dataset.max_pixels, self.dataset.size)
                else:
                    images = batch[0].to(self.device, non_blocking=True)
                images = self.normalize(images) if normalized else images
                yield (images,) + tuple(t.to(self.device, non_blocking=True) for t in batch[1:])
        except AcdcError as exc:
            # stop the workers now: left to garbage collection, each one holds the exit up for 5 s
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            # a worker's error arrives wrapped with its traceback; keep the one line that names the image
            raise AcdcError(str(exc).strip().splitlines()[-1].removeprefix("acdc_cli.errors.AcdcError: ")) from None


def _images_under(class_dir: Path) -> list[str]:
    """Image files below one class folder in torchvision's ImageFolder order (folders by path, then file names),
    following directory symlinks but entering no directory twice: a symlink loop cannot multiply the samples."""

    def unreadable(exc: OSError) -> None:
        raise AcdcError(f"ImageFolder: cannot read {exc.filename} ({exc.strerror or exc.__class__.__name__})")

    visited: set[tuple[int, int]] = set()
    folders = []
    for root, dirs, files in os.walk(class_dir, onerror=unreadable, followlinks=True):
        try:
            stat = os.stat(root)
        except OSError as exc:
            unreadable(exc)
        identity = (stat.st_dev, stat.st_ino)
        if identity in visited:
            dirs[:] = []
            continue
        visited.add(identity)
        dirs.sort()  # which of two links to one folder is kept must not depend on the file system's order
        folders.append((root, sorted(f for f in files if f.lower().endswith(IMAGE_EXTENSIONS))))
    return [os.path.join(root, name) for root, names in sorted(folders) for name in names]


def scan(folder: Path) -> tuple[list[str], np.ndarray, list[str]]:
    """(image paths, labels, class names) of one ImageFolder tree; a missing or empty tree is a one-line error."""
    if not folder.is_dir():
        raise AcdcError(f"ImageFolder: expected the folder {folder} (one subfolder of images per class)")
    expected = f"expected {folder}/<class>/<image>.JPEG"
    try:
        classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    except OSError as exc:
        raise AcdcError(f"ImageFolder {folder}: cannot read it ({exc.strerror or exc})") from None
    if not classes:
        raise AcdcError(f"ImageFolder {folder}: no class folders ({expected})")
    paths: list[str] = []
    labels: list[int] = []
    empty = []
    for label, name in enumerate(classes):
        found = _images_under(folder / name)
        if not found:
            empty.append(name)
        paths += found
        labels += [label] * len(found)
    if empty:
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise AcdcError(f"ImageFolder {folder}: no images in the class folder(s) {shown} ({expected}; "
                        f"extensions {', '.join(IMAGE_EXTENSIONS)})")
    return paths, np.array(labels, dtype=np.int64), classes


def _check_device_decoding(device: torch.device) -> None:
    """data.decode = "gpu" needs CUDA and a torchvision built with nvJPEG: find out now, not at the first batch."""
    from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

    if device.type != "cuda":
        raise AcdcError(f"data.decode = 'gpu' decodes on a CUDA device, but this run uses {device.type}; "
                        "set data.decode = 'cpu'")
    probe = encode_jpeg(torch.zeros(3, 16, 16, dtype=torch.uint8))
    try:
        decode_jpeg([probe], mode=ImageReadMode.RGB, device=device)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise AcdcError(f"data.decode = 'gpu': torchvision cannot decode JPEGs on {device} ({reason}); "
                        "set data.decode = 'cpu'") from None


# images data.name = "imagefolder" measures its mean/std on: enough for three decimals, quick on any folder
MEASURE_IMAGES = 500


def auto_val_size(train_images: int) -> int:
    """data.val_size None for a folder of your own: a tenth of its training images, at least one."""
    return max(1, train_images // 10)


def measure_mean_std(paths: Sequence[str], size: int, seed: int, max_pixels: int,
                     workers: int = 0) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of the pixels in [0, 1] of (up to MEASURE_IMAGES, seeded) training
    images as evaluation sees them (resized, centre crop)."""
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed + 2))[:MEASURE_IMAGES].tolist()
    dataset = ImageDataset([paths[i] for i in order], np.zeros(len(order)), augment=False, max_pixels=max_pixels,
                           size=size)
    keys = [(i, 0) for i in range(len(order))]
    loader = DataLoader(dataset, batch_size=64, sampler=keys, num_workers=workers, collate_fn=collate_interleaved)
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    count = 0
    for images, _ in loader:
        pixels = images.to(torch.float64).div_(255.0)
        total += pixels.sum(dim=(0, 2, 3))
        squares += pixels.square().sum(dim=(0, 2, 3))
        count += pixels.numel() // 3
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(1e-12).sqrt()
    # a blank folder (every pixel one value) would divide by zero: its spread is taken as one
    std = torch.where(std < 1e-6, torch.ones_like(std), std)
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def build(settings: Settings, device: torch.device, rank: int, world_size: int) -> DataBundle:
    """Train (minus a seeded held-out val split; all of it when ``data.val_size = 0``, then no val loader) and val
    loaders from ``train/``; the test loader from ``val/``.

    ``data.name = "imagefolder"`` (a folder of your own): crops of ``data.image_size``, a held-out split of a tenth
    of the training images unless ``data.val_size`` says otherwise, and the mean/std given in ``data.mean`` /
    ``data.std`` or else measured from the training split and written into ``settings`` so that the run's
    config.toml and checkpoints record them."""
    d, seed = settings.data, settings.runtime.seed
    if d.dir is None:
        raise AcdcError("ImageFolder: data.dir is not set; pass --data-dir PATH (a folder holding train/ and val/)")
    root = Path(d.dir).expanduser()
    if not root.is_dir():
        raise AcdcError(f"ImageFolder: data.dir {root} is not a folder (expected {root}/train and {root}/val)")
    if d.decode == "gpu":
        _check_device_decoding(device)
        if d.augment_policy != "none":
            raise AcdcError(f"data.augment_policy {d.augment_policy} runs in the loader workers, on decoded images: "
                            "use data.decode cpu or pil")
    paths, labels, classes = scan(root / "train")
    test_paths, test_labels, test_classes = scan(root / "val")
    if test_classes != classes:
        raise AcdcError(f"ImageFolder: {root}/val has other class folders than {root}/train")
    val_size = auto_val_size(len(labels)) if d.val_size is None else d.val_size
    train_i, val_i = (t.numpy() for t in split_val(len(labels), val_size, seed))
    train_labels = labels[train_i]
    augment = d.augment
    memorized = None
    workers = d.num_workers if d.num_workers is not None else default_num_workers()
    size = crop_sizes(d.image_size)[0]
    if d.mean is not None and d.std is not None:
        mean, std = tuple(d.mean), tuple(d.std)
    elif d.name == "imagefolder":
        mean, std = measure_mean_std([paths[i] for i in train_i], size, seed, d.max_image_pixels)
        settings.data = d.model_copy(update={"mean": mean, "std": std})
    else:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    common = dict(mean=mean, std=std, seed=seed, device=device, num_workers=workers)
    images = dict(decode=d.decode, max_pixels=d.max_image_pixels, size=size)
    if d.random_labels:
        positions, random_labels = (t.numpy() for t in select_random_labels(
            torch.from_numpy(train_i), d.random_labels, len(classes), seed))
        picked = train_i[positions]
        memorized = ImageLoader(
            ImageDataset([paths[i] for i in picked], random_labels, augment=False, extra=labels[picked], **images),
            d.eval_batch_size, **common,
        )
        train_labels = train_labels.copy()
        train_labels[positions] = random_labels
        augment = False
    train_set = ImageDataset([paths[i] for i in train_i], train_labels, augment=augment, policy=build_policy(d),
                             **images)
    return DataBundle(
        # whole batches only, so that a compiled step sees one shape (as timm's loader does)
        train=ImageLoader(train_set, d.batch_size // world_size, shuffle=True, drop_last=True, rank=rank,
                          world_size=world_size, persistent=True, **common),
        val=ImageLoader(ImageDataset([paths[i] for i in val_i], labels[val_i], augment=False, **images),
                        d.eval_batch_size, **common) if len(val_i) else None,
        test=ImageLoader(ImageDataset(test_paths, test_labels, augment=False, **images), d.eval_batch_size, **common),
        num_classes=len(classes),
        in_channels=3,
        image_size=size,
        memorized=memorized,
    )
