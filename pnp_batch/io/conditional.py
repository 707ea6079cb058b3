"""Conditional writes: create an object only if it is absent, replace or delete it only if it is unchanged.

The primitives a lease (io/lease.py) is built on. Every object read here comes with a *tag* naming its
version; a conditional replace or delete names the tag it expects and fails with
:class:`PreconditionFailed` when the object changed meanwhile (compare-and-swap).

How each store does it:

* **Local files**: create = write a hidden temporary file, then ``os.link`` it to the name (fails if the
  name exists; the content is whole the moment it appears). Replace and delete run under an exclusive
  ``fcntl.flock`` of a hidden lock file next to the object, and compare the content's sha256 (the tag).
  Holds between processes of one host, and of several hosts on a file system with working POSIX locks.
* **S3 (and S3-compatible stores that implement them)**: ``PutObject`` with ``If-None-Match: *`` (create)
  or ``If-Match: <ETag>`` (replace), ``DeleteObject`` with ``If-Match``; a 412 (or a 409 conflict
  between two conditional writes) is :class:`PreconditionFailed`. The tag is the ETag.
* **Any other fsspec store**: best effort: an existence check, then a plain write (two runs starting in
  the same instant can both believe they created the object); :func:`atomic` says which is which, and
  the lease warns. Callers read the object back and compare what they wrote.

Transient errors are retried (io/retry.py). A retried create or replace may meet its own earlier,
successful attempt as a "precondition failed": callers resolve that by reading the object back.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import posixpath
import uuid
from collections.abc import Iterator

from fsspec.asyn import sync

from pnp_batch.io import storage
from pnp_batch.io.retry import with_retries

logger = logging.getLogger(__name__)

_S3 = {"s3", "s3a"}
_PRECONDITION_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


class PreconditionFailed(OSError):
    """The object exists (create) or is not the version named (replace, delete)."""


def atomic(uri: str) -> bool:
    """Whether this store does conditional writes atomically (local files and S3), not best effort."""
    return not storage.is_remote(uri) or storage._split_scheme(uri)[0] in _S3


def read(uri: str) -> tuple[bytes, str] | None:
    """The object's bytes and tag; None when it does not exist."""
    local = storage._local_path(uri)
    if local is not None:
        try:
            with open(local, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, _digest(data)
    fs, path = storage.filesystem(uri)
    if _is_s3(uri):
        bucket, key, _ = fs.split_path(path)

        def get() -> tuple[bytes, str] | None:
            try:
                return sync(fs.loop, _s3_get, fs, bucket, key)
            except FileNotFoundError:
                return None

        return with_retries(get, uri)
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        return None
    return data, _digest(data)


def create(uri: str, data: bytes) -> str:
    """Write ``data`` at ``uri`` only if nothing is there; its tag. :class:`PreconditionFailed` if present."""
    local = storage._local_path(uri)
    if local is not None:
        with _locked(local):
            _link_new(local, data)
        return _digest(data)
    if _is_s3(uri):
        with contextlib.suppress(_Unsupported):
            return _s3_put(uri, data, IfNoneMatch="*")
    if storage.exists(uri):
        raise PreconditionFailed(storage.redact(f"{uri} exists"))
    storage.write_bytes_atomic(uri, data)
    return _digest(data)


def replace(uri: str, data: bytes, tag: str) -> str:
    """Overwrite ``uri`` with ``data`` only if it is still the version ``tag``; the new tag."""
    local = storage._local_path(uri)
    if local is not None:
        with _locked(local):
            _check_local(local, uri, tag)
            storage.write_bytes_atomic(local, data)
        return _digest(data)
    if _is_s3(uri):
        with contextlib.suppress(_Unsupported):
            return _s3_put(uri, data, IfMatch=tag)
    current = read(uri)
    if current is None or current[1] != tag:
        raise PreconditionFailed(storage.redact(f"{uri} changed"))
    storage.write_bytes_atomic(uri, data)
    return _digest(data)


def delete(uri: str, tag: str) -> None:
    """Delete ``uri`` only if it is still the version ``tag`` (a missing object is not an error)."""
    local = storage._local_path(uri)
    if local is not None:
        with _locked(local):
            if os.path.exists(local):
                _check_local(local, uri, tag)
                os.unlink(local)
        return
    if _is_s3(uri):
        fs, path = storage.filesystem(uri)
        bucket, key, _ = fs.split_path(path)

        def rm() -> None:
            try:
                fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=tag)
            except FileNotFoundError:
                return
            except Exception as e:
                if _precondition(e):
                    raise PreconditionFailed(storage.redact(f"{uri} changed")) from None
                if not _unsupported(e):
                    raise
                # a store without conditional deletes: compare, then delete
                current = read(uri)
                if current is not None and current[1] != tag:
                    raise PreconditionFailed(storage.redact(f"{uri} changed")) from None
                fs.rm_file(path)
            finally:
                fs.invalidate_cache(posixpath.dirname(path))

        _retry_keeping(rm, uri)
        return
    current = read(uri)
    if current is not None:
        if current[1] != tag:
            raise PreconditionFailed(storage.redact(f"{uri} changed"))
        storage.delete(uri)


# ----------------------------------------------------------------------------------------------


def _is_s3(uri: str) -> bool:
    return storage._split_scheme(uri)[0] in _S3


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """An exclusive lock on a hidden file next to ``path`` (held between processes)."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, f".{name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _link_new(path: str, data: bytes) -> None:
    """Make ``path`` appear whole with ``data``, or fail if it exists (hard link of a finished temp file)."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise PreconditionFailed(storage.redact(f"{path} exists")) from None
    finally:
        os.unlink(tmp)


def _check_local(local: str, uri: str, tag: str) -> None:
    try:
        with open(local, "rb") as f:
            current = _digest(f.read())
    except FileNotFoundError:
        raise PreconditionFailed(storage.redact(f"{uri} is gone")) from None
    if current != tag:
        raise PreconditionFailed(storage.redact(f"{uri} changed"))


def _s3_put(uri: str, data: bytes, **condition: str) -> str:
    fs, path = storage.filesystem(uri)
    bucket, key, _ = fs.split_path(path)

    def put() -> str:
        try:
            resp = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
        except FileExistsError:  # s3fs's name for a 412 on If-None-Match
            raise PreconditionFailed(storage.redact(f"{uri} exists")) from None
        except Exception as e:
            if _precondition(e):
                raise PreconditionFailed(storage.redact(f"{uri} changed")) from None
            if _unsupported(e):
                _warn_unsupported(uri)
                raise _Unsupported from None
            raise
        finally:
            fs.invalidate_cache(posixpath.dirname(path))
        return str(resp.get("ETag", ""))

    return _retry_keeping(put, uri)


async def _s3_get(fs, bucket: str, key: str) -> tuple[bytes, str]:
    """GetObject: the body and the ETag of one and the same version."""
    resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
    body = resp["Body"]
    try:
        data = await body.read()
    finally:
        body.close()
    return bytes(data), str(resp.get("ETag", ""))


class _Unsupported(Exception):
    """The S3-compatible store rejected the conditional header (501): fall back to best effort."""


_warned: set[str] = set()


def _warn_unsupported(uri: str) -> None:
    bucket = storage.redact(uri.split("://", 1)[-1].split("/", 1)[0])
    if bucket not in _warned:
        _warned.add(bucket)
        logger.warning("the store of %s does not support conditional writes (If-None-Match / If-Match): the "
                       "output lease is best effort there (see docs/reliability.md)", bucket)


def _retry_keeping(fn, uri: str):
    """with_retries, letting PreconditionFailed through as itself (it is an answer, not an error)."""
    failed: list[BaseException] = []

    def call():
        try:
            return fn()
        except (PreconditionFailed, _Unsupported) as e:
            failed.append(e)
            return None

    out = with_retries(call, uri)
    if failed:
        raise failed[-1]
    return out


def _response(e: BaseException) -> dict:
    for cur in (e, e.__cause__, e.__context__):
        resp = getattr(cur, "response", None)
        if isinstance(resp, dict):
            return resp
    return {}


def _precondition(e: BaseException) -> bool:
    resp = _response(e)
    code = str(resp.get("Error", {}).get("Code", ""))
    status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in _PRECONDITION_CODES or status in (409, 412)


def _unsupported(e: BaseException) -> bool:
    """The store (501) or an old botocore (no IfNoneMatch/IfMatch parameter yet) cannot do it."""
    if any("Unknown parameter" in str(c) for c in (e, e.__cause__, e.__context__) if c is not None):
        return True
    resp = _response(e)
    code = str(resp.get("Error", {}).get("Code", ""))
    return code in ("NotImplemented", "501") or resp.get("ResponseMetadata", {}).get("HTTPStatusCode") == 501
