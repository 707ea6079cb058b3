"""The only fsspec wrapper: read/write/list objects on local disks, S3, HTTP and any fsspec scheme.

Everything that touches files goes through here so that three things hold everywhere:

* **Retries.** Transient failures (throttling/SlowDown, 5xx, dropped or timed-out connections) are
  retried with exponential backoff and full jitter, a bounded number of times (``MAX_ATTEMPTS``,
  ``BACKOFF_BASE``, ``BACKOFF_CAP``); then :class:`~pnp_batch.errors.TransientError` is raised.
  Missing objects raise a plain :class:`FileNotFoundError`; anything else an :class:`OSError`.
* **Atomic writes.** Local files are written to a hidden temporary file in the same folder and
  renamed into place; object stores get one PUT of the whole object. A reader never sees half a file.
* **No credentials in messages.** Every message raised from here passes through :func:`redact`.

Options (``configure``) are merged with the standard AWS environment variables for ``s3://``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import posixpath
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from typing import IO, Any, TypeVar

import fsspec

from pnp_batch.errors import TransientError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Retry policy (module constants so deployments and tests can tune them).
MAX_ATTEMPTS = 5
BACKOFF_BASE = 0.2
BACKOFF_CAP = 5.0
_sleep: Callable[[float], None] = time.sleep  # patched in tests

_LOCK = threading.Lock()
_OPTIONS: dict[str, Any] = {}

_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"}
_S3 = {"s3", "s3a"}
_SECRET_NAME = re.compile(r"key|secret|token|password|passwd|credential", re.IGNORECASE)
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID")
# Shorter values are not redacted: they are not real secrets and replacing them would mangle text.
_MIN_SECRET_LEN = 8
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_SIGNED_QUERY = re.compile(
    r"(?P<name>X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|Signature|AWSAccessKeyId|sig)=[^&\s]+",
    re.IGNORECASE,
)

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


# --------------------------------------------------------------------------------------------
# Options and credentials
# --------------------------------------------------------------------------------------------


def configure(storage_options: dict[str, Any] | None) -> None:
    """Set process-wide fsspec options (e.g. from ``--storage-option``); ``None`` clears them."""
    global _OPTIONS
    with _LOCK:
        _OPTIONS = dict(storage_options or {})
    reset_cache()


def storage_options(protocol: str = "s3") -> dict[str, Any]:
    """The options used for ``protocol``: configured ones over the AWS environment (for s3)."""
    opts: dict[str, Any] = {}
    if protocol in _S3:
        env = os.environ
        if env.get("AWS_PROFILE"):
            opts["profile"] = env["AWS_PROFILE"]
        if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
            opts["key"] = env["AWS_ACCESS_KEY_ID"]
            opts["secret"] = env["AWS_SECRET_ACCESS_KEY"]
            if env.get("AWS_SESSION_TOKEN"):
                opts["token"] = env["AWS_SESSION_TOKEN"]
        client: dict[str, Any] = {}
        if env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"):
            client["endpoint_url"] = env.get("AWS_ENDPOINT_URL_S3") or env["AWS_ENDPOINT_URL"]
        region = env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION")
        if region:
            client["region_name"] = region
        if client:
            opts["client_kwargs"] = client
        # Listings must reflect our own writes (resume reads the results we just wrote).
        opts["use_listings_cache"] = False
    with _LOCK:
        configured = json.loads(json.dumps(_OPTIONS, default=str)) if _OPTIONS else {}
    return _deep_merge(opts, configured)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_storage_option(item: str) -> tuple[str, Any]:
    """Parse ``KEY=VALUE`` from ``--storage-option``; JSON values where possible.

    A dotted key nests: ``client_kwargs.region_name=eu-west-1`` gives
    ``("client_kwargs", {"region_name": "eu-west-1"})``.
    """
    if "=" not in item:
        raise ValueError(f"--storage-option {redact(item)!r} must be KEY=VALUE")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ValueError("--storage-option needs a key before '='")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    parts = key.split(".")
    for part in reversed(parts[1:]):
        value = {part: value}
    return parts[0], value


def merge_options(items: list[str]) -> dict[str, Any]:
    """Parse several ``KEY=VALUE`` items into one nested options dict."""
    out: dict[str, Any] = {}
    for item in items:
        k, v = parse_storage_option(item)
        out = _deep_merge(out, {k: v})
    return out


def _secret_values() -> list[str]:
    found: list[str] = []

    def walk(obj: Any, secret: bool) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, secret or bool(_SECRET_NAME.search(str(k))))
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v, secret)
        elif secret and isinstance(obj, str) and len(obj) >= _MIN_SECRET_LEN:
            found.append(obj)

    with _LOCK:
        walk(_OPTIONS, False)
    for name in _SECRET_ENV:
        v = os.environ.get(name)
        if v and len(v) >= _MIN_SECRET_LEN:
            found.append(v)
    return sorted(set(found), key=len, reverse=True)


def redact(text: str) -> str:
    """Remove configured secrets, AWS secret env values, URL passwords and signatures from ``text``."""
    text = str(text)
    for s in _secret_values():
        text = text.replace(s, "***")
    text = _URL_USERINFO.sub(r"\g<scheme>***@", text)
    return _SIGNED_QUERY.sub(r"\g<name>=***", text)


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
    opts = storage_options(scheme) if scheme in _S3 else _generic_options()
    fs, path = fsspec.core.url_to_fs(uri, **opts)
    return fs, path


def _generic_options() -> dict[str, Any]:
    with _LOCK:
        return json.loads(json.dumps(_OPTIONS, default=str)) if _OPTIONS else {}


def reset_cache() -> None:
    """Forget cached file system instances (fsspec caches them per set of options)."""
    fsspec.AbstractFileSystem.clear_instance_cache()
    try:
        import s3fs
    except ImportError:  # s3fs is optional
        return
    s3fs.S3FileSystem.clear_instance_cache()


# --------------------------------------------------------------------------------------------
# Errors and retries
# --------------------------------------------------------------------------------------------


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


def _describe(exc: BaseException) -> str:
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
                raise OSError(redact(f"{what}: {_describe(e)}")) from _safe_cause(e)
            if attempt >= attempts:
                raise TransientError(
                    redact(f"{what}: {_describe(e)} (gave up after {attempts} attempts)")
                ) from _safe_cause(e)
            delay = _backoff(attempt)
            logger.warning(
                "%s", redact(f"{what}: {_describe(e)}; retry {attempt}/{attempts - 1} in {delay:.2f}s")
            )
            _sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _safe_cause(exc: BaseException) -> BaseException | None:
    """Keep the original exception as the cause only when its text carries no secret."""
    text = str(exc)
    return exc if redact(text) == text else None


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
            raise OSError(redact(f"{uri}: {_describe(e)}")) from None
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


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write ``data`` so readers see either the old object or the whole new one, never a part."""
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


def write_text_atomic(uri: str, text: str) -> None:
    write_bytes_atomic(uri, text.encode("utf-8"))


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
