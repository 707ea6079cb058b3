"""Content hashes of local weight files (checkpoints, LoRA adapters), each file read once.

A model fingerprint (and so the feature key) names a single-file checkpoint by its content, so two
copies of one file share features and an edited file does not. Hashing a 7 GB checkpoint takes
tens of seconds, so the digest is cached in the pnp-batch cache folder (PNP_BATCH_CACHE, default
~/.cache/pnp-batch), keyed by the file's absolute path, size and modification time: a file changed
in place gets a new mtime and is hashed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

_CHUNK = 8 << 20
_memo: dict[tuple[str, int, int], str] = {}
_lock = threading.Lock()


def _cache_root() -> Path:
    root = os.environ.get("PNP_BATCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pnp-batch")
    return Path(root) / "file-sha256"


def _stamp(path: str) -> tuple[str, int, int]:
    real = os.path.realpath(path)
    st = os.stat(real)
    return real, st.st_size, st.st_mtime_ns


def _entry(real: str) -> Path:
    return _cache_root() / (hashlib.sha256(real.encode()).hexdigest()[:32] + ".json")


def _read_cached(stamp: tuple[str, int, int]) -> str | None:
    try:
        rec = json.loads(_entry(stamp[0]).read_text())
    except (OSError, ValueError):
        return None
    if [rec.get("path"), rec.get("size"), rec.get("mtime_ns")] == list(stamp):
        return rec.get("sha256")
    return None


def _write_cached(stamp: tuple[str, int, int], digest: str) -> None:
    entry = _entry(stamp[0])
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            json.dump({"path": stamp[0], "size": stamp[1], "mtime_ns": stamp[2], "sha256": digest}, f)
        os.replace(tmp, entry)
    except OSError as e:  # a read-only cache only costs a re-hash next time
        log.warning("could not cache the sha256 of %s in %s: %s", stamp[0], entry.parent, e)


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 (hex) of a local file's bytes; computed once per (path, size, mtime)."""
    stamp = _stamp(os.fspath(path))
    with _lock:
        if stamp in _memo:
            return _memo[stamp]
    digest = _read_cached(stamp)
    if digest is None:
        log.info("hashing %s (%.1f MB), once", stamp[0], stamp[1] / 1e6)
        h = hashlib.sha256()
        with open(stamp[0], "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        digest = h.hexdigest()
        _write_cached(stamp, digest)
    with _lock:
        _memo[stamp] = digest
    return digest
