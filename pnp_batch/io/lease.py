"""One writer per output: the lease ``OUT/_lease.json``.

A run takes the lease before it writes anything under ``OUT`` and gives it back at the end (also when
it fails or is interrupted). The object names its holder (run id, host, pid, a random token), when it
was taken and renewed, and when it expires. It is created with a conditional write (io/conditional.py:
an exclusive create locally, ``If-None-Match: *`` on S3), so of two runs starting together exactly one
gets it. A heartbeat thread renews it every ``ttl / 3`` seconds by compare-and-swap (the version last
written, S3's ``If-Match``), so a run never overwrites a lease another run has taken. A run that dies
without giving it back (SIGKILL, a lost node) holds it until it expires; a later run then takes it over,
again by compare-and-swap, so two runs finding the same stale lease cannot both take it. A later run on
the same host (same pid namespace) that finds the holder's process gone takes it over at once.

Expiry is judged with each host's own clock: keep the TTL far above the clock skew between hosts
(NTP keeps it under a second). On stores without conditional writes the lease is best effort (see
docs/reliability.md). The name starts with ``_``: listings of results and readers of ``OUT/results``
never see it. No torch here.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from pnp_batch.errors import UsageError
from pnp_batch.io import conditional, storage
from pnp_batch.io.conditional import PreconditionFailed

logger = logging.getLogger(__name__)

LEASE_NAME = "_lease.json"
DEFAULT_TTL = 120.0  # seconds; renewed every TTL/3, so a crashed run blocks its output for at most this long
MIN_TTL = 3.0


class LeaseHeld(UsageError):
    """Another run holds the output's lease (exit status 2: nothing was written)."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over by another run (it could not renew it within its TTL)."""


@dataclass(frozen=True)
class Holder:
    """What the lease object says."""

    run_id: str
    host: str
    pid: int
    token: str
    started_at: str
    renewed_at: str
    expires_at: str
    ttl_seconds: float
    pid_namespace: int | None = None  # which pids `pid` is one of (Linux: /proc/self/ns/pid), see gone()
    version: int = 1

    @property
    def expires(self) -> dt.datetime:
        return dt.datetime.fromisoformat(self.expires_at)

    def expired(self, now: dt.datetime | None = None) -> bool:
        return (now or _now()) >= self.expires

    def gone(self) -> bool:
        """Whether the holder ran on this host, among this process's pids, and has exited (crashed): its
        lease need not wait out its TTL. Two containers with one host name have different pid namespaces;
        a pid reused since only makes the holder look alive (wait for the TTL: the safe side)."""
        if self.host != socket.gethostname() or self.pid_namespace is None or self.pid_namespace != _pid_namespace():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:  # exists, someone else's
            return False
        return False

    def describe(self) -> str:
        left = (self.expires - _now()).total_seconds()
        when = f"expires {self.expires_at} (in {left:.0f} s)" if left > 0 else f"expired {self.expires_at}"
        return f"run {self.run_id} on host {self.host}, pid {self.pid}; {when}"

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2) + "\n").encode("utf-8")

    @classmethod
    def parse(cls, data: bytes) -> Holder | None:
        """The holder in a lease object; None when it is not one (garbage: treated as lapsed)."""
        try:
            doc = json.loads(data.decode("utf-8"))
            holder = cls(**{k: doc[k] for k in cls.__dataclass_fields__ if k in doc})
            holder.expires  # noqa: B018 - validates the timestamp
            return holder
        except (ValueError, TypeError, KeyError, UnicodeDecodeError):
            return None


def lease_uri(out: str) -> str:
    return storage.join(out, LEASE_NAME)


def read_holder(out: str) -> Holder | None:
    """Who holds the lease of ``out`` now, expired or not (None: nobody)."""
    found = conditional.read(lease_uri(out))
    return None if found is None else Holder.parse(found[0])


class Lease:
    """The lease of one output for one run: acquire, renew (a heartbeat thread), release.

    ``on_lost`` is called (from the heartbeat thread) if another run took the lease over.
    """

    def __init__(self, out: str, run_id: str, ttl: float = DEFAULT_TTL,
                 on_lost: Callable[[str], None] | None = None) -> None:
        self.out = out
        self.uri = lease_uri(out)
        self.run_id = run_id
        self.ttl = max(MIN_TTL, float(ttl))
        self.on_lost = on_lost
        self.token = secrets.token_hex(16)
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.started_at = _now().isoformat()
        self.tag: str | None = None
        self.holder: Holder | None = None
        self.lost: str | None = None
        self.waited = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- taking it -----------------------------------------------------------------------------
    def acquire(self, wait: float | None = None, poll: float | None = None,
                cancelled: Callable[[], bool] | None = None) -> None:
        """Take the lease, or raise :class:`LeaseHeld` naming the holder. ``wait``: seconds to wait for
        it (``math.inf``: as long as it takes; None or 0: not at all); ``cancelled`` ends the wait early."""
        if not conditional.atomic(self.uri):
            logger.warning("%s: this store has no conditional writes; the output lease is best effort "
                           "(docs/reliability.md)", storage.redact(self.out))
        poll = poll if poll is not None else min(5.0, self.ttl / 6)
        t0 = time.monotonic()
        announced = False
        while True:
            holder = self._try_take()
            if holder is None:
                self.waited = time.monotonic() - t0
                self._start_heartbeat()
                logger.info("took the lease %s (expires in %.0f s, renewed every %.0f s)",
                            storage.redact(self.uri), self.ttl, self.ttl / 3)
                return
            waited = time.monotonic() - t0
            if not wait or waited >= wait or (cancelled is not None and cancelled()):
                how = f" after waiting {waited:.0f} s" if wait else ""
                raise LeaseHeld(
                    f"another run is writing to {self.out}{how}: {holder.describe()}. Wait for it to finish, "
                    f"re-run with --wait-for-lease, or use another --out (lease object: {self.uri})"
                )
            if not announced:
                logger.warning("waiting for the lease of %s: held by %s", storage.redact(self.out), holder.describe())
                announced = True
            time.sleep(min(poll, max(0.0, wait - waited)) if wait != math.inf else poll)

    def _try_take(self) -> Holder | None:
        """One attempt: None when this run now holds the lease, else the live holder."""
        body = self._body()
        try:
            tag = conditional.create(self.uri, body.to_json())
            return self._confirm(tag, body)
        except PreconditionFailed:
            pass
        found = conditional.read(self.uri)
        if found is None:
            return self._try_take()  # released meanwhile: try again
        data, tag = found
        current = Holder.parse(data)
        if current is not None and current.token == self.token:  # our own create, retried after a lost reply
            return self._confirm(tag, current)
        if current is not None and not current.expired() and not current.gone():
            return current
        if current is None:
            what = "unreadable"
        elif current.expired():
            what = f"expired ({current.describe()})"
        else:
            what = f"left by run {current.run_id}, pid {current.pid} on this host, which is no longer running"
        try:
            new_tag = conditional.replace(self.uri, body.to_json(), tag)
        except PreconditionFailed:
            return self._try_take()  # another run took it over first, or renewed it: look again
        logger.warning("took over the lease of %s: the previous one was %s", storage.redact(self.out), what)
        return self._confirm(new_tag, body)

    def _confirm(self, tag: str, body: Holder) -> Holder | None:
        """Read the lease back: on a store without conditional writes a concurrent run may have won."""
        if not conditional.atomic(self.uri):
            time.sleep(0.5)
            found = conditional.read(self.uri)
            theirs = Holder.parse(found[0]) if found else None
            if theirs is None or theirs.token != self.token:
                return theirs if theirs is not None else self._try_take()
            tag = found[1]
        with self._lock:
            self.tag, self.holder = tag, body
        return None

    def _body(self) -> Holder:
        now = _now()
        return Holder(run_id=self.run_id, host=self.host, pid=self.pid, token=self.token, started_at=self.started_at,
                      renewed_at=now.isoformat(), expires_at=(now + dt.timedelta(seconds=self.ttl)).isoformat(),
                      ttl_seconds=self.ttl, pid_namespace=_pid_namespace())

    # -- keeping it ----------------------------------------------------------------------------
    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.renew()
            except LeaseLost as e:
                self.lost = str(e)
                logger.error("%s", e)
                if self.on_lost is not None:
                    self.on_lost(str(e))
                return
            except Exception as e:  # noqa: BLE001 - the store is down: try again at the next beat
                logger.warning("could not renew the lease %s: %s", storage.redact(self.uri), storage.describe(e))

    def renew(self) -> None:
        """Extend the lease by a TTL from now (compare-and-swap on the version this run wrote last)."""
        with self._lock:
            if self.tag is None:
                return
            body = self._body()
            try:
                self.tag = conditional.replace(self.uri, body.to_json(), self.tag)
                self.holder = body
                return
            except PreconditionFailed:
                pass
            found = conditional.read(self.uri)
            current = Holder.parse(found[0]) if found else None
            if current is not None and current.token == self.token:  # our own write, retried after a lost reply
                self.tag, self.holder = found[1], current
                return
            self.tag = None
        who = current.describe() if current is not None else "nobody (the lease object is gone)"
        raise LeaseLost(f"this run lost the lease of {self.out}: it is now held by {who}; stopping")

    # -- giving it back ------------------------------------------------------------------------
    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still this run's (never another run's)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self._lock:
            tag, self.tag = self.tag, None
        if tag is None:
            return
        try:
            conditional.delete(self.uri, tag)
            logger.info("released the lease %s", storage.redact(self.uri))
        except PreconditionFailed:
            logger.warning("the lease %s is no longer this run's: left as it is", storage.redact(self.uri))

    def __enter__(self) -> Lease:  # noqa: PYI034 - py3.10 has no typing.Self
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _pid_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)
