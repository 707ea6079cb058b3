"""The source half of a Translator: a source image -> its inverted latents (the features), from the
feature store when they are there, else encoded and DDIM-inverted (several sources per UNet call) and
written to the store in a writer thread; read-ahead of source bytes and stored features (prefetch).

`SourceFeatures` is a mixin of translate/translator.Translator, which provides what it uses: `cfg`,
`models`, `features` (the FeatureStore), `counters`, `timesteps`, `inversion_batch`,
`inversion_streams`, `_streams`, the caches `_feature_writes`, `_prefetched` and `_digests`, and the
methods `encode`, `condition` and `_writer`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from concurrent.futures import Future
from dataclasses import replace
from typing import Any

import torch

from pnp_batch.io import storage
from pnp_batch.io.features import MISSING, feature_key
from pnp_batch.io.images import decode_image, resize_source
from pnp_batch.io.inputs import open_row_input
from pnp_batch.io.rows import Row
from pnp_batch.pnp.inversion import ddim_invert_many

log = logging.getLogger(__name__)
_NOT_READ = object()  # source_features_many: prefetch did not read this key


class SourceFeatures:
    """Inverted latents of source images: stored, inverted, prefetched (a mixin of Translator)."""

    def _invert(self, batches: list[torch.Tensor], inversion_prompt: str, sources: int) -> list[torch.Tensor]:
        """(steps, B, 4, h, w) for each batch of B clean latents of one size, the batches side by side
        (`inversion_streams`); `sources` of all their rows are sources, the rest padding."""
        outs = ddim_invert_many(
            self.models.unet,
            self.models.scheduler_config,
            batches,
            self.condition([inversion_prompt], batches[0].shape),
            self.cfg.inversion_steps,
            self.timesteps,
            self.models.prediction_type,
            self._streams,
        )
        self.counters.invert_calls += sum(o.unet_calls for o in outs)
        self.counters.invert_elements += sum(o.batch_elements for o in outs)
        self.counters.inversions += sources
        return [o.latents for o in outs]

    def _key(self, sha: str, inversion_prompt: str) -> str:
        key = feature_key(sha, self.models.fingerprint, str(self.models.dtype).removeprefix("torch."), self.cfg)
        if self.cfg.inversion_prompt:
            key = hashlib.sha256(f"{key}|{inversion_prompt}".encode()).hexdigest()[:32]
        if self.pack > 1:  # inverted in calls of `pack` sources (translate/packs.py): not for other runs
            key = hashlib.sha256(f"{key}|sources_per_batch={self.pack}".encode()).hexdigest()[:32]
        return key

    def source_features_many(
        self, sources: list[tuple[bytes, str]], prepared: dict[int, Any] | None = None
    ) -> list[tuple[torch.Tensor, str, bool, float] | Exception]:
        """Features for several sources: store hits are loaded; the misses of one latent size and
        inversion prompt are inverted together, `inversion_batch` sources per UNet call (one image
        leaves a GPU half idle: on an H100 a call of 4 costs 1.8 times a call of 1) and
        `inversion_streams` such calls side by side. A source that fails (unreadable image) gets its
        exception in its place; the others go on.

        With `inversion_batch` > 1 every call is padded with zero latents to exactly that many rows.
        The batch size picks the kernels, and with them the last bits of each row's result; a fixed
        size keeps a source's latents from depending on how many sources happened to share its call
        (a resumed run, another manifest). Which rows are its neighbours, and its position among
        them, must not matter either: no kernel mixes rows, but whether a kernel treats every
        position alike is the hardware's business (on the 2-core CPU here it does not at 8x8
        latents; tests/test_gpu.py checks a GPU).

        `prepared`, when given, receives the preprocessed source image of each source decoded here
        (by index), for scoring (run --eval)."""
        results: list[Any] = [None] * len(sources)
        todo: dict[tuple, list[tuple[int, str, str, Any, torch.Tensor]]] = {}
        seen_keys: dict[str, int] = {}  # feature key -> the first source with it here
        same: list[tuple[int, int]] = []  # (source, earlier source with the same features): one inversion
        for i, (data, prompt) in enumerate(sources):
            t0 = time.perf_counter()
            try:
                sha = self._sha256(data)
                key = self._key(sha, prompt)
                if key in seen_keys:  # e.g. groups of one source with different sweep settings
                    same.append((i, seen_keys[key]))
                    continue
                seen_keys[key] = i
                hit = self._stored(key)
                if hit is not None:
                    self.counters.cache_hits += 1
                    results[i] = (hit.to(self.models.device), key, True, time.perf_counter() - t0)
                    continue
                img = decode_image(data, self.cfg.max_pixels)
                resized = resize_source(img, self.cfg.resolution, self.cfg.resize_mode)
                if prepared is not None:
                    prepared[i] = resized
                z0 = self.encode(resized)
            except Exception as e:  # noqa: BLE001 - the caller fails this source's rows
                results[i] = e
                continue
            todo.setdefault((tuple(z0.shape), prompt), []).append((i, sha, key, img.size, z0))
        n = self.inversion_batch
        for (_, prompt), items in todo.items():
            chunks = [items[start : start + n] for start in range(0, len(items), n)]
            for first in range(0, len(chunks), self.inversion_streams):
                side_by_side = chunks[first : first + self.inversion_streams]
                sources = sum(map(len, side_by_side))
                t0 = time.perf_counter()
                try:
                    batches = []
                    for chunk in side_by_side:
                        parts = [z for *_, z in chunk]
                        if n > 1 and len(chunk) < n:  # a fixed batch size: see above
                            parts.append(parts[0].new_zeros((n - len(chunk), *parts[0].shape[1:])))
                        batches.append(torch.cat(parts))
                    latents = self._invert(batches, prompt, sources)
                except Exception as e:  # noqa: BLE001 - e.g. out of memory: these sources' rows fail
                    for chunk in side_by_side:
                        for i, *_ in chunk:
                            results[i] = e
                    continue
                seconds = (time.perf_counter() - t0) / sources
                for chunk, lat_chunk in zip(side_by_side, latents):
                    for j, (i, sha, key, size, _) in enumerate(chunk):
                        lat = lat_chunk[:, j : j + 1]
                        meta = {"image_sha256": sha, "model": self.models.fingerprint,
                                "dtype": str(self.models.dtype), "inversion_prompt": prompt,
                                "timesteps": self.timesteps, "width": size[0], "height": size[1]}
                        self._store_features(key, lat, meta)
                        results[i] = (lat, key, False, seconds)
        for i, j in same:
            results[i] = results[j] if isinstance(results[j], Exception) else (results[j][0], results[j][1], True, 0.0)
            if not isinstance(results[j], Exception):
                self.counters.cache_hits += 1
        return results

    def _stored(self, key: str) -> torch.Tensor | None:
        """A source's stored latents: being written by this worker, read ahead by prefetch, or from the
        feature store; None when there are none (or prefetch found them corrupt and said so: recompute,
        do not read them again)."""
        writing = self._feature_writes.get(key)
        if writing is not None:
            return writing[0]
        hit = self._prefetched.pop(key, _NOT_READ)
        if hit is _NOT_READ:
            hit = self.features.get(key)
        return hit[0] if hit is not None else None

    def _sha256(self, data: bytes) -> str:
        """The source's sha256, computed once: prefetch already hashed the bytes it read ahead (the
        entry holds the bytes, so their id cannot be reused while it is there)."""
        memo = self._digests.pop(id(data), None)
        if memo is not None and memo[0] is data:
            return memo[1]
        return hashlib.sha256(data).hexdigest()

    def _inversion_prompt(self, row: Row) -> str:
        return self.cfg.inversion_prompt.replace("{source_prompt}", row.source_prompt)

    def prefetch(self, group: list[Row]) -> list[Row]:
        """Read ahead for a group, from any thread (I/O only, no CUDA call): its source bytes, put
        in the row, and its stored features, kept until source_features_many asks for them. Errors
        are left for the translation to meet and record."""
        i = next((j for j, r in enumerate(group) if not r.error), None)
        if i is None:
            return group
        row = group[i]
        try:
            data = row.image_bytes if row.image_bytes is not None else open_row_input(row.image, self.policy)
        except Exception:  # noqa: BLE001 - read again (and recorded) by the translation
            return group
        try:
            sha = hashlib.sha256(data).hexdigest()
            if len(self._digests) >= 64:  # source_features_many takes them back; bound what it never asks for
                try:
                    self._digests.pop(next(iter(self._digests)), None)
                except (StopIteration, RuntimeError):  # the translation thread took entries meanwhile
                    pass
            self._digests[id(data)] = (data, sha)
            key = self._key(sha, self._inversion_prompt(row))
            if key not in self._feature_writes and key not in self._prefetched and len(self._prefetched) < 64:
                found = self.features.lookup(key)
                if found != MISSING:  # a hit, or None for a corrupt object: read and verified once
                    self._prefetched[key] = found if isinstance(found, tuple) else None
        except Exception as e:  # noqa: BLE001 - looked up again by the translation
            log.debug("prefetching features: %s", type(e).__name__)
        return [*group[:i], replace(row, image_bytes=data), *group[i + 1 :]]

    def _store_features(self, key: str, lat: torch.Tensor, meta: dict[str, Any]) -> None:
        """Write a source's features to the store in a writer thread (serialising, hashing and
        uploading them need not hold up the GPU). Until written they are served from memory. The
        copy to the host stays on this thread: no CUDA call from another thread can then disturb a
        CUDA graph being recorded here. A failed write is logged; the source is inverted again the
        next time it is needed."""
        fut = self._writer().submit(self.features.put, key, lat.cpu(), meta)
        self._feature_writes[key] = (lat, fut)
        fut.add_done_callback(lambda f: self._feature_written(key, f))

    def _feature_written(self, key: str, fut: Future) -> None:
        self._feature_writes.pop(key, None)
        e = fut.exception()
        if e is not None:
            log.warning("writing features %s to the store failed (%s); that source will be inverted again "
                        "the next time it is needed", key, storage.redact(f"{type(e).__name__}: {e}")[:300])

    def flush(self) -> None:
        """Wait until every feature write started so far has finished."""
        for _, fut in list(self._feature_writes.values()):
            fut.exception()  # waits; a failure was logged by _feature_written
