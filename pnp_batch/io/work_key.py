"""Work keys: what determines a row's output, hashed. A row is done when the latest record of its id is
``ok`` and carries the row's work key (docs/resume.md); a row whose id was done under another key has
changed upstream (image, prompts, overrides), or was made under another config or sweep setting.

The key is a hash over, in order: the effective config's hash (``PipelineConfig.hash``), the row's id,
every column of :data:`WORK_KEY_COLUMNS` that has a value in the row (name and value as text; a null
value counts as an absent column, so adding a column to the list re-keys only rows that fill it), and
the sweep setting's slug (io/sweep.py). Image-like columns (:data:`PATH_COLUMNS`) count as written in
the manifest; their ``*_bytes`` columns (:data:`BYTES_COLUMNS`) count as the sha256 of the bytes, and
when a row has both, the bytes win (they are what the translator reads, and what the record names).

Computed a manifest batch at a time with Arrow kernels (one hashlib call per row): ten million rows
plan without a Python object per row besides that hash. No torch here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Manifest columns that define a unit of work. A column added here (mask, ip_image, ip_adapter_scale...)
# changes the key of the rows that fill it and of no other row. Order is part of the key: append only.
WORK_KEY_COLUMNS: tuple[str, ...] = (
    "image", "image_bytes", "source_prompt", "target_prompt",
    "negative_prompt", "seed", "guidance_scale", "pnp_f_t", "pnp_attn_t",
    "ip_image", "ip_image_bytes", "ip_adapter_scale", "mask", "mask_bytes",
)
# A URI column and the binary column that replaces it: (path column, bytes column). When both hold a value
# in one row, the bytes are used, hashed, and the path is left out of the key.
BYTES_COLUMNS: dict[str, str] = {"image": "image_bytes", "ip_image": "ip_image_bytes", "mask": "mask_bytes"}
PATH_COLUMNS: tuple[str, ...] = tuple(BYTES_COLUMNS)
KEY_CHARS = 32  # hex characters of a work key (128 bits)
_SEP = "\x1e"


def digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=KEY_CHARS // 2).hexdigest()


def key_prefix(key: str | None) -> int:
    """The first 64 bits of a work key, as the done-index stores them (0: no key)."""
    return int(key[:16], 16) if key else 0


def prefixes(keys: Sequence[str]) -> np.ndarray:
    return np.fromiter((int(k[:16], 16) for k in keys), dtype=np.uint64, count=len(keys))


def bytes_sha256(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    """sha256 hex of each binary (or base64 text) value; null stays null."""
    import base64
    import binascii

    out = []
    for v in col.to_pylist():
        if v is None:
            out.append(None)
            continue
        if isinstance(v, str):
            try:
                v = base64.b64decode(v, validate=True)
            except (binascii.Error, ValueError):
                v = v.encode("utf-8")  # not base64: the row fails as such; keyed by its text
        out.append(hashlib.sha256(v).hexdigest())
    return pa.array(out, pa.string())


def _part(name: str, col: pa.Array | pa.ChunkedArray) -> pa.Array:
    """``name=<byte length>:<value>`` + separator for each row with a value, "" where null."""
    text = col if pa.types.is_string(col.type) else pc.cast(col, pa.string())
    if isinstance(text, pa.ChunkedArray):
        text = text.combine_chunks()
    length = pc.cast(pc.binary_length(text), pa.string())
    joined = pc.binary_join_element_wise(pa.scalar(name + "="), length, pa.scalar(":"), text, pa.scalar(_SEP), "")
    return pc.fill_null(joined, "")


def batch_material(batch: pa.RecordBatch | pa.Table, ids: pa.Array, columns: Sequence[str] = WORK_KEY_COLUMNS) -> pa.Array:
    """Per row, the text a work key hashes (without the config and the setting): id, then the columns."""
    names = set(batch.schema.names)
    parts = [_part("id", ids)]
    has_bytes = {p: b for p, b in BYTES_COLUMNS.items() if b in names}
    for name in columns:
        if name not in names:
            continue
        col = batch.column(name)
        if name in has_bytes.values():
            col = bytes_sha256(col)
        elif name in has_bytes:  # the path counts only where its bytes column is null
            col = pc.if_else(pc.is_null(batch.column(has_bytes[name])), col, pa.nulls(len(col), col.type))
        parts.append(_part(name, col))
    out = parts[0]
    for p in parts[1:]:
        out = pc.binary_join_element_wise(out, p, "")
    return out.cast(pa.large_string())


def keys_of(material: pa.Array, config_hash: str, settings: Sequence[str] | None = None) -> list[str]:
    """The work keys of rows whose material is given; ``settings`` (one slug per row) for swept rows."""
    head = config_hash + _SEP
    if settings is None:
        return [digest(head + m) for m in material.to_pylist()]
    return [digest(head + m + _SEP + "setting=" + s) for m, s in zip(material.to_pylist(), settings)]


def key_columns(manifest: Any) -> list[str]:
    """The manifest columns planning reads: the id and the work-key columns it has."""
    return [c for c in ("id", *WORK_KEY_COLUMNS) if c in manifest.columns]


def batch_keys(manifest: Any, batch: Any, start: int, config_hash: str) -> tuple[pa.Array, list[str]]:
    """The ids and work keys of one batch of a manifest or of a swept manifest (io/sweep.GridBatch)."""
    sweep = getattr(manifest, "sweep", None)
    if sweep is None:
        ids = manifest.batch_ids(batch, start)
        return ids, keys_of(batch_material(batch, ids), config_hash)
    base = manifest.manifest
    base_ids = base.batch_ids(batch.base, batch.base_start)
    material = batch_material(batch.base, base_ids).to_pylist()
    size = manifest.size
    n = batch.num_rows
    rep = [material[k // size] for k in range(n)]
    slugs = manifest.slugs
    settings = [slugs[k % size] for k in range(n)]
    return manifest.batch_ids(batch, start), keys_of(pa.array(rep, pa.large_string()), config_hash, settings)


def classify(index: Any, ids: pa.Array, keys: list[str], keep_done: bool) -> tuple[np.ndarray, dict]:
    """(done mask, the match arrays of io/done_index.DoneIndex.match) for one batch: with ``keep_done``
    rows ok under another config count as done."""
    m = index.match(ids, prefixes(keys))
    done = m["done"] | m["other_config"] if keep_done else m["done"]
    return done, m


@dataclass
class KeyCounts:
    """A manifest's rows against a done-index, by work key (docs/resume.md)."""

    total: int = 0
    found: int = 0  # rows whose id has a record
    done: int = 0
    changed: int = 0  # latest record under this config but another key
    other_config: int = 0  # latest record ok under another config


def count_keys(manifest: Any, index: Any, config_hash: str, limit: int | None = None,
               keep_done: bool = False) -> KeyCounts:
    """Stream the manifest's batches against the done-index: the one count that planning (engines/plan)
    and ``status`` (io/status) both make."""
    c = KeyCounts()
    for start, batch in manifest.iter_batches(limit=limit, columns=key_columns(manifest)):
        ids, keys = batch_keys(manifest, batch, start, config_hash)
        done, m = classify(index, ids, keys, keep_done)
        c.total += len(ids)
        c.found += int(m["found"].sum())
        c.done += int(done.sum())
        c.changed += int(m["changed"].sum())
        c.other_config += int(m["other_config"].sum())
    return c
