"""`pnp-batch report --sort KEY --worst N | --best N | --sample N`: the contact sheet of chosen rows.

Rows come from the latest view (io/view: latest record per id joined with its latest score), filtered by
`--where`; `--worst` / `--best` take the N rows at either end of KEY (rows without a value left out),
`--sample` draws N at random with `--seed`. The sheet shows each row's prepared-for-display source and its
output with its scores: OUT/report/{worst|best|sample}-{N}-{KEY}.png, the chosen ids beside it as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from pnp_batch.errors import UsageError
from pnp_batch.io import storage
from pnp_batch.io.images import decode_image
from pnp_batch.io.inputs import open_row_input, output_policy
from pnp_batch.io.results import result_files
from pnp_batch.io.view import filter_view, latest_view
from pnp_batch.report.browse import write_browse
from pnp_batch.report.sheet import SheetEntry, build_contact_sheet
from pnp_batch.report.write import score_line

log = logging.getLogger(__name__)

# Which end of a metric is good; any other column: lower is better (seconds, distances, costs).
HIGHER_IS_BETTER = frozenset({"clip_score", "clip_score_source", "clip_gain"})
SHEET_THUMB = 192
MAX_SHEET_ROWS = 500


def choose_rows(view: pa.Table, key: str | None, mode: str | None, n: int | None, seed: int = 0) -> pa.Table:
    """The chosen rows, in sheet order: worst/best first, or a seeded sample (ordered by key when given)."""
    if key is not None and key not in view.column_names:
        raise UsageError(f"--sort {key!r} is not a column of the view; columns: {', '.join(view.column_names)}")
    if n is not None and n < 0:
        raise UsageError("N must be >= 0")
    if mode in ("worst", "best"):
        if key is None:
            raise UsageError(f"--{mode} needs --sort KEY")
        rows = view.filter(pc.is_valid(view.column(key)))
        high_good = key in HIGHER_IS_BETTER
        descending = (mode == "best") == high_good
        order = pc.sort_indices(rows, sort_keys=[(key, "descending" if descending else "ascending"), ("id", "ascending")])
        return rows.take(order).slice(0, n)
    rows = view
    if mode == "sample":
        rng = np.random.default_rng(seed)
        k = min(n or 0, rows.num_rows)
        picked = np.sort(rng.choice(rows.num_rows, size=k, replace=False)) if k else np.array([], dtype=np.int64)
        rows = rows.take(pa.array(picked, pa.int64()))
    if key is not None:
        desc = key not in HIGHER_IS_BETTER  # worst first, as --worst orders
        rows = rows.take(pc.sort_indices(rows, sort_keys=[(key, "descending" if desc else "ascending"),
                                                          ("id", "ascending")], null_placement="at_end"))
    return rows if n is None else rows.slice(0, n)


def _thumb(uri: Any, policy: Any = None, max_pixels: int = 64_000_000) -> Image.Image | None:
    """A thumbnail of an output (``policy`` None: OUT's own file) or of a source (read under ``policy``)."""
    if not uri or uri == "<image_bytes>":
        return None
    try:
        data = open_row_input(str(uri), policy) if policy is not None else storage.read_bytes(str(uri))
        img = decode_image(data, max_pixels)
    except Exception:  # noqa: BLE001 - shown as a blank tile
        return None
    img.thumbnail((SHEET_THUMB * 2, SHEET_THUMB * 2))
    return img


def selection_sheet(out: str, rows: pa.Table, title: str, name: str) -> str:
    """Draw the chosen rows (source, then output with its scores) to OUT/report/{name}.png; returns its URI."""
    entries = []
    policy = output_policy(out)  # sources are read where the output's latest run could read them
    for r in rows.slice(0, MAX_SHEET_ROWS).to_pylist():
        src = _thumb(r.get("image"), policy) or Image.new("RGB", (SHEET_THUMB, SHEET_THUMB), (128, 128, 128))
        score = {"status": r.get("eval_status"), "error": r.get("eval_error"), "clip_score": r.get("clip_score"),
                 "clip_score_source": r.get("clip_score_source"), "structure_dist": r.get("structure_dist")}
        note = score_line(score) if r.get("eval_status") else None
        label = f"{r['id']}: {r.get('target_prompt') or ''}"
        if r.get("status") == "ok":
            result = (_thumb(r.get("output")), label)
        else:
            result = (None, f"{label} [{r.get('error')}]")
        entries.append(SheetEntry(source=src, source_label=str(r.get("source_prompt") or r.get("image") or ""),
                                  results=[result], notes=[note]))
    more = f"first {MAX_SHEET_ROWS} of {rows.num_rows} rows" if rows.num_rows > MAX_SHEET_ROWS else f"{rows.num_rows} rows"
    sheet = build_contact_sheet(entries, title=title, settings=more, thumb=SHEET_THUMB)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    uri = storage.join(out, "report", f"{name}.png")
    storage.write_bytes_atomic(uri, buf.getvalue())
    storage.write_text_atomic(storage.join(out, "report", f"{name}.json"),
                              json.dumps({"title": title, "ids": rows.column("id").to_pylist()}, indent=1) + "\n")
    return uri


def report_selection(a: argparse.Namespace) -> list[str]:
    """What `pnp-batch report` writes besides the sweep reports: the chosen rows' sheet, and index.html."""
    mode = "worst" if a.worst is not None else "best" if a.best is not None else "sample" if a.sample is not None else None
    n = a.worst if a.worst is not None else a.best if a.best is not None else a.sample
    if a.page_size < 1:
        raise UsageError("--page-size must be >= 1")
    if mode in ("worst", "best") and a.sort is None:
        raise UsageError(f"--{mode} needs --sort KEY")
    if not result_files(a.out):
        return []
    view = latest_view(a.out)
    written = []
    if mode or a.sort or a.where:
        rows = choose_rows(filter_view(view, a.where), a.sort, mode, n, a.seed)
        name = "-".join(str(x) for x in (mode or "sorted", n if n is not None else "all", a.sort or "id"))
        what = {"worst": f"the {n} worst by {a.sort}", "best": f"the {n} best by {a.sort}",
                "sample": f"{n} rows sampled (seed {a.seed})"}.get(mode or "", f"rows by {a.sort or 'id'}")
        title = f"pnp-batch: {what}" + (f" where {a.where}" if a.where else "")
        written.append(selection_sheet(a.out, rows, title, name))
    if not a.no_index:
        written.append(write_browse(a.out, view, page_size=a.page_size))
    return written
