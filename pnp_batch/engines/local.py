"""The embedded default engine: one process, one model; the next source is read while this one samples."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, replace
from typing import Any

from pnp_batch import storage
from pnp_batch.engines.base import RunRequest
from pnp_batch.manifest import Row

log = logging.getLogger(__name__)


def prefetch(row: Row) -> Row:
    """Read the group's source bytes ahead of time (I/O in a thread while the GPU samples)."""
    if row.error or row.image_bytes is not None or row.image is None:
        return row
    try:
        data = storage.read_bytes(row.image)
    except Exception:  # noqa: BLE001 - the translator reads again and records the error
        return row
    return replace(row, image_bytes=data)


def _prefetch_window(window: list[list[Row]]) -> list[list[Row]]:
    """The groups with their first row's source bytes read (they stand in for the whole group)."""
    return [[prefetch(g[0]), *g[1:]] for g in window]


def _windows(groups: Iterator[list[Row]], size: int) -> Iterator[list[list[Row]]]:
    window: list[list[Row]] = []
    for g in groups:
        window.append(g)
        if len(window) >= size:
            yield window
            window = []
    if window:
        yield window


class LocalBackend:
    name = "local"

    def __init__(self) -> None:
        self.translator = None

    def start(self, req: RunRequest) -> None:
        from pnp_batch.worker import Translator

        self.translator = Translator(req.cfg, req.out, req.features_uri, worker="local")

    def map_groups(self, groups: Iterator[list[Row]]) -> Iterator[list[dict[str, Any]]]:
        """Windows of `inversion_batch` groups (their inversions share UNet calls); the next window's
        source bytes are read in a thread while this one samples."""
        size = self.translator.inversion_batch
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
            pending: Future | None = None
            for window in _windows(groups, size):
                fut = pool.submit(_prefetch_window, window)
                if pending is not None:
                    yield from self.translator.process_many(pending.result())
                pending = fut
            if pending is not None:
                yield from self.translator.process_many(pending.result())

    def stats(self) -> dict[str, Any]:
        if self.translator is None:
            return {}
        return {"unet": asdict(self.translator.counters), "device": str(self.translator.models.device),
                "dtype": str(self.translator.models.dtype), "model": self.translator.models.fingerprint}

    def stop(self) -> None:
        self.translator = None
