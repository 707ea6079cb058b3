"""Before and after sampling a group's rows, for the translator and for packs of sources (translate/packs.py):
which rows can be translated (their image prompt and mask usable), and the records and writes of the
rows translated.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch

from pnp_batch.io.output_paths import output_uri
from pnp_batch.io.records import SCORES_FIELD
from pnp_batch.io.rows import Row
from pnp_batch.masks.group import RowMask, mask_uri
from pnp_batch.translate.image_prompts import split_unusable


@dataclasses.dataclass
class Feats:
    """A source's features as the translator got them: latents, feature key, whether from the store, and
    the inversion's seconds per source."""

    latents: torch.Tensor
    key: str
    hit: bool
    seconds: float


def usable_rows(tr, rows: list[Row], feats: Feats, source_data: bytes | None, attempt: int,
                fillers: bool = False) -> tuple[list[Row], list[dict], dict[str, RowMask]]:
    """(rows to sample, failed records of rows whose image prompt or mask cannot be used, id -> mask).

    An unreadable `ip_image` or `mask` fails its row only. With `fillers` (packs), such a row stays in
    its place as a companion (sampled text-only with the whole frame edited, never written), so the
    pack's calls keep the shape they have in any other run of the same manifest."""

    def failed(r: Row, msg: str) -> dict:
        return tr._record(r, "failed", error=msg, feature_key=feats.key, cache_hit=feats.hit, attempt=attempt)

    ok, bad = split_unusable(tr.image_prompts, rows, tr.cfg.ip_adapter_scale, failed)
    masks: dict[str, RowMask] = {}
    if tr.masks is not None and ok:
        ok, more, masks = tr.masks.prepare(ok, feats.latents, feats.key, source_data, failed)
        bad += more
    if fillers and len(ok) < len(rows):
        kept = {r.id for r in ok}
        ok = [r if r.id in kept else dataclasses.replace(r, companion=True, ip_image=None, ip_image_bytes=None)
              for r in rows]
    return ok, bad, masks


def submit_rows(tr, rows: list[Row], images: np.ndarray, negs: list[str], masks: dict[str, RowMask], feats: Feats,
                t_tr: float, attempt: int, source: Any, image_sha256: str | None) -> list[dict[str, Any] | Future]:
    """Score the translated rows (run --eval), then hand the images of the rows to do (not the companions)
    to the writer threads; each record is a Future that resolves once its image (and mask) is written."""
    h, w = feats.latents.shape[-2] * 8, feats.latents.shape[-1] * 8
    scores = tr._scores(rows, images, source, masks) if tr.scorer is not None else [None] * len(rows)
    records: list[dict[str, Any] | Future] = []
    for r, img, neg, score in zip(rows, images, negs, scores):
        if r.companion:
            continue
        uri = output_uri(tr.out, r.id, tr.cfg.output_format)
        m = masks.get(r.id)
        warning = "; ".join(x for x in (tr.prompt_warning(r.target_prompt), m and m.warning) if x) or None
        ok = tr._record(
            r, "ok", output=uri, negative=neg, feature_key=feats.key, cache_hit=feats.hit, width=w, height=h,
            invert_seconds=feats.seconds if not feats.hit else 0.0, translate_seconds=t_tr, attempt=attempt,
            warning=warning, mask=mask_uri(tr.out, r.id) if m is not None else None,
        )
        ok["image_sha256"] = image_sha256
        if score is not None:
            ok[SCORES_FIELD] = score  # the driver writes it to OUT/eval/ (only if the image is written)
        records.append(tr._writer().submit(tr._write_image, r, uri, img, ok, m))
    return records
