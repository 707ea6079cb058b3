"""A mask from pixels to the latents and back (docs/masks.md): framed as the source is, reduced to the
latent grid, dilated and feathered there, and the paste of the source's pixels outside it.

Conventions: a mask is 1 where the edit happens and 0 where the source is kept. Pixel masks are numpy
(H, W) arrays, latent masks torch (1, h, w) float tensors with values in [0, 1].
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pnp_batch.errors import RowError
from pnp_batch.io.images import short_side_size

ASPECT_TOLERANCE = 0.01  # relative difference of width/height between a mask and its source


class MaskError(RowError):
    """A row's mask cannot be used (unreadable, another aspect ratio): that row fails."""


def read_mask(data: bytes, max_pixels: int) -> Image.Image:
    """The mask image as 8-bit single channel: 255 where any channel is non-zero (white or non-zero =
    edit here), 0 elsewhere; an alpha channel is ignored."""
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > max_pixels:
            raise MaskError(f"mask is {img.width}x{img.height}, more than max_pixels={max_pixels}")
        img.load()
    except MaskError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoding failure is the row's
        raise MaskError(f"mask unreadable: {type(e).__name__}: {e}") from None
    arr = np.asarray(img.convert("RGB") if img.mode not in ("L", "1", "I", "I;16", "F") else img)
    on = arr.reshape(arr.shape[0], arr.shape[1], -1).max(axis=2) > 0
    return Image.fromarray((on * 255).astype(np.uint8), "L")


def frame_mask(mask: Image.Image, source_size: tuple[int, int], resolution: int, resize_mode: str) -> np.ndarray:
    """The mask framed exactly as io/images.resize_source frames its source (same output size, same crop),
    as a bool (H, W) array; MaskError when its aspect ratio is not the source's."""
    sw, sh = source_size
    mw, mh = mask.size
    if abs((mw / mh) / (sw / sh) - 1) > ASPECT_TOLERANCE:
        raise MaskError(f"mask is {mw}x{mh}, its source {sw}x{sh}: another aspect ratio")
    if resize_mode == "short_side":
        size = short_side_size(sw, sh, resolution)
        framed = mask if mask.size == size else mask.resize(size, resample=Image.BILINEAR)
    elif resize_mode == "center_crop":
        s = min(mw, mh)
        left, top = (mw - s) // 2, (mh - s) // 2
        framed = mask.crop((left, top, left + s, top + s)).resize((resolution, resolution), resample=Image.BILINEAR)
    else:
        raise ValueError(f"resize_mode={resize_mode!r} is not one of short_side, center_crop")
    return np.asarray(framed) >= 128


def to_latent(pixels: np.ndarray, h: int, w: int) -> torch.Tensor:
    """(1, h, w) float: 1 where any pixel of the 8x8 cell is edited (the edit region is never cut)."""
    p = pixels[: 8 * h, : 8 * w]
    if p.shape != (8 * h, 8 * w):  # a framed size the VAE rounds differently: pad with "keep"
        p = np.pad(p, ((0, 8 * h - p.shape[0]), (0, 8 * w - p.shape[1])))
    cells = p.reshape(h, 8, w, 8).any(axis=(1, 3))
    return torch.from_numpy(cells.astype(np.float32)).unsqueeze(0)


def shape(mask: torch.Tensor, dilate: int, feather: int) -> torch.Tensor:
    """Dilate by `dilate` latent pixels, then feather outward over `feather` more: the (dilated) region
    stays exactly 1, the ramp falls to 0 at 2 * feather pixels outside it. (..., h, w) in and out."""
    m = mask.reshape(-1, 1, *mask.shape[-2:])
    grow = dilate + feather
    if grow:
        m = F.max_pool2d(m, 2 * grow + 1, stride=1, padding=grow)
    if feather:
        m = F.avg_pool2d(m, 2 * feather + 1, stride=1, padding=feather, count_include_pad=False)
    return m.reshape(mask.shape)


def to_pixels(latent: torch.Tensor, height: int, width: int) -> np.ndarray:
    """A latent mask (1, h, w) up to (height, width) float32 (bilinear; exactly 0 and 1 where the cells
    around are all 0 or all 1)."""
    up = F.interpolate(latent.float().reshape(1, 1, *latent.shape[-2:]), size=(height, width), mode="bilinear",
                       align_corners=False)[0, 0]
    up = torch.where(up >= 1 - 1e-6, torch.ones_like(up), torch.where(up <= 1e-6, torch.zeros_like(up), up))
    return up.cpu().numpy()


def paste(image: np.ndarray, source: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The output (H, W, 3) uint8 with the source's pixels where `mask` (H, W, in [0, 1]) is 0, its own where
    it is 1, mixed between (rounded); exact copies of the source where the mask is 0."""
    src = source[: image.shape[0], : image.shape[1]]
    if src.shape != image.shape:
        raise MaskError(f"prepared source is {source.shape[1]}x{source.shape[0]}, the output "
                        f"{image.shape[1]}x{image.shape[0]}: cannot paste")
    m = mask[..., None]
    mixed = np.rint(src.astype(np.float32) + m * (image.astype(np.float32) - src.astype(np.float32)))
    out = np.where(m <= 0, src, np.where(m >= 1, image, np.clip(mixed, 0, 255).astype(np.uint8)))
    return out.astype(np.uint8)


def mask_png(mask: np.ndarray) -> bytes:
    """A mask (H, W) in [0, 1] as an 8-bit grey PNG (0 = kept, 255 = edited)."""
    buf = io.BytesIO()
    Image.fromarray(np.rint(np.clip(mask, 0, 1) * 255).astype(np.uint8), "L").save(buf, format="PNG")
    return buf.getvalue()
