"""engines/stop.py and the driver's side of stopping: the first signal asks, the grace period ends in
GraceExpired, exit statuses; rows that failed because the store was unreachable are left pending."""

from __future__ import annotations

import os
import signal
import time

import pytest

from pnp_batch.engines.base import _record
from pnp_batch.engines.progress import Progress
from pnp_batch.engines.stop import GraceExpired, StopRequest


def test_the_first_signal_asks_to_stop_and_the_grace_period_ends_the_wait():
    stop = StopRequest(grace=0.3)
    before = signal.getsignal(signal.SIGTERM)
    restore = stop.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # handled in this (the main) thread: no exit
        time.sleep(0.01)
        assert stop.requested and stop.reason == "signal" and stop.signal_name == "SIGTERM"
        assert stop.exit_status == 143 and stop.message == "stopped by SIGTERM"
        with pytest.raises(GraceExpired):
            time.sleep(5)  # the work "in flight" takes longer than the grace period
    finally:
        restore()
    assert signal.getsignal(signal.SIGTERM) == before


def test_disarm_cancels_the_grace_period_and_sigint_is_130():
    stop = StopRequest(grace=0.2)
    restore = stop.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        stop.disarm()  # the work in flight finished in time
        time.sleep(0.4)
        assert stop.exit_status == 130
    finally:
        restore()


def test_reclaim_takes_the_handler_back_from_a_library():
    stop = StopRequest()
    restore = stop.install()
    try:
        signal.signal(signal.SIGTERM, lambda *a: None)  # what ray.init does, in effect
        stop.reclaim()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.reason == "signal"
        stop.disarm()
    finally:
        restore()


def test_other_reasons_exit_1_and_the_first_request_wins():
    stop = StopRequest()
    assert stop.exit_status is None
    assert stop.request("outage", "the store is gone")
    assert not stop.request("lease_lost", "later")
    assert (stop.reason, stop.exit_status) == ("outage", 1)


class _Writer:
    def __init__(self) -> None:
        self.added: list[dict] = []

    def add(self, rec: dict) -> None:
        self.added.append(rec)


def test_rows_failed_by_an_outage_stay_pending():
    stop, writer, counts = StopRequest(), _Writer(), {"ok": 0, "failed": 0}
    progress = Progress(3, "test", interval=1e9)
    window = [
        {"id": "a", "status": "ok", "error": None},
        {"id": "b", "status": "failed", "error": "image not found: b.png"},
        {"id": "c", "status": "failed", "error": "StoreUnavailable: the store was unreachable for 601 s"},
    ]
    _record(window, "run-1", writer, counts, [], stop, progress)
    assert [r["id"] for r in writer.added] == ["a", "b"]  # c is not recorded: pending
    assert stop.reason == "outage" and "unreachable" in stop.message
    later = [{"id": "d", "status": "failed", "error": "OSError: anything"}, {"id": "e", "status": "ok", "error": None}]
    _record(later, "run-1", writer, counts, [], stop, progress)
    assert [r["id"] for r in writer.added] == ["a", "b", "e"]  # after giving up, no failure is trusted
    assert counts == {"ok": 2, "failed": 1}
