"""Packs of sources (pipeline key `sources_per_batch`): N groups inverted and sampled in one UNet call
per step, with bytes that are a function of the manifest and the config alone.

Why: at K = 1 a sampling call is 3 elements (source, negative, target) and an inversion call 1, which
leaves most of a GPU idle. Packing N sources makes each call N times bigger and the calls N times
fewer; the elements per image stay the same (pnp/packs.py).

How the bytes stay exact (docs/packs.md):
- Which groups share a pack is fixed by the manifest: the groups of each window of rows the planner
  reads (engines/plan.work_groups; io/manifest.group_rows), cut into consecutive packs of N in their
  first-seen order, done or not. A pack with a row to do is handed out whole; its groups' rows that
  are already ok go with it as companions (translated, not written), as within a group. So a resumed
  or Ray-distributed run forms the same packs as an uninterrupted one, whatever was pending.
- Inside a pack, group j always sits in slot j: its source is row j of an inversion call of exactly N
  rows (zeros where a source is not inverted here: found in the feature store, unreadable, or past the
  end of a short pack), and the sampling calls' layout is planned from the pack's rows alone. A
  source that cannot be read keeps its slot with zero latents, so its neighbours' calls keep their
  shape. No kernel mixes rows, so a row's bits depend on its slot and the call's shape, never on its
  neighbours' values (tests/packs/test_pack_sampler.py checks it on this CPU).
- Feature-store keys of packed runs carry N (translate/sources.SourceFeatures._key): a source inverted
  in a batch of N is not served to a run with another N.

Where the math does not allow one call: groups of a pack with another negative-prompt mode (blend has
three element kinds), another layer setting (another injector), or another latent size (`resize_mode:
short_side` with other aspect ratios) are sampled in separate calls, one per kind, in slot order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import torch

from pnp_batch.io.images import decode_image, resize_source
from pnp_batch.io.inputs import open_row_input
from pnp_batch.io.rows import Row
from pnp_batch.masks.group import RegionMasks, RowMask
from pnp_batch.pnp.inversion import ddim_invert_many
from pnp_batch.pnp.packs import pnp_sample_pack
from pnp_batch.translate.finish import Feats, submit_rows, usable_rows
from pnp_batch.translate.outputs import row_message
from pnp_batch.translate.pack_plan import pack_size

log = logging.getLogger(__name__)

MAX_TARGETS_PER_PACK_LOOP = 256  # as translator.MAX_TARGETS_PER_LOOP: bounds the latents held


# -- the translator's side ------------------------------------------------------------------------
class _Slot:
    """One group of a pack: its rows, records so far, source bytes and features."""

    def __init__(self, index: int, group: list[Row], tr, attempt: int) -> None:
        self.index = index
        self.records: list[dict[str, Any] | Future] = [
            tr._record(r, "failed", error=r.error, attempt=attempt) for r in group if r.error and not r.companion]
        self.rows = [r for r in group if not r.error]
        self.data: bytes | None = None
        self.sha: str | None = None  # the source bytes' sha256 (the records name them)
        self.prompt = ""
        self.feats: Feats | None = None
        self.masks: dict[str, RowMask] = {}  # id -> mask (mask_mode), for the rows whose mask could be used
        self.failed: Exception | None = None
        self.prepared: Any = None  # the preprocessed source, for run --eval
        self.twin: _Slot | None = None  # an earlier slot of the same source and features


def start_pack(tr, groups: list[list[Row]], attempt: int = 1) -> list[list[dict[str, Any] | Future]]:
    """Translator.start_many for a pack (the whole window the engine handed out): the records of each
    group, in order; a translated row's record is a Future resolving once its image is written."""
    n = pack_size(tr.cfg)
    slots = [_Slot(j, g, tr, attempt) for j, g in enumerate(groups)]
    _features(tr, slots, n)
    for s in slots:  # image prompts and masks; a row whose own cannot be used fails and stays as a filler
        if s.rows and s.feats is not None:
            s.rows, bad, s.masks = usable_rows(tr, s.rows, s.feats, s.data, attempt, fillers=True)
            s.records += bad
    by_kind: dict[tuple, list[_Slot]] = {}
    for s in slots:
        if s.rows and s.feats is not None:
            by_kind.setdefault(_kind(tr, s.rows[0], s.feats.latents.shape), []).append(s)
    for s in slots:  # an unreadable source keeps its slot (zero latents) among the sources like it
        if s.rows and s.feats is None:
            s.records += tr._source_failed(s.rows, s.failed or RuntimeError("no features"), attempt)
            like = next((k for k in by_kind if k[:2] == _kind(tr, s.rows[0], ())[:2]), None)
            if like is not None:
                by_kind[like].append(s)
    for kind, members in by_kind.items():
        members.sort(key=lambda s: s.index)
        for run in _runs(members):
            _sample(tr, kind, run, attempt)
    return [s.records for s in slots]


def _kind(tr, row: Row, shape: tuple) -> tuple:
    """What the slots sampled in one call share: layer setting, negative-prompt mode, latent size."""
    return (tr.row_points(row), tr._negative_mode([row]), tuple(shape[2:]))


def _runs(members: list[_Slot]) -> Iterator[list[tuple[_Slot, list[Row]]]]:
    """Consecutive slots (a slot's rows in chunks) of at most MAX_TARGETS_PER_PACK_LOOP targets."""
    run: list[tuple[_Slot, list[Row]]] = []
    size = 0
    for s in members:
        for first in range(0, len(s.rows), MAX_TARGETS_PER_PACK_LOOP):
            chunk = s.rows[first : first + MAX_TARGETS_PER_PACK_LOOP]
            if run and size + len(chunk) > MAX_TARGETS_PER_PACK_LOOP:
                yield run
                run, size = [], 0
            run.append((s, chunk))
            size += len(chunk)
    if run:
        yield run


def _features(tr, slots: list[_Slot], n: int) -> None:
    """Each slot's features: from the store, or inverted at its slot in calls of exactly n rows."""
    seen: dict[str, _Slot] = {}
    misses: dict[tuple, list[tuple[_Slot, torch.Tensor, str, str, tuple]]] = {}
    for s in slots:
        if not s.rows:
            continue
        first = s.rows[0]
        t0 = time.perf_counter()
        try:
            s.data = first.image_bytes if first.image_bytes is not None else open_row_input(first.image, tr.policy)
            s.prompt = tr._inversion_prompt(first)
            sha = s.sha = tr._sha256(s.data)
            key = tr._key(sha, s.prompt)
            if key in seen:
                s.twin = seen[key]
                continue
            seen[key] = s
            hit = tr._stored(key)
            if hit is not None:
                tr.counters.cache_hits += 1
                s.feats = Feats(hit.to(tr.models.device), key, True, time.perf_counter() - t0)
                continue
            img = decode_image(s.data, tr.cfg.max_pixels)
            resized = resize_source(img, tr.cfg.resolution, tr.cfg.resize_mode)
            s.prepared = resized
            z0 = tr.encode(resized)
        except Exception as e:  # noqa: BLE001 - a bad source is data: its rows fail
            s.failed = e
            continue
        misses.setdefault(tuple(z0.shape), []).append((s, z0, sha, key, img.size))
    for shape, items in misses.items():
        t0 = time.perf_counter()
        try:
            batch = torch.zeros((n, *shape[1:]), device=items[0][1].device, dtype=items[0][1].dtype)
            prompts = [""] * n
            for s, z0, *_ in items:
                batch[s.index] = z0[0]
                prompts[s.index] = s.prompt
            out = ddim_invert_many(tr.models.unet, tr.models.scheduler_config, [batch],
                                   tr.condition(prompts, shape), tr.cfg.inversion_steps, tr.timesteps,
                                   tr.models.prediction_type)[0]
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: these sources' rows fail
            for s, *_ in items:
                s.failed = e
            continue
        tr.counters.invert_calls += out.unet_calls
        tr.counters.invert_elements += out.batch_elements
        tr.counters.inversions += len(items)
        seconds = (time.perf_counter() - t0) / len(items)
        for s, _, sha, key, size in items:
            lat = out.latents[:, s.index : s.index + 1]
            meta = {"image_sha256": sha, "model": tr.models.fingerprint, "dtype": str(tr.models.dtype),
                    "inversion_prompt": s.prompt, "timesteps": tr.timesteps, "width": size[0], "height": size[1],
                    "sources_per_batch": n, "slot": s.index}
            tr._store_features(key, lat, meta)
            s.feats = Feats(lat, key, False, seconds)
    for s in slots:  # a second group of the same source (other sweep settings) shares its features
        if s.twin is not None:
            t = s.twin
            s.feats = Feats(t.feats.latents, t.feats.key, True, 0.0) if t.feats is not None else None
            s.failed = t.failed
            s.prepared = t.prepared


def _sample(tr, kind: tuple, run: list[tuple[_Slot, list[Row]]], attempt: int) -> None:
    """Sample one run of slots of one kind in shared calls, decode each slot's images, write them."""
    points = kind[0]
    live = [(s, rows) for s, rows in run if s.feats is not None or s.failed is not None]
    t0 = time.perf_counter()
    try:
        controller = tr.use_points(points, pack=True)
        ref = next(s.feats.latents for s, _ in live if s.feats is not None)
        lats, targets, negs = [], [], []
        for s, rows in live:
            lats.append(s.feats.latents if s.feats is not None else torch.zeros_like(ref))
            t, ng = tr._targets(rows, ref.shape)
            targets.append(t)
            negs.append(ng)
        masks = {k: m for s, _ in live for k, m in s.masks.items()}  # each row its own mask (fillers: none)
        region = RegionMasks.region([r for _, rows in live for r in rows], masks, tr.cfg.steps,
                                    ref.device) if masks else None
        out = pnp_sample_pack(tr.models.unet, controller, tr.models.scheduler_config, lats,
                              tr.condition([""], ref.shape), targets, tr.cfg.steps, tr.max_batch, region=region)
        tr.count_sampling(out)
        t_tr = (time.perf_counter() - t0) / max(1, sum(len(rows) for _, rows in live))
    except Exception as e:
        log.exception("translation of a pack of %d sources failed", len(live))
        for s, rows in live:
            if s.feats is not None:
                msg = row_message(e, rows[0])
                s.records += [tr._record(r, "failed", error=msg, feature_key=s.feats.key, cache_hit=s.feats.hit,
                                         attempt=attempt) for r in rows if not r.companion]
        return
    for (s, rows), lat, ng in zip(live, out.latents, negs):
        if s.feats is None or all(r.companion for r in rows):
            continue  # a filler slot, or companions only: nothing written
        images = tr.images(lat, rows, s.masks, s.data)
        source = None
        if tr.scorer is not None:
            source = s.prepared if s.prepared is not None else tr._eval_source({}, 0, s.data)
        s.records += submit_rows(tr, rows, images, ng, s.masks, s.feats, t_tr, attempt, source, s.sha)
