"""OUT/eval/ score shards (io/metrics): one explicit schema, atomic shards, the latest view, joins, stats."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pnp_batch.io.metrics import (
    SCORE_SCHEMA,
    ScoreWriter,
    format_score_stats,
    read_all_scores,
    read_scores,
    score_files,
    score_stats,
    scored_keys,
)
from pnp_batch.io.results import ResultWriter

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def _score(rid: str, status: str = "ok", h: str = "h1", clip: float | None = 20.0, minutes: int = 0, **kw) -> dict:
    rec = {"id": rid, "config_hash": h, "status": status, "clip_score": clip if status == "ok" else None,
           "clip_model": "tiny-clip", "dino_model": "tiny-dino", "scored_at": T0 + dt.timedelta(minutes=minutes)}
    if status == "failed":
        rec["error"] = "output image unreadable"
    rec.update(kw)
    return rec


def test_every_shard_has_the_explicit_schema_even_when_columns_are_all_null(tmp_path):
    with ScoreWriter(str(tmp_path), "run1") as w:
        w.add({"id": "a", "config_hash": "h", "status": "failed", "error": "boom"})
    files = score_files(str(tmp_path))
    assert [f.rsplit("/", 1)[-1] for f in files] == ["run1-00000.parquet"]
    schema = pq.read_schema(files[0])
    assert schema.equals(SCORE_SCHEMA, check_metadata=False)
    assert schema.field("clip_score").type == pa.float64()
    assert schema.field("scored_at").type == pa.timestamp("us", tz="UTC")
    assert read_all_scores(str(tmp_path)).column("scored_at")[0].as_py() is not None  # defaulted to now


def test_writer_rejects_unknown_columns_and_statuses(tmp_path):
    w = ScoreWriter(str(tmp_path), "run1")
    with pytest.raises(KeyError, match="not score columns"):
        w.add({**_score("a"), "output": "x.png"})
    with pytest.raises(ValueError, match="status"):
        w.add(_score("a", status="done"))
    w.close()
    assert score_files(str(tmp_path)) == []


def test_shards_are_written_atomically_and_in_pieces(tmp_path):
    w = ScoreWriter(str(tmp_path), "r", shard_rows=2)
    for i in range(5):
        w.add(_score(f"r{i}"))
    assert len(score_files(str(tmp_path))) == 2  # two full shards on disk before close
    w.close()
    assert len(score_files(str(tmp_path))) == 3
    assert not [p for p in (tmp_path / "eval").iterdir() if p.name.startswith(".")]  # no temp file left


def test_latest_view_prefers_the_latest_ok_score_else_the_latest_failure(tmp_path):
    with ScoreWriter(str(tmp_path), "r1") as w:
        w.add(_score("a", clip=10.0, minutes=0))
        w.add(_score("a", status="failed", minutes=5))  # a later failure does not hide an ok score
        w.add(_score("b", status="failed", minutes=0))
        w.add(_score("c", clip=1.0, minutes=0))
        w.add(_score("c", h="h2", clip=2.0, minutes=1))  # another config: its own key
    with ScoreWriter(str(tmp_path), "r2") as w:
        w.add(_score("a", clip=30.0, minutes=10))  # re-scored (--overwrite): the latest ok wins
        w.add(_score("b", status="failed", minutes=3, error="second failure"))
        w.add(_score("c", status="failed", minutes=20))  # the latest record, but c has an ok score
    latest = {(r["id"], r["config_hash"]): r for r in read_scores(str(tmp_path)).to_pylist()}
    assert set(latest) == {("a", "h1"), ("b", "h1"), ("c", "h1"), ("c", "h2")}
    assert latest[("a", "h1")]["clip_score"] == 30.0
    assert latest[("b", "h1")]["status"] == "failed" and latest[("b", "h1")]["error"] == "second failure"
    assert latest[("c", "h2")]["clip_score"] == 2.0
    assert latest[("c", "h1")]["status"] == "ok" and latest[("c", "h1")]["clip_score"] == 1.0
    assert scored_keys(str(tmp_path)) == {("a", "h1"), ("c", "h1"), ("c", "h2")}
    assert read_scores(str(tmp_path / "empty")).schema.equals(SCORE_SCHEMA)


def _results(out, rows):
    with ResultWriter(str(out), "run0") as w:
        for rid, setting in rows:
            rec = {"id": rid, "status": "ok", "config_hash": "h1", "target_prompt": f"prompt {rid}"}
            if setting is not None:
                rec["setting"] = setting
            w.add(rec)


def test_scores_join_the_results_on_id_with_pyarrow_and_duckdb(tmp_path):
    _results(tmp_path, [("a", None), ("b", None)])
    with ScoreWriter(str(tmp_path), "e1") as w:
        w.add(_score("a", clip=11.0))
        w.add(_score("b", clip=22.0, structure_dist=0.5))
    res = pads.dataset(str(tmp_path / "results"), format="parquet").to_table(columns=["id", "config_hash",
                                                                                     "target_prompt"])
    ev = pads.dataset(str(tmp_path / "eval"), format="parquet").to_table()
    joined = res.join(ev, keys=["id", "config_hash"]).sort_by("id")
    assert joined.column("clip_score").to_pylist() == [11.0, 22.0]
    assert joined.column("target_prompt").to_pylist() == ["prompt a", "prompt b"]

    duckdb = pytest.importorskip("duckdb")
    got = duckdb.sql(
        f"SELECT r.id, e.clip_score, e.structure_dist FROM '{tmp_path}/results/*.parquet' r "
        f"JOIN '{tmp_path}/eval/*.parquet' e USING (id, config_hash) WHERE e.status = 'ok' ORDER BY r.id"
    ).fetchall()
    assert got == [("a", 11.0, None), ("b", 22.0, 0.5)]


def test_stats_per_setting_column_else_per_config_hash(tmp_path):
    _results(tmp_path, [(f"x{i}", "guidance_scale=5" if i < 10 else "guidance_scale=10") for i in range(20)])
    with ScoreWriter(str(tmp_path), "e1") as w:
        for i in range(20):
            w.add(_score(f"x{i}", clip=float(i), structure_dist=i / 100))
        w.add(_score("x19", status="failed", minutes=-1))  # older failure: the ok score is the latest view
    stats = {s.setting: s for s in score_stats(str(tmp_path))}
    assert set(stats) == {"guidance_scale=5", "guidance_scale=10"}
    low = stats["guidance_scale=5"].metrics["clip_score"]
    assert (low.count, low.mean, low.median) == (10, 4.5, 4.5)
    assert low.p10 == pytest.approx(0.9) and low.p90 == pytest.approx(8.1)  # linear interpolation, as numpy
    assert stats["guidance_scale=10"].metrics["structure_dist"].mean == pytest.approx(0.145)
    assert stats["guidance_scale=5"].metrics["clip_score_source"] is None
    text = format_score_stats(list(stats.values()))
    assert "setting guidance_scale=5" in text and "clip_score" in text and "4.50" in text

    plain = tmp_path / "plain"
    _results(plain, [("a", None), ("b", None)])
    with ScoreWriter(str(plain), "e1") as w:
        w.add(_score("a", clip=1.0))
        w.add(_score("b", status="failed"))
    (only,) = score_stats(str(plain))
    assert only.setting == "h1" and only.failed == 1 and only.metrics["clip_score"].count == 1
