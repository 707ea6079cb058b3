"""Stopping a run before its end: shutdown signals, a lost lease, an outage of the output store.

The first SIGTERM or SIGINT (pod eviction, spot-instance notice, Ctrl-C) asks the run to stop: no new
group is started, the groups in flight finish and are recorded, the results shard and the run summary
(status ``interrupted``, with the signal) are written, the lease is given back, and the process exits
128 + the signal's number (130 for SIGINT, 143 for SIGTERM). In-flight work gets ``--grace-seconds``;
past it :class:`GraceExpired` is raised in the main thread and what is still in flight stays pending.
A second signal exits at once (``os._exit``): nothing is flushed, and, as after a SIGKILL, every object
a reader sees is whole (writes are atomic) and the rows in flight are simply pending.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

log = logging.getLogger(__name__)

DEFAULT_GRACE = 30.0
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GraceExpired(BaseException):
    """The work in flight did not finish within the grace period (a BaseException, so that no
    per-row ``except Exception`` records it as a row failure)."""


def exit_status(signum: int) -> int:
    """The shell's convention: 128 + the signal's number."""
    return 128 + int(signum)


class StopRequest:
    """Whether, and why, the run was asked to stop; the signal handlers that ask."""

    def __init__(self, grace: float = DEFAULT_GRACE) -> None:
        self.grace = max(0.0, float(grace))
        self.event = threading.Event()
        self.reason: str | None = None  # "signal" | "outage" | "lease_lost"
        self.message = ""
        self.signum: int | None = None
        self.on_force: Callable[[], None] | None = None  # last words before a second signal's exit
        self._installed = False
        self._lock = threading.Lock()

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def request(self, reason: str, message: str, signum: int | None = None, say: str | None = None) -> bool:
        """Ask the run to stop (the first request wins); True if this one was the first. ``message`` goes
        to the run summary, ``say`` (default: the message) to the log."""
        with self._lock:
            if self.event.is_set():
                return False
            self.reason, self.message, self.signum = reason, message, signum
            self.event.set()
        log.warning("%s", say or message)
        self._arm()
        return True

    # -- signals ---------------------------------------------------------------------------------
    def install(self) -> Callable[[], None]:
        """Handle SIGINT/SIGTERM (and the grace timer's SIGALRM) in this process; returns the undo.
        Only the main thread can install handlers: elsewhere (a test's thread) nothing is installed."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        saved = {s: signal.getsignal(s) for s in (*SIGNALS, signal.SIGALRM)}
        for s in SIGNALS:
            signal.signal(s, self._on_signal)
        signal.signal(signal.SIGALRM, self._on_alarm)
        self._installed = True

        def restore() -> None:
            self.disarm()
            self._installed = False
            for s, h in saved.items():
                signal.signal(s, h if h is not None else signal.SIG_DFL)

        return restore

    def reclaim(self) -> None:
        """Install the handlers again where a library replaced them (``ray.init`` sets its own SIGTERM
        handler, which exits at once)."""
        if not self._installed or threading.current_thread() is not threading.main_thread():
            return
        for s in SIGNALS:
            if signal.getsignal(s) != self._on_signal:
                log.debug("re-installing the %s handler", signal.Signals(s).name)
                signal.signal(s, self._on_signal)

    def signalled(self, signum: int) -> None:
        """A signal that reached another handler first (``ray.init``'s own SIGTERM handler raises
        SystemExit while Ray starts): handled as if this handler had received it."""
        self._on_signal(signum, None)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.request("signal", f"stopped by {name}", signum,
                        say=f"received {name}: no new groups; finishing the work in flight (up to {self.grace:.0f} "
                        f"s, --grace-seconds), then writing the results and the run summary. Send {name} again "
                        "to exit at once"):
            return
        log.error("received %s again: exiting now; the rows in flight stay pending (re-run the same command)", name)
        if self.on_force is not None:
            done = threading.Thread(target=self._last_words, daemon=True)
            done.start()
            done.join(timeout=3.0)
        sys.stderr.flush()
        os._exit(exit_status(self.signum or signum))

    def _last_words(self) -> None:
        try:
            self.on_force()
        except Exception as e:  # noqa: BLE001 - exiting anyway
            log.debug("before exiting: %s", type(e).__name__)

    def _on_alarm(self, signum: int, frame: FrameType | None) -> None:
        if self.event.is_set():
            raise GraceExpired(f"the work in flight did not finish within {self.grace:.0f} s (--grace-seconds)")

    def _arm(self) -> None:
        """Start the grace period: SIGALRM (handled in the main thread) when it is over."""
        if self._installed:
            signal.setitimer(signal.ITIMER_REAL, max(self.grace, 0.001))

    def disarm(self) -> None:
        """The work in flight is over (or given up): no GraceExpired from now on."""
        if self._installed:
            signal.setitimer(signal.ITIMER_REAL, 0)

    @property
    def exit_status(self) -> int | None:
        """128 + signal for a signal; 1 for an outage or a lost lease; None when no stop was asked."""
        if self.reason == "signal" and self.signum is not None:
            return exit_status(self.signum)
        return 1 if self.reason else None
