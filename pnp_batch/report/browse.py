"""OUT/report/index.html: a browsable page of every row of a run, for runs of 100,000 rows.

Written by `pnp-batch report`: thumbnails (OUT/report/thumbs/, JPEG, one per output and one per source,
each written once: a name carries a hash of what it shows, so a later call only adds the new ones), the
rows' data as script files of CHUNK_ROWS rows (OUT/report/data/rows-NNNNN.js; scripts, not fetch(), so
the page also works opened from a local disk), and the page (assets/report/browse.html: its script sorts by any numeric
column, filters by status and setting, and shows one page of cards at a time).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from pnp_batch.io import storage
from pnp_batch.io.images import decode_image
from pnp_batch.io.inputs import open_row_input, output_policy
from pnp_batch.resources import BROWSE_PAGE

log = logging.getLogger(__name__)

THUMB = 160
CHUNK_ROWS = 2000
TEXT_COLUMNS = ("id", "status", "error", "target_prompt", "source_prompt")


def _h(*parts: Any) -> str:
    return hashlib.sha256("\x00".join(str(p) for p in parts).encode("utf-8")).hexdigest()[:12]


def thumb_name(kind: str, uri: str, stamp: Any = "") -> str:
    """The thumbnail's file name: what it shows (the image URI and, for outputs, the record's time) hashed."""
    return f"{kind}-{_h(uri, stamp)}.jpg"


def _make_thumb(uri: str, dest: str, policy: Any = None) -> bool:
    """A JPEG thumbnail of ``uri`` at ``dest``; a source is read under the run's input ``policy``."""
    try:
        img = decode_image(open_row_input(uri, policy) if policy is not None else storage.read_bytes(uri), 64_000_000)
        img.thumbnail((THUMB, THUMB))
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="JPEG", quality=85)
        storage.write_bytes_atomic(dest, buf.getvalue())
        return True
    except Exception as e:  # noqa: BLE001 - a card without a thumbnail
        log.debug("no thumbnail for %s: %s", storage.redact(uri), e)
        return False


def _setting(r: dict[str, Any]) -> str:
    return str(r.get("setting") or r.get("config_hash") or "")


def _numeric(schema: pa.Schema) -> list[str]:
    return [f.name for f in schema if (pa.types.is_floating(f.type) or pa.types.is_integer(f.type))]


def _num(v: Any) -> Any:
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


def write_browse(out: str, view: pa.Table, page_size: int = 100, threads: int | None = None,
                 policy: Any = None) -> str:
    """Write OUT/report/index.html, its data chunks and the missing thumbnails; returns the page's URI."""
    report = storage.join(out, "report")
    thumbs = storage.join(report, "thumbs")
    have = {storage.basename(u) for u in storage.list_files(thumbs, ".jpg")}
    numeric = _numeric(view.schema)
    cols = [c for c in (*TEXT_COLUMNS, "image", "output", "finished_at", "setting", "config_hash", *numeric)
            if c in view.column_names]
    if policy is None:  # sources are read where the output's latest run could read them
        policy = output_policy(out)
    jobs: dict[str, str] = {}
    sources: set[str] = set()  # thumbnails of sources: read under the run's input policy
    rows_out = []
    for r in view.select(cols).to_pylist():
        card: dict[str, Any] = {c: r.get(c) for c in TEXT_COLUMNS if c in r}
        card["setting"] = _setting(r)
        card["m"] = [_num(r.get(c)) for c in numeric]
        if r.get("status") == "ok" and r.get("output"):
            name = thumb_name("out", r["output"], r.get("finished_at"))
            card["t"] = name
            card["o"] = _link(out, str(r["output"]))
            if name not in have:
                jobs[name] = str(r["output"])
        src = r.get("image")
        if src and src != "<image_bytes>":
            name = thumb_name("src", src)
            card["s"] = name
            if name not in have:
                jobs[name] = str(src)
                sources.add(name)
        rows_out.append(card)
    if jobs:
        log.info("report: writing %d thumbnails", len(jobs))
        names = sorted(jobs)
        with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
            made = list(pool.map(lambda n: _make_thumb(jobs[n], storage.join(thumbs, n),
                                                       policy if n in sources else None), names))
        missing = {n for n, ok in zip(names, made) if not ok}
        for card in rows_out:  # an image that could not be read: its card shows a blank tile
            for k in ("t", "s"):
                if card.get(k) in missing:
                    del card[k]
    data = storage.join(report, "data")
    chunks = max(1, -(-len(rows_out) // CHUNK_ROWS))
    for k in range(chunks):
        part = rows_out[k * CHUNK_ROWS:(k + 1) * CHUNK_ROWS]
        text = f"PNP_ROWS({k}, {json.dumps(part, separators=(',', ':'), default=str)});\n"
        storage.write_text_atomic(storage.join(data, f"rows-{k:05d}.js"), text)
    for uri in storage.list_files(data, ".js"):  # chunks of an earlier, larger view
        name = storage.basename(uri)
        if name.startswith("rows-") and name[5:10].isdigit() and int(name[5:10]) >= chunks:
            storage.delete(uri)
    meta = {"total": len(rows_out), "chunks": chunks, "numeric": numeric, "page_size": page_size,
            "statuses": sorted({str(r.get("status")) for r in rows_out}),
            "settings": sorted({r["setting"] for r in rows_out}), "title": f"pnp-batch: {len(rows_out)} rows"}
    storage.write_text_atomic(storage.join(data, "meta.js"), f"PNP_META({json.dumps(meta)});\n")
    page = BROWSE_PAGE.read_text(encoding="utf-8")
    uri = storage.join(report, "index.html")
    storage.write_text_atomic(uri, page)
    log.info("report page: %s (%d rows, %d thumbnails written)", uri, len(rows_out), len(jobs))
    return uri


def _link(out: str, uri: str) -> str:
    """The output's link from OUT/report/: relative when it lies under OUT, else as recorded."""
    if not storage.is_remote(out) and not storage.is_remote(uri) and "://" not in uri:
        rel = os.path.relpath(os.path.abspath(uri), os.path.abspath(os.path.join(out, "report")))
        return rel.replace(os.sep, "/")
    base = out.rstrip("/") + "/"
    return "../" + uri[len(base):] if uri.startswith(base) else uri
