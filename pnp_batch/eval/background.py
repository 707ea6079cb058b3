"""How well a region edit kept what it was told to keep (docs/masks.md): metrics over the unedited region.

For a row with a mask (OUT/masks/{id}.png, 0 = kept), at output size: `bg_mse` (mean squared error of
8-bit values over the kept pixels and channels), `bg_psnr` (10 log10(255^2 / bg_mse), infinite when equal),
`bg_ssim` (the mean of the SSIM map over the kept pixels: torchmetrics' Gaussian SSIM, 11x11, sigma 1.5,
on [0, 255] values, as PIE-Bench computes it over its unedited region). The CLIP score of the edited region
(`clip_score_edited`) is the scorer's: the output with the kept region blacked out (eval/score.py).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


def kept(mask: np.ndarray) -> np.ndarray:
    """The unedited pixels of a mask (H, W) in [0, 1]: where it is 0."""
    return mask <= 0


def background_metrics(output: Any, source: Any, mask: np.ndarray) -> dict[str, float | None]:
    """bg_mse, bg_psnr, bg_ssim of `output` against the prepared `source` (PIL images or (H, W, 3) uint8)
    over the kept pixels of `mask`; None each when nothing is kept."""
    out = np.asarray(output.convert("RGB") if hasattr(output, "convert") else output).astype(np.float64)
    src = np.asarray(source.convert("RGB") if hasattr(source, "convert") else source).astype(np.float64)
    h, w = out.shape[:2]
    src = src[:h, :w]
    keep = kept(mask[:h, :w])
    if src.shape != out.shape or keep.shape != (h, w):
        raise ValueError(f"output {w}x{h}, source {src.shape[1]}x{src.shape[0]}, mask {mask.shape[1]}x{mask.shape[0]}: "
                         "not the same size")
    if not keep.any():
        return {"bg_mse": None, "bg_psnr": None, "bg_ssim": None}
    mse = float(((out - src) ** 2)[keep].mean())
    psnr = 10 * math.log10(255.0**2 / mse) if mse > 0 else math.inf  # identical: infinite
    return {"bg_mse": mse, "bg_psnr": psnr, "bg_ssim": _ssim_over(out, src, keep)}


def _ssim_over(out: np.ndarray, src: np.ndarray, keep: np.ndarray) -> float:
    from torchmetrics.functional.image import structural_similarity_index_measure

    a = torch.from_numpy(out).permute(2, 0, 1).unsqueeze(0).float()
    b = torch.from_numpy(src).permute(2, 0, 1).unsqueeze(0).float()
    if min(a.shape[-2:]) < 11:  # smaller than the window: no SSIM map to take
        raise ValueError("image smaller than the 11x11 SSIM window")
    _, full = structural_similarity_index_measure(a, b, data_range=255.0, return_full_image=True)
    ssim_map = full[0].mean(dim=0).numpy()  # (H, W): the channels' mean
    return float(ssim_map[keep].mean())


def blacked_out(output: Any, mask: np.ndarray) -> Any:
    """The output with its kept region (mask 0) black: what `clip_score_edited` scores."""
    from PIL import Image

    arr = np.asarray(output.convert("RGB")).copy()
    h, w = arr.shape[:2]
    arr[kept(mask[:h, :w])] = 0
    return Image.fromarray(arr, "RGB")


def read_mask_pixels(data: bytes) -> np.ndarray:
    """A stored mask PNG (OUT/masks) as (H, W) float32 in [0, 1]."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0
