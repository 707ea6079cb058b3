"""Row: one manifest row, resolved and checked. Plain Python (no pyarrow), so compute-only code
(the translator, the benchmark, GPU workers) can use it without the data-plane dependencies."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from pnp_batch.config import GROUP_KEYS


@dataclass(frozen=True)
class Row:
    """One manifest row, resolved and checked."""

    index: int
    id: str
    image: str | None
    image_bytes: bytes | None
    source_prompt: str
    target_prompt: str
    overrides: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    # Already ok in an earlier run, but its group still has rows to do: translated again in the
    # group's batch and then dropped (no image written, no record). The rows to do then share their
    # UNet batches with the same rows as in an uninterrupted run, and float rounding differs with
    # the batch, so this is what gives them the same bytes (CONTRACT).
    companion: bool = False
    # What determines the row's output, hashed (io/work_key.py); set by the planner, carried by the record.
    work_key: str | None = None
    # The row's image prompt (IP-Adapter runs, docs/ip_adapter.md): a resolved URI or the bytes; None
    # for both: a text-only row.
    ip_image: str | None = None
    ip_image_bytes: bytes | None = None
    # The row's edit mask (mask_mode: manifest, docs/masks.md): a resolved URI or the bytes; None for both:
    # no mask given.
    mask: str | None = None
    mask_bytes: bytes | None = None

    @cached_property
    def source_key(self) -> str:
        """What identifies the source image: rows sharing it share one inversion."""
        if self.image_bytes is not None:
            return "bytes:" + hashlib.sha256(self.image_bytes).hexdigest()
        return self.image or f"row:{self.index}"

    @cached_property
    def batch_key(self) -> str:
        """What rows must share to be translated in one UNet batch: the source, and the overrides that
        change the batch itself (negative-prompt mode, injection layers; config.GROUP_KEYS). Rows of one
        source that differ there form separate groups, which still share one inversion (feature store)."""
        split = {k: self.overrides[k] for k in GROUP_KEYS if k in self.overrides}
        return self.source_key + (f"\0{sorted(split.items())!r}" if split else "")
