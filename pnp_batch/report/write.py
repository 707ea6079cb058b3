"""Write the contact sheet of a run (OUT/report/): reads sources and outputs through storage, draws with sheet.py."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

from PIL import Image

from pnp_batch.config import PipelineConfig
from pnp_batch.io import storage
from pnp_batch.io.images import decode_image
from pnp_batch.io.inputs import open_row_input, output_policy
from pnp_batch.io.metrics import ok_scores
from pnp_batch.io.output_paths import located
from pnp_batch.io.policy import InputPolicy
from pnp_batch.io.results import latest_results
from pnp_batch.report.masks import outline_masks
from pnp_batch.report.sheet import SheetEntry, build_contact_sheet, build_html
from pnp_batch.report.tradeoff import tradeoff_png, tradeoff_points

log = logging.getLogger(__name__)

MAX_SOURCES = 24
THUMB = 256


def _thumb(img: Image.Image) -> Image.Image:
    img = img.copy()
    img.thumbnail((THUMB * 2, THUMB * 2))
    return img


def _output_thumb(uri: str) -> Image.Image | None:
    """A thumbnail of an output image, or None when it cannot be read (the sheet shows a blank)."""
    try:
        return _thumb(Image.open(io.BytesIO(storage.read_bytes(uri))).convert("RGB"))
    except Exception:  # noqa: BLE001
        return None


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
                 scores: dict[str, dict[str, Any]] | None = None, policy: InputPolicy | None = None) -> str:
    """OUT/report/{run_id}.png and .html: each source, then each of its targets' results (with their
    scores under them when `scores`, id -> score record, has them). Sources are read under `policy`
    (the run's input policy; by default the latest run's)."""
    scores = scores or {}
    policy = policy or output_policy(out)
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
            source = decode_image(open_row_input(src, policy), cfg.max_pixels) if src != "<image_bytes>" else None
        except Exception:  # noqa: BLE001 - an unreadable source is already a failed row
            source = None
        if source is None:
            source = Image.new("RGB", (THUMB, THUMB), (128, 128, 128))
        source = outline_masks(_thumb(source), out, (r.get("mask") for r in recs))  # region edits
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
                results.append((_output_thumb(located(out, r["output"])), label))
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


MAX_SWEEP_SOURCES = 24
MAX_SWEEP_SETTINGS = 48
SWEEP_THUMB = 160


def _sweep_table(out: str) -> list[dict[str, Any]]:
    """The latest record of every sweep row (those with a `setting`), in id order."""
    cols = ["status", "error", "output", "image", "target_prompt", "model", "config_hash", "source_id", "setting"]
    table = latest_results(out, cols)
    if table.num_rows == 0 or "setting" not in table.column_names or "source_id" not in table.column_names:
        return []
    rows = [r for r in table.sort_by("id").to_pylist() if r.get("setting")]
    return rows


def write_sweep_sheet(out: str, max_pixels: int = 64_000_000, policy: InputPolicy | None = None) -> str | None:
    """OUT/report/sweep.png: one row per source (its manifest row's id), one column per setting, each
    output's scores under it where they exist. None when the output has no sweep rows."""
    rows = _sweep_table(out)
    if not rows:
        return None
    policy = policy or output_policy(out)
    scores = {(r["id"], r["config_hash"]): r for r in ok_scores(out).to_pylist()}
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    shown = settings[:MAX_SWEEP_SETTINGS]
    by_source: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_source.setdefault(r["source_id"], {})[r["setting"]] = r
    entries = []
    for source_id, cells in list(by_source.items())[:MAX_SWEEP_SOURCES]:
        first = next(iter(cells.values()))
        src = first.get("image")
        try:
            source = decode_image(open_row_input(src, policy), max_pixels) if src and src != "<image_bytes>" else None
        except Exception:  # noqa: BLE001 - an unreadable source is already a failed row
            source = None
        source = _thumb(source) if source is not None else Image.new("RGB", (SWEEP_THUMB, SWEEP_THUMB), (128,) * 3)
        results: list[tuple[Image.Image | None, str]] = []
        for setting in shown:
            r = cells.get(setting)
            if r is None:
                results.append((None, f"{setting} [not run]"))
                continue
            label = setting.replace(",", ", ")
            note = score_line(scores.get((r["id"], r["config_hash"])))
            if note:
                label += f" | {note}"
            if r["status"] == "ok":
                results.append((_output_thumb(located(out, r["output"])), label))
            else:
                results.append((None, f"{label} [{r.get('error')}]"))
        entries.append(SheetEntry(source=source, source_label=f"{source_id}: {first.get('target_prompt')}",
                                  results=results))
    more = []
    if len(by_source) > MAX_SWEEP_SOURCES:
        more.append(f"first {MAX_SWEEP_SOURCES} of {len(by_source)} sources")
    if len(settings) > MAX_SWEEP_SETTINGS:
        more.append(f"first {MAX_SWEEP_SETTINGS} of {len(settings)} settings")
    title = f"pnp-batch sweep: {len(settings)} settings x {len(by_source)} sources"
    if any("test model" in str(r.get("model", "")) for r in rows[:1]):
        title += " (tiny random-weight test model)"
    sheet = build_contact_sheet(entries, title=title, settings="; ".join(more) or "one column per setting",
                                thumb=SWEEP_THUMB)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    uri = storage.join(out, "report", "sweep.png")
    storage.write_bytes_atomic(uri, buf.getvalue())
    log.info("sweep contact sheet: %s", uri)
    return uri


def write_tradeoff(out: str) -> str | None:
    """OUT/report/tradeoff.png (and tradeoff.json, the plotted numbers) from the scored rows; None when
    no row is scored."""
    points = tradeoff_points(out)
    if not points:
        return None
    n = sum(len(p.clip) for p in points)
    png = tradeoff_png(points, title=f"pnp-batch trade-off: {len(points)} settings, {n} scored outputs "
                       "(error bars: interquartile range)")
    uri = storage.join(out, "report", "tradeoff.png")
    storage.write_bytes_atomic(uri, png)
    storage.write_text_atomic(storage.join(out, "report", "tradeoff.json"),
                              json.dumps([p.summary() for p in points], indent=2) + "\n")
    log.info("trade-off plot: %s", uri)
    return uri


def write_sweep_reports(out: str, max_pixels: int = 64_000_000, sheet: bool = True,
                        policy: InputPolicy | None = None) -> list[str]:
    """The sweep contact sheet (outputs with sweep rows; `sheet=False` skips looking for them) and the
    trade-off plot (scored outputs) of OUT."""
    return [u for u in (write_sweep_sheet(out, max_pixels, policy) if sheet else None, write_tradeoff(out)) if u]
