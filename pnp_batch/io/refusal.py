"""Write refusals: a store that is reachable but will not take a write (full, over quota, read-only,
denied, its bucket gone) is the store's condition, not a row's.

``classify`` maps an exception (local errno, s3fs/botocore error, or their text) to ``store_full``
(ENOSPC, EDQUOT, quota codes: an operator can free space while the run waits) or ``store_refused``
(EROFS, EACCES, EPERM, AccessDenied, NoSuchBucket, InvalidBucketName: nothing to wait for).
``storage.write_bytes_atomic`` raises :class:`~pnp_batch.errors.StoreRefused` for both, after waiting
out a full store up to ``--outage-timeout`` (retry.OUTAGE's clock and limit); io/write_check.py is the
check `run` and `eval` make before any model loads (exit 2 naming the location and the reason).
"""

from __future__ import annotations

import errno
import logging
import random
import re
import time
from collections.abc import Callable
from typing import TypeVar

from pnp_batch.errors import StoreRefused
from pnp_batch.io import retry
from pnp_batch.io.credentials import redact

log = logging.getLogger(__name__)
T = TypeVar("T")

FULL, REFUSED = "store_full", "store_refused"

_ERRNOS = {
    errno.ENOSPC: (FULL, "no space left on device"),
    errno.EDQUOT: (FULL, "disk quota exceeded"),
    errno.EROFS: (REFUSED, "read-only file system"),
    errno.EACCES: (REFUSED, "permission denied"),
    errno.EPERM: (REFUSED, "operation not permitted"),
}
_CODES = {  # object-store error codes (botocore ClientError, in s3fs's messages too)
    "QuotaExceeded": (FULL, "quota exceeded"),
    "QuotaExceededException": (FULL, "quota exceeded"),
    "StorageQuotaExceeded": (FULL, "storage quota exceeded"),
    "EntityTooLarge": (FULL, "object larger than the store allows"),
    "AccessDenied": (REFUSED, "access denied"),
    "AllAccessDisabled": (REFUSED, "all access to the bucket is disabled"),
    "AccountProblem": (REFUSED, "the account cannot write"),
    "InvalidAccessKeyId": (REFUSED, "the access key is not valid"),
    "SignatureDoesNotMatch": (REFUSED, "the credentials are rejected"),
    "NoSuchBucket": (REFUSED, "the bucket does not exist"),
    "InvalidBucketName": (REFUSED, "the bucket name is not valid"),
    "InvalidBucketState": (REFUSED, "the bucket cannot take writes in its state"),
}
_TEXT = [
    (re.compile(r"No space left on device|ENOSPC", re.IGNORECASE), FULL, "no space left on device"),
    (re.compile(r"Disk quota exceeded|EDQUOT|quota exceeded", re.IGNORECASE), FULL, "quota exceeded"),
    (re.compile(r"Read-only file system|EROFS", re.IGNORECASE), REFUSED, "read-only file system"),
    (re.compile(r"\bAccess ?Denied\b|Forbidden", re.IGNORECASE), REFUSED, "access denied"),
    (re.compile(r"NoSuchBucket|The specified bucket does not exist", re.IGNORECASE), REFUSED, "the bucket does not exist"),
    (re.compile(r"InvalidBucketName", re.IGNORECASE), REFUSED, "the bucket name is not valid"),
    (re.compile(r"Permission denied", re.IGNORECASE), REFUSED, "permission denied"),
]
FIX = {
    FULL: "free space or raise the quota, then re-run the same command: it resumes with the rows left pending",
    REFUSED: "make it writable for this user (permissions, bucket policy, a read-write mount, the bucket's name), "
             "then re-run the same command: it resumes with the rows left pending",
}


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen and len(seen) < 10:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def classify(exc: BaseException) -> tuple[str, str] | None:
    """(kind, reason) when ``exc`` says the store refuses writes, else None."""
    chain = _chain(exc)
    for e in chain:
        if isinstance(e, StoreRefused):
            return e.kind, e.reason
        if isinstance(e, OSError) and e.errno in _ERRNOS:
            return _ERRNOS[e.errno]
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            if code in _CODES:
                return _CODES[code]
    for e in chain:
        text = str(e)
        for code, found in _CODES.items():
            if re.search(rf"\b{code}\b", text):
                return found
        for pattern, kind, reason in _TEXT:
            if pattern.search(text):
                return kind, reason
        if isinstance(e, PermissionError):
            return REFUSED, "permission denied"
    return None


def refused(exc: BaseException, where: str) -> StoreRefused | None:
    """The :class:`StoreRefused` ``exc`` amounts to for a write at ``where``, or None."""
    if isinstance(exc, StoreRefused):
        return exc
    found = classify(exc)
    if found is None:
        return None
    kind, reason = found
    return StoreRefused(kind, redact(where), reason, FIX[kind])


def write_or_refuse(fn: Callable[[], T], where: str, wait: bool = True) -> T:
    """Run the write ``fn``; a refusal becomes :class:`StoreRefused`. A full store (``store_full``) is
    tried again, every ``retry.OUTAGE_POLL`` seconds at most, until it takes the write or
    ``--outage-timeout`` runs out (``wait=False``: raise at once, for writes that may fail, like the
    feature store's)."""
    try:
        return fn()
    except Exception as e:
        r = refused(e, where)
        if r is None:
            raise
    if r.kind != FULL or not wait or retry.OUTAGE.limit() <= 0 or retry.OUTAGE.gave_up is not None:
        raise r from None
    limit = retry.OUTAGE.limit()
    log.warning("%s; pausing: trying again for up to %.0f s (--outage-timeout)", r, limit)
    deadline = time.monotonic() + limit
    delay = retry.BACKOFF_BASE
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise r from None
        delay = min(retry.OUTAGE_POLL, delay * 2)
        retry._sleep(min(left, random.uniform(delay / 2, delay)))
        try:
            out = fn()
        except Exception as e:
            again = refused(e, where)
            if again is None:
                raise
            r = again
            if r.kind != FULL:
                raise r from None
            continue
        log.warning("%s takes writes again; resuming", redact(where))
        return out
