"""The embedded default engine: one process, one model, reading ahead of the GPU and writing behind it."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

from pnp_batch.engines.plan import RunRequest, windows
from pnp_batch.io.manifest import Row
from pnp_batch.io.records import resolve

log = logging.getLogger(__name__)


def _read_ahead(todo: Iterator[list[list[Row]]], pool: ThreadPoolExecutor,
                read: Callable[[list[Row]], list[Row]]) -> Iterator[list[list[Row]]]:
    """The windows with each group passed through `read`; the next window is read in `pool` while
    the caller works on this one."""
    pending: Future | None = None
    for window in todo:
        fut = pool.submit(lambda w: [read(g) for g in w], window)
        if pending is not None:
            yield pending.result()
        pending = fut
    if pending is not None:
        yield pending.result()


class LocalBackend:
    name = "local"

    def __init__(self) -> None:
        self.translator = None
        self.stopping: threading.Event | None = None  # set by the driver: start no new window once it is set

    def start(self, req: RunRequest) -> None:
        from pnp_batch.translate.translator import Translator

        self.translator = Translator(req.cfg, req.out, req.features_uri, worker="local", evaluate=req.eval,
                                     layer_settings=req.layer_settings(), policy=req.input_policy)

    def map_groups(self, groups: Iterator[list[Row]]) -> Iterator[list[dict[str, Any]]]:
        """Windows of `PipelineConfig.window` groups (inverted at once). While one window is
        on the GPU, the next one's source bytes and stored features are read and the previous one's
        images are written (threads); a window's records are yielded once its images are written."""
        size = self.translator.window
        writing: list | None = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
            for window in _read_ahead(windows(groups, size), pool, self.translator.prefetch):
                if self.stopping is not None and self.stopping.is_set():
                    break  # the window read ahead is not started: its rows stay pending
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
