"""results.py: sharded writing, one-dataset reading, latest attempt, run summaries, status."""

from __future__ import annotations

import datetime as dt
import os
import re

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pnp_batch.io import results, storage
from pnp_batch.io.results import (
    RESULT_COLUMNS,
    ResultWriter,
    latest_results,
    load_latest,
    make_run_id,
    read_results,
    read_run_summaries,
    write_run_summary,
)
from pnp_batch.io.status import status_report

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def rec(rid: str, status: str = "ok", minutes: int = 0, **kw) -> dict:
    return {"id": rid, "status": status, "finished_at": T0 + dt.timedelta(minutes=minutes), **kw}


def test_make_run_id_sortable() -> None:
    rid = make_run_id()
    assert re.fullmatch(r"\d{8}T\d{9}Z-[0-9a-f]{6}", rid)


def test_writer_shards_and_dataset(tmp_path) -> None:
    out = str(tmp_path / "out")
    w = ResultWriter(out, "20260101T000000Z-abcdef", shard_rows=1000, flush_seconds=1e9)
    for i in range(2500):
        w.add(rec(f"r{i}", "ok" if i % 5 else "failed", error=None if i % 5 else "no image", width=512,
                  style=f"s{i % 3}"))
    assert len(w.files_written) == 2  # 2,000 written, 500 buffered
    w.close()
    files = sorted(os.listdir(tmp_path / "out" / "results"))
    assert files == [f"20260101T000000Z-abcdef-{i:05d}.parquet" for i in range(3)]
    assert w.rows_written == 2500
    table = ds.dataset(str(tmp_path / "out" / "results"), format="parquet").to_table()
    assert table.num_rows == 2500
    assert table.schema.names[: len(RESULT_COLUMNS)] == list(RESULT_COLUMNS)
    assert table.schema.field("finished_at").type == pa.timestamp("us", tz="UTC")
    assert table.schema.field("feature_cache_hit").type == pa.bool_()
    assert table.column("style").to_pylist()[:4] == ["s0", "s1", "s2", "s0"]
    assert table.column("run_id").unique().to_pylist() == ["20260101T000000Z-abcdef"]
    assert read_results(out).num_rows == 2500


def test_consistent_schema_with_extra_schema(tmp_path) -> None:
    out = str(tmp_path)
    w = ResultWriter(out, "run", shard_rows=2, extra_schema=pa.schema([("score", pa.float64())]))
    w.add(rec("a", score=None))
    w.add(rec("b", score=None))
    w.add(rec("c", score=1.5))
    w.close()
    schemas = [pq.read_schema(f) for f in results.result_files(out)]
    assert all(s.field("score").type == pa.float64() for s in schemas)


def test_flush_by_time(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(results.time, "monotonic", lambda: now[0])
    w = ResultWriter(str(tmp_path), "run", shard_rows=1000, flush_seconds=30)
    w.add(rec("a"))
    assert w.files_written == []
    now[0] += 31
    w.add(rec("b"))
    assert len(w.files_written) == 1 and w.rows_written == 2


def test_bad_status_rejected(tmp_path) -> None:
    with pytest.raises(ValueError, match="status"):
        ResultWriter(str(tmp_path), "run").add({"id": "x", "status": "done"})


def test_load_latest_picks_latest_attempt(tmp_path) -> None:
    out = str(tmp_path)
    with ResultWriter(out, "20260101T000000Z-aaaaaa") as w:
        w.add(rec("x", "failed", 0, error="boom"))
        w.add(rec("y", "ok", 0))
        w.add(rec("z", "failed", 5))
    with ResultWriter(out, "20260102T000000Z-bbbbbb") as w:
        w.add(rec("x", "ok", 10))
        w.add(rec("y", "failed", 0))  # same time as the earlier ok: later shard wins the tie
        w.add(rec("z", "ok", 1))  # older than the failure: the failure stays latest
    assert load_latest(out) == {"x": "ok", "y": "failed", "z": "failed"}
    latest = latest_results(out)
    assert latest.num_rows == 3
    by_id = {r["id"]: r for r in latest.to_pylist()}
    assert by_id["x"]["run_id"] == "20260102T000000Z-bbbbbb"
    assert read_results(out).num_rows == 6


def test_empty_results(tmp_path) -> None:
    assert load_latest(str(tmp_path / "none")) == {}
    assert read_results(str(tmp_path)).num_rows == 0
    assert latest_results(str(tmp_path)).num_rows == 0


def test_no_partial_shards_visible(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = str(tmp_path)
    with ResultWriter(out, "run1") as w:
        w.add(rec("a"))
    # A writer killed between the temp write and the rename leaves only a hidden file.
    (tmp_path / "results" / ".run2-00000.parquet.deadbeef.tmp").write_bytes(b"PAR1 half a file")
    table = ds.dataset(str(tmp_path / "results"), format="parquet").to_table()
    assert table.num_rows == 1
    assert load_latest(out) == {"a": "ok"}


def test_error_messages_are_redacted(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "shh-very-secret-000")
    with ResultWriter(str(tmp_path), "run") as w:
        w.add(rec("a", "failed", error="denied with shh-very-secret-000"))
    assert read_results(str(tmp_path)).column("error").to_pylist() == ["denied with ***"]


def test_run_summaries_round_trip(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = str(tmp_path)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "summary-secret-123")
    uri = write_run_summary(out, "20260102T000000Z-bbbbbb", {"started_at": "2026-01-02T00:00:00Z",
                                                               "counts": {"ok": 1}, "note": "summary-secret-123"})
    write_run_summary(out, "20260101T000000Z-aaaaaa", {"started_at": "2026-01-01T00:00:00Z", "counts": {"ok": 2}})
    assert uri.endswith("runs/20260102T000000Z-bbbbbb.json")
    runs = read_run_summaries(out)
    assert [r["run_id"] for r in runs] == ["20260101T000000Z-aaaaaa", "20260102T000000Z-bbbbbb"]
    assert runs[1]["counts"] == {"ok": 1} and runs[1]["note"] == "***"
    assert [f for f in os.listdir(tmp_path / "runs") if f.startswith(".")] == []


def test_status_report(tmp_path) -> None:
    out = str(tmp_path / "out")
    manifest = str(tmp_path / "m.parquet")
    pq.write_table(pa.table({"id": ["a", "b", "c", "d"], "image": ["i"] * 4, "target_prompt": ["t"] * 4}), manifest)
    with ResultWriter(out, "r1") as w:
        w.add(rec("a", "ok"))
        w.add(rec("b", "failed", error="image not found: /x/b.png"))
        w.add(rec("c", "failed", 0, error="first try"))
        w.add(rec("c", "ok", 1))
    write_run_summary(out, "r1", {"manifest": manifest, "counts": {"ok": 2, "failed": 1}})
    report = status_report(out)
    assert (report.done, report.failed, report.pending) == (2, 1, 1)
    assert report.remaining == 2
    assert report.failures == [("b", "image not found: /x/b.png")]
    text = report.format()
    assert "done: 2" in text and "failed: 1" in text and "pending: 1" in text
    assert "b: image not found" in text and "results" in text


def test_status_with_unreadable_manifest(tmp_path) -> None:
    out = str(tmp_path)
    with ResultWriter(out, "r1") as w:
        w.add(rec("a"))
    write_run_summary(out, "r1", {"manifest": str(tmp_path / "gone.parquet")})
    report = status_report(out)
    assert report.done == 1 and report.pending is None
    assert "pending: unknown (manifest unreadable" in report.format()


def test_results_on_s3(s3_bucket: str) -> None:
    out = f"{s3_bucket}/runs/out"
    w = ResultWriter(out, "run", shard_rows=2)
    for i in range(5):
        w.add(rec(f"r{i}", minutes=i))
    w.close()
    files = results.result_files(out)
    assert len(files) == 3 and all(f.startswith(f"{s3_bucket}/runs/out/results/run-") for f in files)
    assert load_latest(out) == {f"r{i}": "ok" for i in range(5)}
    assert results.dataset(out).to_table().num_rows == 5
    write_run_summary(out, "run", {"manifest": "s3://nowhere/m.parquet"})
    assert read_run_summaries(out)[0]["run_id"] == "run"
    assert storage.exists(f"{out}/runs/run.json")
