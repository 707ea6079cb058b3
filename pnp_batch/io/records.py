"""The result record of one row attempt: one shape for every engine (no torch, no pyarrow)."""

from __future__ import annotations

from concurrent.futures import Future
from datetime import datetime, timezone
from typing import Any

from pnp_batch.config import PipelineConfig
from pnp_batch.io.credentials import redact
from pnp_batch.io.rows import Row

# The key under which a worker's record carries the row's score record (run --eval) to the driver,
# which takes it out and writes it to OUT/eval/ (io/metrics); it is never a result column.
SCORES_FIELD = "_scores"


def row_record(row: Row, cfg: PipelineConfig, status: str, model: str, worker: str, attempt: int,
               **fields: Any) -> dict[str, Any]:
    """A record with every CONTRACT column; `fields` fills the ones known (error, output, timings...)."""
    o = row.overrides
    rec: dict[str, Any] = {
        "id": row.id,
        "status": status,
        "error": None,
        "warning": None,
        "output": None,
        # the source translated: a row with image_bytes has no image (io/manifest.py); no URI credentials
        "image": redact(row.image) if row.image is not None else "<image_bytes>",
        "source_prompt": row.source_prompt,
        "target_prompt": row.target_prompt,
        "negative_prompt": None,
        "seed": int(o.get("seed", cfg.seed)),
        "guidance_scale": float(o.get("guidance_scale", cfg.guidance_scale)),
        "pnp_f_t": float(o.get("pnp_f_t", cfg.pnp_f_t)),
        "pnp_attn_t": float(o.get("pnp_attn_t", cfg.pnp_attn_t)),
        "pipeline": cfg.name,
        "config_hash": cfg.hash(),
        "model": model,
        "feature_key": None,
        "feature_cache_hit": None,
        "width": None,
        "height": None,
        "invert_seconds": None,
        "translate_seconds": None,
        "worker": worker,
        "attempt": attempt,
        "finished_at": datetime.now(timezone.utc),
        "work_key": row.work_key,
        "image_sha256": None,
        "output_sha256": None,
        "mask": None,
    }
    unknown = set(fields) - set(rec)
    if unknown:
        raise KeyError(f"not result columns: {sorted(unknown)}")
    rec.update(fields)
    for k in ("output", "error", "warning"):  # credentials in a URI never reach the results
        if isinstance(rec[k], str):
            rec[k] = redact(rec[k])
    for k, v in row.extra.items():
        rec.setdefault(k, v)
    return rec


def resolve(records: list[dict[str, Any] | Future]) -> list[dict[str, Any]]:
    """The records of one group, waiting for those whose images are still being written."""
    return [r.result() if isinstance(r, Future) else r for r in records]
