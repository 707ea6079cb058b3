"""The embedded default engine: one process, one model; the next source is read while this one samples."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
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
    from dataclasses import replace

    return replace(row, image_bytes=data)


class LocalBackend:
    name = "local"

    def __init__(self) -> None:
        self.translator = None

    def start(self, req: RunRequest) -> None:
        from pnp_batch.worker import Translator

        self.translator = Translator(req.cfg, req.out, req.features_uri, worker="local")

    def map_groups(self, groups: Iterator[list[Row]]) -> Iterator[list[dict[str, Any]]]:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
            pending: Future | None = None
            pending_rows: list[Row] | None = None
            for rows in groups:
                fut = pool.submit(prefetch, rows[0])
                if pending is not None:
                    yield self._run(pending_rows, pending.result())
                pending, pending_rows = fut, rows
            if pending is not None:
                yield self._run(pending_rows, pending.result())

    def _run(self, rows: list[Row], first: Row) -> list[dict[str, Any]]:
        # the prefetched bytes stand in for every row of the group (they share one source)
        if first.image_bytes is not None and rows[0].image_bytes is None:
            rows = [first] + rows[1:]
        return self.translator.process(rows)

    def stats(self) -> dict[str, Any]:
        if self.translator is None:
            return {}
        from dataclasses import asdict

        return {"unet": asdict(self.translator.counters), "device": str(self.translator.models.device),
                "dtype": str(self.translator.models.dtype), "model": self.translator.models.fingerprint}

    def stop(self) -> None:
        self.translator = None
