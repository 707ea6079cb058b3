"""Data-plane benchmarks (printed figures, not tests): manifest validation and result writing.

Run with ``python -m pnp_batch.bench.data [--rows N] [--results-rows N] [--tracemalloc]``.
No torch is imported.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pnp_batch.io import storage
from pnp_batch.io.results import ResultWriter, load_latest, make_run_id
from pnp_batch.io.validate import validate_manifest

logger = logging.getLogger(__name__)


def _maxrss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_synthetic_manifest(path: str, rows: int, chunk: int = 100_000) -> int:
    """A Parquet manifest of ``rows`` rows (ids, image paths, prompts, a pass-through column),
    written chunk by chunk so that making it does not itself take much memory. Returns bytes."""
    schema = pa.schema(
        [("id", pa.string()), ("image", pa.string()), ("source_prompt", pa.string()),
         ("target_prompt", pa.string()), ("seed", pa.int64()), ("group", pa.string())]
    )
    with pq.ParquetWriter(path, schema) as w:
        for start in range(0, rows, chunk):
            idx = range(start, min(rows, start + chunk))
            w.write_table(
                pa.table(
                    {
                        "id": [f"row-{i:09d}" for i in idx],
                        "image": [f"images/{i % 50_000:06d}.jpg" for i in idx],
                        "source_prompt": ["a photograph of a horse in a field" for _ in idx],
                        "target_prompt": [f"a watercolor painting of a zebra, variant {i % 97}" for i in idx],
                        "seed": [i % 10 for i in idx],
                        "group": [f"g{i % 13}" for i in idx],
                    },
                    schema=schema,
                ),
                row_group_size=chunk,
            )
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
        latest = load_latest(out)
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
            "load_latest_seconds": round(read_s, 2),
            "ids_indexed": len(latest),
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="manifest rows for bench_validate")
    p.add_argument("--results-rows", type=int, default=50_000, help="records for bench_results")
    p.add_argument("--tracemalloc", action="store_true", help="also measure Python allocations (slower)")
    args = p.parse_args(argv)
    figures = {
        "validate": bench_validate(args.rows, with_tracemalloc=args.tracemalloc),
        "results": bench_results(args.results_rows),
        "python": sys.version.split()[0],
        "pyarrow": pa.__version__,
    }
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
