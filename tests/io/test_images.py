"""images.py: a bad-input corpus generated in the test, mode conversions, resize numerics, encoding."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pnp_batch.io.images import (
    ImageError,
    decode_image,
    encode_image,
    image_size_from_header,
    resize_source,
    short_side_size,
)

LIMIT = 64_000_000


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def png_header_only(w: int, h: int) -> bytes:
    """A PNG whose IHDR claims w x h (a decompression bomb's header) with one tiny IDAT."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(
        b"IEND", b""
    )


# ---- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty file (0 bytes)"),
        (np.random.default_rng(1).bytes(4096), "not an image (cannot identify format)"),
        (b"hello, I am text", "not an image"),
    ],
)
def test_not_images(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        decode_image(data, LIMIT)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated(fmt: str) -> None:
    data = encode(noise(64, 48), fmt)
    with pytest.raises(ImageError, match="truncated or corrupt image"):
        decode_image(data[: len(data) // 2], LIMIT)


def test_truncated_inside_header() -> None:
    data = encode(noise(8, 8), "PNG")[:20]
    with pytest.raises(ImageError, match="truncated or corrupt image"):
        decode_image(data, LIMIT)


def test_bomb_header_rejected_before_decoding() -> None:
    data = png_header_only(100_000, 100_000)
    assert image_size_from_header(data) == (100_000, 100_000)
    with pytest.raises(ImageError, match=r"image is 100000 x 100000 = 10000000000 pixels, over the limit of 64000000"):
        decode_image(data, LIMIT)


def test_over_max_pixels() -> None:
    data = encode(noise(40, 30), "JPEG")
    assert image_size_from_header(data) == (40, 30)
    with pytest.raises(ImageError, match=r"40 x 30 = 1200 pixels, over the limit of 1000 \(set max_pixels"):
        decode_image(data, 1000)
    assert decode_image(data, 1200).size == (40, 30)


def test_pil_bomb_error_becomes_image_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # Even with PIL's own limit far below ours, the result is our message, not PIL's exception.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    img = decode_image(encode(noise(8, 8), "GIF"), LIMIT)
    assert img.size == (8, 8)
    assert Image.MAX_IMAGE_PIXELS >= LIMIT


# ---- modes ---------------------------------------------------------------------------------------


def test_rgb_png_and_jpeg_round_trip() -> None:
    src = noise(5, 3)
    out = decode_image(encode(src, "PNG"), LIMIT)
    assert out.mode == "RGB" and out.size == (5, 3)
    assert np.array_equal(np.asarray(out), np.asarray(src))
    jpg = decode_image(encode(src, "JPEG", quality=95), LIMIT)
    assert jpg.mode == "RGB" and jpg.size == (5, 3)


def test_tiny_1x1() -> None:
    out = decode_image(encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"), LIMIT)
    assert out.size == (1, 1) and out.getpixel((0, 0)) == (10, 20, 30)


def test_cmyk_jpeg() -> None:
    img = Image.new("CMYK", (6, 4), (0, 255, 255, 0))  # pure red in CMYK
    out = decode_image(encode(img, "JPEG", quality=100), LIMIT)
    assert out.mode == "RGB" and out.size == (6, 4)
    r, g, b = np.asarray(out)[2, 3]
    assert r > 240 and g < 15 and b < 15


def test_16bit_png_scales_to_8bit() -> None:
    arr = np.array([[0, 257, 32896], [65535, 128, 65535]], dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I")
    data = encode(img, "PNG")
    out = decode_image(data, LIMIT)
    assert out.mode == "RGB" and out.size == (3, 2)
    got = np.asarray(out)[..., 0]
    assert got.tolist() == [[0, 1, 128], [255, 0, 255]]
    assert np.array_equal(np.asarray(out)[..., 0], np.asarray(out)[..., 2])


def test_palette_with_transparency_drops_alpha() -> None:
    img = Image.new("P", (4, 2))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.putpixel((0, 0), 1)
    img.info["transparency"] = 0  # red is transparent
    out = decode_image(encode(img, "PNG", transparency=0), LIMIT)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (0, 0, 255)
    assert out.getpixel((1, 0)) == (255, 0, 0)  # alpha dropped: the colour itself, as convert("RGB")


def test_rgba_drops_alpha_like_convert_rgb() -> None:
    rgba = Image.new("RGBA", (3, 5), (200, 100, 50, 0))
    out = decode_image(encode(rgba, "PNG"), LIMIT)
    assert out.size == (3, 5) and out.getpixel((2, 4)) == (200, 100, 50)


@pytest.mark.parametrize(("mode", "value", "expected"), [("L", 77, (77, 77, 77)), ("1", 1, (255, 255, 255)),
                                                         ("LA", (90, 0), (90, 90, 90))])
def test_grey_modes(mode: str, value: object, expected: tuple[int, int, int]) -> None:
    out = decode_image(encode(Image.new(mode, (3, 5), value), "PNG"), LIMIT)
    assert out.mode == "RGB" and out.size == (3, 5) and out.getpixel((1, 1)) == expected


def test_exif_orientation_not_applied() -> None:
    img = noise(6, 4)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    out = decode_image(encode(img, "JPEG", exif=exif.tobytes()), LIMIT)
    assert out.size == (6, 4)


# ---- resize --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "expected"),
    [((640, 480), (682, 512)), ((512, 768), (512, 768)), ((300, 200), (768, 512)), ((480, 640), (512, 682)),
     ((1000, 333), (1537, 512)), ((512, 512), (512, 512))],
)
def test_short_side_sizes(size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert short_side_size(*size, 512) == expected
    assert resize_source(noise(*size), 512, "short_side").size == expected


def test_short_side_unchanged_returns_same_image() -> None:
    img = noise(512, 768)
    assert resize_source(img, 512, "short_side") is img


def test_short_side_is_pil_bilinear() -> None:
    img = noise(640, 480, seed=3)
    out = resize_source(img, 512, "short_side")
    ref = img.resize((682, 512), resample=Image.BILINEAR)
    assert np.array_equal(np.asarray(out), np.asarray(ref))


def test_center_crop_is_square_then_lanczos() -> None:
    img = noise(100, 60, seed=4)
    out = resize_source(img, 64, "center_crop")
    ref = img.crop((20, 0, 80, 60)).resize((64, 64), resample=Image.LANCZOS)
    assert out.size == (64, 64)
    assert np.array_equal(np.asarray(out), np.asarray(ref))


def test_unknown_resize_mode() -> None:
    with pytest.raises(ValueError, match="resize_mode"):
        resize_source(noise(4, 4), 64, "stretch")


# ---- encode --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["png", "jpg", "webp"])
def test_encode_is_deterministic(fmt: str) -> None:
    arr = np.asarray(noise(17, 9, seed=5))
    a, b = encode_image(arr, fmt), encode_image(arr.copy(), fmt)
    assert a == b
    back = np.asarray(Image.open(io.BytesIO(a)).convert("RGB"))
    assert back.shape == (9, 17, 3)
    if fmt != "jpg":  # png and webp are lossless
        assert np.array_equal(back, arr)


def test_encode_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        encode_image(np.zeros((4, 4, 3), dtype=np.float32), "png")
    with pytest.raises(ValueError, match="output format"):
        encode_image(np.zeros((4, 4, 3), dtype=np.uint8), "bmp")
