"""`pnp-batch export --engine ray`: the unfinished shards written in parallel by Ray Data tasks.

The driver plans (the view and the filter: metadata only) and checks which shards are finished; each
unfinished shard is one item of a Ray Dataset whose map task reads that shard's images, builds its files
and writes them (and its progress file) itself. Only the shards' summaries come back to the driver.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from pnp_batch.export.run import (
    ExportPlan,
    ExportRequest,
    ShardResult,
    _finished,
    _read_progress,
    _result,
    _shard_name,
    write_shard,
)
from pnp_batch.io import storage

log = logging.getLogger(__name__)


def _write(item: dict[str, Any]) -> dict[str, Any]:
    storage.configure(item["storage_options"])
    res = write_shard(item["req"], item["schema"], item["preps"], item["name"], item["start"], item["rows"],
                      item["identity"])
    return {"doc": res.doc()}


def ray_shards(req: ExportRequest, p: ExportPlan, ids: list[str], identity: str) -> list[tuple[ShardResult, bool]]:
    """Every shard's result in shard order, and whether it was already finished."""
    import ray

    done: dict[int, ShardResult] = {}
    todo: list[dict[str, Any]] = []
    for k, start in enumerate(range(0, p.rows.num_rows, req.shard_size)):
        name = _shard_name(k)
        doc = _read_progress(req.dest, name)
        if _finished(req.dest, doc, start, ids, identity):
            done[k] = _result(doc)
        else:
            todo.append({"k": k, "name": name, "start": start, "rows": p.rows.slice(start, req.shard_size).to_pylist(),
                         "req": req, "schema": p.schema, "preps": p.preps, "identity": identity,
                         "storage_options": req.storage_options})
    written: dict[int, ShardResult] = {}
    if todo:
        owns = False
        if not ray.is_initialized():
            if req.ray_address:
                ray.init(address=req.ray_address, ignore_reinit_error=True)
            else:
                ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, ignore_reinit_error=True,
                         object_store_memory=256 * 1024 * 1024)
                owns = True
        try:
            ks = [t["k"] for t in todo]
            ds = ray.data.from_items(todo, override_num_blocks=len(todo))
            out = ds.map(_write, concurrency=req.workers or None, num_cpus=1).take_all()
            by_name = {o["doc"]["name"]: _result(o["doc"]) for o in out}
            written = {k: by_name[_shard_name(k)] for k in ks}
        finally:
            if owns:
                ray.shutdown()
    log.info("export (ray): %d shard(s) written, %d already finished", len(written), len(done))
    return [(done[k], True) if k in done else (written[k], False) for k in sorted({**done, **written})]
