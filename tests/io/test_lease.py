"""io/lease.py and io/conditional.py on a local folder and on S3 (moto's server, which answers a second
``If-None-Match: *`` PUT and a stale ``If-Match`` with 412): one holder at a time, renewal by
compare-and-swap, release, takeover of a lapsed lease by exactly one contender."""

from __future__ import annotations

import datetime as dt
import json
import threading
from dataclasses import replace

import pytest

from pnp_batch.io import conditional, lease
from pnp_batch.io.conditional import PreconditionFailed
from pnp_batch.io.lease import Holder, Lease, LeaseHeld, lease_uri, read_holder


@pytest.fixture(params=["local", "s3"])
def out(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    bucket = request.getfixturevalue("s3_bucket")
    return f"{bucket}/out"


def test_conditional_create_replace_delete(out):
    uri = f"{out}/obj.json"
    tag = conditional.create(uri, b"one")
    with pytest.raises(PreconditionFailed):
        conditional.create(uri, b"two")
    assert conditional.read(uri) == (b"one", tag)
    tag2 = conditional.replace(uri, b"three", tag)
    assert tag2 != tag
    with pytest.raises(PreconditionFailed):
        conditional.replace(uri, b"four", tag)  # the stale version
    with pytest.raises(PreconditionFailed):
        conditional.delete(uri, tag)
    assert conditional.read(uri)[0] == b"three"
    conditional.delete(uri, tag2)
    assert conditional.read(uri) is None
    conditional.delete(uri, tag2)  # gone already: not an error


def test_one_holder_then_release(out):
    first = Lease(out, "run-a", ttl=60)
    first.acquire()
    try:
        holder = read_holder(out)
        assert (holder.run_id, holder.pid, holder.token) == ("run-a", first.pid, first.token)
        assert 55 <= (holder.expires - dt.datetime.now(dt.timezone.utc)).total_seconds() <= 60
        second = Lease(out, "run-b", ttl=60)
        with pytest.raises(LeaseHeld) as ei:
            second.acquire()
        msg = str(ei.value)
        assert "run run-a" in msg and f"pid {first.pid}" in msg and first.host in msg and "expires" in msg
        assert read_holder(out).token == first.token  # the refused run changed nothing
    finally:
        first.release()
    assert read_holder(out) is None
    second = Lease(out, "run-b", ttl=60)
    second.acquire()
    assert read_holder(out).run_id == "run-b"
    second.release()


def test_renewal_extends_and_is_compare_and_swap(out):
    mine = Lease(out, "run-a", ttl=60)
    mine.acquire()
    before = read_holder(out).expires
    mine._stop.set()  # no heartbeat thread in the way: renew by hand
    mine.renew()
    assert read_holder(out).expires > before
    # another run overwrote the lease (it took over): the next renewal notices and says who holds it now
    data, tag = conditional.read(lease_uri(out))
    theirs = replace(Holder.parse(data), run_id="run-x", token="t" * 32)
    conditional.replace(lease_uri(out), theirs.to_json(), tag)
    with pytest.raises(lease.LeaseLost, match="run run-x"):
        mine.renew()
    mine.release()  # must not delete the other run's lease
    assert read_holder(out).run_id == "run-x"


def _write_expired(out: str, run_id: str = "crashed") -> None:
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=5)
    stale = Holder(run_id=run_id, host="gone", pid=1, token="s" * 32, started_at=past.isoformat(),
                   renewed_at=past.isoformat(), expires_at=past.isoformat(), ttl_seconds=60)
    conditional.create(lease_uri(out), stale.to_json())


def test_a_lapsed_lease_is_taken_over_by_exactly_one(out):
    _write_expired(out)
    results: dict[str, str] = {}
    leases: dict[str, Lease] = {}
    barrier = threading.Barrier(4)

    def contend(name: str) -> None:
        barrier.wait()
        leases[name] = lease = Lease(out, name, ttl=60)
        try:
            lease.acquire()
            results[name] = "took"
        except LeaseHeld:
            results[name] = "refused"

    threads = [threading.Thread(target=contend, args=(f"run-{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results.values()) == ["refused", "refused", "refused", "took"], results
    winner = next(k for k, v in results.items() if v == "took")
    try:
        assert read_holder(out).run_id == winner
    finally:
        leases[winner].release()  # its heartbeat would otherwise outlive the test (and the S3 endpoint)


def test_heartbeat_keeps_a_short_lease_alive(out):
    mine = Lease(out, "run-a", ttl=3)
    mine.acquire()
    try:
        first = read_holder(out).expires
        threading.Event().wait(4.5)  # past the first expiry: renewed every second meanwhile
        assert read_holder(out).expires > first
        with pytest.raises(LeaseHeld):
            Lease(out, "run-b", ttl=3).acquire()
        assert mine.lost is None
    finally:
        mine.release()


def test_wait_for_lease_takes_it_when_released(out):
    mine = Lease(out, "run-a", ttl=6)
    mine.acquire()
    threading.Timer(1.5, mine.release).start()
    waiting = Lease(out, "run-b", ttl=6)
    waiting.acquire(wait=30, poll=0.2)
    assert 1.0 <= waiting.waited < 10
    assert read_holder(out).run_id == "run-b"
    waiting.release()
    # a bounded wait gives up, naming the holder
    holder = Lease(out, "run-c", ttl=60)
    holder.acquire()
    with pytest.raises(LeaseHeld, match="after waiting 1 s: run run-c"):
        Lease(out, "run-d", ttl=60).acquire(wait=1, poll=0.2)
    holder.release()


def test_garbage_lease_object_counts_as_lapsed(out):
    conditional.create(lease_uri(out), b"{not json")
    mine = Lease(out, "run-a", ttl=60)
    mine.acquire()
    assert json.loads(conditional.read(lease_uri(out))[0])["run_id"] == "run-a"
    mine.release()


def test_a_holder_gone_from_this_host_is_taken_over_at_once(out):
    import os
    import subprocess
    import sys

    dead_pid = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_pid.wait()  # exited and reaped: its pid names no process
    me = Lease(out, "probe", ttl=60)._body()
    alive = replace(me, run_id="alive", token="a" * 32, pid=os.getpid())
    conditional.create(lease_uri(out), alive.to_json())
    with pytest.raises(LeaseHeld, match="run alive"):
        Lease(out, "run-b", ttl=60).acquire()  # a live process on this host: respected
    _, tag = conditional.read(lease_uri(out))
    elsewhere = replace(alive, run_id="elsewhere", pid=dead_pid.pid, host="other-host")
    tag = conditional.replace(lease_uri(out), elsewhere.to_json(), tag)
    with pytest.raises(LeaseHeld, match="run elsewhere"):
        Lease(out, "run-b", ttl=60).acquire()  # another host's pid says nothing here: wait for the TTL
    crashed = replace(alive, run_id="crashed", pid=dead_pid.pid)
    conditional.replace(lease_uri(out), crashed.to_json(), tag)
    taker = Lease(out, "run-b", ttl=60)
    taker.acquire()  # this host, this pid namespace, the process is gone: no need to wait
    assert read_holder(out).run_id == "run-b"
    taker.release()
