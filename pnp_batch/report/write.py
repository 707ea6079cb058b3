"""Write the contact sheet of a run (OUT/report/): reads sources and outputs through storage, draws with sheet.py."""

from __future__ import annotations

import io
import logging
from typing import Any

from PIL import Image

from pnp_batch.config import PipelineConfig
from pnp_batch.io import storage
from pnp_batch.io.images import decode_image
from pnp_batch.report.sheet import SheetEntry, build_contact_sheet, build_html

log = logging.getLogger(__name__)

MAX_SOURCES = 24
THUMB = 256


def _thumb(img: Image.Image) -> Image.Image:
    img = img.copy()
    img.thumbnail((THUMB * 2, THUMB * 2))
    return img


def score_line(score: dict[str, Any] | None) -> str | None:
    """The scores shown under an output: CLIP score, its gain over the source, structure distance."""
    if not score:
        return None
    if score.get("status") != "ok":
        return f"not scored: {score.get('error')}"
    parts = [f"CLIP {score['clip_score']:.1f}"]
    if score.get("clip_score_source") is not None:
        parts.append(f"({score['clip_score'] - score['clip_score_source']:+.1f} vs source)")
    if score.get("structure_dist") is not None:
        parts.append(f"structure {score['structure_dist']:.4f}")
    return " ".join(parts)


def write_report(out: str, cfg: PipelineConfig, run_id: str, records: list[dict[str, Any]],
                 scores: dict[str, dict[str, Any]] | None = None) -> str:
    """OUT/report/{run_id}.png and .html: each source, then each of its targets' results (with their
    scores under them when `scores`, id -> score record, has them)."""
    scores = scores or {}
    by_source: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_source.setdefault(str(r.get("image")), []).append(r)
    settings = {
        "pipeline": cfg.name,
        "model": records[0].get("model"),
        "steps": cfg.steps,
        "inversion_steps": cfg.inversion_steps,
        "guidance_scale": cfg.guidance_scale,
        "pnp_f_t": cfg.pnp_f_t,
        "pnp_attn_t": cfg.pnp_attn_t,
        "negative_prompt_mode": cfg.negative_prompt_mode,
        "config_hash": cfg.hash(),
    }
    entries, html_entries = [], []
    report_dir = storage.join(out, "report")
    for n, (src, recs) in enumerate(list(by_source.items())[:MAX_SOURCES]):
        try:
            source = decode_image(storage.read_bytes(src), cfg.max_pixels) if src != "<image_bytes>" else None
        except Exception:  # noqa: BLE001 - an unreadable source is already a failed row
            source = None
        if source is None:
            source = Image.new("RGB", (THUMB, THUMB), (128, 128, 128))
        source = _thumb(source)
        src_name = f"{run_id}-source-{n:03d}.jpg"
        buf = io.BytesIO()
        source.save(buf, format="JPEG", quality=90)
        storage.write_bytes_atomic(storage.join(report_dir, src_name), buf.getvalue())
        results, html_results, notes = [], [], []
        for r in recs:
            label = r.get("target_prompt") or ""
            note = score_line(scores.get(r["id"])) if r["status"] == "ok" else None
            notes.append(note)
            if r["status"] == "ok":
                try:
                    img = _thumb(Image.open(io.BytesIO(storage.read_bytes(r["output"]))).convert("RGB"))
                except Exception:  # noqa: BLE001
                    img = None
                results.append((img, label))
                html_results.append((f"../images/{storage.basename(r['output'])}", label,
                                     "ok" + (f" · {note}" if note else "")))
            else:
                results.append((None, f"{label} [{r.get('error')}]"))
                html_results.append((None, label, f"failed: {r.get('error')}"))
        entries.append(SheetEntry(source=source, source_label=recs[0].get("source_prompt") or src, results=results,
                                  notes=notes))
        html_entries.append((src_name, recs[0].get("source_prompt") or src, html_results))
    line = ", ".join(f"{k} {v}" for k, v in settings.items() if k != "model")
    title = f"pnp-batch run {run_id}"
    if "test model" in str(settings["model"]):
        title += " (tiny random-weight test model: plumbing, not quality)"
    sheet = build_contact_sheet(entries, title=title, settings=line, thumb=THUMB)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    png = storage.join(report_dir, f"{run_id}.png")
    storage.write_bytes_atomic(png, buf.getvalue())
    storage.write_bytes_atomic(
        storage.join(report_dir, f"{run_id}.html"), build_html(html_entries, title, settings).encode("utf-8")
    )
    log.info("contact sheet: %s", png)
    return png
