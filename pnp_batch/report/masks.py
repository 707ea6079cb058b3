"""The contact sheet's view of region edits (docs/masks.md): each row's mask outlined on its source."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable

import numpy as np
from PIL import Image

from pnp_batch.io import storage
from pnp_batch.io.output_paths import located

log = logging.getLogger(__name__)

# Outline colours, one per distinct mask of a source (rows of one source may have masks of their own).
COLOURS = ((255, 0, 255), (0, 255, 255), (255, 255, 0), (255, 96, 0), (0, 255, 0))


def _edge(on: np.ndarray) -> np.ndarray:
    """The pixels of a binary region that touch a pixel outside it (4-neighbourhood), the frame excluded."""
    inner = on.copy()
    inner[1:, :] &= on[:-1, :]
    inner[:-1, :] &= on[1:, :]
    inner[:, 1:] &= on[:, :-1]
    inner[:, :-1] &= on[:, 1:]
    return on & ~inner


def outline_masks(thumb: Image.Image, out: str, masks: Iterable[str | None]) -> Image.Image:
    """`thumb` with the outline of each distinct mask (OUT/masks/..., as recorded) drawn on it; masks that
    cannot be read are left out (the sheet is a view, not a check)."""
    seen: list[str] = []
    for m in masks:
        if m and m not in seen:
            seen.append(m)
    if not seen:
        return thumb
    arr = np.asarray(thumb.convert("RGB")).copy()
    for k, uri in enumerate(seen):
        try:
            with Image.open(io.BytesIO(storage.read_bytes(located(out, uri, "masks") or uri))) as img:
                small = img.convert("L").resize(thumb.size, resample=Image.NEAREST)
        except Exception as e:  # noqa: BLE001 - no outline for an unreadable mask
            log.debug("no outline for mask %s: %s", storage.redact(uri), e)
            continue
        edge = _edge(np.asarray(small) > 0)
        arr[edge] = COLOURS[k % len(COLOURS)]
    return Image.fromarray(arr, "RGB")
