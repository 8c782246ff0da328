"""The ImageFolder pipeline: torchvision decoding against PIL, the reference's crop distribution drawn from a cheap
reseeded generator, odd files (PNG, CMYK, grayscale, corrupt, huge), symlink loops, the batched device path run on
the CPU, whole batches only, and the worker default."""

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from acdc_cli.config import load_settings
from acdc_cli.data import build
from acdc_cli.data import imagefolder as imf
from acdc_cli.data.imagefolder import CropPlan, ImageDataset, ImageLoader, draw_crop, eval_pixels, scan, train_pixels
from acdc_cli.data.jpeg import decode_on_host, jpeg_header
from acdc_cli.data.tensor_loader import TensorLoader
from acdc_cli.errors import AcdcError

CPU = torch.device("cpu")
# torchvision 0.29 warns on each call to its codecs; acdc silences that at import, pytest restores warnings per test
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


def smooth_picture(height: int, width: int, seed: int = 0) -> Image.Image:
    """Upsampled noise: compresses and decodes like a photograph."""
    coarse = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.BILINEAR)


def jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=92, **options)
    return buffer.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def pil_rgb(data: bytes) -> torch.Tensor:
    from torchvision.transforms.v2.functional import pil_to_tensor

    return pil_to_tensor(Image.open(io.BytesIO(data)).convert("RGB"))


def odd_tree(root: Path) -> Path:
    """train/ and val/ with two classes holding every kind of file the pipeline must take: baseline and progressive
    JPEGs, grayscale and CMYK JPEGs, RGBA and palette PNGs, a PNG named .JPEG and a JPEG named .png."""
    kinds = [
        ("a.JPEG", lambda p: jpeg_bytes(p)),
        ("b.jpg", lambda p: jpeg_bytes(p, progressive=True)),
        ("c.JPEG", lambda p: jpeg_bytes(p.convert("L"))),
        ("d.JPEG", lambda p: jpeg_bytes(p.convert("CMYK"))),
        ("e.png", lambda p: png_bytes(p.convert("RGBA"))),
        ("f.png", lambda p: png_bytes(p.convert("P"))),
        ("g.JPEG", lambda p: png_bytes(p)),
        ("h.png", lambda p: jpeg_bytes(p)),
    ]
    for split in ("train", "val"):
        for label in range(2):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for index, (name, encode) in enumerate(kinds):
                picture = smooth_picture(48 + 7 * index, 64 - 3 * index, seed=10 * label + index)
                (folder / name).write_bytes(encode(picture))
    return root


def _settings(root: Path, *extra: str):
    return load_settings(overrides=["data.name='imagenet'", f"data.dir='{root}'", "data.val_size=2",
                                    "data.num_workers=0", *extra])


class TorchDraws:
    """Hands out torch's global random stream in the calls torchvision's transforms make."""

    def uniform(self, low: float, high: float) -> float:
        return torch.empty(1).uniform_(low, high).item()

    def randint(self, low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, size=(1,)).item())

    def random(self) -> float:
        return torch.rand(1).item()


# ----------------------------------------------------------------------------------------------------------------
# the augmentation is the reference's


@pytest.mark.parametrize("size", [(375, 500), (61, 47), (500, 333), (1, 1000), (900, 10), (224, 224)])
def test_crop_windows_are_torchvisions_given_the_same_draws(size):
    """The reference (utils/datasets.py, imagenet_get_datasets) trains with torchvision's RandomResizedCrop(224) and
    RandomHorizontalFlip(): fed torch's own stream, draw_crop returns exactly get_params's windows, including the
    centred fallback of images too narrow for any try (1x1000, 900x10)."""
    from torchvision.transforms import RandomResizedCrop

    height, width = size
    image = torch.zeros(1, height, width)
    for seed in range(300):
        torch.manual_seed(seed)
        expected = RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
        flip_expected = torch.rand(1).item() < 0.5
        torch.manual_seed(seed)
        plan = draw_crop(height, width, TorchDraws())
        assert plan[:4] == tuple(expected) and plan.flip == flip_expected, seed


def test_crop_draws_from_the_reseeded_generator_have_torchvisions_distribution():
    """The pipeline draws from random.Random, not torch's stream: the same distribution, compared on 4,000 windows
    of a 375x500 image against 4,000 of torchvision's (means within 5 standard errors)."""
    import random

    from torchvision.transforms import RandomResizedCrop

    def stats(windows):
        area = np.array([h * w / (375 * 500) for _, _, h, w in windows])
        aspect = np.log([w / h for _, _, h, w in windows])
        centre = np.array([(left + w / 2) / 500 for _, left, _, w in windows])
        return area, aspect, centre

    rng = random.Random(0)
    ours = stats([draw_crop(375, 500, rng)[:4] for _ in range(4000)])
    torch.manual_seed(0)
    image = torch.zeros(1, 375, 500)
    theirs = stats([RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(4000)])
    for a, b in zip(ours, theirs):
        assert abs(a.mean() - b.mean()) < 5 * np.hypot(a.std(), b.std()) / np.sqrt(4000)
        assert abs(np.median(a) - np.median(b)) < 0.05
    assert ours[0].min() >= 0.079 and ours[0].max() <= 1.0
    assert abs(ours[1]).max() <= np.log(4 / 3) + 0.01  # + rounding to whole pixels
    flips = [draw_crop(375, 500, rng).flip for _ in range(4000)]
    assert 0.47 < np.mean(flips) < 0.53


def test_decoded_pixels_equal_pils_and_crops_match_pils_resize():
    from torchvision import transforms as T
    from torchvision.transforms.v2.functional import pil_to_tensor

    for index, (height, width) in enumerate([(375, 500), (61, 47), (500, 333)]):
        data = jpeg_bytes(smooth_picture(height, width, seed=index))
        pixels = decode_on_host(bytearray(data), "x.JPEG", 10**9)
        assert pixels.dtype == torch.uint8 and torch.equal(pixels, pil_rgb(data))  # both libjpeg-turbo
        pil = Image.open(io.BytesIO(data)).convert("RGB")
        for plan in (CropPlan(3, 5, height - 7, width - 9, False), CropPlan(0, 0, height // 2, width // 3, True)):
            ours = train_pixels(pixels, plan)
            box = (plan.left, plan.top, plan.left + plan.width, plan.top + plan.height)
            reference = pil.crop(box).resize((224, 224), Image.BILINEAR)
            if plan.flip:
                reference = reference.transpose(Image.FLIP_LEFT_RIGHT)
            assert ours.shape == (3, 224, 224)
            # torch's uint8 antialiased bilinear and PIL's differ in fixed-point rounding only
            assert (ours.int() - pil_to_tensor(reference).int()).abs().max() <= 2
        reference_eval = T.Compose([T.Resize(256), T.CenterCrop(224), T.PILToTensor()])(pil)
        assert (eval_pixels(pixels).int() - reference_eval.int()).abs().max() <= 2


# ----------------------------------------------------------------------------------------------------------------
# files


def test_jpeg_header_reads_the_frame():
    picture = smooth_picture(37, 53)
    assert jpeg_header(jpeg_bytes(picture)) == (37, 53, 3, 8)
    assert jpeg_header(jpeg_bytes(picture, progressive=True)) == (37, 53, 3, 8)
    assert jpeg_header(jpeg_bytes(picture.convert("L"))) == (37, 53, 1, 8)
    assert jpeg_header(jpeg_bytes(picture.convert("CMYK"))) == (37, 53, 4, 8)
    assert jpeg_header(png_bytes(picture)) is None
    assert jpeg_header(jpeg_bytes(picture)[:40]) is None  # cut before the frame header
    assert jpeg_header(b"\xff\xd8") is None and jpeg_header(b"") is None


@pytest.mark.parametrize("decode", ["cpu", "pil"])
def test_every_kind_of_file_is_read_as_pil_reads_it(tmp_path, decode):
    odd_tree(tmp_path)
    paths, labels, classes = scan(tmp_path / "val")
    assert classes == ["class0", "class1"] and len(paths) == 16
    dataset = ImageDataset(paths, labels, augment=False, decode=decode)
    from torchvision import transforms as T

    reference = T.Compose([T.Resize(256), T.CenterCrop(224), T.PILToTensor()])
    for index, path in enumerate(paths):
        pixels, label = dataset[(index, 0)]
        assert pixels.shape == (3, 224, 224) and label == labels[index]
        expected = reference(Image.open(path).convert("RGB"))
        assert (pixels.int() - expected.int()).abs().max() <= 2, path


def test_cmyk_and_grayscale_jpegs_decode_like_pil():
    picture = smooth_picture(40, 50)
    for mode in ("L", "CMYK"):
        data = jpeg_bytes(picture.convert(mode))
        assert torch.equal(decode_on_host(bytearray(data), "x", 10**9), pil_rgb(data)), mode


def _first_batch_of(path: Path, decode: str) -> None:
    """One training batch of the single file ``path``, through the loader (the device path decodes in the loader)."""
    dataset = ImageDataset([str(path)], np.zeros(1, dtype=np.int64), augment=True, decode=decode)
    next(iter(ImageLoader(dataset, 1, imf.IMAGENET_MEAN, imf.IMAGENET_STD, drop_last=True)))


@pytest.mark.parametrize("payload", [b"", b"not an image", b"\xff\xd8\xff\xe0garbage", None])
@pytest.mark.parametrize("decode", ["cpu", "gpu", "pil"])
def test_unreadable_files_are_one_line_errors_naming_them(tmp_path, payload, decode):
    path = tmp_path / "bad.JPEG"
    path.write_bytes(payload if payload is not None else jpeg_bytes(smooth_picture(60, 80))[:300])  # truncated
    with pytest.raises(AcdcError, match="cannot read image") as err:
        _first_batch_of(path, decode)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(AcdcError, match=r"cannot read image .*gone.JPEG \(No such file"):
        _first_batch_of(tmp_path / "gone.JPEG", decode)


def _huge_jpeg(height: int, width: int) -> bytes:
    """A small JPEG whose frame header claims another size (nothing in it would decode to that many pixels)."""
    data = bytearray(jpeg_bytes(smooth_picture(16, 16)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _huge_png(height: int, width: int) -> bytes:
    """A valid PNG header for a height x width RGB image, with a few compressed rows: PIL reads its size."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (1 + 3 * width) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


@pytest.mark.parametrize("decode", ["cpu", "gpu", "pil"])
def test_a_200_megapixel_image_is_refused_from_its_header(tmp_path, decode):
    for name, data in (("huge.JPEG", _huge_jpeg(10_000, 20_000)), ("huge.png", _huge_png(10_000, 20_000))):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(AcdcError) as err:
            _first_batch_of(path, decode)
        message = str(err.value)
        assert str(path) in message and "\n" not in message, message
        # JPEG: acdc reads the frame header; PNG: PIL refuses it first and says only how many pixels
        size = "20000x10000 = 200,000,000 pixels" if name.endswith("JPEG") else "is 200,000,000 pixels"
        assert size in message and "more than data.max_image_pixels = 89,478,485" in message, message


def test_the_pixel_bound_is_a_setting_and_reaches_the_workers(tmp_path):
    from data_helpers import write_imagefolder

    write_imagefolder(tmp_path, classes=2, train=3, val=1)  # images of at most 71x71 pixels
    big = tmp_path / "train" / "n00000001" / "big.JPEG"
    big.write_bytes(jpeg_bytes(smooth_picture(100, 100)))
    for workers in (0, 1):
        bundle = build(_settings(tmp_path, "data.max_image_pixels=9999", "data.val_size=1", "data.batch_size=6",
                                 f"data.num_workers={workers}"), CPU)
        with pytest.raises(AcdcError) as err:
            for loader in (bundle.train, bundle.val):  # the big image is in one of them
                for _ in loader:
                    pass
        assert str(err.value) == (f"image {big} is 100x100 = 10,000 pixels, more than data.max_image_pixels = 9,999: "
                                  "shrink or remove it, or raise the bound")
    bundle = build(_settings(tmp_path, "data.max_image_pixels=10000", "data.val_size=1", "data.batch_size=6"), CPU)
    assert sum(len(y) for loader in (bundle.train, bundle.val) for _, y in loader) == 7


# ----------------------------------------------------------------------------------------------------------------
# the tree


def test_scan_lists_what_torchvision_imagefolder_lists(tmp_path):
    from torchvision.datasets import ImageFolder

    for label in ("b", "a", "c"):
        for sub in ("", "x/", "x/y/", "z/"):
            folder = tmp_path / label / sub
            folder.mkdir(parents=True, exist_ok=True)
            for name in ("2.JPEG", "1.jpg", "10.PNG", "notes.txt", "3.webp"):
                (folder / name).write_bytes(b"")
    paths, labels, classes = scan(tmp_path)
    tree = ImageFolder(str(tmp_path), loader=lambda p: p)
    assert classes == tree.classes == ["a", "b", "c"]
    assert list(zip(paths, labels.tolist())) == tree.samples and len(paths) == 3 * 4 * 4


def test_a_symlink_loop_does_not_multiply_samples(tmp_path):
    from data_helpers import write_imagefolder

    write_imagefolder(tmp_path, classes=2, train=3, val=1)
    class0, class1 = sorted((tmp_path / "train").iterdir())
    (class0 / "loop").symlink_to("..", target_is_directory=True)  # train/n0/loop -> train: a cycle
    (class0 / "self").symlink_to(".", target_is_directory=True)
    nested = class1 / "nested"
    nested.mkdir()
    Image.new("RGB", (8, 8)).save(nested / "x.JPEG")
    (class1 / "twice").symlink_to("nested", target_is_directory=True)  # the same folder under two names
    paths, labels, _ = scan(tmp_path / "train")
    by_class = [[p for p, label in zip(paths, labels) if label == c] for c in (0, 1)]
    # n1: its own 3 and nested/x once, not again through "twice"
    assert by_class[1] == [str(class1 / f"img_{i}.JPEG") for i in range(3)] + [str(nested / "x.JPEG")]
    # n0: its own 3 once (not again through "self" or loop/n0), and what its loop leads to (train/n1) once
    assert by_class[0][:3] == [str(class0 / f"img_{i}.JPEG") for i in range(3)]
    assert len(by_class[0]) == 7 and len({os.path.realpath(p) for p in by_class[0]}) == 7


def test_an_empty_class_folder_is_named(tmp_path):
    from data_helpers import write_imagefolder

    write_imagefolder(tmp_path, classes=2, train=2, val=1)
    (tmp_path / "train" / "zebra").mkdir()
    (tmp_path / "train" / "zebra" / "readme.txt").write_text("no images")
    with pytest.raises(AcdcError, match=r"ImageFolder .*/train: no images in the class folder\(s\) zebra"):
        scan(tmp_path / "train")


# ----------------------------------------------------------------------------------------------------------------
# the device path (data.decode = "gpu") runs on the CPU too


def _batches(loader: ImageLoader, start: int = 0) -> list[tuple[torch.Tensor, ...]]:
    return [tuple(t.clone() for t in batch) for batch in loader.iterate(start)]


def _loader(root: Path, decode: str, augment: bool = True, workers: int = 0, batch: int = 5) -> ImageLoader:
    paths, labels, _ = scan(root / "train")
    dataset = ImageDataset(paths, labels, augment=augment, decode=decode)
    return ImageLoader(dataset, batch, imf.IMAGENET_MEAN, imf.IMAGENET_STD, shuffle=True, drop_last=True, seed=3,
                       num_workers=workers)


@pytest.mark.parametrize("augment", [True, False])
def test_device_decoding_on_the_cpu_gives_the_host_pipelines_batches(tmp_path, augment):
    """The batched path decodes JPEGs on the loader's device and crops them there; host-decoded files (PNG, CMYK)
    join at their positions. On the CPU its kernels are the host path's, so the batches are equal bit for bit."""
    odd_tree(tmp_path)
    host, device = _loader(tmp_path, "cpu", augment), _loader(tmp_path, "gpu", augment)
    for loader in (host, device):
        loader.set_epoch(2)
    a, b = _batches(host), _batches(device)
    assert len(a) == len(b) == 3  # 16 images in whole batches of 5
    for x, y in zip(a, b):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])


def test_device_decoding_falls_back_per_file(tmp_path, monkeypatch):
    """When the device decoder refuses a batch, each file is retried alone and, refused again, decoded on the host:
    the batch is unchanged."""
    import torchvision.io

    odd_tree(tmp_path)
    expected = _batches(_loader(tmp_path, "gpu"))
    real = torchvision.io.decode_jpeg
    refused = []

    def refuses_batches_and_progressive(data, **kw):
        if isinstance(data, list):
            raise RuntimeError("batched decode failed")
        if b"\xff\xc2" in data.numpy().tobytes():  # a progressive frame
            refused.append(1)
            raise RuntimeError("progressive")
        return real(data, **kw)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", refuses_batches_and_progressive)
    got = _batches(_loader(tmp_path, "gpu"))
    assert refused and all(torch.equal(x[0], y[0]) for x, y in zip(expected, got))


def test_device_decoding_needs_cuda(tmp_path):
    odd_tree(tmp_path)
    with pytest.raises(AcdcError, match="data.decode = 'gpu' decodes on a CUDA device, but this run uses cpu"):
        build(_settings(tmp_path, "data.decode='gpu'"), CPU)


@pytest.mark.parametrize("decode", ["cpu", "gpu", "pil"])
def test_resume_and_worker_count_leave_the_batches_unchanged(tmp_path, decode):
    odd_tree(tmp_path)
    whole = _loader(tmp_path, decode, workers=0)
    parallel = _loader(tmp_path, decode, workers=2)
    for loader in (whole, parallel):
        loader.set_epoch(5)
    a, b, tail = _batches(whole), _batches(parallel), _batches(whole, start=2)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    assert len(tail) == 1 and torch.equal(tail[0][0], a[2][0])
    whole.set_epoch(6)
    assert not torch.equal(_batches(whole)[0][0], a[0][0])


def test_batches_reach_the_device_channels_last(tmp_path):
    odd_tree(tmp_path)
    images, _ = next(iter(_loader(tmp_path, "cpu")))
    assert images.shape == (5, 3, 224, 224) and images.is_contiguous(memory_format=torch.channels_last)
    raw, _ = next(_loader(tmp_path, "pil").iterate(normalized=False))
    assert raw.dtype == torch.uint8 and raw.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nvjpeg_batches_match_the_cpu_pipeline(tmp_path):
    """On CUDA: nvJPEG + crops on the GPU give the CPU pipeline's batches up to IDCT and rounding differences, and
    are exactly repeatable (a resumed epoch sees the same batches)."""
    odd_tree(tmp_path)
    cuda = torch.device("cuda")
    paths, labels, _ = scan(tmp_path / "train")
    make = lambda decode: ImageLoader(ImageDataset(paths, labels, augment=True, decode=decode), 5,  # noqa: E731
                                      imf.IMAGENET_MEAN, imf.IMAGENET_STD, shuffle=True, drop_last=True, seed=3,
                                      device=cuda)
    host, device = make("cpu"), make("gpu")
    a = [x.cpu() for x, _ in host.iterate(normalized=False)]
    b = [x.cpu() for x, _ in device.iterate(normalized=False)]
    psnr = [10 * np.log10(255**2 / max((x.double() - y.double()).pow(2).mean().item(), 1e-12)) for x, y in zip(a, b)]
    # decoders that differ in IDCT and rounding only stay above 40 dB; on these pictures a crop 2 pixels off gives
    # 30 dB and a wrong flip or crop 12 dB
    assert len(psnr) == 3 and min(psnr) > 35, psnr
    again = [x.cpu() for x, _ in device.iterate(normalized=False)]
    tail = [x.cpu() for x, _ in device.iterate(2, normalized=False)]
    assert all(torch.equal(x, y) for x, y in zip(b, again)) and torch.equal(tail[0], b[2])


# ----------------------------------------------------------------------------------------------------------------
# whole batches only


def test_training_tensor_loader_yields_whole_batches_and_resumes_exactly():
    images = torch.randint(0, 256, (23, 3, 8, 8), dtype=torch.uint8)
    common = dict(mean=(0.5,) * 3, std=(0.25,) * 3, shuffle=True, augment=True, seed=4)
    full = TensorLoader(images, torch.arange(23), 5, drop_last=True, **common)
    ragged = TensorLoader(images, torch.arange(23), 5, **common)
    for loader in (full, ragged):
        loader.set_epoch(1)
    kept, all_batches = list(full), list(ragged)
    assert len(full) == 4 and full.num_samples == 20 and [len(y) for _, y in kept] == [5] * 4
    assert len(ragged) == 5 and len(all_batches[-1][1]) == 3
    # dropping the tail changes no kept sample's order or augmentation
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(kept, all_batches))
    assert all(torch.equal(x[0], y[0]) for x, y in zip(full.iterate(3), kept[3:]))
    # a set smaller than one batch trains on one short batch: still a single shape every step
    small = TensorLoader(images[:3], torch.arange(3), 5, drop_last=True, **common)
    assert len(small) == 1 and [len(y) for _, y in small] == [3]


def test_training_loaders_of_every_dataset_drop_the_partial_batch(tmp_path):
    from data_helpers import write_cifar10, write_imagefolder

    write_cifar10(tmp_path / "c10")
    write_imagefolder(tmp_path / "inet", classes=3, train=5, val=1)
    cases = [
        (load_settings(overrides=["data.batch_size=32"]), 1257),
        (load_settings(overrides=["data.name='synthetic'", "data.synthetic_size=50", "data.batch_size=16",
                                  "model.name='tiny-test'"]), 50),
        (load_settings(overrides=["data.name='cifar10'", f"data.dir='{tmp_path / 'c10'}'", "data.val_size=10",
                                  "data.batch_size=32"]), 240),
        (_settings(tmp_path / "inet", "data.batch_size=4"), 13),
    ]
    for settings, train_images in cases:
        bundle = build(settings, CPU)
        batch = settings.data.batch_size
        assert len(bundle.train) == train_images // batch and bundle.train.num_samples == len(bundle.train) * batch
        assert {len(y) for _, y, *_ in bundle.train} == {batch}
        # evaluation keeps every image
        assert sum(len(y) for _, y, *_ in bundle.val) == bundle.val.num_samples


def test_worker_default_is_the_cores_shared_by_local_ranks_minus_one(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert imf.default_num_workers() == 15
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert imf.default_num_workers() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert imf.default_num_workers() == 0
    assert load_settings().data.num_workers is None  # unset: resolved per machine when the loaders are built
