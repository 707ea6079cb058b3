"""The results of several runs are one dataset: one explicit, versioned schema for every shard, read
as one table by pyarrow.dataset, DuckDB and Ray; shards written before the schema stay readable."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pnp_batch.cli import main
from pnp_batch.config import load_config
from pnp_batch.io import results
from pnp_batch.io.results import (
    RESULT_SCHEMA,
    RESULTS_SCHEMA_VERSION,
    ResultWriter,
    schema_version,
)
from pnp_batch.io.status import status_report

FAST = ["--pipeline", "tiny", "--set", "steps=4", "--set", "inversion_steps=4", "--set", "resolution=64",
        "--no-report"]
LONG = " ".join(["a very long and detailed watercolor painting of a red fox"] * 12)  # > 77 CLIP tokens


def _image(folder, name: str, seed: int) -> str:
    arr = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(arr).resize((64, 64)).save(folder / name)
    return name


def _manifest(folder, name: str, table: pa.Table) -> str:
    pq.write_table(table, folder / name)
    return str(folder / name)


def _two_runs(tmp_path) -> str:
    """Run 1: no warnings, a failure, pass-through columns string/float/int/list (one all null).
    Run 2: a warning, no `style` column (run 1 had it), `score` all null, a new `batch` column."""
    a, b = _image(tmp_path, "a.png", 1), _image(tmp_path, "b.png", 2)
    m1 = _manifest(tmp_path, "m1.parquet", pa.table({
        "id": ["r1", "r2", "r3"], "image": [a, a, "missing.png"], "source_prompt": ["a photo"] * 3,
        "target_prompt": ["a fox", "a cat", "a dog"], "style": ["ink", None, "oil"],
        "score": pa.array([0.5, None, 1.5], pa.float64()), "n": pa.array([1, 2, 3], pa.int64()),
        "tags": pa.array([["x"], [], None], pa.list_(pa.string())), "empty": pa.array([None] * 3, pa.int32()),
    }))
    m2 = _manifest(tmp_path, "m2.parquet", pa.table({
        "id": ["q1", "q2"], "image": [b, b], "source_prompt": ["a photo"] * 2, "target_prompt": [LONG, "a cow"],
        "score": pa.array([None, None], pa.float64()), "n": pa.array([7, 8], pa.int64()),
        "batch": ["b2", "b2"],
    }))
    out = str(tmp_path / "out")
    assert main(["run", m1, "--out", out, *FAST]) == 1  # r3's image is missing
    assert main(["run", m2, "--out", out, *FAST]) == 0
    return out


def test_every_shard_carries_the_explicit_versioned_schema(tmp_path) -> None:
    out = _two_runs(tmp_path)
    files = results.result_files(out)
    assert len(files) == 2
    schemas = [pq.read_schema(f) for f in files]
    for s in schemas:
        assert s.names[: len(RESULT_SCHEMA)] == RESULT_SCHEMA.names
        for f in RESULT_SCHEMA:
            assert s.field(f.name).type == f.type, f.name
        assert not any(pa.types.is_null(f.type) for f in s), s
        assert schema_version(s) == RESULTS_SCHEMA_VERSION == 3  # v2: work_key, image_sha256, output_sha256; v3: mask
    first, second = schemas
    # pass-through columns typed from the manifest, all-null ones included
    assert first.field("score").type == pa.float64() and first.field("n").type == pa.int64()
    assert first.field("tags").type == pa.list_(pa.string()) and first.field("empty").type == pa.int32()
    assert second.field("score").type == pa.float64()  # all null in run 2: still the manifest's type
    # run 2's manifest lacks style/tags/empty: its shard still has them (null, same type), after its own
    assert {"style", "tags", "empty", "batch"} <= set(second.names)
    assert second.field("style").type == pa.string() and second.field("empty").type == pa.int32()


def test_results_of_several_runs_read_as_one_table(tmp_path) -> None:
    out = _two_runs(tmp_path)
    where = f"{out}/results"
    # pyarrow.dataset, as the README shows it (the first shard's columns) and with every column
    table = ds.dataset(where, format="parquet").to_table()
    assert table.num_rows == 5 and table.schema.field("warning").type == pa.string()
    by_id = {r["id"]: r for r in table.to_pylist()}
    assert by_id["q1"]["warning"] and "truncated" in by_id["q1"]["warning"]
    assert by_id["r1"]["warning"] is None and by_id["r3"]["status"] == "failed"
    assert by_id["q1"]["style"] is None and by_id["r1"]["style"] == "ink" and by_id["q2"]["n"] == 8
    full = results.dataset(out).to_table()
    assert full.num_rows == 5 and {r["id"]: r["batch"] for r in full.to_pylist()}["q2"] == "b2"

    duckdb = pytest.importorskip("duckdb")
    con = duckdb.connect()
    rows = con.sql(f"select id, status, warning, style, score, n from read_parquet('{where}/*.parquet') "
                   "order by id").fetchall()
    assert [r[0] for r in rows] == ["q1", "q2", "r1", "r2", "r3"]
    assert rows[0][2] and rows[2][2] is None and rows[4][1] == "failed" and rows[2][3] == "ink"
    union = con.sql(f"select id, batch from read_parquet('{where}/*.parquet', union_by_name=true) "
                    "where batch is not null order by id").fetchall()
    assert union == [("q1", "b2"), ("q2", "b2")]

    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=1, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    try:
        got = ray.data.read_parquet(where).take_all()
    finally:
        ray.shutdown()
    assert sorted(r["id"] for r in got) == ["q1", "q2", "r1", "r2", "r3"]
    assert {r["id"]: r["warning"] for r in got}["q1"] == by_id["q1"]["warning"]


def _legacy_shard(out, ids: list[str]) -> None:
    """A shard as pnp-batch wrote them before the explicit schema: no version, `warning` and the
    per-row overrides as inferred pass-through columns (the warning of Arrow's null type)."""
    n = len(ids)
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    table = pa.table({
        "id": ids, "status": ["ok"] * n, "error": pa.array([None] * n, pa.string()),
        "output": [f"{out}/images/{i}.png" for i in ids], "seed": pa.array([0] * n, pa.int64()),
        "config_hash": [load_config("tiny", FAST[3:8:2]).hash()] * n,  # the run's: made under its settings "run_id": ["20260101T000000000Z-000000"] * n,
        "finished_at": pa.array([t0] * n, pa.timestamp("us", tz="UTC")),
        "warning": pa.nulls(n), "guidance_scale": [7.5] * n, "style": pa.nulls(n),
    })
    (out / "results").mkdir(parents=True)
    pq.write_table(table, out / "results" / "20260101T000000000Z-000000-00000.parquet")
    assert schema_version(pq.read_schema(out / "results" / "20260101T000000000Z-000000-00000.parquet")) == 0


def test_outputs_written_before_the_schema_stay_readable_by_status_and_resume(tmp_path) -> None:
    a = _image(tmp_path, "a.png", 3)
    m = _manifest(tmp_path, "m.parquet", pa.table({
        "id": ["x1", "x2", "x3"], "image": [a] * 3, "source_prompt": ["a photo"] * 3,
        "target_prompt": ["a fox", "a cat", LONG], "style": ["ink", "oil", "ink"],
    }))
    out = tmp_path / "out"
    _legacy_shard(out, ["x1", "x2"])
    # the bug this schema fixes: a null-typed warning shard, then one with a warning
    assert main(["run", m, "--out", str(out), *FAST]) == 0
    summary = json.loads(next((out / "runs").glob("*.json")).read_text())
    assert summary["counts"]["done_before"] == 2 and summary["counts"]["ok"] == 1  # resume read the old shard
    report = status_report(str(out))
    assert (report.done, report.failed, report.pending, report.remaining) == (3, 0, 0, 0)
    new = pq.read_schema(results.result_files(str(out))[-1])
    assert new.field("warning").type == pa.string() and new.field("style").type == pa.string()
    table = results.dataset(str(out)).to_table()  # our reader unifies the old null type away
    assert table.num_rows == 3 and table.schema.field("warning").type == pa.string()
    assert {r["id"]: r["warning"] is not None for r in table.to_pylist()} == {"x1": False, "x2": False, "x3": True}
    assert main(["run", m, "--out", str(out), *FAST, "--dry-run"]) == 0
    assert len(results.result_files(str(out))) == 2  # nothing more to do


def test_an_all_null_pass_through_column_of_no_known_type_is_a_string_column(tmp_path) -> None:
    with ResultWriter(str(tmp_path), "run") as w:
        w.add({"id": "a", "status": "ok", "note": None, "warning": None})
    s = pq.read_schema(results.result_files(str(tmp_path))[0])
    assert s.field("note").type == pa.string() and s.field("warning").type == pa.string()
