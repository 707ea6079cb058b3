"""`pnp-batch export OUT DEST`: the rows of OUT's latest view that pass a filter, as a training set.

Plan: the view (io/view.latest_view: latest record per id joined with its latest score), filtered by the
SQL expression, ids in ascending order. Shards: consecutive runs of the matched rows (`shard_size` rows, or
until `shard_bytes` of images), named 00000, 00001, ... Each shard's files are built in memory and written
atomically, then its progress file `DEST/_export/{shard}.json` (its rows, skips and the files' sha256): a
re-run with the same request finds it and skips the shard. `DEST/export.json` is written last.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pnp_batch.errors import UsageError
from pnp_batch.export.samples import Prep, Sample, SampleReader, Skipped
from pnp_batch.export.writers import FORMATS, shard_files
from pnp_batch.io import storage
from pnp_batch.io.results import read_run_summaries, result_files
from pnp_batch.io.view import filter_view, latest_view

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 10_000
PROGRESS = "_export"
MANIFEST = "export.json"
MAX_SKIPS_LISTED = 100


@dataclass
class ExportRequest:
    out: str
    dest: str
    where: str | None = None
    format: str = "webdataset"
    shard_size: int = DEFAULT_SHARD_SIZE
    shard_bytes: int | None = None  # when set, a shard closes once its images reach this many bytes
    split: str = "train"
    dry_run: bool = False
    overwrite: bool = False
    engine: str = "local"
    ray_address: str | None = None
    workers: int | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        """What makes two exports the same (a re-run of one skips the other's finished shards)."""
        return {"out": storage.redact(self.out), "where": self.where or "", "format": self.format,
                "shard_size": self.shard_size, "shard_bytes": self.shard_bytes, "split": self.split}


@dataclass
class ExportPlan:
    rows: pa.Table  # the matched rows of the view, ids ascending
    schema: pa.Schema  # the view's columns (the metadata every format carries)
    preps: dict[str, Prep | None]
    view_rows: int
    statuses: dict[str, int] = field(default_factory=dict)


def plan_export(req: ExportRequest) -> ExportPlan:
    """The rows that pass the filter; UsageError (exit 2) for a bad request or expression."""
    if req.format not in FORMATS:
        raise UsageError(f"--format {req.format!r}: one of {', '.join(FORMATS)}")
    if req.shard_size < 1:
        raise UsageError("--shard-size must be >= 1")
    if req.shard_bytes is not None and req.shard_bytes < 1:
        raise UsageError("--shard-bytes must be >= 1")
    if not result_files(req.out):
        raise UsageError(f"{storage.redact(req.out)} has no results (OUT/results/*.parquet): nothing to export")
    view = latest_view(req.out)
    rows = filter_view(view, req.where)
    preps: dict[str, Prep | None] = {}
    for summary in read_run_summaries(req.out):  # oldest first: the latest summary of a config wins
        cfg = summary.get("config")
        if isinstance(cfg, dict) and summary.get("config_hash"):
            preps[str(summary["config_hash"])] = Prep.of(cfg)
    statuses = Counter(rows.column("status").to_pylist()) if rows.num_rows else Counter()
    return ExportPlan(rows=rows, schema=view.schema, preps=preps, view_rows=view.num_rows,
                      statuses=dict(sorted(statuses.items(), key=lambda kv: str(kv[0]))))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _ids_sha(ids: list[str]) -> str:
    return _sha("\n".join(ids).encode("utf-8"))


def _shard_name(k: int) -> str:
    return f"{k:05d}"


@dataclass
class ShardResult:
    """A shard's progress file: which rows it covers, what it wrote, what it skipped and why."""

    name: str
    start: int
    end: int
    ids_sha: str
    files: dict[str, dict[str, Any]]
    written: int
    skipped: list[dict[str, str]]
    identity_sha: str

    def doc(self) -> dict[str, Any]:
        return {"name": self.name, "start": self.start, "end": self.end, "ids_sha": self.ids_sha, "files": self.files,
                "written": self.written, "skipped": self.skipped, "identity_sha": self.identity_sha}


def _identity_sha(req: ExportRequest) -> str:
    return _sha(json.dumps(req.identity(), sort_keys=True).encode("utf-8"))


def _read_progress(dest: str, name: str) -> dict[str, Any] | None:
    uri = storage.join(dest, PROGRESS, f"{name}.json")
    try:
        doc = json.loads(storage.read_text(uri))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _finished(dest: str, doc: dict[str, Any] | None, start: int, ids: list[str], identity: str) -> bool:
    """A shard is finished when its progress file names the same rows, the same request, and its files exist."""
    if not doc or doc.get("start") != start or doc.get("identity_sha") != identity:
        return False
    end = doc.get("end")
    if not isinstance(end, int) or end > len(ids) or doc.get("ids_sha") != _ids_sha(ids[start:end]):
        return False
    return all(storage.exists(storage.join(dest, rel)) for rel in doc.get("files", {}))


def source_policy(out: str) -> Any:
    """Sources and masks are read where the output's latest run could read them (its input policy)."""
    from pnp_batch.io.inputs import output_policy

    return output_policy(out)


def write_shard(req: ExportRequest, plan_schema: pa.Schema, preps: dict[str, Prep | None], name: str, start: int,
                rows: list[dict[str, Any]], identity: str) -> ShardResult:
    """Read the rows' samples, build the shard's files in memory, write them atomically, then its progress file."""
    reader = SampleReader(preps, source_policy(req.out))
    samples: list[Sample] = []
    skipped: list[dict[str, str]] = []
    for row in rows:
        got = reader.read(row)
        if isinstance(got, Skipped):
            log.warning("export: row %s skipped: %s", got.id, got.reason)
            skipped.append({"id": got.id, "reason": got.reason})
        else:
            samples.append(got)
    files = shard_files(req.format, name, samples, plan_schema, req.split) if samples else {}
    listed = {}
    for rel, data in files.items():
        storage.write_bytes_atomic(storage.join(req.dest, rel), data)
        listed[rel] = {"sha256": _sha(data), "bytes": len(data)}
    result = ShardResult(name=name, start=start, end=start + len(rows), ids_sha=_ids_sha([str(r["id"]) for r in rows]),
                         files=listed, written=len(samples), skipped=skipped, identity_sha=identity)
    storage.write_text_atomic(storage.join(req.dest, PROGRESS, f"{name}.json"),
                              json.dumps(result.doc(), sort_keys=True, indent=1) + "\n")
    return result


def _sample_bytes(s: Sample) -> int:
    return len(s.source_png) + len(s.edit) + len(s.mask_png or b"")


def _byte_shards(req: ExportRequest, p: ExportPlan, ids: list[str], identity: str) -> Iterator[tuple[ShardResult, bool]]:
    """Shards closed by a byte limit: boundaries are found while reading, so they are written one after another."""
    pos, k = 0, 0
    n = p.rows.num_rows
    while pos < n:
        name = _shard_name(k)
        doc = _read_progress(req.dest, name)
        if _finished(req.dest, doc, pos, ids, identity):
            res = _result(doc)
            yield res, True
        else:
            reader = SampleReader(p.preps, source_policy(req.out))
            end, size = pos, 0
            while end < n and size < (req.shard_bytes or 0) and end - pos < req.shard_size:
                got = reader.read(p.rows.slice(end, 1).to_pylist()[0])
                size += _sample_bytes(got) if isinstance(got, Sample) else 0
                end += 1
            res = write_shard(req, p.schema, p.preps, name, pos, p.rows.slice(pos, end - pos).to_pylist(), identity)
            yield res, False
        pos, k = res.end, k + 1


def _result(doc: dict[str, Any]) -> ShardResult:
    return ShardResult(**{k: doc[k] for k in ("name", "start", "end", "ids_sha", "files", "written", "skipped",
                                              "identity_sha")})


def _count_shards(req: ExportRequest, p: ExportPlan, ids: list[str], identity: str) -> Iterator[tuple[ShardResult, bool]]:
    for k, start in enumerate(range(0, p.rows.num_rows, req.shard_size)):
        name = _shard_name(k)
        doc = _read_progress(req.dest, name)
        if _finished(req.dest, doc, start, ids, identity):
            yield _result(doc), True
            continue
        rows = p.rows.slice(start, req.shard_size).to_pylist()
        yield write_shard(req, p.schema, p.preps, name, start, rows, identity), False


def _check_dest(req: ExportRequest) -> None:
    """DEST holding another export (another filter, format or OUT) is refused without --overwrite."""
    uri = storage.join(req.dest, MANIFEST)
    try:
        doc = json.loads(storage.read_text(uri))
    except (OSError, ValueError):
        return
    if isinstance(doc, dict) and doc.get("request") != req.identity() and not req.overwrite:
        raise UsageError(f"{storage.redact(req.dest)} holds another export ({doc.get('request')}); "
                         "choose another DEST or pass --overwrite to replace it")


def _remove_stale(req: ExportRequest, keep: int) -> None:
    """Shards past the last one of this export (left by an earlier, larger export into DEST) are deleted."""
    for uri in storage.list_files(storage.join(req.dest, PROGRESS), ".json"):
        name = storage.basename(uri)[:-5]
        if name.isdigit() and int(name) >= keep:
            doc = _read_progress(req.dest, name) or {}
            for rel in doc.get("files", {}):
                storage.delete(storage.join(req.dest, rel))
            storage.delete(uri)
