"""The write check `run` and `eval` make before any model loads: a small object written and deleted
under the output (io/refusal.py says what a refusal is)."""

from __future__ import annotations

import logging
import os
import uuid

from pnp_batch.errors import StoreRefused, UsageError
from pnp_batch.io import storage
from pnp_batch.io.credentials import redact
from pnp_batch.io.refusal import FIX, write_or_refuse

log = logging.getLogger(__name__)


def probe(uri: str, what: str = "OUT") -> None:
    """Check that ``uri`` (a folder or prefix) takes a write: write and delete a small object under it.
    A refusal is a :class:`UsageError` (exit 2) naming the location and the reason."""
    name = storage.join(uri, f".pnp-batch-write-check-{uuid.uuid4().hex[:12]}")
    created = _missing_folders(uri)  # removed again afterwards: the check leaves nothing behind
    try:
        write_or_refuse(lambda: storage._write_bytes(name, b"pnp-batch write check\n"), name,
                        wait=False)
    except StoreRefused as e:
        raise UsageError(f"{what} {redact(uri)} cannot take writes: {e.reason}; {FIX[e.kind].split(', then')[0]}. "
                         "Nothing was loaded or written.") from None
    try:
        storage.delete(name)
        for folder in created:
            os.rmdir(folder)
    except Exception as e:  # noqa: BLE001 - a leftover check file harms nothing
        log.debug("could not delete the write check %s: %s", redact(name), e)


def _missing_folders(uri: str) -> list[str]:
    """The local folders a write under ``uri`` would create, deepest first (none for an object store)."""
    path = storage._local_path(uri)
    out: list[str] = []
    if path is None:
        return out
    path = os.path.abspath(path)
    while path and not os.path.exists(path):
        out.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return out
