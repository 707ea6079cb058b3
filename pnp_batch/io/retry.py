"""Retries for storage calls: which errors are transient, and backoff with full jitter.

Transient failures (throttling/SlowDown, 5xx, dropped or timed-out connections) are retried a bounded
number of times (``MAX_ATTEMPTS``, ``BACKOFF_BASE``, ``BACKOFF_CAP``), then
:class:`~pnp_batch.errors.TransientError` is raised; every message is redacted.

An *outage* of the output store is different: when the retries of a call on it (any object under a store
named by ``guard_stores``: the scheme and bucket of OUT and of the feature store) run out because the store
cannot be reached at all
(connection refused or reset, timeouts, no route: not an error the store answered with), the call waits
and tries again, every ``OUTAGE_POLL`` seconds at most, until the store answers or ``outage_timeout``
seconds have passed since the outage began (one clock for the whole process: every thread waiting on
the store shares it). The run pauses meanwhile and goes on by itself when the store is back. Past the
limit :class:`~pnp_batch.errors.StoreUnavailable` is raised, and every later call that cannot reach the
store raises it after its ordinary retries, without waiting again. ``--outage-timeout`` (or the
environment variable ``PNP_BATCH_OUTAGE_TIMEOUT``, which Ray workers inherit, as they inherit
``PNP_BATCH_OUTAGE_STORES``) sets the limit; 0 turns the waiting off. Other stores (a source image on some
web server) keep the ordinary retries: an unreachable source fails its row.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import re
import socket
import threading
import time
import urllib.error
from collections.abc import Callable
from typing import TypeVar

from pnp_batch.errors import StoreUnavailable, TransientError
from pnp_batch.io.credentials import redact

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Retry policy (module constants so deployments and tests can tune them).
MAX_ATTEMPTS = 5
BACKOFF_BASE = 0.2
BACKOFF_CAP = 5.0
_sleep: Callable[[float], None] = time.sleep  # patched in tests
OUTAGE_ENV = "PNP_BATCH_OUTAGE_TIMEOUT"
STORES_ENV = "PNP_BATCH_OUTAGE_STORES"  # space-separated store roots (scheme://bucket) the outage wait covers
DEFAULT_OUTAGE_TIMEOUT = 600.0  # seconds a run waits for an unreachable store before it stops
OUTAGE_POLL = 15.0  # at most this long between two tries while the store is unreachable

_TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestLimitExceeded", "TooManyRequests", "TooManyRequestsException", "ProvisionedThroughputExceeded",
    "RequestTimeout", "RequestTimeoutException", "InternalError", "InternalFailure", "ServiceUnavailable",
    "ServiceUnavailableException", "BandwidthLimitExceeded", "EC2ThrottledException", "PriorRequestNotComplete",
    "500", "502", "503", "504",
}
_TRANSIENT_CLASS_NAMES = {
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ResponseStreamingError", "IncompleteReadError", "IncompleteRead", "FSTimeoutError", "ServerDisconnectedError",
    "ClientPayloadError", "ClientConnectorError", "ClientOSError", "ServerTimeoutError", "ProxyConnectionError",
    "HTTPClientError",
}
_TRANSIENT_ERRNOS = {
    errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE,
    errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EAGAIN,
}
# Errors that mean "the store could not be reached", not "the store answered with an error".
_UNREACHABLE_CLASS_NAMES = {
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ServerDisconnectedError", "ClientConnectorError", "ClientOSError", "ServerTimeoutError", "FSTimeoutError",
    "ProxyConnectionError", "ConnectionError", "TimeoutError",
}
_UNREACHABLE_TEXT = re.compile(
    r"Could not connect|Connection refused|Connection reset|connection was closed|Cannot connect|timed out|"
    r"Name or service not known|No route to host|Network is unreachable|Server disconnected",
    re.IGNORECASE,
)
_TRANSIENT_TEXT = re.compile(
    r"SlowDown|Throttl|TooManyRequests|Too Many Requests|RequestTimeout|ServiceUnavailable|Service Unavailable|"
    r"InternalError|Internal Server Error|Bad Gateway|Gateway Time-?out|Connection reset|connection was closed|"
    r"timed out|Read timeout|Could not connect",
    re.IGNORECASE,
)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen and len(seen) < 10:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or its cause) is worth retrying."""
    chain = _chain(exc)
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    for e in chain:
        if isinstance(e, TransientError):
            return True
        if isinstance(e, urllib.error.HTTPError):
            return e.code >= 500 or e.code in (408, 429)
        if isinstance(e, (TimeoutError, socket.timeout, ConnectionError)):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
        names = {c.__name__ for c in type(e).__mro__}
        if names & _TRANSIENT_CLASS_NAMES:
            return True
        mod = type(e).__module__ or ""
        if mod.startswith("aiohttp") and "ClientError" in names:
            if "ClientResponseError" in names:
                status = getattr(e, "status", 0) or 0
                return status >= 500 or status in (408, 429)
            return True
        response = getattr(e, "response", None)
        if isinstance(response, dict):  # botocore ClientError
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            return code in _TRANSIENT_CODES or status >= 500 or status == 429
        if isinstance(e, urllib.error.URLError):
            return True
    # s3fs turns botocore errors into OSError(EIO, message); fall back to the message text.
    return any(_TRANSIENT_TEXT.search(str(e)) for e in chain)


def is_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (or its cause) says the store could not be reached at all (an outage), as
    opposed to an error response from a store that is up."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False  # the store answered
    for e in _chain(exc):
        if isinstance(e, (ConnectionError, TimeoutError, socket.timeout)):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS - {errno.EAGAIN}:
            return True
        if {c.__name__ for c in type(e).__mro__} & _UNREACHABLE_CLASS_NAMES:
            return True
        if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
            return True
    return any(_UNREACHABLE_TEXT.search(str(e)) for e in _chain(exc))


class _Outage:
    """The process-wide state of an outage: when it began, and whether the run gave up on it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.since: float | None = None
        self.gave_up: str | None = None
        self.timeout: float | None = None  # None: from the environment, else DEFAULT_OUTAGE_TIMEOUT

    def limit(self) -> float:
        if self.timeout is not None:
            return self.timeout
        try:
            return float(os.environ.get(OUTAGE_ENV, DEFAULT_OUTAGE_TIMEOUT))
        except ValueError:
            return DEFAULT_OUTAGE_TIMEOUT

    def begin(self, what: str, exc: BaseException) -> float:
        """Note that the store is unreachable; the monotonic time the outage began."""
        with self.lock:
            if self.since is None:
                self.since = time.monotonic()
                logger.warning(
                    "%s", redact(f"the store is unreachable ({what}: {describe(exc)}); pausing: retrying for up "
                                 f"to {self.limit():.0f} s (--outage-timeout)")
                )
            return self.since

    def end(self) -> None:
        with self.lock:
            if self.since is not None and self.gave_up is None:
                logger.warning("the store is reachable again after %.0f s; resuming", time.monotonic() - self.since)
                self.since = None

    def give_up(self, what: str, exc: BaseException) -> StoreUnavailable:
        with self.lock:
            if self.gave_up is None:
                waited = time.monotonic() - self.since if self.since is not None else self.limit()
                self.gave_up = redact(f"the store was unreachable for {waited:.0f} s, longer than --outage-timeout "
                                      f"{self.limit():.0f} s ({what}: {describe(exc)})")
            return StoreUnavailable(self.gave_up)


OUTAGE = _Outage()


def set_outage_timeout(seconds: float | None) -> None:
    """Set the outage limit of this process (None: the environment's, else the default); clears the state."""
    with OUTAGE.lock:
        OUTAGE.timeout = seconds
        OUTAGE.since = None
        OUTAGE.gave_up = None


def store_root(uri: str) -> str | None:
    """``scheme://bucket`` of a remote URI (None for a local path)."""
    m = re.match(r"([a-zA-Z][a-zA-Z0-9+.-]*)://([^/]+)", uri)
    if m is None or m.group(1).lower() in ("file", "local"):
        return None
    return f"{m.group(1).lower()}://{m.group(2)}"


def guarded_stores(*uris: str) -> str:
    """The value of ``PNP_BATCH_OUTAGE_STORES`` for these URIs (the driver sets it; workers inherit it)."""
    return " ".join(sorted({r for r in map(store_root, uris) if r}))


def _guarded(what: str) -> bool:
    root = store_root(what)
    return root is not None and root in os.environ.get(STORES_ENV, "").split()


def store_unavailable() -> str | None:
    """Why this process gave up on the store (None while it has not)."""
    return OUTAGE.gave_up


def _wait_out(fn: Callable[[], T], what: str, exc: BaseException) -> T:
    """Keep trying ``fn`` while the store is unreachable, up to the outage limit (see the module doc)."""
    if OUTAGE.gave_up is not None or OUTAGE.limit() <= 0:
        raise OUTAGE.give_up(what, exc) from _safe_cause(exc)
    since = OUTAGE.begin(what, exc)
    delay = BACKOFF_BASE
    while True:
        left = since + OUTAGE.limit() - time.monotonic()
        if left <= 0 or OUTAGE.gave_up is not None:
            raise OUTAGE.give_up(what, exc) from _safe_cause(exc)
        delay = min(OUTAGE_POLL, delay * 2)
        _sleep(min(left, random.uniform(delay / 2, delay)))
        try:
            out = fn()
        except Exception as e:
            if not is_unreachable(e):
                raise
            exc = e
            since = OUTAGE.begin(what, e)  # the same outage; a new one if another call saw the store back
            continue
        OUTAGE.end()
        return out


def _backoff(attempt: int) -> float:
    """Full-jitter exponential backoff for retry number ``attempt`` (1-based)."""
    return random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * (2 ** (attempt - 1))))


def describe(exc: BaseException) -> str:
    """The exception as `Type: message`, redacted."""
    msg = str(exc) or type(exc).__name__
    return redact(f"{type(exc).__name__}: {msg}")


def with_retries(fn: Callable[[], T], what: str, attempts: int | None = None) -> T:
    """Call ``fn``; retry transient failures with backoff; map errors to the module's contract.

    ``what`` names the operation and object for messages (it is redacted).
    """
    attempts = attempts or MAX_ATTEMPTS
    if OUTAGE.gave_up is not None and _guarded(what):
        attempts = 1  # the run gave up on this store: one try each, so that stopping does not drag on
    for attempt in range(1, attempts + 1):
        try:
            out = fn()
        except FileNotFoundError as e:
            raise FileNotFoundError(redact(f"not found: {what}")) from _safe_cause(e)
        except Exception as e:  # noqa: BLE001 - classified below: retried, or mapped to OSError
            if not is_transient(e):
                raise OSError(redact(f"{what}: {describe(e)}")) from _safe_cause(e)
            if attempt >= attempts and _guarded(what) and is_unreachable(e):
                unreachable = e
                break  # wait the outage out below, outside this handler (no exception chained to this one)
            if attempt >= attempts:
                raise TransientError(
                    redact(f"{what}: {describe(e)} (gave up after {attempts} attempts)")
                ) from _safe_cause(e)
            delay = _backoff(attempt)
            logger.warning(
                "%s", redact(f"{what}: {describe(e)}; retry {attempt}/{attempts - 1} in {delay:.2f}s")
            )
            _sleep(delay)
            continue
        if OUTAGE.since is not None:
            OUTAGE.end()
        return out
    try:
        return _wait_out(fn, what, unreachable)
    except FileNotFoundError as e:
        raise FileNotFoundError(redact(f"not found: {what}")) from _safe_cause(e)
    except StoreUnavailable:
        raise
    except Exception as e:  # noqa: BLE001 - the store is back and answered with an error
        if not is_transient(e):
            raise OSError(redact(f"{what}: {describe(e)}")) from _safe_cause(e)
        raise TransientError(redact(f"{what}: {describe(e)}")) from _safe_cause(e)


def _safe_cause(exc: BaseException) -> BaseException | None:
    """Keep the original exception as the cause only when its text carries no secret."""
    text = str(exc)
    return exc if redact(text) == text else None
