"""JPEG files for the ImageFolder pipeline: the header read without decoding (size and colour), the pixel bound
checked before any decoder allocates, and decoding on the host with torchvision (libjpeg-turbo) or PIL."""

from __future__ import annotations

import io
import re
import warnings
from typing import Any, NamedTuple

import torch

from acdc_cli.errors import AcdcError
from acdc_cli.sections import DataSettings

DEFAULT_MAX_PIXELS: int = DataSettings.model_fields["max_image_pixels"].default


# JPEG start-of-frame markers (they hold the image size); C4, C8 and CC share the range but mean other things
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


class JpegHeader(NamedTuple):
    height: int
    width: int
    components: int  # 1 gray, 3 YCbCr/RGB, 4 CMYK/YCCK
    precision: int  # bits per sample


def jpeg_header(data: bytes | bytearray) -> JpegHeader | None:
    """The frame header of a JPEG, read by walking its marker segments; None when ``data`` is not a JPEG or has no
    usable frame header before its first scan (the caller then leaves the file to PIL)."""
    if data[:2] != b"\xff\xd8":
        return None
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length field
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan: no frame header came first
            return None
        length = (data[pos + 2] << 8) | data[pos + 3]
        if marker in _SOF_MARKERS:
            if length < 8 or pos + 10 > end:
                return None
            height = (data[pos + 5] << 8) | data[pos + 6]
            width = (data[pos + 7] << 8) | data[pos + 8]
            # height 0 means "given later in a DNL segment", which libjpeg-turbo does not support
            return JpegHeader(height, width, data[pos + 9], data[pos + 4]) if height and width else None
        if length < 2:
            return None
        pos += 2 + length
    return None


def _too_large(path: str, height: int, width: int, max_pixels: int) -> AcdcError:
    return AcdcError(
        f"image {path} is {width}x{height} = {width * height:,} pixels, more than data.max_image_pixels = "
        f"{max_pixels:,}: shrink or remove it, or raise the bound"
    )


def read_bytes(path: str) -> bytearray:
    try:
        with open(path, "rb") as fh:
            return bytearray(fh.read())
    except OSError as exc:
        raise AcdcError(f"cannot read image {path} ({exc.strerror or exc.__class__.__name__})") from None


def _decodable_jpeg(data: bytearray, path: str, max_pixels: int) -> JpegHeader | None:
    """The header when libjpeg-turbo / nvJPEG should decode ``data``: an 8-bit JPEG with 1 or 3 channels within the
    pixel bound. None for anything PIL should handle; an error for a JPEG over the bound."""
    header = jpeg_header(data)
    if header is None:
        return None
    if header.height * header.width > max_pixels:
        raise _too_large(path, header.height, header.width, max_pixels)
    return header if header.precision == 8 and header.components in (1, 3) else None


def open_with_pil(data: bytes | bytearray, path: str, max_pixels: int) -> Any:
    """A PIL image in RGB, refused from its header when over the pixel bound (before its pixels are decoded)."""
    from PIL import Image, UnidentifiedImageError

    header = jpeg_header(data)
    if header is not None and header.height * header.width > max_pixels:
        raise _too_large(path, header.height, header.width, max_pixels)  # as the other decoders say it
    try:
        with warnings.catch_warnings():
            # acdc applies its own bound below; PIL's warning would repeat for every epoch of a large image
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise _too_large(path, height, width, max_pixels)
        return image.convert("RGB")
    except Image.DecompressionBombError as exc:
        # PIL refuses more than twice its own bound before acdc sees the size; its message holds the pixel count
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        if found and int(found.group(1)) > max_pixels:
            raise AcdcError(f"image {path} is {size}, more than data.max_image_pixels = {max_pixels:,}: shrink or "
                            "remove it, or raise the bound") from None
        raise AcdcError(f"image {path} is {size}, more than PIL decodes: shrink it or convert it to JPEG") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        # truncated, corrupt or unknown files; PIL raises all of these for broken headers
        raise AcdcError(f"cannot read image {path} ({exc.__class__.__name__})") from None


def decode_on_host(data: bytearray, path: str, max_pixels: int) -> torch.Tensor:
    """uint8 (3, H, W) RGB: libjpeg-turbo for ordinary JPEGs, PIL for every other file and every JPEG it refuses."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2.functional import pil_to_tensor

    if _decodable_jpeg(data, path, max_pixels) is not None:
        try:
            return decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass  # arithmetic coding, odd markers, truncation: PIL reads some of these and names the rest
    return pil_to_tensor(open_with_pil(data, path, max_pixels))
