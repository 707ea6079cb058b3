"""The done-index: every id with a result record and the status of its latest record, held as one
sorted Arrow string array and numpy flags (no Python object per id), looked up a batch of ids at a
time by binary search (``pyarrow.compute.search_sorted``). Resume, planning and ``status`` use it
on tens of millions of rows; memory is about 40 bytes per id, plus the sort while it is built.

A row's latest record is the one with the latest ``finished_at``; ties go to the later shard (in
name order), then the later position in the shard. No torch here.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pnp_batch.io import storage

logger = logging.getLogger(__name__)

ID_TYPE = pa.large_string()  # ids of every row together may pass 2 GiB of text
_OLDEST = -(2**63)
READ_THREADS = 16  # shards read at once while the index is built


def as_ids(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Ids as one contiguous ``large_string`` array, the type the index is searched with."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    return values if values.type == ID_TYPE else values.cast(ID_TYPE)


@dataclass
class _Scan:
    """What one pass over the shards collects, record by record, in shard order."""

    ids: list[pa.Array]
    finished: list[np.ndarray]
    ok: list[np.ndarray]
    other: list[np.ndarray]
    wk: list[np.ndarray]  # first 64 bits of each record's work key (0: none, results schema v1)
    starts: list[int]  # index of each shard's first record in the concatenation


class DoneIndex:
    """ids (sorted, unique) and per id: latest record ok?, its position among all records, and
    whether it was made under another config hash (when one was given)."""

    def __init__(self, ids: pa.Array, ok: np.ndarray, seq: np.ndarray, finished: np.ndarray,
                 other_config: np.ndarray, files: list[str], starts: np.ndarray,
                 work_keys: np.ndarray | None = None) -> None:
        self.ids = ids
        self.ok = ok
        self.seq = seq  # position of the id's latest record in the shards' concatenation
        self.finished = finished
        self.other_config = other_config
        self.files = files
        self.starts = starts
        # per id, the first 64 bits of its latest record's work key (io/work_key.py; 0: a v1 record without)
        self.work_keys = np.zeros(len(ids), np.uint64) if work_keys is None else work_keys

    # ---- building ----------------------------------------------------------------------------

    @classmethod
    def empty(cls) -> DoneIndex:
        z = np.zeros(0, dtype=np.int64)
        return cls(pa.array([], ID_TYPE), np.zeros(0, bool), z, z, np.zeros(0, bool), [], z)

    @classmethod
    def from_mapping(cls, latest: Mapping[str, str]) -> DoneIndex:
        """From ``{id: latest status}`` (small cases and tests)."""
        if not latest:
            return cls.empty()
        ids = pa.array(list(latest), ID_TYPE)
        ok = np.array([s == "ok" for s in latest.values()], dtype=bool)
        order = pc.sort_indices(ids).to_numpy()
        n = len(ids)
        return cls(ids.take(order), ok[order], np.arange(n), np.zeros(n, np.int64), np.zeros(n, bool), [],
                   np.zeros(0, np.int64))

    @classmethod
    def from_files(cls, files: list[str], config_hash: str | None = None) -> DoneIndex:
        """Read ``id``, ``status``, ``finished_at`` (and ``config_hash``) of every shard, in order."""
        scan = _Scan([], [], [], [], [], [])
        total = 0
        for table in _read_all(files, config_hash is not None):
            n = table.num_rows
            scan.starts.append(total)
            total += n
            if not n:
                continue
            scan.ids.append(as_ids(table.column("id")))
            fin = table.column("finished_at")
            fin = pc.fill_null(fin.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()), _OLDEST)
            scan.finished.append(fin.to_numpy())
            scan.ok.append(pc.fill_null(pc.equal(table.column("status"), "ok"), False).to_numpy(zero_copy_only=False))
            scan.wk.append(_key_prefixes(table.column("work_key")))
            if config_hash is not None:
                # a record without a config hash (older shards) is not counted as another config
                other = pc.fill_null(pc.not_equal(table.column("config_hash"), config_hash), False)
                scan.other.append(other.to_numpy(zero_copy_only=False))
            else:
                scan.other.append(np.zeros(n, bool))
        if not total:
            return cls.empty()
        return cls._latest(scan, files)

    @classmethod
    def _latest(cls, scan: _Scan, files: list[str]) -> DoneIndex:
        ids = as_ids(pa.chunked_array(scan.ids, ID_TYPE))  # one contiguous array: sorts without merging
        scan.ids.clear()
        finished = np.concatenate(scan.finished)
        scan.finished.clear()
        # stable sort: equal (id, finished_at) keep shard order, then position: the last is the latest
        order = pc.sort_indices(
            pa.table({"id": ids, "f": finished}), sort_keys=[("id", "ascending"), ("f", "ascending")]
        )
        ids = ids.take(order)
        order = order.to_numpy()
        n = len(ids)
        last = np.ones(n, dtype=bool)
        if n > 1:
            last[:-1] = pc.not_equal(ids.slice(0, n - 1), ids.slice(1)).to_numpy(zero_copy_only=False)
        unique = bool(last.all())  # the usual case: one record per id, nothing to drop
        keep = (order if unique else order[last]).view(np.int64)  # positions < 2**63: the same bits
        wk = _gather(scan.wk, keep)  # the widest first, while the least else is held
        finished = finished[keep]
        ok, other = _gather(scan.ok, keep), _gather(scan.other, keep)
        if not unique:
            ids = ids.filter(pa.array(last))
        del order, last
        pa.default_memory_pool().release_unused()
        return cls(ids, ok, keep, finished, other, list(files), np.asarray(scan.starts, dtype=np.int64), wk)

    # ---- looking up -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.ids)

    def __bool__(self) -> bool:
        return len(self.ids) > 0

    @property
    def ok_count(self) -> int:
        return int(self.ok.sum())

    @property
    def failed_count(self) -> int:
        return len(self.ids) - self.ok_count

    @property
    def ok_other_config_count(self) -> int:
        """Ids whose latest record is ok but was made under another config hash."""
        return int((self.ok & self.other_config).sum())

    def lookup(self, ids: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
        """For a batch of ids: (has a record, latest record ok), as numpy bool arrays."""
        needles = as_ids(ids)
        n = len(needles)
        if not len(self.ids) or not n:
            return np.zeros(n, bool), np.zeros(n, bool)
        pos = _positions(self.ids, needles)
        inside = pos < len(self.ids)
        at = np.where(inside, pos, 0)
        found = inside & pc.equal(self.ids.take(pa.array(at)), needles).to_numpy(zero_copy_only=False)
        return found, found & self.ok[at]

    def match(self, ids: pa.Array | pa.ChunkedArray, keys: np.ndarray) -> dict[str, np.ndarray]:
        """For a batch of ids and their rows' work keys (first 64 bits, io/work_key.prefixes), numpy bool
        arrays: ``done`` (latest record ok under this key; a v1 record without a key: under this
        config), ``other_config`` (latest record ok, made under another config), ``changed`` (latest
        record under this config but another key: the row changed upstream), ``found``."""
        needles = as_ids(ids)
        n = len(needles)
        if not len(self.ids) or not n:
            z = np.zeros(n, bool)
            return {"found": z, "done": z, "other_config": z, "changed": z}
        pos = _positions(self.ids, needles)
        inside = pos < len(self.ids)
        at = np.where(inside, pos, 0)
        found = inside & pc.equal(self.ids.take(pa.array(at)), needles).to_numpy(zero_copy_only=False)
        wk = self.work_keys[at]
        other = found & self.other_config[at]
        same_key = found & ((wk == keys) | ((wk == 0) & ~other))
        return {"found": found, "done": same_key & self.ok[at], "other_config": other & self.ok[at],
                "changed": found & ~other & ~same_key}

    def is_ok(self, ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
        return self.lookup(ids)[1]

    def get(self, rid: str, default: str | None = None) -> str | None:
        """Like ``dict.get`` on ``{id: latest status}``: "ok", "failed" or ``default``."""
        found, ok = self.lookup(pa.array([rid], ID_TYPE))
        if not found[0]:
            return default
        return "ok" if ok[0] else "failed"

    def to_dict(self) -> dict[str, str]:
        """``{id: latest status}`` (Python objects for every id: small outputs only)."""
        return dict(zip(self.ids.to_pylist(), np.where(self.ok, "ok", "failed").tolist()))

    def failures(self, limit: int) -> list[tuple[str, str | None]]:
        """The first ``limit`` ids whose latest record failed, oldest latest record first, with its error."""
        bad = np.flatnonzero(~self.ok)
        if not len(bad):
            return []
        chosen = bad[np.lexsort((self.seq[bad], self.finished[bad]))[:limit]]
        seqs = self.seq[chosen]
        file_of = np.searchsorted(self.starts, seqs, side="right") - 1
        errors: dict[int, str | None] = {}
        for fi in np.unique(file_of):
            column = _read_column(self.files[fi], "error")
            for s in seqs[file_of == fi]:
                errors[int(s)] = None if column is None else column[int(s - self.starts[fi])].as_py()
        ids = self.ids.take(pa.array(chosen)).to_pylist()
        return [(rid, errors[int(s)]) for rid, s in zip(ids, seqs)]


def _positions(values: pa.Array, needles: pa.Array) -> np.ndarray:
    """Where each needle is or would go in the sorted ``values``: a binary search where pyarrow has
    ``search_sorted`` (pyarrow 26 here), else a hash lookup (builds a hash table per call: slower)."""
    if hasattr(pc, "search_sorted"):
        return pc.search_sorted(values, needles).to_numpy().astype(np.int64)
    found = pc.index_in(needles, value_set=values)
    return pc.fill_null(found, len(values)).to_numpy().astype(np.int64)


def _read_all(files: list[str], with_config: bool, threads: int | None = None) -> Iterator[pa.Table]:
    """:func:`_read_columns` of every shard, in order, ``threads`` at a time (an object store answers
    each GET in tens of milliseconds: ten thousand shards one by one would take minutes)."""
    threads = READ_THREADS if threads is None else threads
    if threads <= 1 or len(files) <= 1:
        for f in files:
            yield _read_columns(f, with_config)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="done-index") as pool:
        ahead: deque[Future] = deque()
        names = iter(files)
        for f in islice(names, 2 * threads):  # bounded read-ahead: tables are turned into arrays in order
            ahead.append(pool.submit(_read_columns, f, with_config))
        while ahead:
            table = ahead.popleft().result()
            nxt = next(names, None)
            if nxt is not None:
                ahead.append(pool.submit(_read_columns, nxt, with_config))
            yield table


def _read_columns(uri: str, with_config: bool) -> pa.Table:
    """id, status, finished_at (and config_hash) of one shard; a column it lacks comes back null."""
    want = {"id": pa.string(), "status": pa.string(), "finished_at": pa.timestamp("us", tz="UTC"),
            "work_key": pa.string()}
    if with_config:
        want["config_hash"] = pa.string()
    with storage.open_input(uri) as fh:
        pf = pq.ParquetFile(fh)
        names = set(pf.schema_arrow.names)
        table = pf.read(columns=[c for c in want if c in names])
    for name, typ in want.items():
        if name not in names:
            table = table.append_column(name, pa.nulls(table.num_rows, typ))
    return table


def _gather(chunks: list[np.ndarray], keep: np.ndarray) -> np.ndarray:
    """One column of the scan at the kept positions; its chunks are let go as soon as they are joined,
    so no column is held three times over (the peak of building the index)."""
    joined = np.concatenate(chunks)
    chunks.clear()
    return joined[keep]


def _key_prefixes(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """The first 64 bits of each work key as uint64 (0 where null: records of results schema v1)."""
    text = pc.fill_null(pc.utf8_slice_codeunits(col, 0, 16), "0").to_pylist()
    return np.fromiter((int(t or "0", 16) for t in text), dtype=np.uint64, count=len(text))


def _read_column(uri: str, name: str) -> pa.ChunkedArray | None:
    with storage.open_input(uri) as fh:
        pf = pq.ParquetFile(fh)
        if name not in pf.schema_arrow.names:
            return None
        return pf.read(columns=[name]).column(name)
