"""`pnp-batch bench --export`: how fast `pnp-batch export` turns an output into a data set, per core.

A real `run --eval` of the tiny model translates a few sources (the images are the model's, at the
resolution asked); its records and scores are then repeated to `--export-rows` rows, each with its own
copy of an output image, so the export reads as many files as it writes samples. Each format is exported
`--repeats` times, interleaved, into fresh folders; the figures are the median rows/s with [min..max], the
peak of Python's allocations during one export (tracemalloc) and the largest shard's size, to show the
memory is bounded by one shard, not the export. A figure printed, not a test (docs/export.md).
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pnp_batch.bench.inputs import synthetic_sources

FORMATS = ("parquet", "webdataset", "imagefolder")


def _make_output(root: Path, rows: int, resolution: int) -> Path:
    """OUT with `rows` ok rows (tiny-model outputs repeated under new ids, each its own file) and scores."""
    from pnp_batch.io.metrics import ScoreWriter
    from pnp_batch.io.results import ResultWriter, latest_results

    src = root / "in"
    src.mkdir()
    prompts = ("a photo of a fox", "a watercolor painting")
    manifest = []
    for i, data in enumerate(synthetic_sources(4, resolution, seed=11)):
        (src / f"s{i}.png").write_bytes(data)
        manifest += [{"id": f"s{i}-{j}", "image": f"s{i}.png", "source_prompt": "a photo", "target_prompt": p}
                     for j, p in enumerate(prompts)]
    pq.write_table(pa.Table.from_pylist(manifest), src / "m.parquet")
    out = root / "out"
    code = subprocess.run([sys.executable, "-m", "pnp_batch", "run", str(src / "m.parquet"), "--out", str(out),
                           "--pipeline", "tiny", "--set", "steps=4", "--set", "inversion_steps=4",
                           "--set", f"resolution={resolution}", "--eval", "--no-report"], check=False).returncode
    if code != 0:
        raise RuntimeError(f"bench --export: the tiny run exited {code}")
    made = latest_results(str(out)).to_pylist()
    scores = {r["id"]: r for r in pq.read_table(out / "eval").to_pylist()}
    with ResultWriter(str(out), "bench-copies", shard_rows=10_000) as w, \
            ScoreWriter(str(out), "bench-copies", shard_rows=10_000) as sw:
        for k in range(rows - len(made)):
            base = made[k % len(made)]
            rid = f"copy{k:07d}"
            dest = out / "images" / f"{rid}.png"
            dest.write_bytes(_tagged(Path(base["output"]).read_bytes(), rid))
            w.add({**{c: base[c] for c in ("image", "source_prompt", "target_prompt", "config_hash", "model",
                                            "feature_key", "seed") if c in base},
                   "id": rid, "status": "ok", "output": str(dest)})
            s = scores[base["id"]]
            sw.add({**{c: s[c] for c in ("config_hash", "status", "clip_score", "clip_score_source",
                                          "structure_dist", "clip_model")}, "id": rid})
    return out


def _tagged(png: bytes, text: str) -> bytes:
    """The PNG with a tEXt chunk naming the row before IEND: the same pixels, bytes of its own (real outputs
    differ, and Parquet would otherwise store repeated images once in a dictionary)."""
    body = b"pnp-batch-row\x00" + text.encode()
    chunk = struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body))
    end = png.rindex(b"IEND") - 4
    return png[:end] + chunk + png[end:]


def _export_once(out: Path, dest: Path, fmt: str, shard_size: int) -> dict[str, Any]:
    from pnp_batch.export.driver import export
    from pnp_batch.export.run import ExportRequest

    tracemalloc.start()
    t0 = time.perf_counter()
    code = export(ExportRequest(out=str(out), dest=str(dest), format=fmt, shard_size=shard_size))
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    if code != 0:
        raise RuntimeError(f"bench --export: export exited {code}")
    doc = json.loads((dest / "export.json").read_text())
    shard_bytes = max((sum(f["bytes"] for f in s["files"].values()) for s in doc["shards"]), default=0)
    return {"seconds": seconds, "written": doc["counts"]["written"], "peak_alloc_mib": peak / 2**20,
            "largest_shard_mib": shard_bytes / 2**20}


def run_export_bench(args) -> int:
    rows = args.export_rows
    resolution = args.resolution or 256
    repeats = args.repeats or 3
    shard_size = max(1, rows // 4)
    print(f"bench --export: {rows} rows of tiny-model outputs at {resolution} px, shards of {shard_size} rows, "
          f"{repeats} repeats per format, interleaved; local engine (one core)", flush=True)
    logging.getLogger("pnp_batch.export").setLevel(logging.WARNING)  # one line per export, not per shard
    with tempfile.TemporaryDirectory(prefix="pnp-bench-export-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        out = _make_output(root, rows, resolution)
        print(f"bench --export: output made in {time.perf_counter() - t0:.1f} s", flush=True)
        runs: dict[str, list[dict[str, Any]]] = {f: [] for f in FORMATS}
        for r in range(repeats):
            for fmt in FORMATS:
                dest = root / f"x-{fmt}-{r}"
                runs[fmt].append(_export_once(out, dest, fmt, shard_size))
                shutil.rmtree(dest)
    figures = {}
    for fmt, got in runs.items():
        rates = [g["written"] / g["seconds"] for g in got]
        figures[fmt] = {"rows_per_s_median": statistics.median(rates), "rows_per_s_min": min(rates),
                        "rows_per_s_max": max(rates), "peak_alloc_mib": max(g["peak_alloc_mib"] for g in got),
                        "largest_shard_mib": max(g["largest_shard_mib"] for g in got), "written": got[0]["written"]}
        f = figures[fmt]
        print(f"  {fmt:12s} {f['rows_per_s_median']:8.0f} rows/s [{f['rows_per_s_min']:.0f}..{f['rows_per_s_max']:.0f}]"
              f"  peak allocations {f['peak_alloc_mib']:.0f} MiB, largest shard {f['largest_shard_mib']:.0f} MiB"
              f"  ({f['written']} rows)", flush=True)
    target = figures["parquet"]["rows_per_s_median"] >= 500
    print(f"bench --export: parquet {figures['parquet']['rows_per_s_median']:.0f} rows/s per core "
          f"({'meets' if target else 'misses'} the 500 rows/s target)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "resolution": resolution, "repeats": repeats,
                                               "shard_size": shard_size, "formats": figures}, indent=2) + "\n")
    return 0
