"""Resume by work key: which rows of the manifest are done, changed, or done under another config.

A row is done when the latest record of its id is ``ok`` and carries the row's work key
(io/work_key.py). Against OUT's done-index each row is one of:

* done: skipped (or translated again, unwritten, as a companion of a row redone in its group);
* changed: its id's latest record is under this config but another key (image, prompts or overrides
  corrected upstream): redone, counted ``changed``; the old record stays in the history;
* other config: its id's latest record is ok under another pipeline config. A choice the user states:
  ``--overwrite`` redoes every row, ``--keep-done`` keeps these as done; neither: exit 2 before any work
  (:class:`ConfigChanged`);
* to do: no record, or the latest failed.

Keys are computed a manifest batch at a time (io/work_key.batch_material); docs/resume.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from pnp_batch.errors import UsageError
from pnp_batch.io import storage


class ConfigChanged(UsageError):
    """OUT holds rows done under another config and neither --overwrite nor --keep-done was given (exit 2)."""


def config_change_message(out: str, config_hash: str, n: int, others: list[str]) -> str:
    named = ", ".join(others[:5]) if others else "another config"
    return (
        f"{storage.redact(out)} holds {n} row(s) of this manifest done under another pipeline config "
        f"({named}; this run's config is {config_hash}). Re-running would overwrite their images: pass "
        f"--overwrite to redo every row under this config, --keep-done to keep them and do only the rows never "
        f"done, or use another --out (docs/resume.md)"
    )


def other_config_hashes(out: str, config_hash: str) -> list[str]:
    """The config hashes of OUT's run summaries other than ``config_hash``, newest first (for the message)."""
    from pnp_batch.io.results import read_run_summaries

    seen: dict[str, None] = {}
    for doc in reversed(read_run_summaries(out)):
        h = doc.get("config_hash")
        if h and h != config_hash:
            seen.setdefault(str(h))
    return list(seen)


def with_keys(rows: list, keys: list[str], offset: int) -> Iterator:
    """The rows with their work keys (``keys`` indexed from ``offset``)."""
    from dataclasses import replace

    for k, r in enumerate(rows):
        yield replace(r, work_key=keys[offset + k])


def _kind(t: pa.DataType) -> str:
    """A type's family: columns of one family cast into each other losslessly (int32 -> int64...)."""
    for name, test in (("string", lambda x: pa.types.is_string(x) or pa.types.is_large_string(x)
                        or pa.types.is_string_view(x) or pa.types.is_dictionary(x) and pa.types.is_string(x.value_type)),
                       ("integer", pa.types.is_integer), ("floating", pa.types.is_floating),
                       ("boolean", pa.types.is_boolean), ("binary", lambda x: pa.types.is_binary(x)
                        or pa.types.is_large_binary(x)), ("timestamp", pa.types.is_timestamp)):
        if test(t):
            return name
    return str(t)


def check_passthrough(manifest: Any, out: str) -> None:
    """A pass-through column whose type differs from the one OUT's results already hold would leave OUT/results
    unreadable as one dataset: a UsageError (exit 2, before any work) naming the column and both types."""
    from pnp_batch.io.results import _carried_columns

    held = _carried_columns(out)
    if not held:
        return
    clashes = []
    for f in manifest.extra_schema:
        old = held.get(f.name)
        if old is None or pa.types.is_null(f.type) or _kind(old) == _kind(f.type):
            continue
        clashes.append(f"{f.name!r} is {f.type} in the manifest but {old} in the results already in OUT")
    if clashes:
        raise UsageError(
            f"pass-through column type differs from {storage.redact(out)}/results: {'; '.join(clashes)}. "
            f"Cast the column in the manifest to the type OUT holds (CSV columns are read as text), or use "
            f"another --out")


def _norm(uri: str) -> str:
    if storage.is_remote(uri):
        return uri.rstrip("/")
    import os

    return os.path.abspath(storage.filesystem(uri)[1]).rstrip("/")


def check_out_outside(manifest_uri: str, out: str) -> None:
    """OUT inside a manifest folder or prefix would be read back as manifest files by the next run: exit 2."""
    if not storage.is_dir(manifest_uri):
        return
    base, o = _norm(manifest_uri), _norm(out)
    if o == base or o.startswith(base + "/"):
        raise UsageError(
            f"--out {storage.redact(out)} is inside the manifest's folder or prefix {storage.redact(manifest_uri)}: "
            f"the next run would read its results as manifest rows; put OUT outside the manifest")
