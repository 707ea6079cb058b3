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
from pnp_batch.records import resolve

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


def _read_ahead(windows: Iterator[list[list[Row]]], pool: ThreadPoolExecutor) -> Iterator[list[list[Row]]]:
    """The windows with their sources read; the next one is read in `pool` while the caller works."""
    pending: Future | None = None
    for window in windows:
        fut = pool.submit(_prefetch_window, window)
        if pending is not None:
            yield pending.result()
        pending = fut
    if pending is not None:
        yield pending.result()


class LocalBackend:
    name = "local"

    def __init__(self) -> None:
        self.translator = None

    def start(self, req: RunRequest) -> None:
        from pnp_batch.worker import Translator

        self.translator = Translator(req.cfg, req.out, req.features_uri, worker="local")

    def map_groups(self, groups: Iterator[list[Row]]) -> Iterator[list[dict[str, Any]]]:
        """Windows of `inversion_batch` groups (their inversions share UNet calls). While one window is
        on the GPU, the next one's source bytes are read and the previous one's images are written
        (threads); a window's records are yielded once its images are written."""
        size = self.translator.inversion_batch
        writing: list | None = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
            for window in _read_ahead(_windows(groups, size), pool):
                started = self.translator.start_many(window)
                if writing is not None:
                    yield from map(resolve, writing)
                writing = started
        if writing is not None:
            yield from map(resolve, writing)

    def stats(self) -> dict[str, Any]:
        if self.translator is None:
            return {}
        return {"unet": asdict(self.translator.counters), "device": str(self.translator.models.device),
                "dtype": str(self.translator.models.dtype), "model": self.translator.models.fingerprint}

    def stop(self) -> None:
        if self.translator is not None:
            self.translator.close()
        self.translator = None
