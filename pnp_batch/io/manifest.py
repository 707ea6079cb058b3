"""Read manifests (Parquet, CSV, JSON Lines; one file or a folder/prefix of Parquet files) from any
URI, validate them, derive ids, and group rows by source image. No torch here.

Manifests are streamed in record batches: a manifest with tens of millions of rows is never held
in memory as Python objects. Problems come in two kinds:

* :class:`ManifestError` — the manifest cannot be used at all (unreadable, missing or mistyped
  columns, duplicate ids). The run stops before any work (exit status 2).
* ``Row.error`` — one row cannot be done (empty prompt, unsafe id, no image, override out of
  range). That row is recorded as failed; the others go on.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import math
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pnp_batch.io import storage
from pnp_batch.io.image_prompts import file_fields, file_id_part, ip_fields, ip_id_part, ip_scale_override
from pnp_batch.io.manifest_schema import (
    FLOAT_COLUMNS,
    KNOWN_COLUMNS,
    OVERRIDE_COLUMNS,
    PARQUET_SUFFIXES,
    ManifestError,
    check_schema,
    csv_convert_options,
    csv_parse_options,
    csv_typed,
    kind_of,
    read_schema,
)
from pnp_batch.io.rows import Row

logger = logging.getLogger(__name__)

ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_ID_RE = re.compile(ID_PATTERN)
BATCH_ROWS = 65_536
_MAX_LISTED = 10


def is_blank(text: str) -> bool:
    """Empty once whitespace and invisible characters (zero-width spaces and joiners, BOM, other format
    and control characters) are taken out."""
    return not any(not ch.isspace() and unicodedata.category(ch) not in ("Cf", "Cc", "Zs", "Zl", "Zp")
                   for ch in text)


def derive_id(image_ref: str | None, source_prompt: str, target_prompt: str, overrides: dict[str, Any],
              image_prompt: list[Any] | None = None) -> str:
    """A deterministic id: 'r' + 16 hex chars of sha256 over the image reference (the manifest's
    ``image`` value as written, or the sha256 of ``image_bytes``), both prompts and the overrides (and
    the image prompt, io/image_prompts.ip_id_part, for rows that have one)."""
    parts = [image_ref, source_prompt, target_prompt, [overrides.get(k) for k in OVERRIDE_COLUMNS]]
    blob = json.dumps(
        parts + [image_prompt] if image_prompt is not None else parts,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return "r" + hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


class RowStream:
    """Rows and ids one at a time, from the batch interface a manifest reader provides (``iter_batches``,
    ``rows_of``, ``iter_id_batches``): a Manifest, and a manifest expanded by a sweep (io/sweep.py)."""

    def iter_rows(self, limit: int | None = None, batch_rows: int | None = None) -> Iterator[Row]:
        """Stream :class:`Row` objects (at most ``limit``), batch by batch."""
        for start, batch in self.iter_batches(limit, batch_rows):
            yield from self.rows_of(batch, start)

    def iter_ids(self) -> Iterator[tuple[int, str]]:
        """(row index, id) for every row (Python strings: small manifests; see ``iter_id_batches``)."""
        for start, ids in self.iter_id_batches():
            for i, rid in enumerate(ids.to_pylist()):
                yield start + i, rid


class Manifest(RowStream):
    """A manifest opened for streaming; see :func:`open_manifest`."""

    def __init__(self, uri: str, files: list[str], kind: str, schema: pa.Schema, base_dir: str) -> None:
        self.uri = uri
        self.files = files
        self.kind = kind
        self.schema = schema
        self.base_dir = base_dir

    @property
    def columns(self) -> list[str]:
        return list(self.schema.names)

    @property
    def extra_columns(self) -> list[str]:
        """Pass-through columns, in manifest order."""
        return [c for c in self.schema.names if c not in KNOWN_COLUMNS]

    @property
    def extra_schema(self) -> pa.Schema:
        """Arrow schema of the pass-through columns (for consistent result shards)."""
        return pa.schema([self.schema.field(c) for c in self.extra_columns])

    def __repr__(self) -> str:
        return f"Manifest({self.uri!r}, kind={self.kind}, files={len(self.files)})"

    # ---- reading --------------------------------------------------------------------------

    def batches(self, columns: list[str] | None = None, batch_rows: int | None = None) -> Iterator[pa.RecordBatch]:
        """Stream record batches (optionally only some columns) over all files in order."""
        cols = [c for c in (columns or self.columns) if c in self.schema.names]
        batch_rows = batch_rows or BATCH_ROWS
        read = {"parquet": self._parquet_batches, "csv": self._csv_batches}.get(self.kind, self._json_batches)
        for f in self.files:
            try:
                yield from read(f, cols, batch_rows)
            except (OSError, pa.ArrowException) as e:
                raise ManifestError(storage.redact(f"cannot read manifest file {f}: {e}")) from None

    def _parquet_batches(self, uri: str, cols: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
        with storage.open_input(uri) as fh:
            # pre_buffer off: pyarrow would otherwise read the chosen columns of every row group at the
            # start, the whole manifest in memory; this way one row group is held at a time
            yield from pq.ParquetFile(fh, pre_buffer=False).iter_batches(batch_size=batch_rows, columns=cols)

    def _csv_batches(self, uri: str, cols: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
        with storage.open_input(uri) as fh:
            reader = pacsv.open_csv(
                fh,
                read_options=pacsv.ReadOptions(block_size=1 << 22),
                parse_options=csv_parse_options(uri),
                convert_options=csv_convert_options(cols, self.columns),
            )
            for batch in reader:
                yield from _rebatch(csv_typed(batch, uri), batch_rows)

    def _json_batches(self, uri: str, cols: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
        with storage.open_input(uri) as fh:
            reader = pajson.open_json(
                fh,
                read_options=pajson.ReadOptions(block_size=1 << 22),
                parse_options=pajson.ParseOptions(explicit_schema=self.schema, unexpected_field_behavior="ignore"),
            )
            for batch in reader:
                yield from _rebatch(batch.select(cols), batch_rows)

    def iter_batches(self, limit: int | None = None, batch_rows: int | None = None,
                     columns: list[str] | None = None) -> Iterator[tuple[int, pa.RecordBatch]]:
        """(index of its first row, batch) over the first ``limit`` rows."""
        index = 0
        for batch in self.batches(columns, batch_rows=batch_rows):
            n = batch.num_rows if limit is None else min(batch.num_rows, limit - index)
            if n <= 0:
                if limit is not None:
                    return
                continue
            yield index, batch if n == batch.num_rows else batch.slice(0, n)
            index += n

    def rows_of(self, batch: pa.RecordBatch, start: int, begin: int = 0, end: int | None = None) -> list[Row]:
        """:class:`Row` objects for rows ``begin:end`` of a batch whose first row has index ``start``."""
        end = batch.num_rows if end is None else end
        cols = {name: batch.column(name).slice(begin, end - begin).to_pylist() for name in batch.schema.names}
        extra = self.extra_columns
        return [self._make_row(start + begin + i, {k: v[i] for k, v in cols.items()}, extra)
                for i in range(end - begin)]

    def batch_ids(self, batch: pa.RecordBatch, start: int) -> pa.Array:
        """The ids of a batch's rows as one ``large_string`` array: the ``id`` column when it has no
        gaps, else each row's id (derived where missing) from its :class:`Row`."""
        ids = _complete_ids(batch.column("id")) if "id" in batch.schema.names else None
        if ids is None:
            ids = pa.array([r.id for r in self.rows_of(batch, start)], pa.large_string())
        return ids

    def _make_row(self, index: int, rec: dict[str, Any], extra_cols: list[str]) -> Row:
        problems: list[str] = []
        image = rec.get("image") or None
        raw_bytes = rec.get("image_bytes")
        image_bytes: bytes | None = None
        if isinstance(raw_bytes, str):
            try:
                image_bytes = base64.b64decode(raw_bytes, validate=True)
            except (binascii.Error, ValueError):
                problems.append("image_bytes is text but not base64")
        elif raw_bytes is not None:
            image_bytes = bytes(raw_bytes)
        source_prompt = rec.get("source_prompt") or ""
        target_prompt = rec.get("target_prompt") or ""
        overrides, override_problems = _overrides(rec)
        problems.extend(override_problems)
        ip_scale, ip_problems = ip_scale_override(rec)
        ip_image, ip_image_bytes, ip_read_problems = ip_fields(rec, self.base_dir)
        overrides.update(ip_scale)
        problems.extend(ip_problems + ip_read_problems)
        mask, mask_bytes, mask_problems = file_fields(rec, self.base_dir, "mask")  # region edits (docs/masks.md)
        problems.extend(mask_problems)
        rid = rec.get("id")
        if rid is None or rid == "":
            ref = image if image_bytes is None else hashlib.sha256(image_bytes).hexdigest()
            extra_part = ip_id_part(rec, overrides)
            mask_part = file_id_part(rec, "mask")
            if mask_part is not None:  # ids of rows without a mask stay as they were
                extra_part = [extra_part, "mask", mask_part]
            rid = derive_id(ref, source_prompt, target_prompt, overrides, extra_part)
        else:
            rid = str(rid)
            if not _ID_RE.fullmatch(rid):
                problems.insert(0, f"unsafe id {rid!r}: must match {ID_PATTERN}")
        if image is None and image_bytes is None and "image_bytes is text but not base64" not in problems:
            problems.append("no image")
        if is_blank(target_prompt):
            problems.append("empty target_prompt")
        return Row(
            index=index,
            id=rid,
            # image_bytes win over image when a row has both (docs/resume.md): the row names only what is read
            image=storage.resolve(self.base_dir, image) if image is not None and image_bytes is None else None,
            image_bytes=image_bytes,
            source_prompt=source_prompt,
            target_prompt=target_prompt,
            overrides=overrides,
            extra={c: rec.get(c) for c in extra_cols},
            error="; ".join(problems) if problems else None,
            ip_image=ip_image,
            ip_image_bytes=ip_image_bytes,
            mask=mask,
            mask_bytes=mask_bytes,
        )

    def iter_id_batches(self, limit: int | None = None) -> Iterator[tuple[int, pa.Array]]:
        """(index of the first row, ids as ``large_string``) batch by batch, over the first ``limit``
        rows; reads only the ``id`` column while it has no gaps, then derives ids from whole rows."""
        index = 0
        if "id" in self.schema.names:
            for start, batch in self.iter_batches(limit, columns=["id"]):
                ids = _complete_ids(batch.column(0))
                if ids is None:
                    break
                yield start, ids
                index = start + len(ids)
            else:
                return
        # Some ids are missing: derive them from the whole rows, continuing where we stopped.
        for start, batch in self.iter_batches(limit):
            if start + batch.num_rows <= index:
                continue
            if start < index:
                batch, start = batch.slice(index - start), index
            yield start, self.batch_ids(batch, start)

    def check_ids(self) -> int:
        """Return the row count; raise ManifestError on duplicate ids (naming the first few).

        The ids are gathered as one Arrow string array (no Python object per id) and sorted; equal
        neighbours are the duplicates. Memory: about three times the ids' bytes, while sorting.
        """
        chunks = [ids for _, ids in self.iter_id_batches()]
        if not chunks:
            return 0
        ids = pa.chunked_array(chunks, pa.large_string()).combine_chunks()
        del chunks
        count = len(ids)
        if count < 2:
            return count
        order = pc.sort_indices(ids)
        ranked = ids.take(order)
        same = pc.equal(ranked.slice(1), ranked.slice(0, count - 1))
        if not pc.any(same).as_py():
            del ranked, order, same
            pa.default_memory_pool().release_unused()  # what planning reads next may use it
            return count
        dup_values = pc.unique(ranked.slice(1).filter(same))
        del ranked, order
        self._raise_duplicates(ids, dup_values)
        return count  # not reached

    def _raise_duplicates(self, ids: pa.Array, dup_values: pa.Array) -> None:
        """Name the duplicate ids with their rows, first occurring first."""
        positions = np.flatnonzero(pc.is_in(ids, value_set=dup_values).to_numpy(zero_copy_only=False))
        seen: dict[str, list[int]] = {}
        for index, rid in zip(positions.tolist(), ids.take(pa.array(positions)).to_pylist()):
            rows = seen.get(rid)
            if rows is None:
                if len(seen) >= _MAX_LISTED:  # positions ascend: the first ids met are the ones listed
                    continue
                rows = seen[rid] = []
            if len(rows) <= 5:
                rows.append(index)
        listed = sorted(seen.items(), key=lambda kv: kv[1][0])
        where = self._row_locator()
        parts = [
            f"{rid!r} (rows {', '.join(where(i) for i in idx[:5])}{', ...' if len(idx) > 5 else ''})"
            for rid, idx in listed[:_MAX_LISTED]
        ]
        n = len(dup_values)
        more = f" and {n - _MAX_LISTED} more" if n > _MAX_LISTED else ""
        hint = "" if "id" in self.schema.names else " (derived ids collide only for identical rows)"
        raise ManifestError(
            f"{self.uri}: {n} duplicate id{'s' if n != 1 else ''}: {'; '.join(parts)}{more}{hint}"
        )

    def _row_locator(self):
        """index -> "N" for a one-file manifest, "N (row K of FILE)" for a folder of files (rows counted
        from each file's footer)."""
        if len(self.files) < 2:
            return str
        counts = []
        for f in self.files:
            with storage.open_input(f) as fh:
                counts.append(pq.ParquetFile(fh).metadata.num_rows)
        starts = np.cumsum([0, *counts])

        def where(i: int) -> str:
            k = int(np.searchsorted(starts, i, side="right") - 1)
            return f"{i} (row {i - int(starts[k])} of {storage.redact(self.files[k])})"
        return where

    def fingerprint(self) -> str:
        """A short hash of the manifest's files (names and sizes) and schema."""
        h = hashlib.sha256(str(self.schema).encode())
        for f in self.files:
            try:
                size = storage.size(f)
            except OSError:
                size = -1
            h.update(f"{f}\0{size}\n".encode())
        return h.hexdigest()[:16]


def _complete_ids(col: pa.Array) -> pa.Array | None:
    """An id column as ``large_string`` when every row has one (not null, not empty), else None."""
    if col.null_count:
        return None
    ids = col.cast(pa.large_string())
    if len(ids) and pc.any(pc.equal(pc.utf8_length(ids), 0)).as_py():
        return None
    return ids


def _rebatch(batch: pa.RecordBatch, rows: int) -> Iterator[pa.RecordBatch]:
    for start in range(0, batch.num_rows, rows):
        yield batch.slice(start, rows)


def _overrides(rec: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    out: dict[str, Any] = {}
    problems: list[str] = []
    v = rec.get("negative_prompt")
    if v is not None:
        out["negative_prompt"] = str(v)
    v = rec.get("seed")
    if v is not None and not (isinstance(v, float) and math.isnan(v)):
        if isinstance(v, float) and not v.is_integer():
            problems.append(f"seed={v!r} must be a whole number")
        elif int(v) < 0:
            problems.append(f"seed={int(v)} must be >= 0")
        else:
            out["seed"] = int(v)
    for key in FLOAT_COLUMNS:
        v = rec.get(key)
        if v is None:
            continue
        f = float(v)
        if math.isnan(f):  # pandas writes NaN for missing floats: treat as absent
            continue
        if key == "guidance_scale":
            if not math.isfinite(f) or f < 0:
                problems.append(f"guidance_scale={f!r} must be a number >= 0")
                continue
        elif not 0.0 <= f <= 1.0:
            problems.append(f"{key}={f!r} must be a number from 0 to 1")
            continue
        out[key] = f
    return out, problems


def open_manifest(uri: str) -> Manifest:
    """Open a manifest file, or a folder/prefix of Parquet files, from any URI."""
    if not storage.is_remote(uri):  # relative image paths must not depend on a worker's cwd
        uri = os.path.abspath(storage.filesystem(uri)[1])
    kind = kind_of(uri)
    is_dir = storage.is_dir(uri)
    if kind == "unknown" or is_dir:
        if is_dir:
            files = storage.list_files(uri)
            parquet = [f for f in files if f.lower().endswith(PARQUET_SUFFIXES)]
            if not parquet:
                raise ManifestError(f"no Parquet files under {storage.redact(uri)}")
            schemas = [read_schema(f, "parquet") for f in parquet]
            for f, s in zip(parquet, schemas):
                check_schema(s, f)
            try:
                schema = pa.unify_schemas(schemas, promote_options="permissive")
            except (pa.ArrowException, TypeError) as e:
                raise ManifestError(f"{uri}: the Parquet files have incompatible schemas: {e}") from None
            return Manifest(uri, parquet, "parquet", schema, uri.rstrip("/") or uri)
        if not storage.exists(uri):
            raise ManifestError(f"manifest not found: {storage.redact(uri)}")
        kind = "parquet"  # unknown extension: Parquet is the documented format
    schema = read_schema(uri, kind)
    check_schema(schema, uri)
    return Manifest(uri, [uri], kind, schema, storage.parent(uri))


# ------------------------------------------------------------------------------------------
# Grouping
# ------------------------------------------------------------------------------------------


def group_rows(rows: Iterable[Row], window: int = 256) -> Iterator[list[Row]]:
    """Group rows sharing a source image, streaming: within each window of ``window`` rows,
    groups come out in first-seen order. Rows with an error are single-row groups; rows of one source
    that cannot share a UNet batch (Row.batch_key: a swept negative-prompt mode or layer setting) form
    groups of their own."""
    groups: dict[str, list[Row]] = {}
    n = 0
    for row in rows:
        key = f"\0error:{row.index}" if row.error else row.batch_key
        groups.setdefault(key, []).append(row)
        n += 1
        if n >= window:
            yield from groups.values()
            groups = {}
            n = 0
    yield from groups.values()
