"""One exported sample per row of the view: its images read through storage, its metadata as JSON values.

A sample holds the prepared source (decoded and resized as the run's pipeline did, PNG), the output
exactly as stored in OUT/images (its bytes, not re-encoded: the same pixels), the mask when the row had
one, the prompts and every column of the view. A row whose source or output cannot be read is a
`Skipped` with the reason; the export goes on.
"""

from __future__ import annotations

import datetime as dt
import io
import math
from dataclasses import dataclass, field
from typing import Any

from pnp_batch.io import storage
from pnp_batch.io.images import decode_image, resize_source
from pnp_batch.io.inputs import open_row_input

IMAGE_BYTES = "<image_bytes>"
MASK_COLUMNS = ("mask",)  # the record's mask as applied (region edits, docs/masks.md): OUT/masks/{id}.png
DEFAULT_MAX_PIXELS = 64_000_000


@dataclass(frozen=True)
class Prep:
    """How a run's pipeline prepared its sources (from the run summary's config)."""

    resolution: int
    resize_mode: str
    max_pixels: int = DEFAULT_MAX_PIXELS
    lora: tuple[str, ...] = ()

    @classmethod
    def of(cls, cfg: dict[str, Any]) -> Prep | None:
        try:
            return cls(int(cfg["resolution"]), str(cfg["resize_mode"]), int(cfg.get("max_pixels") or DEFAULT_MAX_PIXELS),
                       tuple(str(x) for x in (cfg.get("lora") or ())))
        except (KeyError, TypeError, ValueError):
            return None


@dataclass
class Sample:
    """What every format writes for one row."""

    id: str
    source_png: bytes
    edit: bytes
    edit_ext: str  # the output's own extension (png, jpg, webp): its bytes are copied, not re-encoded
    meta: dict[str, Any]
    mask_png: bytes | None = None


@dataclass
class Skipped:
    id: str
    reason: str


@dataclass
class SampleReader:
    """Reads rows into samples; prepared sources are cached by (URI, preprocessing) within one shard."""

    preps: dict[str, Prep | None]  # config_hash -> preprocessing
    policy: Any = None  # the run's input policy (io/policy.py): sources are read under it
    _sources: dict[tuple, bytes | Exception] = field(default_factory=dict)

    def read(self, row: dict[str, Any]) -> Sample | Skipped:
        rid = str(row["id"])
        prep = self.preps.get(str(row.get("config_hash")))
        output = row.get("output")
        if row.get("status") != "ok" or not output:
            return Skipped(rid, f"row status is {row.get('status')!r}: no output image")
        try:
            edit = storage.read_bytes(output)
        except Exception as e:  # noqa: BLE001 - a skipped row, with its reason
            return Skipped(rid, f"output image unreadable ({storage.redact(str(output))}): {_reason(e)}")
        src = row.get("image")
        if not src or src == IMAGE_BYTES:
            return Skipped(rid, "the source was given as image_bytes in the manifest and is not stored in OUT")
        if prep is None:
            return Skipped(rid, f"no run summary in OUT/runs records how config {row.get('config_hash')} "
                           "prepared its sources")
        got = self._source(str(src), prep)
        if isinstance(got, Exception):
            return Skipped(rid, f"source image unreadable ({storage.redact(str(src))}): {_reason(got)}")
        mask = None
        for col in MASK_COLUMNS:  # the mask as applied (OUT/masks, located by io/view): OUT's own file
            if row.get(col):
                try:
                    mask = storage.read_bytes(str(row[col]))
                    decode_image(mask, prep.max_pixels)  # a damaged file skips the row, as a damaged output does
                except Exception as e:  # noqa: BLE001
                    return Skipped(rid, f"mask unreadable ({storage.redact(str(row[col]))}): {_reason(e)}")
        ext = storage.basename(str(output)).rsplit(".", 1)[-1].lower() if "." in storage.basename(str(output)) else "png"
        meta = jsonable(row)
        meta["lora"] = list(prep.lora)
        return Sample(id=rid, source_png=got, edit=edit, edit_ext=ext, meta=meta, mask_png=mask)

    def _source(self, uri: str, prep: Prep) -> bytes | Exception:
        key = (uri, prep)
        if key not in self._sources:
            try:
                img = resize_source(decode_image(open_row_input(uri, self.policy), prep.max_pixels), prep.resolution,
                                    prep.resize_mode)
                self._sources[key] = _png(img)
            except Exception as e:  # noqa: BLE001
                self._sources[key] = e
        return self._sources[key]


def _png(img: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # fast; lossless all the same
    return buf.getvalue()


def _reason(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return storage.redact(f"{type(e).__name__}: {text}" if text else type(e).__name__)[:300]


def jsonable(row: dict[str, Any]) -> dict[str, Any]:
    """A row's values as JSON values: timestamps as ISO 8601, NaN as null, bytes dropped."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if isinstance(v, (bytes, bytearray)):
            continue
        if isinstance(v, (dt.datetime, dt.date)):
            v = v.isoformat()
        elif isinstance(v, float) and not math.isfinite(v):
            v = None
        out[k] = v
    return out
