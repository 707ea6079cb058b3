"""Retries for storage calls: which errors are transient, and backoff with full jitter.

Transient failures (throttling/SlowDown, 5xx, dropped or timed-out connections) are retried a bounded
number of times (``MAX_ATTEMPTS``, ``BACKOFF_BASE``, ``BACKOFF_CAP``), then
:class:`~pnp_batch.errors.TransientError` is raised; every message is redacted.
"""

from __future__ import annotations

import errno
import logging
import random
import re
import socket
import time
import urllib.error
from collections.abc import Callable
from typing import TypeVar

from pnp_batch.errors import TransientError
from pnp_batch.io.credentials import redact

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Retry policy (module constants so deployments and tests can tune them).
MAX_ATTEMPTS = 5
BACKOFF_BASE = 0.2
BACKOFF_CAP = 5.0
_sleep: Callable[[float], None] = time.sleep  # patched in tests

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
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except FileNotFoundError as e:
            raise FileNotFoundError(redact(f"not found: {what}")) from _safe_cause(e)
        except Exception as e:  # noqa: BLE001 - classified below: retried, or mapped to OSError
            if not is_transient(e):
                raise OSError(redact(f"{what}: {describe(e)}")) from _safe_cause(e)
            if attempt >= attempts:
                raise TransientError(
                    redact(f"{what}: {describe(e)} (gave up after {attempts} attempts)")
                ) from _safe_cause(e)
            delay = _backoff(attempt)
            logger.warning(
                "%s", redact(f"{what}: {describe(e)}; retry {attempt}/{attempts - 1} in {delay:.2f}s")
            )
            _sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _safe_cause(exc: BaseException) -> BaseException | None:
    """Keep the original exception as the cause only when its text carries no secret."""
    text = str(exc)
    return exc if redact(text) == text else None
