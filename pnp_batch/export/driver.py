"""The export's driver: plan, the shards (here, or in parallel with Ray), then DEST/export.json."""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any

from pnp_batch import __version__
from pnp_batch.export.run import (
    MANIFEST,
    MAX_SKIPS_LISTED,
    ExportPlan,
    ExportRequest,
    ShardResult,
    _byte_shards,
    _check_dest,
    _count_shards,
    _identity_sha,
    _remove_stale,
    plan_export,
)
from pnp_batch.io import storage

log = logging.getLogger(__name__)


def export(req: ExportRequest) -> int:
    """Write the export; exit status 0 (skipped rows are counted in export.json, not an error)."""
    p = plan_export(req)
    if req.dry_run:
        print(dry_run_text(req, p))
        return 0
    _check_dest(req)
    identity = _identity_sha(req)
    ids = [str(x) for x in p.rows.column("id").to_pylist()] if p.rows.num_rows else []
    log.info("export: %d of %d rows match; format %s into %s", p.rows.num_rows, p.view_rows, req.format,
             storage.redact(req.dest))
    if req.engine == "ray" and req.shard_bytes is None:
        from pnp_batch.export.ray_export import ray_shards  # Ray only when asked for

        results = ray_shards(req, p, ids, identity)
        reused = sum(1 for _, r in results if r)
        shards = [s for s, _ in results]
    else:
        shards, reused = [], 0
        gen = _byte_shards if req.shard_bytes is not None else _count_shards
        for res, was_done in gen(req, p, ids, identity):
            shards.append(res)
            reused += was_done
            log.info("export: shard %s %s (%d written, %d skipped)", res.name, "already finished" if was_done else
                     "written", res.written, len(res.skipped))
    _remove_stale(req, len(shards))
    doc = export_manifest(req, p, shards)
    storage.write_text_atomic(storage.join(req.dest, MANIFEST), json.dumps(doc, indent=2, sort_keys=True) + "\n")
    c = doc["counts"]
    print(f"export: {c['matched']} matched, {c['written']} written, {c['skipped']} skipped, {len(shards)} shard(s) "
          f"({reused} already finished) -> {storage.redact(req.dest)}")
    return 0


def export_manifest(req: ExportRequest, p: ExportPlan, shards: list[ShardResult]) -> dict[str, Any]:
    """DEST/export.json: the request, the counts, pnp-batch's version and every shard's files with sha256."""
    skipped = [s for r in shards for s in r.skipped]
    reasons = Counter(s["reason"].split(" (")[0].split(":")[0] for s in skipped)
    return {
        "request": req.identity(),
        "pnp_batch_version": __version__,
        "counts": {"view_rows": p.view_rows, "matched": p.rows.num_rows, "written": sum(r.written for r in shards),
                   "skipped": len(skipped), "skipped_by_reason": dict(sorted(reasons.items())),
                   "matched_by_status": p.statuses},
        "skipped": skipped[:MAX_SKIPS_LISTED],
        "shards": [{"name": r.name, "rows": r.end - r.start, "written": r.written, "files": r.files} for r in shards],
    }


def dry_run_text(req: ExportRequest, p: ExportPlan, n: int = 5) -> str:
    lines = [f"out: {storage.redact(req.out)}", f"where: {req.where or '(every row)'}",
             f"rows in view: {p.view_rows}", f"matched: {p.rows.num_rows}",
             "matched by status: " + (", ".join(f"{k} {v}" for k, v in p.statuses.items()) or "-")]
    if req.shard_bytes is None:
        lines.append(f"shards: {-(-p.rows.num_rows // req.shard_size)} of up to {req.shard_size} rows ({req.format})")
    else:
        lines.append(f"shards: closed at {req.shard_bytes} bytes of images ({req.format})")
    cols = [c for c in ("id", "status", "target_prompt", "clip_score", "clip_gain", "structure_dist")
            if c in p.rows.column_names]
    lines.append("sample rows:")
    for row in p.rows.slice(0, n).select(cols).to_pylist():
        lines.append("  " + ", ".join(f"{k}={_fmt(v)}" for k, v in row.items()))
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else repr(v) if isinstance(v, str) else str(v)
