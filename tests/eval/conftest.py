"""Fixtures of the evaluation tests: the random-weight metric models, loaded once, and seeded images."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def metric_models():
    """tiny-clip and tiny-dino on the CPU in fp32 (built into the pnp-batch cache on first use)."""
    from pnp_batch.eval.models import load_metric_models

    return load_metric_models("tiny-clip", "tiny-dino", device="cpu", dtype="auto")


def _noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth random RGB image (low-frequency noise upsampled), so resizing keeps its structure."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(height // 8, 2), max(width // 8, 2), 3), dtype=np.uint8)
    return Image.fromarray(small, "RGB").resize((width, height), Image.BILINEAR)


@pytest.fixture
def noise_image() -> Callable[..., Image.Image]:
    """``noise_image(width, height, seed=0)``: a deterministic RGB test image made in memory."""
    return _noise_image
