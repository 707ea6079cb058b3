"""A translated image's pixels: the VAE's output as 8-bit RGB (where it is written: io/output_paths.py), and
the one-line reason a row failed."""

from __future__ import annotations

import numpy as np
import torch

from pnp_batch.errors import RowError
from pnp_batch.io import storage
from pnp_batch.io.rows import Row


def to_uint8(images: torch.Tensor, quantize: str) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] from the VAE -> (B, H, W, 3) uint8, as diffusers (round) or ToPILImage (floor)."""
    x = (images.float() / 2 + 0.5).clamp(0, 1) * 255
    x = x.round() if quantize == "round" else x
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def row_message(e: BaseException, row: Row) -> str:
    """A one-line reason for a failed row, without credentials."""
    if isinstance(e, FileNotFoundError):
        msg = f"image not found: {row.image}"
    elif isinstance(e, RowError):
        msg = str(e)
    elif isinstance(e, torch.cuda.OutOfMemoryError):
        msg = "out of GPU memory (lower batch_size or resolution)"
    else:
        msg = f"{type(e).__name__}: {e}"
    return storage.redact(msg.splitlines()[0] if msg else type(e).__name__)[:500]
