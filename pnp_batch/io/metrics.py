"""Metric scores as Parquet shards next to the results, their latest view, and their statistics.

Layout under ``OUT``: ``eval/{eval_run_id}-{seq:05d}.parquet``, one score record per (row attempt,
scoring), all shards with exactly ``SCORE_SCHEMA`` (every column typed, even when all null), each
shard written whole in one atomic write (the ResultWriter's machinery). ``run --eval`` writes them
under its run id, ``pnp-batch eval`` under its own. They join the results on ``(id, config_hash)``
(docs/quality.md). No torch here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pnp_batch.io import storage
from pnp_batch.io.results import STATUSES, ResultWriter, _concat, _read_file, latest_results, utcnow

logger = logging.getLogger(__name__)

SCORE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("config_hash", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("clip_score", pa.float64()),
        ("clip_score_source", pa.float64()),
        ("structure_dist", pa.float64()),
        ("bg_psnr", pa.float64()),  # region edits (docs/masks.md): over the unedited region, rows with a mask
        ("bg_mse", pa.float64()),
        ("bg_ssim", pa.float64()),
        ("clip_score_edited", pa.float64()),
        ("clip_model", pa.string()),
        ("clip_revision", pa.string()),
        ("dino_model", pa.string()),
        ("dino_revision", pa.string()),
        ("scored_at", pa.timestamp("us", tz="UTC")),
    ]
)
SCORE_COLUMNS = tuple(SCORE_SCHEMA.names)
METRICS = ("clip_score", "clip_score_source", "structure_dist")
# Region edits only (docs/masks.md): shown where some row of a setting has them.
REGION_METRICS = ("bg_psnr", "bg_mse", "bg_ssim", "clip_score_edited")
EVAL_FOLDER = "eval"


def scores_dir(out_uri: str) -> str:
    return storage.join(out_uri, EVAL_FOLDER)


def score_files(out_uri: str) -> list[str]:
    """The score shards under ``OUT/eval`` in name order (hidden temp files excluded)."""
    return storage.list_files(scores_dir(out_uri), ".parquet")


class ScoreWriter(ResultWriter):
    """Buffer score records and write them as ``OUT/eval/{run_id}-NNNNN.parquet`` shards of SCORE_SCHEMA."""

    folder = EVAL_FOLDER

    def _prepare(self, record: dict[str, Any]) -> dict[str, Any]:
        unknown = set(record) - set(SCORE_COLUMNS)
        if unknown:
            raise KeyError(f"not score columns: {sorted(unknown)}")
        rec = dict(record)
        if rec.get("scored_at") is None:
            rec["scored_at"] = utcnow()
        if rec.get("status") not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {rec.get('status')!r}")
        if rec.get("error") is not None:
            rec["error"] = storage.redact(str(rec["error"]))
        return rec

    def _table(self, records: list[dict[str, Any]]) -> pa.Table:
        return pa.Table.from_arrays(
            [pa.array([r.get(f.name) for r in records], type=f.type) for f in SCORE_SCHEMA], schema=SCORE_SCHEMA
        )


def read_all_scores(out_uri: str) -> pa.Table:
    """Every score record of every shard, oldest first (scored_at, then shard, then position)."""
    files = score_files(out_uri)
    if not files:
        return SCORE_SCHEMA.empty_table()
    tables, index = [], []
    for i, f in enumerate(files):
        t = _read_file(f)
        tables.append(t.select([c for c in SCORE_COLUMNS if c in t.column_names]))
        index.extend([i] * t.num_rows)
    table = _concat(tables)
    for f in SCORE_SCHEMA:  # columns added later (the background metrics): null in older shards
        if f.name not in table.column_names:
            table = table.append_column(f.name, pa.nulls(table.num_rows, f.type))
    table = table.select(SCORE_SCHEMA.names).cast(SCORE_SCHEMA)
    keys = pa.table({
        "t": pc.fill_null(table.column("scored_at").cast(pa.int64()), -(2**63)),
        "s": pa.array(index, pa.int64()),
        "p": pa.array(range(table.num_rows), pa.int64()),
    })
    return table.take(pc.sort_indices(keys, sort_keys=[("t", "ascending"), ("s", "ascending"), ("p", "ascending")]))


def read_scores(out_uri: str) -> pa.Table:
    """One score per (id, config_hash): its latest ``ok`` score, else its latest failure."""
    table = read_all_scores(out_uri)
    if table.num_rows == 0:
        return table
    # rank: failures before ok, each oldest first; the last of each key wins
    ok = pc.equal(table.column("status"), "ok").cast(pa.int64())
    rank = pa.table({"ok": pc.fill_null(ok, 0), "p": pa.array(range(table.num_rows), pa.int64())})
    order = pc.sort_indices(rank, sort_keys=[("ok", "ascending"), ("p", "ascending")])
    ranked = table.take(order)
    pos = pa.array(range(ranked.num_rows), pa.int64())
    last = (
        pa.table({"id": ranked.column("id"), "config_hash": ranked.column("config_hash"), "pos": pos})
        .group_by(["id", "config_hash"], use_threads=False)
        .aggregate([("pos", "max")])
        .column("pos_max")
    )
    return ranked.take(pc.take(last, pc.sort_indices(last)))


def ok_scores(out_uri: str) -> pa.Table:
    """The latest ``ok`` score of every (id, config_hash) that has one (the reports plot these)."""
    table = read_scores(out_uri)
    return table.filter(pc.equal(table.column("status"), "ok")) if table.num_rows else table


def scored_keys(out_uri: str) -> set[tuple[str, str]]:
    """The (id, config_hash) pairs that have an ``ok`` score: `pnp-batch eval` skips them."""
    table = read_all_scores(out_uri)
    ok = table.filter(pc.equal(table.column("status"), "ok"))
    return set(zip(ok.column("id").to_pylist(), ok.column("config_hash").to_pylist()))


# ------------------------------------------------------------------------------------------
# Statistics per setting (pnp-batch status)
# ------------------------------------------------------------------------------------------


@dataclass
class MetricStats:
    count: int
    mean: float
    median: float
    p10: float
    p90: float


@dataclass
class SettingScores:
    """The latest ok scores of one setting, summarised, and how many of its rows failed scoring."""

    setting: str
    metrics: dict[str, MetricStats | None] = field(default_factory=dict)
    failed: int = 0


def _stats(values: list[float | None]) -> MetricStats | None:
    arr = np.array([v for v in values if v is not None], dtype=np.float64)
    if arr.size == 0:
        return None
    with np.errstate(invalid="ignore"):  # bg_psnr is infinite where the kept region is exact
        p10, median, p90 = np.quantile(arr, [0.1, 0.5, 0.9])
    return MetricStats(int(arr.size), float(arr.mean()), float(median), float(p10), float(p90))


def score_stats(out_uri: str) -> list[SettingScores]:
    """Per setting (the results' ``setting`` column where they have one, else the config hash):
    count, mean, median, p10 and p90 of each metric over the latest score of each row."""
    scores = read_scores(out_uri)
    if scores.num_rows == 0:
        return []
    setting_of: dict[tuple[str, str], str] = {}
    results = latest_results(out_uri, ["config_hash", "setting"])
    if "setting" in results.column_names:
        for rid, h, s in zip(results.column("id").to_pylist(), results.column("config_hash").to_pylist(),
                             results.column("setting").to_pylist()):
            if s is not None:
                setting_of[(rid, h)] = str(s)
    rows: dict[str, list[dict[str, Any]]] = {}
    for rec in scores.to_pylist():
        name = setting_of.get((rec["id"], rec["config_hash"]), rec["config_hash"])
        rows.setdefault(name, []).append(rec)
    out = []
    for name in sorted(rows):
        recs = rows[name]
        ok = [r for r in recs if r["status"] == "ok"]
        out.append(SettingScores(
            setting=name,
            metrics={**{m: _stats([r[m] for r in ok]) for m in METRICS},
                     **{m: st for m in REGION_METRICS if (st := _stats([r.get(m) for r in ok])) is not None}},
            failed=len(recs) - len(ok),
        ))
    return out


def format_score_stats(stats: list[SettingScores]) -> str:
    """The metric block of ``pnp-batch status``: one table per setting."""
    if not stats:
        return "metrics: none scored yet (pnp-batch eval OUT, or run --eval)"
    lines = ["metrics (latest score per row; clip_score higher is better, structure_dist lower is better):"]
    for s in stats:
        lines.append(f"  setting {s.setting}" + (f" ({s.failed} rows failed scoring)" if s.failed else ""))
        lines.append(f"    {'metric':<18} {'count':>6} {'mean':>9} {'median':>9} {'p10':>9} {'p90':>9}")
        for name, st in s.metrics.items():
            if st is None:
                lines.append(f"    {name:<18} {0:>6} {'-':>9} {'-':>9} {'-':>9} {'-':>9}")
                continue
            digits = 4 if name in ("structure_dist", "bg_ssim") else 2
            vals = " ".join(f"{v:>9.{digits}f}" for v in (st.mean, st.median, st.p10, st.p90))
            lines.append(f"    {name:<18} {st.count:>6} {vals}")
    return "\n".join(lines)
