"""A translated image's pixels: the VAE's output as 8-bit RGB (where it is written: io/output_paths.py)."""

from __future__ import annotations

import numpy as np
import torch


def to_uint8(images: torch.Tensor, quantize: str) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] from the VAE -> (B, H, W, 3) uint8, as diffusers (round) or ToPILImage (floor)."""
    x = (images.float() / 2 + 0.5).clamp(0, 1) * 255
    x = x.round() if quantize == "round" else x
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
