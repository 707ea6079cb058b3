"""Figures of the PCA views: rows = images (first column the image itself), columns = layers at one
timestep, or timesteps at one layer. Each view is upsampled nearest to its image's size, then shown at
the figure's cell size."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

CELL = 160  # the longer side of one cell, in pixels
LABEL = 18


def view_image(rgb_tokens: np.ndarray, token_hw: tuple[int, int], image_size: tuple[int, int]) -> Image.Image:
    """A (tokens x 3) uint8 view as an image of ``image_size`` (w, h), upsampled nearest."""
    h, w = token_hw
    return Image.fromarray(rgb_tokens.reshape(h, w, 3)).resize(image_size, Image.NEAREST)


def _cell(img: Image.Image) -> Image.Image:
    w, h = img.size
    s = CELL / max(w, h)
    return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.NEAREST)


def grid(images: list[Image.Image], names: list[str], columns: list[str], cells: list[list[Image.Image | None]],
         title: str) -> Image.Image:
    """rows = images; column 0 the image, then one column per label in ``columns``."""
    n_cols = len(columns) + 1
    fig = Image.new("RGB", (n_cols * (CELL + 4) + 4, LABEL * 2 + len(images) * (CELL + LABEL + 4) + 4), "white")
    draw = ImageDraw.Draw(fig)
    draw.text((4, 2), title, fill="black")
    for j, label in enumerate(["image", *columns]):
        draw.text((4 + j * (CELL + 4), LABEL + 2), label, fill="black")
    for i, (img, name) in enumerate(zip(images, names)):
        y = LABEL * 2 + i * (CELL + LABEL + 4)
        draw.text((4, y), name[:40], fill="black")
        row = [img, *cells[i]]
        for j, c in enumerate(row):
            x = 4 + j * (CELL + 4)
            if c is None:
                draw.text((x + 4, y + LABEL + CELL // 2), "(none)", fill="gray")
                continue
            fig.paste(_cell(c), (x, y + LABEL))
    return fig
