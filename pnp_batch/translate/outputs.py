"""A translated image's name and pixels: where it is written, and the VAE's output as 8-bit RGB."""

from __future__ import annotations

import numpy as np
import torch

from pnp_batch.io import storage

EXTENSIONS = {"png": "png", "jpg": "jpg", "webp": "webp"}



def output_uri(out: str, row_id: str, fmt: str) -> str:
    return storage.join(out, "images", f"{row_id}.{EXTENSIONS[fmt]}")


def to_uint8(images: torch.Tensor, quantize: str) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] from the VAE -> (B, H, W, 3) uint8, as diffusers (round) or ToPILImage (floor)."""
    x = (images.float() / 2 + 0.5).clamp(0, 1) * 255
    x = x.round() if quantize == "round" else x
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
