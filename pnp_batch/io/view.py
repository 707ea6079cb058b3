"""The latest view of an output: each id's latest record joined with its latest score, and SQL filters over it.

One row per id (`io/results.latest_results`), the results' columns as they are, and the score of that
row (`io/metrics.read_scores`: latest ``ok`` score, else latest failure) as the columns of ``OUT/eval``;
the two columns both tables have are renamed on the score side (``eval_status``, ``eval_error``), and
``clip_gain = clip_score - clip_score_source`` is added. ``pnp-batch export --where`` and ``pnp-batch
report --where`` evaluate a SQL boolean expression over this view with DuckDB (docs/export.md).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pnp_batch.errors import UsageError
from pnp_batch.io.metrics import SCORE_SCHEMA, read_scores
from pnp_batch.io.output_paths import locate_files
from pnp_batch.io.results import latest_results

# The score columns as the view names them (the others keep their names).
SCORE_RENAMES = {"status": "eval_status", "error": "eval_error"}
# The key a score joins its result on. Issue 20 makes the unit of work (id, work_key): change it here only.
SCORE_JOIN_KEYS = ("id", "config_hash")
VIEW_NAME = "rows"


def join_scores(results: pa.Table, scores: pa.Table) -> pa.Table:
    """`results` (one row per id) with its score's columns (null where the row has none) and `clip_gain`,
    in `results`' order. The one place that knows how a score finds its row."""
    keys = [k for k in SCORE_JOIN_KEYS if k in results.column_names]
    score_cols = [c for c in SCORE_SCHEMA.names if c not in SCORE_JOIN_KEYS]
    renamed = {c: SCORE_RENAMES.get(c, c) for c in score_cols}
    clash = [renamed[c] for c in score_cols if renamed[c] in results.column_names]
    results = results.drop_columns(clash)  # a pass-through column named like a score: the score wins
    if scores.num_rows == 0 or not keys:
        extra = {renamed[c]: pa.nulls(results.num_rows, SCORE_SCHEMA.field(c).type) for c in score_cols}
        joined = results
        for name, arr in extra.items():
            joined = joined.append_column(name, arr)
    else:
        right = scores.select([*keys, *score_cols]).rename_columns([*keys, *(renamed[c] for c in score_cols)])
        pos = "__pnp_pos"
        left = results.append_column(pos, pa.array(range(results.num_rows), pa.int64()))
        joined = left.join(right, keys=keys, join_type="left outer", use_threads=False)
        joined = joined.take(pc.sort_indices(joined.column(pos))).drop_columns([pos])
        joined = joined.select([*results.column_names, *(renamed[c] for c in score_cols)])
    gain = pc.subtract(joined.column("clip_score"), joined.column("clip_score_source"))
    return joined.append_column("clip_gain", gain)


def latest_view(out: str, columns: list[str] | None = None) -> pa.Table:
    """The view of OUT, one row per id, ids in ascending order (a deterministic order for exports)."""
    results = latest_results(out, columns)
    if results.num_rows:
        results = results.take(pc.sort_indices(results.column("id")))
    return join_scores(locate_files(out, results), read_scores(out))  # files where they are now


def _duckdb() -> Any:
    try:
        import duckdb
    except ImportError as e:  # pragma: no cover - a runtime dependency
        raise UsageError("--where needs DuckDB: pip install duckdb") from e
    return duckdb


def where_positions(view: pa.Table, where: str | None) -> list[int]:
    """Positions (ascending) of the view's rows for which the SQL boolean expression `where` is true.

    DuckDB evaluates it (no file or network access); an expression that does not parse, names an unknown
    column or is not boolean raises UsageError (exit 2) that lists the view's columns."""
    if not where or not where.strip():
        return list(range(view.num_rows))
    duckdb = _duckdb()
    pos = "__pnp_pos"
    table = view.append_column(pos, pa.array(range(view.num_rows), pa.int64()))
    con = duckdb.connect(":memory:")
    try:
        con.register(VIEW_NAME, table)
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        try:
            got = con.execute(
                f'SELECT "{pos}" FROM {VIEW_NAME} WHERE ({where}) ORDER BY "{pos}"'
            ).fetchnumpy()
        except duckdb.Error as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(
                f"--where {where!r} cannot be evaluated: {first}\ncolumns: {', '.join(view.column_names)}"
            ) from None
    finally:
        con.close()
    return [int(x) for x in got[pos]]


def filter_view(view: pa.Table, where: str | None) -> pa.Table:
    """The rows of the view that pass `where` (all rows when it is empty), in the view's order."""
    if not where or not where.strip():
        return view
    return view.take(pa.array(where_positions(view, where), pa.int64()))
