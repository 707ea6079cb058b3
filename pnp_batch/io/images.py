"""Decode, check and resize source images; encode output images. No torch here.

Numerics follow the authors' preprocessing exactly:

* ``short_side`` is what torchvision's ``T.Resize(512)`` does to a PIL image (the reference code):
  short side to ``resolution``, long side ``int(resolution * long / short)``, PIL bilinear (which
  antialiases when shrinking), unchanged when the size already matches.
* ``center_crop`` is the authors' original code: the central square, then PIL Lanczos.

Alpha is dropped with ``convert("RGB")`` as the reference does; EXIF orientation is not applied
(the reference does not apply it either).
"""

from __future__ import annotations

import io
import logging
import struct

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from pnp_batch.errors import RowError

logger = logging.getLogger(__name__)

OUTPUT_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


class ImageError(RowError):
    """A source image cannot be used; the row fails with this message."""


def _format_from_magic(data: bytes) -> str | None:
    for sig, name in _SIGNATURES:
        if data.startswith(sig):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def image_size_from_header(data: bytes) -> tuple[int, int] | None:
    """(width, height) read from the header alone, without decoding pixels; None if unknown."""
    try:
        fmt = _format_from_magic(data)
        if fmt == "PNG" and len(data) >= 24 and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        if fmt == "GIF" and len(data) >= 10:
            return struct.unpack("<HH", data[6:10])
        if fmt == "BMP" and len(data) >= 26:
            w, h = struct.unpack("<ii", data[18:26])
            return abs(w), abs(h)
        if fmt == "JPEG":
            return _jpeg_size(data)
    except struct.error:
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception:  # noqa: BLE001 - PIL raises many types for bad headers; "unknown" is the answer
        return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    n = len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            i += 1
            continue
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            if i + 9 > n:
                return None
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return w, h
        i += 2 + length
    return None


def _too_large(w: int, h: int, max_pixels: int) -> ImageError:
    return ImageError(
        f"image is {w} x {h} = {w * h} pixels, over the limit of {max_pixels} (set max_pixels to raise it)"
    )


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode encoded image bytes into an RGB image, checking the pixel limit before decoding."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    header_size = image_size_from_header(data)
    if header_size and header_size[0] * header_size[1] > max_pixels:
        raise _too_large(header_size[0], header_size[1], max_pixels)
    # PIL's own bomb check must not be stricter than ours, and must never be off.
    if Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        size = header_size
        if size:
            raise _too_large(size[0], size[1], max_pixels) from None
        raise ImageError(f"image is over the pixel limit of {max_pixels} ({e})") from None
    except UnidentifiedImageError:
        if _format_from_magic(data):
            raise ImageError(
                f"truncated or corrupt image: {_format_from_magic(data)} header cannot be read"
            ) from None
        raise ImageError("not an image (cannot identify format)") from None
    except Exception as e:  # noqa: BLE001 - PIL plugins raise many types on corrupt headers
        raise ImageError(f"truncated or corrupt image: {e}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise _too_large(w, h, max_pixels)
    if w < 1 or h < 1:
        raise ImageError(f"image has no pixels ({w} x {h})")
    try:
        if ImageFile.LOAD_TRUNCATED_IMAGES:
            logger.debug("PIL LOAD_TRUNCATED_IMAGES is on; truncated images may decode partially")
        img.load()
    except Image.DecompressionBombError as e:
        raise ImageError(f"image is over the pixel limit of {max_pixels} ({e})") from None
    except MemoryError:
        raise ImageError(f"image is {w} x {h}: not enough memory to decode it") from None
    except Exception as e:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError, zlib.error...
        raise ImageError(f"truncated or corrupt image: {e}") from None
    try:
        return to_rgb(img)
    except ImageError:
        raise
    except Exception as e:  # noqa: BLE001 - any conversion failure is this row's problem
        raise ImageError(f"cannot convert image mode {img.mode!r} to RGB: {e}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (16-bit/32-bit grey scaled, alpha dropped)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img).astype(np.int64)
        arr = np.clip(arr, 0, 65535)
        grey = ((arr + 128) // 257).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if arr.size and np.nanmax(arr) <= 1.0 else 1.0
        grey = np.clip(np.rint(np.nan_to_num(arr) * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "P":
        # Same RGB values as convert("RGB"); via RGBA avoids PIL's palette-transparency warning.
        return img.convert("RGBA").convert("RGB")
    return img.convert("RGB")


def resize_source(img: Image.Image, resolution: int, resize_mode: str) -> Image.Image:
    """Resize a decoded RGB source image the way the authors' preprocessing does."""
    w, h = img.size
    if resize_mode == "short_side":
        new_w, new_h = short_side_size(w, h, resolution)
        if (new_w, new_h) == (w, h):
            return img
        return img.resize((new_w, new_h), resample=Image.BILINEAR)
    if resize_mode == "center_crop":
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        square = img.crop((left, top, left + s, top + s))
        return square.resize((resolution, resolution), resample=Image.LANCZOS)
    raise ValueError(f"resize_mode={resize_mode!r} is not one of short_side, center_crop")


def short_side_size(w: int, h: int, resolution: int) -> tuple[int, int]:
    """(new_w, new_h) as torchvision's Resize(resolution) computes it."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = resolution, int(resolution * long / short)
    return (new_short, new_long) if w <= h else (new_long, new_short)


def encode_image(rgb: np.ndarray, fmt: str) -> bytes:
    """Encode an HxWx3 uint8 array; the same array always gives the same bytes."""
    key = fmt.lower().lstrip(".")
    if key not in OUTPUT_FORMATS:
        raise ValueError(f"output format {fmt!r} is not one of png, jpg, webp")
    arr = np.ascontiguousarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 array, got {arr.dtype} {arr.shape}")
    img = Image.fromarray(arr, "RGB")
    buf = io.BytesIO()
    if key == "png":
        img.save(buf, "PNG", compress_level=6, optimize=False)
    elif key in ("jpg", "jpeg"):
        img.save(buf, "JPEG", quality=95, optimize=False, progressive=False)
    else:
        img.save(buf, "WEBP", lossless=True, quality=100, method=4, exact=True)
    return buf.getvalue()


def extension(fmt: str) -> str:
    """File extension (without dot) for an output format."""
    key = fmt.lower().lstrip(".")
    return "jpg" if key == "jpeg" else key
