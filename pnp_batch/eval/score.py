"""Score rows: the metric models loaded once, images in memory or read through io, score records out.

A score record has exactly the columns of io/metrics.SCORE_SCHEMA (the driver writes it). Both
callers use the same `Scorer.score`: the translator (`run --eval`) with the output image still in
memory and the source as it preprocessed it, `pnp-batch eval` with both read back through `read_item`.

The source a score sees is the source *as preprocessed by the pipeline* (decoded, then resized per
`resolution` / `resize_mode`, io/images.resize_source), for both `structure_dist` and
`clip_score_source`: the image the translation started from, framed as the output is.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from PIL.Image import Image

from pnp_batch.config import PipelineConfig
from pnp_batch.eval.background import background_metrics, blacked_out, read_mask_pixels
from pnp_batch.eval.metrics import clip_score, structure_dist
from pnp_batch.eval.models import MetricModels, load_metric_models
from pnp_batch.io import storage
from pnp_batch.io.images import decode_image, resize_source
from pnp_batch.io.inputs import open_row_input
from pnp_batch.io.policy import InputPolicy

log = logging.getLogger(__name__)

NO_SOURCE_NOTE = ("the source was given as image_bytes in the manifest and is not stored in OUT: "
                  "clip_score_source and structure_dist not computed (run --eval scores them from memory)")
IMAGE_BYTES = "<image_bytes>"
BACKGROUND_KEYS = ("bg_psnr", "bg_mse", "bg_ssim", "clip_score_edited")  # rows with a mask (eval/background.py)


@dataclass
class ScoreItem:
    """One row to score: its output image, its preprocessed source (None: not available), its prompt.

    `error` set means the row cannot be scored (an image could not be read): it becomes a failure.
    `note` is kept in the record's error column of an ok score that misses some metric.
    """

    id: str
    config_hash: str
    target_prompt: str
    output: Image | None = None
    source: Image | None = None
    error: str | None = None
    note: str | None = None
    mask: Any = None  # (H, W) float in [0, 1], 0 = kept (region edits): the background metrics are computed


def load_scorer(cfg: PipelineConfig, device: str | None = None) -> Scorer:
    """The metric models the config names (eval_* keys), on the pipeline's device and dtype."""
    models = load_metric_models(
        cfg.eval_clip_model, cfg.eval_dino_model, device=device or cfg.device, dtype=cfg.dtype,
        clip_revision=cfg.eval_clip_revision or None, dino_revision=cfg.eval_dino_revision or None,
    )
    return Scorer(models)


def _reason(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return storage.redact(f"{type(e).__name__}: {text}" if text else type(e).__name__)[:500]


class Scorer:
    """The two metric models of one worker; `score(items)` gives one score record per item."""

    def __init__(self, models: MetricModels) -> None:
        self.models = models

    def _record(self, item: ScoreItem, status: str, error: str | None = None, **scores: float | None) -> dict:
        m = self.models
        return {
            "id": item.id, "config_hash": item.config_hash, "status": status, "error": error,
            "clip_score": scores.get("clip_score"), "clip_score_source": scores.get("clip_score_source"),
            "structure_dist": scores.get("structure_dist"),
            **{k: scores.get(k) for k in BACKGROUND_KEYS},
            "clip_model": m.clip_model, "clip_revision": m.clip_revision,
            "dino_model": m.dino_model, "dino_revision": m.dino_revision,
            "scored_at": datetime.now(timezone.utc),
        }

    def score(self, items: Sequence[ScoreItem]) -> list[dict[str, Any]]:
        """Score records in the order of `items`; a failure of the models fails the batch's rows, never raises."""
        out: list[dict[str, Any] | None] = [None] * len(items)
        good = []
        for i, item in enumerate(items):
            if item.error or item.output is None:
                out[i] = self._record(item, "failed", item.error or "no output image to score")
            else:
                good.append(i)
        if good:
            try:
                prompts = [items[i].target_prompt for i in good]
                clip = clip_score(self.models, [items[i].output for i in good], prompts)
                with_src = [i for i in good if items[i].source is not None]
                src_clip = dict(zip(with_src, clip_score(
                    self.models, [items[i].source for i in with_src], [items[i].target_prompt for i in with_src])))
                struct = dict(zip(with_src, structure_dist(
                    self.models, [items[i].source for i in with_src], [items[i].output for i in with_src])))
                region = _region_scores(self.models, items, with_src)
            except Exception as e:  # noqa: BLE001 - these rows fail scoring; the run goes on
                log.warning("scoring %d rows failed: %s", len(good), _reason(e))
                for i in good:
                    out[i] = self._record(items[i], "failed", f"scoring failed: {_reason(e)}")
            else:
                for i, c in zip(good, clip):
                    out[i] = self._record(items[i], "ok", items[i].note, clip_score=c,
                                          clip_score_source=src_clip.get(i), structure_dist=struct.get(i),
                                          **region.get(i, {}))
        return out  # type: ignore[return-value]


def _region_scores(models: MetricModels, items: Sequence[ScoreItem], with_src: list[int]) -> dict[int, dict]:
    """The background metrics and clip_score_edited of the items with a source and a mask."""
    masked = [i for i in with_src if items[i].mask is not None]
    if not masked:
        return {}
    out = {i: background_metrics(items[i].output, items[i].source, items[i].mask) for i in masked}
    edited = clip_score(models, [blacked_out(items[i].output, items[i].mask) for i in masked],
                        [items[i].target_prompt for i in masked])
    for i, c in zip(masked, edited):
        out[i]["clip_score_edited"] = c
    return out


@dataclass(frozen=True)
class Preprocessing:
    """How the pipeline preprocessed its sources (from the run's config)."""

    resolution: int
    resize_mode: str
    max_pixels: int

    @classmethod
    def of(cls, cfg: PipelineConfig | dict[str, Any]) -> Preprocessing:
        get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
        return cls(int(get("resolution")), str(get("resize_mode")), int(get("max_pixels", 64_000_000)))


def prepare_source(data: bytes, prep: Preprocessing) -> Image | Exception:
    """The source as the pipeline prepares it (decoded, resized), or the exception saying why it cannot be."""
    try:
        return resize_source(decode_image(data, prep.max_pixels), prep.resolution, prep.resize_mode)
    except Exception as e:  # noqa: BLE001 - recorded in the rows' scores
        return e


def score_decoded(scorer: Scorer, ids: Sequence[str], prompts: Sequence[str], config_hash: str,
                  images: Sequence[Any], source: Image | Exception | None,
                  masks: Sequence[Any] | None = None) -> list[dict[str, Any]]:
    """Score rows of one group from their decoded HxWx3 uint8 images in memory and their shared
    prepared source (an exception: the rows' scores fail with its reason) - run --eval's path."""
    from PIL import Image as PILImage

    items = []
    for j, (rid, prompt, img) in enumerate(zip(ids, prompts, images)):
        item = ScoreItem(id=rid, config_hash=config_hash, target_prompt=prompt, output=PILImage.fromarray(img, "RGB"),
                         mask=masks[j] if masks is not None else None)
        if isinstance(source, Exception):
            item.error = f"source image cannot be prepared for scoring: {_reason(source)}"
        else:
            item.source = source
        items.append(item)
    return scorer.score(items)


def read_item(row: dict[str, Any], prep: Preprocessing | None, sources: dict[tuple, Image | Exception],
              policy: InputPolicy | None = None) -> ScoreItem:
    """A ScoreItem for a result record (`id`, `config_hash`, `target_prompt`, `output`, `image`), its
    output and source read through storage; `sources` caches prepared sources by (URI, preprocessing): rows share them.
    An image that cannot be read makes the item an eval failure with the reason."""
    item = ScoreItem(id=row["id"], config_hash=row["config_hash"], target_prompt=row.get("target_prompt") or "")
    try:
        item.output = decode_image(storage.read_bytes(row["output"]), prep.max_pixels if prep else 64_000_000)
    except Exception as e:  # noqa: BLE001 - recorded as this row's eval failure
        item.error = f"output image unreadable ({row.get('output')}): {_reason(e)}"
        return item
    if row.get("mask"):  # a region edit: OUT's own file, as recorded (engines/evaluate.py locates it)
        try:
            item.mask = read_mask_pixels(storage.read_bytes(row["mask"]))
        except Exception as e:  # noqa: BLE001 - recorded as this row's eval failure
            item.error = f"mask unreadable ({row.get('mask')}): {_reason(e)}"
            return item
    src = row.get("image")
    if not src or src == IMAGE_BYTES:
        item.note = NO_SOURCE_NOTE
        return item
    if prep is None:
        item.error = (f"no run summary in OUT/runs records the preprocessing of config {row['config_hash']}, "
                      "so the source cannot be prepared as the pipeline did")
        return item
    key = (src, prep)
    if key not in sources:
        try:
            sources[key] = resize_source(decode_image(open_row_input(src, policy), prep.max_pixels), prep.resolution,
                                         prep.resize_mode)
        except Exception as e:  # noqa: BLE001
            sources[key] = e
    got = sources[key]
    if isinstance(got, Exception):
        item.error = f"source image unreadable ({storage.redact(src)}): {_reason(got)}"
    else:
        item.source = got
    return item
