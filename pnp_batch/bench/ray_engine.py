"""The same CPU work through `--engine ray` (one worker) and `--engine local`, side by side.

``python -m pnp_batch.bench.ray_engine [--rows 8 --sources 4 --steps 8 --resolution 96]`` prints the
figures: steady-state throughput of each engine (after start-up and one warm-up group), the ratio
ray/local, the scheduling overhead per group, and the start-up cost of each engine.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _png(seed: int, size: int) -> bytes:
    import numpy as np
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, "PNG")
    return buf.getvalue()


def _groups(folder: Path, rows: int, sources: int, size: int, first_seed: int) -> list[list[Any]]:
    """Groups of rows (``rows`` spread over ``sources`` PNGs written to ``folder``)."""
    from pnp_batch.io.manifest import Row, group_rows

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(rows):
        s = i % sources
        path = folder / f"src{first_seed + s}.png"
        if not path.exists():
            path.write_bytes(_png(first_seed + s, size))
        out.append(Row(index=i, id=f"b{first_seed}-{i}", image=str(path), image_bytes=None,
                       source_prompt=f"a photo of thing {s}", target_prompt=f"a painting of thing {s}, style {i}"))
    return list(group_rows(out))


def _time_backend(backend: Any, req: Any, warmup: list[list[Any]], groups: list[list[Any]]) -> dict[str, float]:
    t0 = time.perf_counter()
    backend.start(req)
    for _ in backend.map_groups(iter(warmup)):
        pass
    t1 = time.perf_counter()
    n = 0
    for records in backend.map_groups(iter(groups)):
        assert all(r["status"] == "ok" for r in records), [r["error"] for r in records]
        n += len(records)
    t2 = time.perf_counter()
    stats = backend.stats()
    backend.stop()
    return {"startup_s": t1 - t0, "wall_s": t2 - t1, "rows": n, "rows_per_s": n / (t2 - t1),
            "unet_sample_calls": stats.get("unet", {}).get("sample_calls", 0)}


def bench_ray_vs_local(rows: int = 8, sources: int = 4, steps: int = 8, resolution: int = 96,
                       inversion_steps: int | None = None, repeats: int = 2,
                       threads: int | None = None) -> dict[str, Any]:
    """Run the same groups through LocalBackend and RayBackend(workers=1), alternately ``repeats``
    times each (ray first), on one Ray instance; the fastest run of each engine gives the figures."""
    import os

    import ray
    import torch

    from pnp_batch.config import load_config
    from pnp_batch.engines.local import LocalBackend
    from pnp_batch.engines.plan import RunRequest
    from pnp_batch.engines.ray import RayBackend

    overrides = [f"steps={steps}", f"inversion_steps={inversion_steps or steps}", f"resolution={resolution}"]
    cfg = load_config("tiny", overrides)
    figures: dict[str, Any] = {"rows": rows, "sources": sources, "steps": steps, "resolution": resolution,
                               "repeats": repeats, "cpus": os.cpu_count()}
    # both engines compute with the same intra-op thread count (the actor's default: all CPUs)
    threads = threads or os.cpu_count() or 1
    figures["threads"] = threads
    torch.set_num_threads(threads)
    owns = not ray.is_initialized()
    if owns:
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, object_store_memory=256 * 1024 * 1024)
    runs: dict[str, list[dict[str, float]]] = {"ray": [], "local": []}
    try:
        with tempfile.TemporaryDirectory(prefix="pnp-bench-ray-") as tmp:
            root = Path(tmp)
            groups = _groups(root / "src", rows, sources, resolution, first_seed=100)
            warmup = _groups(root / "src", 1, 1, resolution, first_seed=1)
            figures["groups"] = len(groups)
            for i in range(repeats):
                for name in ("ray", "local"):
                    backend = RayBackend(threads_per_worker=threads) if name == "ray" else LocalBackend()
                    req = RunRequest(manifest="-", out=str(root / f"{name}{i}"), cfg=cfg, engine=name, workers=1)
                    runs[name].append(_time_backend(backend, req, warmup, groups))
    finally:
        if owns:
            ray.shutdown()
    for name, results in runs.items():
        figures[name] = min(results, key=lambda r: r["wall_s"])
        figures[f"{name}_walls_s"] = [round(r["wall_s"], 3) for r in results]
    local, ray_ = figures["local"], figures["ray"]
    figures["throughput_ratio_ray_over_local"] = ray_["rows_per_s"] / local["rows_per_s"]
    figures["overhead_per_group_s"] = (ray_["wall_s"] - local["wall_s"]) / len(groups)
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pnp_batch.bench.ray_engine", description=__doc__)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--sources", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--resolution", type=int, default=96)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads for both engines (default: CPUs)")
    p.add_argument("--json", default=None, help="also write the figures here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    f = bench_ray_vs_local(rows=a.rows, sources=a.sources, steps=a.steps, resolution=a.resolution,
                           repeats=a.repeats, threads=a.threads)
    print(f"{f['rows']} rows over {f['groups']} groups, tiny model, {f['steps']} steps, {f['resolution']} px, "
          f"CPU, {f['threads']} torch threads")
    for name in ("local", "ray"):
        e = f[name]
        print(f"  {name:5s}: {e['wall_s']:7.2f} s  {e['rows_per_s']:6.3f} rows/s  (start-up {e['startup_s']:.1f} s; walls {f[name + '_walls_s']})")
    print(f"  throughput ray/local: {f['throughput_ratio_ray_over_local']:.3f}")
    print(f"  scheduling overhead per group: {f['overhead_per_group_s'] * 1000:+.0f} ms")
    if a.json:
        Path(a.json).write_text(json.dumps(f, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
