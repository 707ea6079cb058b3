"""Progress of a long run: a bar on a terminal, a log line every 30 s otherwise (CI, Ray jobs)."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger(__name__)


class Progress:
    """A bar on a terminal, periodic log lines otherwise (CI, Ray jobs)."""

    def __init__(self, total: int, desc: str, interval: float = 30.0) -> None:
        self.total, self.done, self.failed = total, 0, 0
        self.start = time.monotonic()
        self.last = self.start
        self.interval = interval
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="row", dynamic_ncols=True)
        else:
            log.info("%s: %d rows to do", desc, total)

    def update(self, ok: int, failed: int) -> None:
        self.done += ok + failed
        self.failed += failed
        if self.bar is not None:
            self.bar.update(ok + failed)
            self.bar.set_postfix(failed=self.failed)
            return
        now = time.monotonic()
        if now - self.last >= self.interval or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            log.info(
                "progress: %d/%d rows done (%d failed), %.2f rows/s, ETA %s",
                self.done, self.total, self.failed, rate, _fmt_eta(eta),
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt_eta(s: float) -> str:
    if s == float("inf"):
        return "unknown"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"
