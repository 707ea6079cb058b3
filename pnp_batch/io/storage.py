"""The only fsspec wrapper: read/write/list objects on local disks, S3, HTTP and any fsspec scheme.

Everything that touches files goes through here so that three things hold everywhere:

* **Retries.** Transient failures (throttling/SlowDown, 5xx, dropped or timed-out connections) are
  retried with backoff (retry.py), then :class:`~pnp_batch.errors.TransientError` is raised.
  Missing objects raise a plain :class:`FileNotFoundError`; anything else an :class:`OSError`.
* **Atomic writes.** Local files are written to a hidden temporary file in the same folder and
  renamed into place; object stores get one PUT of the whole object. A reader never sees half a file.
* **No credentials in messages.** Every message raised from here passes through :func:`redact`.

Options (``configure``) are merged with the standard AWS environment variables for ``s3://``
(credentials.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import re
import urllib.error
import urllib.request
import uuid
from typing import IO, Any

import fsspec

from pnp_batch.io import credentials

# Re-exported: callers reach all of storage, options and redaction included, through this module.
from pnp_batch.io.credentials import merge_options, parse_storage_option, redact, storage_options  # noqa: F401
from pnp_batch.io.retry import describe, is_transient, with_retries  # noqa: F401

logger = logging.getLogger(__name__)

_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"}
_S3 = {"s3", "s3a"}


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


def configure(storage_options: dict[str, Any] | None) -> None:
    """Set process-wide fsspec options (e.g. from ``--storage-option``); ``None`` clears them."""
    credentials.set_options(storage_options)
    reset_cache()


# --------------------------------------------------------------------------------------------
# URIs
# --------------------------------------------------------------------------------------------


def _split_scheme(uri: str) -> tuple[str, str]:
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        if re.fullmatch(r"[a-zA-Z][a-zA-Z0-9+.-]*", scheme):
            return scheme.lower(), rest
    return "", uri


def _local_path(uri: str) -> str | None:
    """The local path for a plain path or file:// URI, else None."""
    scheme, rest = _split_scheme(uri)
    if scheme == "":
        return os.path.expanduser(uri)
    if scheme in ("file", "local"):
        return rest if rest.startswith("/") else "/" + rest
    return None


def is_remote(uri: str) -> bool:
    """True for anything that is not a plain local path or file:// URI."""
    return _local_path(uri) is None


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or URI."""
    if not is_remote(base) and "://" not in base:
        return os.path.join(base, *parts)
    out = base.rstrip("/")
    for p in parts:
        p = p.strip("/")
        if p:
            out = f"{out}/{p}"
    return out


def resolve(base_dir: str, path: str) -> str:
    """Resolve ``path`` from a manifest: relative → under ``base_dir``; absolute paths and URIs unchanged."""
    if "://" in path or os.path.isabs(path):
        return path
    if not is_remote(base_dir) and "://" not in base_dir:
        return os.path.normpath(os.path.join(base_dir, path))
    scheme, rest = _split_scheme(base_dir.rstrip("/"))
    bucket, _, key = rest.partition("/")
    joined = posixpath.normpath(posixpath.join("/", key, path)).lstrip("/")
    return f"{scheme}://{bucket}/{joined}" if joined else f"{scheme}://{bucket}"


def parent(uri: str) -> str:
    """The folder (or prefix) holding ``uri``."""
    scheme, rest = _split_scheme(uri)
    if scheme and scheme not in ("file", "local"):
        rest = rest.rstrip("/")
        if "/" not in rest:
            return uri
        return f"{scheme}://{rest.rsplit('/', 1)[0]}"
    if scheme:
        return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"
    return os.path.dirname(uri.rstrip("/")) or "."


def basename(uri: str) -> str:
    """The last component of a path or URI."""
    return uri.rstrip("/").rsplit("/", 1)[-1]


# --------------------------------------------------------------------------------------------
# File systems
# --------------------------------------------------------------------------------------------


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec file system and the path within it for ``uri``."""
    local = _local_path(uri)
    if local is not None:
        return fsspec.filesystem("file"), os.path.abspath(local)
    scheme, _ = _split_scheme(uri)
    opts = storage_options(scheme) if scheme in _S3 else credentials.configured_options()
    fs, path = fsspec.core.url_to_fs(uri, **opts)
    return fs, path


def reset_cache() -> None:
    """Forget cached file system instances (fsspec caches them per set of options)."""
    fsspec.AbstractFileSystem.clear_instance_cache()
    try:
        import s3fs
    except ImportError:  # s3fs is optional
        return
    s3fs.S3FileSystem.clear_instance_cache()


# --------------------------------------------------------------------------------------------
# Reading and writing
# --------------------------------------------------------------------------------------------


def read_bytes(uri: str, timeout: float = 60) -> bytes:
    """The whole content of ``uri`` (local path, file://, s3://, http(s)://, any fsspec scheme)."""
    local = _local_path(uri)
    if local is not None:
        try:
            with open(local, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise FileNotFoundError(redact(f"not found: {uri}")) from None
        except IsADirectoryError:
            raise OSError(redact(f"{uri}: is a folder, not a file")) from None
        except OSError as e:
            raise OSError(redact(f"{uri}: {describe(e)}")) from None
    scheme, _ = _split_scheme(uri)
    if scheme in ("http", "https"):
        return with_retries(lambda: _http_get(uri, timeout), uri)
    fs, path = filesystem(uri)
    return with_retries(lambda: fs.cat_file(path), uri)


def _http_get(uri: str, timeout: float) -> bytes:
    req = urllib.request.Request(uri, headers={"User-Agent": "pnp-batch"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read()
    except urllib.error.HTTPError as e:
        if e.code in (404, 410):
            raise FileNotFoundError(uri) from None
        raise


def read_text(uri: str, timeout: float = 60) -> str:
    return read_bytes(uri, timeout).decode("utf-8")


def write_bytes_atomic(uri: str, data: bytes, wait: bool = True) -> None:
    """Write ``data`` so readers see either the old object or the whole new one, never a part.

    A store that refuses the write (full, over quota, read-only, denied, no such bucket) raises
    :class:`~pnp_batch.errors.StoreRefused`; a full one is tried again up to ``--outage-timeout`` first
    (``wait=False``: at once). See io/refusal.py."""
    from pnp_batch.io.refusal import write_or_refuse

    write_or_refuse(lambda: _write_bytes(uri, data), uri, wait=wait)


def _write_bytes(uri: str, data: bytes) -> None:
    local = _local_path(uri)
    if local is not None:
        _write_local_atomic(local, data)
        return
    fs, path = filesystem(uri)
    scheme, _ = _split_scheme(uri)

    def put() -> None:
        if scheme not in _OBJECT_STORES:
            with contextlib.suppress(OSError, NotImplementedError):  # some have no folders
                fs.makedirs(posixpath.dirname(path), exist_ok=True)
        fs.pipe_file(path, data)  # one PUT (s3fs uses multipart above 5 GB: still atomic)

    with_retries(put, uri)
    _invalidate(fs, path)


def write_text_atomic(uri: str, text: str, wait: bool = True) -> None:
    write_bytes_atomic(uri, text.encode("utf-8"), wait=wait)


def _write_local_atomic(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _invalidate(fs: fsspec.AbstractFileSystem, path: str) -> None:
    fs.invalidate_cache(posixpath.dirname(path))


def exists(uri: str) -> bool:
    """Whether a file or object exists at ``uri``."""
    local = _local_path(uri)
    if local is not None:
        return os.path.exists(local)
    fs, path = filesystem(uri)
    return with_retries(lambda: bool(fs.exists(path)), uri)


def is_dir(uri: str) -> bool:
    """Whether ``uri`` is a folder (or an object-store prefix holding objects)."""
    local = _local_path(uri)
    if local is not None:
        return os.path.isdir(local)
    fs, path = filesystem(uri)
    return with_retries(lambda: bool(fs.isdir(path)), uri)


def delete(uri: str) -> None:
    """Delete a file or object; a missing one is not an error."""
    local = _local_path(uri)
    if local is not None:
        try:
            os.unlink(local)
        except FileNotFoundError:
            pass
        return
    fs, path = filesystem(uri)
    try:
        with_retries(lambda: fs.rm_file(path), uri)
    except FileNotFoundError:
        pass
    _invalidate(fs, path)


def _visible(rel: str) -> bool:
    return not any(part.startswith((".", "_")) for part in rel.split("/") if part)


def list_files(prefix_uri: str, suffix: str = "") -> list[str]:
    """Files under a folder/prefix (recursive, sorted), skipping names starting with '.' or '_'.

    Local results are plain paths; remote results keep their scheme. A prefix naming a single
    file gives that file.
    """
    local = _local_path(prefix_uri)
    if local is not None:
        if os.path.isfile(local):
            return [local] if local.endswith(suffix) else []
        out: list[str] = []
        for root, dirs, files in os.walk(local):
            dirs[:] = [d for d in dirs if not d.startswith((".", "_"))]
            for name in files:
                if not name.startswith((".", "_")) and name.endswith(suffix):
                    out.append(os.path.join(root, name))
        return sorted(out)
    fs, path = filesystem(prefix_uri)
    path = path.rstrip("/")

    def find() -> list[str]:
        try:
            return list(fs.find(path, withdirs=False))
        except FileNotFoundError:
            return []

    found = with_retries(find, prefix_uri)
    out = []
    for p in found:
        p = p.rstrip("/")
        rel = p[len(path):] if p.startswith(path) else posixpath.basename(p)
        if p != path and not _visible(rel):
            continue
        if p.endswith(suffix):
            out.append(fs.unstrip_protocol(p))
    return sorted(out)


def open_input(uri: str) -> IO[bytes]:
    """A binary file-like object for streaming reads (e.g. by pyarrow); the caller closes it."""
    local = _local_path(uri)
    if local is not None:
        try:
            return open(local, "rb")
        except FileNotFoundError:
            raise FileNotFoundError(redact(f"not found: {uri}")) from None
    fs, path = filesystem(uri)
    return with_retries(lambda: fs.open(path, "rb"), uri)


def size(uri: str) -> int:
    """Size in bytes of the file or object at ``uri``."""
    local = _local_path(uri)
    if local is not None:
        try:
            return os.path.getsize(local)
        except FileNotFoundError:
            raise FileNotFoundError(redact(f"not found: {uri}")) from None
    fs, path = filesystem(uri)
    return int(with_retries(lambda: fs.size(path), uri))
