"""Planning and resume at scale: the done-index plan is the plan the Python dict of ids gave (same
groups, same order, same companions), and its memory grows far slower than the rows."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pnp_batch.bench.data import write_synthetic_manifest, write_synthetic_results
from pnp_batch.config import load_config
from pnp_batch.engines.plan import RunRequest, plan, work_groups
from pnp_batch.io import manifest as manifest_module
from pnp_batch.io import results
from pnp_batch.io.manifest import Manifest, Row, group_rows, open_manifest
from pnp_batch.io.results import ResultWriter, load_latest, write_run_summary

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
CONFIG_HASH = load_config("tiny").hash()  # the config the plans below are made under


def _set_based_groups(manifest: Manifest, done: dict[str, str], req: RunRequest,
                      counts: dict[str, int]) -> Iterator[list[Row]]:
    """work_groups as it was before the done-index: every row made, a dict lookup per row."""
    for group in group_rows(manifest.iter_rows(limit=req.limit), window=req.group_window):
        if req.overwrite:
            yield group
            continue
        marked = [replace(r, companion=True) if done.get(r.id) == "ok" else r for r in group]
        if not all(r.companion for r in marked):
            counts["companions"] = counts.get("companions", 0) + sum(r.companion for r in marked)
            yield marked


def _set_based_todo(manifest: Manifest, done: dict[str, str], req: RunRequest) -> int:
    return sum(1 for index, rid in manifest.iter_ids()
               if (req.limit is None or index < req.limit) and (req.overwrite or done.get(rid) != "ok"))


def _case(tmp_path) -> tuple[str, str]:
    """A manifest of two files (37 + 26 rows; sources shared by 1-4 rows, a bad row) and results
    from three runs: failures, ids retried across shards (latest wins, ties by shard), stray ids."""
    folder = tmp_path / "m"
    folder.mkdir()
    rows = []
    for i in range(63):
        rows.append({"id": f"row{i:03d}", "image": f"src{(i * 7) // 10 % 17}.png", "source_prompt": "a photo",
                     "target_prompt": "" if i == 40 else f"a fox {i}", "style": f"s{i % 3}"})
    pq.write_table(pa.Table.from_pylist(rows[:37]), folder / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[37:]), folder / "part-1.parquet")
    out = str(tmp_path / "out")

    def run(run_id: str, records: list[tuple[str, str, int]]) -> None:
        with ResultWriter(out, run_id, shard_rows=7) as w:
            for rid, status, minute in records:
                w.add({"id": rid, "status": status, "config_hash": CONFIG_HASH,  # keyless records (schema v1)
                       "finished_at": T0 + dt.timedelta(minutes=minute)})

    run("20260101T000000000Z-aaaaaa", [(f"row{i:03d}", "failed" if i % 9 == 0 else "ok", 0) for i in range(50)])
    run("20260102T000000000Z-bbbbbb", [(f"row{i:03d}", "ok", 10) for i in range(0, 50, 9)]  # retried: ok now
        + [("row001", "failed", 10), ("row002", "failed", 0), ("row003", "ok", -5)]  # a later failure, a tie, older
        + [(f"row{i:03d}", "ok", 10) for i in range(52, 56)] + [("stray", "ok", 3)])
    run("20260103T000000000Z-cccccc", [("row045", "failed", 20), ("row060", "ok", 20)])
    return str(folder), out


@pytest.mark.parametrize("limit", [None, 20, 45])
@pytest.mark.parametrize("window", [4, 5, 256])
@pytest.mark.parametrize("overwrite", [False, True])
def test_the_plan_is_the_set_based_plan(tmp_path, monkeypatch, limit, window, overwrite) -> None:
    monkeypatch.setattr(manifest_module, "BATCH_ROWS", 6)  # windows straddle batches and files
    m_uri, out = _case(tmp_path)
    req = RunRequest(manifest=m_uri, out=out, cfg=load_config("tiny"), limit=limit, overwrite=overwrite,
                     group_window=window)
    manifest, done, p = plan(req)
    old_done = {} if overwrite else load_latest(out)
    assert old_done.get("row001") in (None, "failed") and old_done.get("row002") in (None, "failed")
    old_counts: dict[str, int] = {}
    new_counts: dict[str, int] = {}
    old = [[(r.index, r.id, r.companion, r.error) for r in g]
           for g in _set_based_groups(open_manifest(m_uri), old_done, req, old_counts)]
    new = [[(r.index, r.id, r.companion, r.error) for r in g] for g in work_groups(manifest, done, req, new_counts)]
    assert new == old
    assert new_counts.get("companions", 0) == old_counts.get("companions", 0)
    total = min(63, limit or 63)
    assert (p.total, p.todo) == (total, _set_based_todo(open_manifest(m_uri), old_done, req))
    assert sum(1 for g in new for r in g if not r[2]) == p.todo  # every row to do is in exactly one group
    if not overwrite:
        assert any(r[2] for g in new for r in g)  # the case has companions
        assert p.done_before > 0


def test_work_groups_still_takes_a_mapping(tmp_path) -> None:
    m_uri, out = _case(tmp_path)
    req = RunRequest(manifest=m_uri, out=out, cfg=load_config("tiny"), group_window=8)
    from_index = [[r.id for r in g] for g in work_groups(open_manifest(m_uri), plan(req)[1], req)]
    from_dict = [[r.id for r in g] for g in work_groups(open_manifest(m_uri), load_latest(out), req)]
    assert from_index == from_dict and from_index


_MEASURE = """
import json, sys, tracemalloc
import pyarrow as pa
from pnp_batch.io import manifest as manifest_module
manifest_module.BATCH_ROWS = 4096  # both sizes measured span many batches: the growth is the rows'
from pnp_batch.config import load_config
from pnp_batch.engines.plan import RunRequest, plan
from pnp_batch.io.status import status_report
from pnp_batch.io.validate import validate_manifest
op, manifest, out = sys.argv[1:]
cfg = load_config("tiny")
tracemalloc.start()  # after the imports: what the rows cost, not what loading the modules does
if op == "dry_run":
    plan(RunRequest(manifest=manifest, out=out, cfg=cfg))
elif op == "status":
    assert status_report(out).pending == 0
else:
    assert validate_manifest(manifest).ok
print(json.dumps({"arrow": pa.default_memory_pool().max_memory(), "python": tracemalloc.get_traced_memory()[1]}))
"""


def _peak(tmp_path, rows: int) -> dict[str, int]:
    """Peak bytes of Arrow's memory pool plus peak Python allocations (tracemalloc) of planning,
    status and validate, each in a fresh process: what the data plane holds, without the allocator's
    and the interpreter's noise that the resident set carries at this small scale."""
    folder = tmp_path / f"n{rows}"
    folder.mkdir()
    manifest, out = str(folder / "m.parquet"), str(folder / "out")
    write_synthetic_manifest(manifest, rows, chunk=10_000)
    write_synthetic_results(out, rows, shard_rows=5000, chunk=20_000, config_hash=load_config("tiny").hash())
    write_run_summary(out, "bench", {"manifest": manifest})
    peaks = {}
    for op in ("dry_run", "status", "validate"):
        done = subprocess.run([sys.executable, "-c", _MEASURE, op, manifest, out], capture_output=True, text=True,
                              timeout=600, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        peaks[op] = figures["arrow"] + figures["python"]
    return peaks


@pytest.mark.slow
def test_memory_of_plan_status_and_validate_grows_far_slower_than_the_rows(tmp_path) -> None:
    """From 20,000 to 200,000 rows (and as many done records) the data plane's peak grows by under
    100 bytes a row: ids as one Arrow array, not a Python dict of strings (which took over 250 bytes
    a row here). Full size, seconds and resident memory: docs/bench.md (python -m pnp_batch.bench.data)."""
    small, large = _peak(tmp_path, 20_000), _peak(tmp_path, 200_000)
    for name in small:
        per_row = (large[name] - small[name]) / 180_000
        assert per_row < 100, (name, small[name], large[name], per_row)


def test_the_lookup_without_search_sorted_gives_the_same_answers(tmp_path, monkeypatch) -> None:
    """Older pyarrow has no compute.search_sorted: the hash lookup fallback answers the same."""
    from pnp_batch.io import done_index

    _, out = _case(tmp_path)
    index = done_index.DoneIndex.from_files(results.result_files(out))
    needles = pa.array([f"row{i:03d}" for i in range(70)] + ["stray", "zzz", ""])
    fast = index.lookup(needles)
    monkeypatch.delattr(done_index.pc, "search_sorted")
    slow = index.lookup(needles)
    assert all((a == b).all() for a, b in zip(fast, slow)) and fast[0].sum() > 50
