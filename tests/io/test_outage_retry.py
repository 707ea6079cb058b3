"""io/retry.py: an unreachable output store is waited out (up to the outage limit), one clock for every
caller; other stores, and errors a store answers with, keep the bounded retries."""

from __future__ import annotations

import logging
import time

import pytest

from pnp_batch.errors import StoreUnavailable, TransientError
from pnp_batch.io import retry

STORE = "s3://out-bucket"


@pytest.fixture
def outage(monkeypatch: pytest.MonkeyPatch):
    """The output store guarded, short real sleeps, the state cleared before and after."""
    monkeypatch.setenv(retry.STORES_ENV, STORE)
    monkeypatch.setattr(retry, "_sleep", lambda s: time.sleep(min(s, 0.01)))
    retry.set_outage_timeout(0.5)
    yield
    retry.set_outage_timeout(None)


def _down_for(n: int, then=lambda: b"ok"):
    calls = {"n": 0}

    def fn():
        calls["n"] += 1
        if calls["n"] <= n:
            raise ConnectionRefusedError(111, "Connection refused")
        return then()

    return fn, calls


def test_an_outage_shorter_than_the_limit_is_waited_out(outage, caplog):
    fn, calls = _down_for(retry.MAX_ATTEMPTS + 3)  # more than the ordinary retries cover
    with caplog.at_level(logging.WARNING, logger="pnp_batch.io.retry"):
        assert retry.with_retries(fn, f"{STORE}/images/a.png") == b"ok"
    assert calls["n"] == retry.MAX_ATTEMPTS + 4
    text = caplog.text
    assert "the store is unreachable" in text and "pausing" in text and "reachable again" in text
    assert retry.store_unavailable() is None


def test_past_the_limit_the_run_gives_up_and_later_calls_fail_at_once(outage):
    fn, _ = _down_for(10**9)
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable, match="longer than --outage-timeout 0 s"):
        retry.with_retries(fn, f"{STORE}/images/a.png")
    assert 0.5 <= time.monotonic() - t0 < 5
    assert retry.store_unavailable() is not None
    fn2, calls2 = _down_for(10**9)
    with pytest.raises(StoreUnavailable):
        retry.with_retries(fn2, f"{STORE}/results/x.parquet")
    assert calls2["n"] == 1  # one try, no waiting: stopping must not drag on


def test_other_stores_keep_the_bounded_retries(outage):
    fn, calls = _down_for(10**9)
    with pytest.raises(TransientError, match="gave up after"):
        retry.with_retries(fn, "http://images.example/a.png")  # an unreachable source fails its row
    assert calls["n"] == retry.MAX_ATTEMPTS
    assert retry.store_unavailable() is None


def test_errors_the_store_answers_with_are_not_an_outage(outage):
    def slow_down():
        raise OSError("An error occurred (SlowDown) when calling the PutObject operation: reduce rate")

    with pytest.raises(TransientError, match="gave up after"):
        retry.with_retries(slow_down, f"{STORE}/images/a.png")
    # a store back from an outage that answers "no such key" says so (not taken for the outage going on)
    fn, _ = _down_for(retry.MAX_ATTEMPTS + 1, then=lambda: (_ for _ in ()).throw(FileNotFoundError("no key")))
    with pytest.raises(FileNotFoundError):
        retry.with_retries(fn, f"{STORE}/features/k.safetensors")
    assert retry.store_unavailable() is None


def test_a_zero_limit_turns_the_waiting_off(outage):
    retry.set_outage_timeout(0)
    fn, calls = _down_for(10**9)
    with pytest.raises(StoreUnavailable):
        retry.with_retries(fn, f"{STORE}/images/a.png")
    assert calls["n"] == retry.MAX_ATTEMPTS
