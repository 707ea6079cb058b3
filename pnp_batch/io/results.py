"""Result records as Parquet shards, run summaries, the done-index used for resume, and status.

Layout under ``OUT``:

* ``results/{run_id}-{seq:05d}.parquet`` — many records per shard, each shard written whole in
  one atomic write, so a killed run leaves no partial shard. Readable as one dataset.
* ``runs/{run_id}.json`` — one summary per run.

A row's *latest* record (by ``finished_at``, ties by shard name, then position) is its state;
rows whose latest status is ``ok`` are skipped by the next run. No torch here.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import secrets
import threading
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pnp_batch.errors import StoreRefused
from pnp_batch.io import storage
from pnp_batch.io.done_index import DoneIndex

logger = logging.getLogger(__name__)

# The results schema, versioned: every shard is written with exactly these columns and types (null
# or not), then the pass-through columns typed from the manifest's schema. A later version only
# adds columns (at the end), so shards of every version read as one dataset. docs/results.md.
RESULTS_SCHEMA_VERSION = 3  # 2: work_key, image_sha256, output_sha256 (docs/resume.md); 3: mask (docs/masks.md)
SCHEMA_VERSION_KEY = b"pnp_batch.results_schema_version"
RESULT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("warning", pa.string()),
        ("output", pa.string()),
        ("image", pa.string()),
        ("source_prompt", pa.string()),
        ("target_prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("seed", pa.int64()),
        ("guidance_scale", pa.float64()),
        ("pnp_f_t", pa.float64()),
        ("pnp_attn_t", pa.float64()),
        ("pipeline", pa.string()),
        ("config_hash", pa.string()),
        ("model", pa.string()),
        ("feature_key", pa.string()),
        ("feature_cache_hit", pa.bool_()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("invert_seconds", pa.float64()),
        ("translate_seconds", pa.float64()),
        ("worker", pa.string()),
        ("attempt", pa.int64()),
        ("run_id", pa.string()),
        ("finished_at", pa.timestamp("us", tz="UTC")),
        ("work_key", pa.string()),
        ("image_sha256", pa.string()),
        ("output_sha256", pa.string()),
        ("mask", pa.string()),  # OUT/masks/{id}.png: the row's mask as applied (region edits), else null
    ],
    metadata={SCHEMA_VERSION_KEY: str(RESULTS_SCHEMA_VERSION).encode()},
)
RESULT_COLUMNS = tuple(RESULT_SCHEMA.names)
_RESULT_SET = frozenset(RESULT_COLUMNS)
STATUSES = ("ok", "failed")


def results_dir(out_uri: str) -> str:
    return storage.join(out_uri, "results")


def runs_dir(out_uri: str) -> str:
    return storage.join(out_uri, "runs")


def make_run_id() -> str:
    """A sortable run id: UTC time to the millisecond plus 6 random hex chars (runs can start within a second)."""
    now = dt.datetime.now(dt.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}Z-" + secrets.token_hex(3)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# ------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------


class ResultWriter:
    """Buffer result records and write them as Parquet shards of many rows.

    A shard is written when ``shard_rows`` records are buffered, when ``flush_seconds`` have
    passed since the last write (checked on :meth:`add` and :meth:`maybe_flush`), and on
    :meth:`flush` / :meth:`close`. Pass-through columns take their types from ``extra_schema``
    (e.g. ``Manifest.extra_schema``) when given, so every shard of a run has the same schema.
    Thread-safe. Subclasses write other tables the same way (``folder``, ``_prepare``, ``_table``:
    io/metrics.ScoreWriter).
    """

    folder = "results"

    def __init__(
        self,
        out_uri: str,
        run_id: str,
        shard_rows: int = 1000,
        flush_seconds: float = 30.0,
        extra_schema: pa.Schema | None = None,
    ) -> None:
        self.out_uri = out_uri
        self.run_id = run_id
        self.shard_rows = max(1, int(shard_rows))
        self.flush_seconds = flush_seconds
        self.rows_written = 0
        self.files_written: list[str] = []
        self.unwritten: list[dict[str, Any]] = []  # records of shards the store refused (their rows stay pending)
        self._buffer: list[dict[str, Any]] = []
        self._seq = 0
        self._last_flush = time.monotonic()
        self._lock = threading.RLock()
        self._extra_types: dict[str, pa.DataType] = {}
        self._carried: dict[str, pa.DataType] | None = None  # read at the first write
        if extra_schema is not None:
            for f in extra_schema:
                if f.name not in RESULT_COLUMNS:
                    self._extra_types[f.name] = f.type
        self._closed = False

    def add(self, record: dict[str, Any]) -> None:
        """Buffer one record (missing columns become null; ``finished_at`` defaults to now)."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{type(self).__name__} is closed")
            self._buffer.append(self._prepare(record))
            if len(self._buffer) >= self.shard_rows:
                self.flush()
            else:
                self.maybe_flush()

    def _prepare(self, record: dict[str, Any]) -> dict[str, Any]:
        """The record as buffered: defaults filled, status checked, error redacted."""
        rec = dict(record)
        rec.setdefault("run_id", self.run_id)
        if rec.get("finished_at") is None:
            rec["finished_at"] = utcnow()
        if rec.get("status") not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {rec.get('status')!r}")
        if rec.get("error") is not None:
            rec["error"] = storage.redact(str(rec["error"]))
        return rec

    def maybe_flush(self) -> None:
        """Flush if ``flush_seconds`` have passed since the last write."""
        with self._lock:
            if self._buffer and time.monotonic() - self._last_flush >= self.flush_seconds:
                self.flush()

    def flush(self) -> str | None:
        """Write the buffered records as shards now; returns the last shard's URI (or None)."""
        with self._lock:
            last = None
            while self._buffer:
                chunk, self._buffer = self._buffer[: self.shard_rows], self._buffer[self.shard_rows :]
                try:
                    last = self._write(chunk)
                except StoreRefused:
                    self.unwritten.extend(chunk)
                    raise
            self._last_flush = time.monotonic()
            return last

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self.flush()
                self._closed = True

    def __enter__(self) -> ResultWriter:  # noqa: PYI034 - py3.10 has no typing.Self
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _table(self, records: list[dict[str, Any]]) -> pa.Table:
        """The records under :data:`RESULT_SCHEMA`, then the pass-through columns: typed from the
        manifest (all-null ones too), else from the values, never Arrow's null type (string then)."""
        arrays: list[pa.Array] = [pa.array([r.get(f.name) for r in records], type=f.type) for f in RESULT_SCHEMA]
        fields: list[pa.Field] = list(RESULT_SCHEMA)
        if self._carried is None:
            self._carried = _carried_columns(self.out_uri)
        extra_names = dict.fromkeys(self._extra_types)
        for r in records:
            for k in r:
                if k not in _RESULT_SET and k not in extra_names:
                    extra_names[k] = None
        for name, typ in self._carried.items():
            if name not in extra_names:
                extra_names[name] = None
                self._extra_types.setdefault(name, typ)
        for name in extra_names:
            arr = _extra_array([r.get(name) for r in records], self._extra_types.get(name))
            if name not in self._extra_types or pa.types.is_null(self._extra_types[name]):
                self._extra_types[name] = arr.type
            arrays.append(arr)
            fields.append(pa.field(name, arr.type))
        return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=RESULT_SCHEMA.metadata))

    def _write(self, records: list[dict[str, Any]]) -> str:
        table = self._table(records)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        name = f"{self.run_id}-{self._seq:05d}.parquet"
        uri = storage.join(self.out_uri, self.folder, name)
        storage.write_bytes_atomic(uri, sink.getvalue().to_pybytes())
        self._seq += 1
        self.rows_written += len(records)
        self.files_written.append(uri)
        logger.debug("wrote %d result records to %s", len(records), uri)
        return uri


def _extra_array(values: list[Any], typ: pa.DataType | None) -> pa.Array:
    """An Arrow array for a pass-through column: the known type if it fits, else inferred, else JSON
    text; an all-null column of no known type is a string column (never Arrow's null type)."""
    if typ is not None and not pa.types.is_null(typ):
        try:
            return pa.array(values, type=typ)
        except (pa.ArrowException, TypeError, ValueError):
            pass
    try:
        arr = pa.array(values)
    except (pa.ArrowException, TypeError, ValueError):
        arr = pa.array([None if v is None else json.dumps(v, default=str) for v in values], type=pa.string())
    return arr.cast(pa.string()) if pa.types.is_null(arr.type) else arr


def _carried_columns(out_uri: str) -> dict[str, pa.DataType]:
    """The pass-through columns of the newest shard already under ``OUT`` (name -> type): a run whose
    manifest lacks one still writes it (all null, same type), so a reader that takes the first
    shard's columns (DuckDB's default) finds them in every later shard. The newest shard carries
    every earlier run's columns the same way, so one footer read is enough."""
    try:
        files = result_files(out_uri)
        if not files:
            return {}
        with storage.open_input(files[-1]) as fh:
            schema = pq.ParquetFile(fh).schema_arrow
    except (OSError, pa.ArrowException) as e:
        logger.debug("no columns carried from earlier shards: %s", e)
        return {}
    return {f.name: f.type for f in schema if f.name not in _RESULT_SET and not pa.types.is_null(f.type)}


def schema_version(schema: pa.Schema) -> int:
    """The results schema version a shard was written with (0: before versions, no metadata)."""
    raw = (schema.metadata or {}).get(SCHEMA_VERSION_KEY)
    return int(raw) if raw else 0


# ------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------


def result_files(out_uri: str) -> list[str]:
    """The result shards under ``OUT/results`` in name order (hidden temp files excluded)."""
    return storage.list_files(results_dir(out_uri), ".parquet")


def _read_file(uri: str, columns: list[str] | None = None) -> pa.Table:
    with storage.open_input(uri) as fh:
        pf = pq.ParquetFile(fh)
        cols = None if columns is None else [c for c in columns if c in pf.schema_arrow.names]
        return pf.read(columns=cols)


def read_results(out_uri: str, columns: list[str] | None = None) -> pa.Table:
    """Every result record of every shard as one table (schemas unified across shards)."""
    files = result_files(out_uri)
    if not files:
        schema = RESULT_SCHEMA if columns is None else pa.schema(
            [RESULT_SCHEMA.field(c) for c in columns if c in _RESULT_SET]
        )
        return schema.empty_table()
    tables = [_read_file(f, columns) for f in files]
    return _concat(tables)


def _concat(tables: list[pa.Table]) -> pa.Table:
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowException, TypeError):
        # Pass-through columns whose types disagree across runs: fall back to strings for those.
        schema = pa.unify_schemas([t.schema for t in tables], promote_options="permissive")
        return pa.concat_tables([t.cast(schema) for t in tables], promote_options="permissive")


def dataset(out_uri: str) -> ds.Dataset:
    """The result shards as one ``pyarrow.dataset`` (local or remote)."""
    files = result_files(out_uri)
    fs, _ = storage.filesystem(results_dir(out_uri))
    paths = [storage.filesystem(f)[1] for f in files]
    schemas = []
    for f in files:
        with storage.open_input(f) as fh:
            schemas.append(pq.ParquetFile(fh).schema_arrow)
    schema = pa.unify_schemas(schemas, promote_options="permissive") if schemas else RESULT_SCHEMA
    return ds.dataset(paths, schema=schema, format="parquet", filesystem=fs)


def _ordered(table: pa.Table, file_index: list[int]) -> pa.Table:
    """Sort records oldest first: finished_at, then shard order, then position in the shard."""
    n = table.num_rows
    fin = table.column("finished_at") if "finished_at" in table.column_names else pa.nulls(n, pa.int64())
    fin = pc.fill_null(fin.cast(pa.int64()), -(2**63))
    keyed = pa.table({"f": fin, "s": pa.array(file_index, pa.int64()), "p": pa.array(range(n), pa.int64())})
    order = pc.sort_indices(keyed, sort_keys=[("f", "ascending"), ("s", "ascending"), ("p", "ascending")])
    return table.take(order)


def _read_indexed(out_uri: str, columns: list[str] | None) -> tuple[pa.Table, list[int]]:
    files = result_files(out_uri)
    tables: list[pa.Table] = []
    file_index: list[int] = []
    for i, f in enumerate(files):
        t = _read_file(f, columns)
        tables.append(t)
        file_index.extend([i] * t.num_rows)
    if not tables:
        return pa.table({}), []
    return _concat(tables), file_index


def done_index(out_uri: str, config_hash: str | None = None) -> DoneIndex:
    """Every id with a record and its latest status, as sorted arrays (the resume index; see
    :mod:`pnp_batch.io.done_index`). With ``config_hash``, also which latest records were made under another."""
    return DoneIndex.from_files(result_files(out_uri), config_hash)


def load_latest(out_uri: str) -> dict[str, str]:
    """id → status of its latest record over all shards; {} when there are none. A Python dict of
    every id: for small outputs and tests; planning and status use :func:`done_index`."""
    return done_index(out_uri).to_dict()


def latest_results(out_uri: str, columns: list[str] | None = None) -> pa.Table:
    """One record per id: its latest attempt."""
    if columns is not None:
        columns = list(dict.fromkeys(["id", "finished_at", *columns]))
    table, file_index = _read_indexed(out_uri, columns)
    if table.num_rows == 0:
        return read_results(out_uri, columns)
    table = _ordered(table, file_index)
    pos = pa.array(range(table.num_rows), pa.int64())
    last = (
        pa.table({"id": table.column("id"), "pos": pos})
        .group_by("id", use_threads=False)
        .aggregate([("pos", "max")])
        .column("pos_max")
    )
    return table.take(pc.take(last, pc.sort_indices(last)))


# ------------------------------------------------------------------------------------------
# Run summaries
# ------------------------------------------------------------------------------------------


def write_run_summary(out_uri: str, run_id: str, summary: dict[str, Any]) -> str:
    """Write ``OUT/runs/{run_id}.json`` atomically (secrets redacted); returns its URI."""
    doc = {"run_id": run_id, **summary}
    text = storage.redact(json.dumps(doc, indent=2, default=str, ensure_ascii=False))
    uri = storage.join(runs_dir(out_uri), f"{run_id}.json")
    storage.write_text_atomic(uri, text + "\n")
    return uri


def read_run_summaries(out_uri: str) -> list[dict[str, Any]]:
    """All run summaries, oldest first (by ``started_at`` when present, else by run id)."""
    out: list[dict[str, Any]] = []
    for f in storage.list_files(runs_dir(out_uri), ".json"):
        try:
            doc = json.loads(storage.read_text(f))
        except (OSError, ValueError) as e:
            logger.warning("skipping unreadable run summary %s: %s", f, e)
            continue
        if isinstance(doc, dict):
            doc.setdefault("run_id", os.path.splitext(storage.basename(f))[0])
            out.append(doc)
    out.sort(key=lambda d: (str(d.get("started_at") or d.get("run_id")), str(d.get("run_id"))))
    return out
