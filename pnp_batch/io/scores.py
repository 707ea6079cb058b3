"""Read the metric scores of an output (`OUT/eval/*.parquet`) for the reports.

The eval stage writes one record per scoring attempt: `id`, `config_hash`, `status` (`ok`|`failed`),
`error`, `clip_score`, `clip_score_source`, `structure_dist`, the metric models and their revisions,
`scored_at`. A row's score is its latest `ok` record per (id, config_hash).
"""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pnp_batch.io import storage

log = logging.getLogger(__name__)

SCORE_COLUMNS = ("id", "config_hash", "status", "clip_score", "clip_score_source", "structure_dist", "scored_at")
_EMPTY = pa.schema([("id", pa.string()), ("config_hash", pa.string()), ("clip_score", pa.float64()),
                    ("clip_score_source", pa.float64()), ("structure_dist", pa.float64())])


def eval_dir(out_uri: str) -> str:
    return storage.join(out_uri, "eval")


def _read(uri: str) -> pa.Table | None:
    try:
        with storage.open_input(uri) as fh:
            pf = pq.ParquetFile(fh)
            return pf.read(columns=[c for c in SCORE_COLUMNS if c in pf.schema_arrow.names])
    except (OSError, pa.ArrowException) as e:
        log.warning("skipping unreadable score shard %s: %s", storage.redact(uri), storage.redact(str(e)))
        return None


def latest_scores(out_uri: str) -> pa.Table:
    """One row per (id, config_hash): its latest ok score (by `scored_at`, then shard order);
    columns id, config_hash, clip_score, clip_score_source, structure_dist. Empty when nothing is scored."""
    tables = []
    for f in storage.list_files(eval_dir(out_uri), ".parquet"):
        t = _read(f)
        if t is not None and t.num_rows and {"id", "config_hash", "status"} <= set(t.column_names):
            for c in _EMPTY.names:
                if c not in t.column_names:
                    t = t.append_column(c, pa.nulls(t.num_rows, _EMPTY.field(c).type))
            if "scored_at" not in t.column_names:
                t = t.append_column("scored_at", pa.nulls(t.num_rows, pa.timestamp("us", tz="UTC")))
            tables.append(t.select([*_EMPTY.names, "status", "scored_at"]).cast(
                pa.schema([*_EMPTY, ("status", pa.string()), ("scored_at", pa.timestamp("us", tz="UTC"))])))
    if not tables:
        return _EMPTY.empty_table()
    table = pa.concat_tables(tables)
    table = table.filter(pc.equal(table.column("status"), "ok"))
    if table.num_rows == 0:
        return _EMPTY.empty_table()
    pos = pa.array(range(table.num_rows), pa.int64())
    when = pc.fill_null(table.column("scored_at").cast(pa.int64()), -(2**63))
    order = pc.sort_indices(pa.table({"w": when, "p": pos}), sort_keys=[("w", "ascending"), ("p", "ascending")])
    table = table.take(order)
    keyed = pa.table({"id": table.column("id"), "h": table.column("config_hash"),
                      "pos": pa.array(range(table.num_rows), pa.int64())})
    last = keyed.group_by(["id", "h"], use_threads=False).aggregate([("pos", "max")]).column("pos_max")
    return table.take(pc.take(last, pc.sort_indices(last))).select(_EMPTY.names)
