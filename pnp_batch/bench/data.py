"""Data-plane benchmarks (printed figures, not tests): manifest validation, result writing, and the
scale bench: `validate`, `run --dry-run`, a resume run with everything done and `status` on a
synthetic manifest with as many done records, each timed in its own process with its peak RSS.

Run with ``python -m pnp_batch.bench.data [--rows N] [--results-rows N] [--tracemalloc]
[--scale-rows N] [--scale-shard-rows N]``. No torch is imported here (the resume run's process does).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pnp_batch.io import storage
from pnp_batch.io.results import RESULT_SCHEMA, ResultWriter, done_index, make_run_id, write_run_summary
from pnp_batch.io.validate import validate_manifest

logger = logging.getLogger(__name__)


def _maxrss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_MANIFEST_SCHEMA = pa.schema(
    [("id", pa.string()), ("image", pa.string()), ("source_prompt", pa.string()),
     ("target_prompt", pa.string()), ("seed", pa.int64()), ("group", pa.string())]
)


def _synthetic_rows(idx: range) -> pa.Table:
    """Rows ``idx`` of the synthetic manifest (the same values for the manifest and its records)."""
    return pa.table(
        {
            "id": [f"row-{i:09d}" for i in idx],
            "image": [f"images/{i % 50_000:06d}.jpg" for i in idx],
            "source_prompt": ["a photograph of a horse in a field" for _ in idx],
            "target_prompt": [f"a watercolor painting of a zebra, variant {i % 97}" for i in idx],
            "seed": [i % 10 for i in idx],
            "group": [f"g{i % 13}" for i in idx],
        },
        schema=_MANIFEST_SCHEMA,
    )


def write_synthetic_manifest(path: str, rows: int, chunk: int = 100_000) -> int:
    """A Parquet manifest of ``rows`` rows (ids, image paths, prompts, a pass-through column),
    written chunk by chunk so that making it does not itself take much memory. Returns bytes."""
    with pq.ParquetWriter(path, _MANIFEST_SCHEMA) as w:
        for start in range(0, rows, chunk):
            w.write_table(_synthetic_rows(range(start, min(rows, start + chunk))), row_group_size=chunk)
    return Path(path).stat().st_size


def bench_validate(rows: int = 1_000_000, with_tracemalloc: bool = False) -> dict[str, Any]:
    """Time and peak memory of ``validate_manifest`` (no image checks) on a synthetic manifest."""
    with tempfile.TemporaryDirectory(prefix="pnp-bench-") as tmp:
        path = str(Path(tmp) / "manifest.parquet")
        t0 = time.perf_counter()
        size = write_synthetic_manifest(path, rows)
        make_s = time.perf_counter() - t0
        rss_before = _maxrss_mib()
        t0 = time.perf_counter()
        report = validate_manifest(path)
        seconds = time.perf_counter() - t0
        out: dict[str, Any] = {
            "rows": rows,
            "manifest_mib": round(size / 2**20, 1),
            "make_seconds": round(make_s, 2),
            "validate_seconds": round(seconds, 2),
            "rows_per_second": round(rows / seconds),
            "ok": report.ok,
            "rows_reported": report.rows,
            "maxrss_mib_before": round(rss_before, 1),
            "maxrss_mib_after": round(_maxrss_mib(), 1),
        }
        if with_tracemalloc:
            tracemalloc.start()
            t0 = time.perf_counter()
            validate_manifest(path)
            out["tracemalloc_seconds"] = round(time.perf_counter() - t0, 2)
            out["tracemalloc_peak_mib"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
            tracemalloc.stop()
        return out


def _record(i: int, run_id: str) -> dict[str, Any]:
    ok = i % 10 != 0
    return {
        "id": f"row-{i:09d}", "status": "ok" if ok else "failed", "error": None if ok else "image not found: x",
        "output": f"/out/images/row-{i:09d}.png" if ok else None, "image": f"images/{i % 500:06d}.jpg",
        "source_prompt": "a horse", "target_prompt": f"a zebra {i % 97}", "negative_prompt": "ugly",
        "seed": 1, "pipeline": "sd21-base", "config_hash": "0123456789abcdef", "model": "tiny",
        "feature_key": "ab" * 16, "feature_cache_hit": i % 2 == 0, "width": 512, "height": 512,
        "invert_seconds": 1.5, "translate_seconds": 3.25, "worker": "w0", "attempt": 1, "run_id": run_id,
        "group": f"g{i % 13}",
    }


def bench_results(rows: int = 50_000, shard_rows: int = 1000) -> dict[str, Any]:
    """Rows/s of :class:`ResultWriter` (local folder) and of the resume index read back."""
    with tempfile.TemporaryDirectory(prefix="pnp-bench-") as out:
        run_id = make_run_id()
        records = [_record(i, run_id) for i in range(rows)]
        t0 = time.perf_counter()
        w = ResultWriter(out, run_id, shard_rows=shard_rows, flush_seconds=1e9)
        for r in records:
            w.add(r)
        w.close()
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        latest = done_index(out)
        read_s = time.perf_counter() - t0
        files = storage.list_files(storage.join(out, "results"), ".parquet")
        total = sum(Path(f).stat().st_size for f in files)
        return {
            "rows": rows,
            "shard_rows": shard_rows,
            "write_seconds": round(write_s, 2),
            "rows_per_second": round(rows / write_s),
            "files": len(files),
            "files_per_10k_rows": round(len(files) * 10_000 / rows, 1),
            "bytes_per_row": round(total / rows, 1),
            "done_index_seconds": round(read_s, 2),
            "ids_indexed": len(latest),
        }


SCALE_RUN_ID = "20260101T000000000Z-5ca1e0"


def write_synthetic_results(out: str, rows: int, shard_rows: int = 1000, chunk: int = 100_000,
                            config_hash: str = "0123456789abcdef") -> int:
    """``rows`` ok records under ``out/results`` in shards of ``shard_rows`` (what a run of that size
    leaves: the driver writes a shard every 1,000 records), with the ids and work keys (under
    ``config_hash``) of :func:`write_synthetic_manifest`'s rows, built chunk by chunk (streamed), so
    a run of that manifest under that config finds every row done. Returns the shard count."""
    from pnp_batch.io.work_key import batch_material, keys_of

    folder = Path(out) / "results"
    folder.mkdir(parents=True, exist_ok=True)
    schema = RESULT_SCHEMA.append(pa.field("group", pa.string()))
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    seq = 0
    for start in range(0, rows, chunk):
        idx = range(start, min(rows, start + chunk))
        n = len(idx)
        made = _synthetic_rows(idx)
        keys = keys_of(batch_material(made, made.column("id").combine_chunks()), config_hash)
        cols: dict[str, pa.Array] = {f.name: pa.nulls(n, f.type) for f in schema}
        cols.update(
            id=pa.array([f"row-{i:09d}" for i in idx], pa.string()),
            status=pa.array(["ok"] * n, pa.string()),
            output=pa.array([f"{out}/images/row-{i:09d}.png" for i in idx], pa.string()),
            target_prompt=pa.array([f"a watercolor painting of a zebra, variant {i % 97}" for i in idx]),
            seed=pa.array([i % 10 for i in idx], pa.int64()),
            config_hash=pa.array([config_hash] * n, pa.string()),
            work_key=pa.array(keys, pa.string()),
            run_id=pa.array([SCALE_RUN_ID] * n, pa.string()),
            finished_at=pa.array([t0 + dt.timedelta(milliseconds=i) for i in idx], pa.timestamp("us", tz="UTC")),
            group=pa.array([f"g{i % 13}" for i in idx], pa.string()),
        )
        table = pa.table([cols[f.name] for f in schema], schema=schema)
        for off in range(0, n, shard_rows):
            pq.write_table(table.slice(off, shard_rows), folder / f"{SCALE_RUN_ID}-{seq:05d}.parquet",
                           compression="zstd")
            seq += 1
    return seq


def run_measured(cmd: list[str], timeout: float = 1800.0) -> dict[str, Any]:
    """Run ``cmd`` in a process of its own: wall seconds, its peak RSS (MiB), exit status, last output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    seconds = time.perf_counter() - t0
    text = out.decode(errors="replace")
    return {"seconds": round(seconds, 1), "rc": proc.returncode, "output": text[-2000:]}


def _peak_rss_mib(cmd: list[str], timeout: float) -> dict[str, Any]:
    """:func:`run_measured` in a wrapper process whose one child is the command, so the wrapper's
    RUSAGE_CHILDREN peak is the command's own peak RSS (this process's children mix in otherwise)."""
    wrapper = (
        "import os, resource, subprocess, sys, time\n"
        "t0 = time.perf_counter()\n"
        "p = subprocess.run(sys.argv[1:], stdout=sys.stdout, stderr=sys.stderr)\n"
        "print('@@bench', time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,"
        " p.returncode)\n"
    )
    res = run_measured([sys.executable, "-c", wrapper, *cmd], timeout)
    m = re.search(r"@@bench ([0-9.]+) (\d+) (-?\d+)", res["output"])
    if m:
        res.update(seconds=round(float(m.group(1)), 1), maxrss_mib=round(int(m.group(2)) / 1024, 1),
                   rc=int(m.group(3)))
        res["output"] = res["output"][: m.start()]
    return res


def _grab(text: str, label: str) -> int | None:
    m = re.search(rf"^{label}: (\d+)", text, re.MULTILINE)
    return int(m.group(1)) if m else None


def bench_scale(rows: int = 10_000_000, shard_rows: int = 1000, timeout: float = 1800.0,
                workdir: str | None = None) -> dict[str, Any]:
    """validate, `run --dry-run`, a resume run with everything done, and `status`, on a manifest of
    ``rows`` rows with ``rows`` ok records: seconds and peak RSS of each, in its own process."""
    with tempfile.TemporaryDirectory(prefix="pnp-bench-scale-", dir=workdir) as tmp:
        manifest, out = str(Path(tmp) / "manifest.parquet"), str(Path(tmp) / "out")
        t0 = time.perf_counter()
        write_synthetic_manifest(manifest, rows)
        from pnp_batch.config import load_config

        shards = write_synthetic_results(out, rows, shard_rows, config_hash=load_config("tiny").hash())
        write_run_summary(out, SCALE_RUN_ID, {"manifest": manifest, "status": "finished"})
        made = time.perf_counter() - t0
        cli = [sys.executable, "-m", "pnp_batch"]
        ops = {
            "validate": [*cli, "validate", manifest],
            "dry_run": [*cli, "run", manifest, "--out", out, "--pipeline", "tiny", "--dry-run"],
            "resume": [*cli, "run", manifest, "--out", out, "--pipeline", "tiny", "--no-report"],
            "status": [*cli, "status", out],
        }
        figures: dict[str, Any] = {"rows": rows, "done_records": rows, "result_shards": shards,
                                   "make_seconds": round(made, 1)}
        for name, cmd in ops.items():
            res = _peak_rss_mib(cmd, timeout)
            text = res.pop("output")
            res["checked"] = {
                "validate": lambda t: _grab(t, "rows") == rows and "\nOK" in t,
                "dry_run": lambda t: _grab(t, "already done") == rows and _grab(t, "to do") == 0,
                "resume": lambda t: "nothing to do" in t,
                "status": lambda t: _grab(t, "done") == rows and _grab(t, "pending") == 0,
            }[name](text) and res.get("rc") == 0
            if not res["checked"]:
                res["output_tail"] = text[-600:]
            figures[name] = res
            print(f"scale {name}: {res}", file=sys.stderr, flush=True)
        return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="manifest rows for bench_validate")
    p.add_argument("--results-rows", type=int, default=50_000, help="records for bench_results")
    p.add_argument("--tracemalloc", action="store_true", help="also measure Python allocations (slower)")
    p.add_argument("--scale-rows", type=int, default=10_000_000,
                   help="manifest rows and done records for the scale bench (0: skip it)")
    p.add_argument("--scale-shard-rows", type=int, default=1000, help="records per result shard (scale bench)")
    p.add_argument("--only-scale", action="store_true", help="run the scale bench alone")
    args = p.parse_args(argv)
    figures: dict[str, Any] = {}
    if not args.only_scale:
        figures["validate"] = bench_validate(args.rows, with_tracemalloc=args.tracemalloc)
        figures["results"] = bench_results(args.results_rows)
    if args.scale_rows > 0:
        figures["scale"] = bench_scale(args.scale_rows, args.scale_shard_rows)
    figures.update(python=sys.version.split()[0], pyarrow=pa.__version__)
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
