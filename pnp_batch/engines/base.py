"""The run driver shared by every engine: manifest -> to-do rows -> groups -> backend -> results."""

from __future__ import annotations

import logging
import os
import platform
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Protocol

import numpy as np

from pnp_batch import __version__
from pnp_batch.config import PipelineConfig
from pnp_batch.engines.progress import Progress
from pnp_batch.engines.stop import DEFAULT_GRACE, GraceExpired, StopRequest
from pnp_batch.errors import ClusterLost, StoreUnavailable
from pnp_batch.io import retry, storage
from pnp_batch.io.done_index import DoneIndex
from pnp_batch.io.lease import DEFAULT_TTL, Lease, LeaseHeld
from pnp_batch.io.manifest import Manifest, Row, group_rows, open_manifest
from pnp_batch.io.metrics import ScoreWriter
from pnp_batch.io.records import SCORES_FIELD
from pnp_batch.io.results import ResultWriter, done_index, make_run_id, write_run_summary
from pnp_batch.io.sweep import Sweep, SweptManifest
from pnp_batch.report.write import write_report, write_sweep_reports

log = logging.getLogger(__name__)


@dataclass
class RunRequest:
    """Everything `pnp-batch run` was asked to do."""

    manifest: str
    out: str
    cfg: PipelineConfig
    features: str | None = None
    limit: int | None = None
    overwrite: bool = False
    dry_run: bool = False
    engine: str = "local"
    ray_address: str | None = None
    workers: int | None = None
    gpus_per_worker: float | None = None
    group_window: int = 256
    report: bool = True
    eval: bool = False  # score each row in the worker (run --eval); the driver writes OUT/eval/
    storage_options: dict[str, Any] = field(default_factory=dict)
    grace_seconds: float = DEFAULT_GRACE  # in-flight work's time after SIGTERM/SIGINT
    wait_for_lease: float | None = None  # seconds to wait for another run's lease (math.inf: no limit)
    lease_ttl: float = DEFAULT_TTL
    outage_timeout: float | None = None  # None: PNP_BATCH_OUTAGE_TIMEOUT, else retry.DEFAULT_OUTAGE_TIMEOUT
    sweep: Sweep | None = None  # run --sweep: every manifest row expanded into the grid (io/sweep.py)

    @property
    def features_uri(self) -> str:
        return self.features or storage.join(self.out, "features")

    @property
    def grid(self) -> int:
        """Rows per manifest row: the sweep's settings, or 1."""
        return self.sweep.size if self.sweep is not None else 1

    @property
    def row_limit(self) -> int | None:
        """--limit counts manifest rows; with a sweep each of them is `grid` rows."""
        return None if self.limit is None else self.limit * self.grid

    def layer_settings(self) -> tuple[tuple[tuple[str, ...] | None, tuple[str, ...] | None], ...]:
        """The injection-layer settings a sweep uses besides the pipeline's (the workers check them
        against the model before any work: exit 2 naming the valid layers)."""
        return self.sweep.layer_settings(self.cfg) if self.sweep is not None else ()

    @property
    def window_rows(self) -> int:
        """Rows grouped at once: a whole number of grids, so a source's grid is never cut in two."""
        return self.grid * max(1, -(-self.group_window // self.grid))


class Backend(Protocol):
    """Where groups are translated: in this process, or on Ray actors.

    Before ``map_groups`` the driver sets ``stopping``, an event set when the run is asked to stop: a
    backend then starts no new group and yields the records of those in flight. The driver also stops
    handing it groups, so a backend that pulls groups lazily needs nothing more."""

    name: str
    stopping: threading.Event | None

    def start(self, req: RunRequest) -> None: ...

    def map_groups(self, groups: Iterator[list[Row]]) -> Iterator[list[dict[str, Any]]]: ...

    def stats(self) -> dict[str, Any]: ...

    def stop(self) -> None: ...


@dataclass
class Plan:
    total: int
    done_before: int
    todo: int


def work_groups(manifest: Manifest, done: DoneIndex | Mapping[str, str], req: RunRequest,
                counts: dict[str, int] | None = None) -> Iterator[list[Row]]:
    """The groups (rows sharing a source) with rows not yet ok (all rows with --overwrite), streaming.

    Groups are formed from every row, done or not, so they are the groups of an uninterrupted run. A
    group's rows that are already ok stay in it as companions (translated, not written): a row's bytes
    depend on the batch it is sampled in, so a row redone after a failure or a crash must share its
    batch with the same rows as before to get the bytes an uninterrupted run gives it (CONTRACT).

    Rows are grouped within consecutive windows of ``req.window_rows`` rows (io/manifest.group_rows;
    with a sweep, a whole number of grids, so a source's grid is never cut in two).
    The ids of a manifest batch are looked up in the done-index at once; a window whose rows are all
    done yields nothing, so it is skipped without making its rows (a resume of ten million rows with
    a few to redo makes Row objects only around those few).
    """
    index = done if isinstance(done, DoneIndex) else DoneIndex.from_mapping(done)
    size = req.window_rows
    window: list[Row] = []  # the rows of the window being filled (it spans batches)
    window_todo = False
    for start, batch in manifest.iter_batches(limit=req.row_limit):
        n = batch.num_rows
        ok = np.zeros(n, dtype=bool) if req.overwrite else index.is_ok(manifest.batch_ids(batch, start))
        i = 0
        while i < n:
            end = min(n, ((start + i) // size + 1) * size - start)  # this window's end within the batch
            todo = not ok[i:end].all()
            if not window and end - i == size and not todo:
                i = end  # a whole window, every row done: nothing from it
                continue
            rows = manifest.rows_of(batch, start, i, end)
            window.extend(replace(r, companion=True) if k else r for r, k in zip(rows, ok[i:end].tolist()))
            window_todo = window_todo or todo
            if (start + end) % size == 0:
                yield from _window_groups(window, window_todo, req.overwrite, counts)
                window, window_todo = [], False
            i = end
    yield from _window_groups(window, window_todo, req.overwrite, counts)


def _window_groups(rows: list[Row], todo: bool, overwrite: bool,
                   counts: dict[str, int] | None) -> Iterator[list[Row]]:
    """The groups of one window that have a row to do (every group with --overwrite)."""
    if not rows or not todo:
        return
    for group in group_rows(rows, window=len(rows) + 1):
        if overwrite:
            yield group
        elif not all(r.companion for r in group):
            if counts is not None:
                counts["companions"] = counts.get("companions", 0) + sum(r.companion for r in group)
            yield group


def windows(groups: Iterator[list[Row]], size: int) -> Iterator[list[list[Row]]]:
    """Consecutive windows of `size` groups, the unit a worker translates at once (PipelineConfig.window:
    their sources are inverted at once, `inversion_batch` per UNet call and `inversion_streams` calls
    side by side). Both engines cut the same windows from the same group stream, so the same sources
    share a batch on either."""
    window: list[list[Row]] = []
    for g in groups:
        window.append(g)
        if len(window) >= size:
            yield window
            window = []
    if window:
        yield window


def plan(req: RunRequest) -> tuple[Manifest, DoneIndex, Plan]:
    """Open and check the manifest (exit 2 on failure), read the done-index, count the work."""
    manifest, total = open_checked(req)
    done, p = count_work(req, manifest, total)
    return manifest, done, p


def open_run_manifest(req: RunRequest) -> Manifest | SweptManifest:
    """The manifest, expanded into the sweep's grid when there is one."""
    manifest = open_manifest(req.manifest)
    return SweptManifest(manifest, req.sweep) if req.sweep is not None else manifest


def open_checked(req: RunRequest) -> tuple[Manifest, int]:
    """The manifest (expanded by --sweep), its ids checked (UsageError, exit 2, on a bad one), and its
    row count under --limit (which counts manifest rows: with a sweep, each is a grid of rows)."""
    manifest = open_run_manifest(req)
    total = manifest.check_ids()
    if req.row_limit is not None:
        total = min(total, req.row_limit)
    return manifest, total


def count_work(req: RunRequest, manifest: Manifest, total: int) -> tuple[DoneIndex, Plan]:
    """The done-index of OUT and the rows left to do.

    Ids stream batch by batch against the done-index's sorted array (io/done_index.py): no Python
    object per row, so ten million rows plan in bounded memory."""
    done = DoneIndex.empty() if req.overwrite else done_index(req.out, req.cfg.hash())
    if done:
        _warn_other_config(req, done)
    # counted from the id column alone (no image bytes, prompts or overrides decoded)
    todo = total
    if not req.overwrite:
        for _, ids in manifest.iter_id_batches(limit=req.row_limit):
            todo -= int(done.is_ok(ids).sum())
    return done, Plan(total=total, done_before=total - todo, todo=todo)


def _warn_other_config(req: RunRequest, done: DoneIndex) -> None:
    """Rows done under another pipeline config stay done (resume is by id): say so, once."""
    other = done.ok_other_config_count
    if other:
        log.warning(
            "%d rows in %s were done with another pipeline config (config_hash differs from %s); they count "
            "as done: use --overwrite to redo them with this one, or another --out",
            other, req.out, req.cfg.hash(),
        )


def versions() -> dict[str, str]:
    out = {"pnp_batch": __version__, "python": platform.python_version()}
    for mod in ("torch", "diffusers", "transformers", "pyarrow", "ray"):
        m = sys.modules.get(mod)
        if m is not None:
            out[mod] = getattr(m, "__version__", "?")
    return out


def execute(req: RunRequest, backend: Backend) -> int:
    """Run the request on the backend; returns the exit status: 0 all done, 1 some rows failed (or the
    run stopped for an outage or a lost lease), 128 + signal when a signal stopped it (docs/reliability.md).
    Raises UsageError (exit 2) for a bad manifest or an output whose lease another run holds, and
    ClusterLost (exit 3) after writing the records and the summary when the backend lost its cluster."""
    stop = StopRequest(req.grace_seconds)
    restore = stop.install()
    saved = {k: os.environ.get(k) for k in (retry.STORES_ENV, retry.OUTAGE_ENV)}
    os.environ[retry.STORES_ENV] = retry.guarded_stores(req.out, req.features_uri)  # Ray workers inherit these
    if req.outage_timeout is not None:
        os.environ[retry.OUTAGE_ENV] = str(req.outage_timeout)
    retry.set_outage_timeout(None)
    try:
        return _execute(req, backend, stop)
    finally:
        restore()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        retry.set_outage_timeout(None)


def _execute(req: RunRequest, backend: Backend, stop: StopRequest) -> int:
    started = datetime.now(timezone.utc)
    t0 = time.monotonic()
    manifest, total = open_checked(req)  # a bad manifest stops here: exit 2, nothing written
    run_id = make_run_id()
    lease = Lease(req.out, run_id, ttl=req.lease_ttl,
                  on_lost=lambda msg: stop.request("lease_lost", msg))
    try:
        lease.acquire(wait=req.wait_for_lease, cancelled=lambda: stop.requested)  # LeaseHeld: exit 2
    except (LeaseHeld, GraceExpired):
        if stop.reason == "signal":
            log.warning("stopped by %s while waiting for the lease; nothing was written", stop.signal_name)
            return stop.exit_status
        raise
    except StoreUnavailable as e:
        log.error("%s; nothing was written: re-run the same command when the store is back", e)
        return 1
    stop.on_force = lease.release
    try:
        return _run_leased(req, backend, stop, manifest, total, run_id, started, t0)
    except StoreUnavailable as e:
        log.error("%s; stopped: re-run the same command when the store is back to finish the rest", e)
        return 1
    except GraceExpired as e:  # a signal before the work began (reading the done-index)
        log.warning("%s; stopped before any row was attempted", e)
        return stop.exit_status or 1
    finally:
        stop.on_force = None
        try:
            lease.release()
        except Exception as e:  # noqa: BLE001 - it lapses after its TTL
            log.warning("could not release the lease (it lapses in %.0f s): %s", lease.ttl, storage.describe(e))


def _run_leased(req: RunRequest, backend: Backend, stop: StopRequest, manifest: Manifest, total: int, run_id: str,
                started: datetime, t0: float) -> int:
    """The run proper, with the lease held: the done-index is read now (a run waited for may have done
    rows meanwhile), then the groups left are translated and recorded."""
    done, p = count_work(req, manifest, total)
    log.info(
        "run %s: %d rows in the manifest, %d already done, %d to do (engine %s, pipeline %s)",
        run_id, p.total, p.done_before, p.todo, backend.name, req.cfg.name,
    )
    counts = {"ok": 0, "failed": 0, "companions": 0, "left_pending": 0}
    sample: list[dict[str, Any]] = []
    if p.todo and not stop.requested:
        try:
            backend.start(req)  # loads the model: an unusable one stops here, before anything is written
        except GraceExpired as e:  # a signal came while the model was loading
            log.warning("%s", e)
        except ClusterLost as e:  # no worker could start (cluster gone, --worker-timeout): the summary says so
            stop.request("cluster_lost", str(e))
            stop.disarm()
            _call(backend.stop, "stop the engine")
            counts["left_pending"] = p.todo
            _call(lambda: _summary(req, manifest.uri, run_id, started, t0, p, counts, {}, "cluster_lost",
                                   backend.name, None, stop), "write the run summary")
            raise ClusterLost(stopped_message(req, run_id, e, counts, p)) from None
        stop.reclaim()  # ray.init replaces the SIGTERM handler with its own
    # A shard every 1,000 rows or 2 minutes: few files, and a crash loses at most 2 minutes of records
    # (their images exist; the next run redoes those rows and rewrites the same bytes).
    writer = ResultWriter(req.out, run_id, shard_rows=1000, flush_seconds=120.0, extra_schema=manifest.extra_schema)
    # Scores (run --eval) are flushed right after the records they belong to, never before: a crash then
    # leaves at most records without scores (`pnp-batch eval` adds them), not scores of rows to be redone.
    scores = ScoreWriter(req.out, run_id, shard_rows=10**9, flush_seconds=float("inf")) if req.eval else None
    sample_scores: dict[str, dict[str, Any]] = {}
    status = "finished"
    stats: dict[str, Any] = {}
    lost: ClusterLost | None = None
    if p.todo:
        progress = Progress(p.todo, f"pnp-batch {run_id}")
        backend.stopping = stop.event
        try:
            groups = _until_stopped(work_groups(manifest, done, req, counts), stop)
            for records in (backend.map_groups(groups) if not stop.requested else ()):
                _record(records, run_id, writer, counts, sample, stop, progress, scores, sample_scores)
        except GraceExpired as e:
            log.warning("%s: the rows still in flight stay pending", e)
            _give_up_in_flight(backend)
        except ClusterLost as e:  # the groups in flight stay to do; what finished is recorded below
            lost = e
            stop.request("cluster_lost", str(e))
        except StoreUnavailable as e:
            stop.request("outage", f"{e}; stopping: the rows in flight stay pending")
        except BaseException as e:
            status = "error" if isinstance(e, Exception) else "interrupted"
            stop.message = stop.message or storage.redact(f"{type(e).__name__}: {e}")[:500]
            raise
        finally:
            stop.disarm()
            status = _status(stop, status)
            _close(writer, "write the last results shard")
            if scores is not None:
                _close(scores, "write the last scores shard")
            progress.close()
            stats = _call(backend.stats, "collect the engine's statistics") or {}
            _call(backend.stop, "stop the engine")
            counts["left_pending"] = p.todo - counts["ok"] - counts["failed"]
            _call(lambda: _summary(req, manifest.uri, run_id, started, t0, p, counts, stats, status, backend.name,
                                   writer, stop), "write the run summary")
    else:
        writer.close()
        _summary(req, manifest.uri, run_id, started, t0, p, counts, {}, status, backend.name, writer, stop)
        log.info("nothing to do: every row is already done (use --overwrite to redo them)")
    if req.report and sample and status != "outage":
        try:
            write_report(req.out, req.cfg, run_id, sample, scores=sample_scores)
        except Exception as e:  # noqa: BLE001 - a report failure must not fail the run
            log.warning("could not write the contact sheet: %s", storage.redact(str(e)))
    if req.report and (req.sweep is not None or req.eval) and status != "outage":
        try:  # the sweep's contact sheet, and the trade-off plot where scores exist
            write_sweep_reports(req.out, req.cfg.max_pixels, sheet=req.sweep is not None)
        except Exception as e:  # noqa: BLE001 - a report failure must not fail the run
            log.warning("could not write the sweep report: %s", storage.redact(str(e)))
    failed = counts.get("failed", 0)
    if lost is not None:
        raise ClusterLost(stopped_message(req, run_id, lost, counts, p)) from None
    if stop.requested:
        log.warning("run %s stopped (%s): %d ok, %d failed, %d left pending; re-run the same command to finish "
                    "the rest", run_id, status, counts["ok"], failed, counts["left_pending"])
        return stop.exit_status
    log.info("run %s finished: %d ok, %d failed, %d done before", run_id, counts["ok"], failed, p.done_before)
    if req.eval:
        log.info("run %s: %d rows scored into %s", run_id, counts.get("scored", 0), storage.join(req.out, "eval"))
        if p.done_before:
            log.info("rows done before this run are scored by `pnp-batch eval %s`", req.out)
    if counts["companions"]:
        log.info("%d rows done before were translated again, not written, as companions of rows redone in their "
                 "groups (a row's bytes depend on the batch it shares)", counts["companions"])
    return 1 if failed else 0


def _until_stopped(groups: Iterator[list[Row]], stop: StopRequest) -> Iterator[list[Row]]:
    """The groups, until a stop is requested: no group is started after it."""
    for g in groups:
        if stop.requested:
            return
        yield g


def _record(records: list[dict[str, Any]], run_id: str, writer: ResultWriter, counts: dict[str, int],
            sample: list[dict[str, Any]], stop: StopRequest, progress: Progress, scores: ScoreWriter | None = None,
            sample_scores: dict[str, dict[str, Any]] | None = None) -> None:
    """Write one window's records (and with --eval their scores, flushed with the records' shard). A row that
    failed because the store was unreachable past the outage limit is not recorded (it stays pending, the
    run stops); once the run gave up on the store, neither is any other failed row (its failure may be the
    outage's)."""
    ok = failed = 0
    for rec in records:
        score = rec.pop(SCORES_FIELD, None)
        if rec["status"] == "failed" and _outage_failure(rec, stop):
            continue
        rec["run_id"] = run_id
        if scores is None:
            writer.add(rec)
        else:
            if score is not None:
                scores.add(score)
                counts["scored"] = counts.get("scored", 0) + (score["status"] == "ok")
                if sample_scores is not None and len(sample_scores) < 200:
                    sample_scores[rec["id"]] = score
            shards = len(writer.files_written)
            writer.add(rec)
            if len(writer.files_written) != shards:  # the scores go out right after their records' shard
                scores.flush()
        counts[rec["status"]] = counts.get(rec["status"], 0) + 1
        if rec["status"] == "failed":
            failed += 1
            log.warning("row %s failed: %s", rec["id"], rec["error"])
        else:
            ok += 1
        if len(sample) < 200:
            sample.append(rec)
    progress.update(ok, failed)
    gave_up = retry.store_unavailable()  # e.g. the lease heartbeat gave up on the store
    if gave_up and not stop.requested:
        stop.request("outage", f"{gave_up}; stopping: the rows in flight stay pending")


def _outage_failure(rec: dict[str, Any], stop: StopRequest) -> bool:
    if StoreUnavailable.__name__ in str(rec.get("error") or ""):
        stop.request("outage", f"{rec['error']}; stopping: the rows in flight stay pending")
        return True
    return stop.reason == "outage"


def _status(stop: StopRequest, status: str) -> str:
    if stop.reason == "signal":
        return "interrupted"
    if stop.reason in ("outage", "lease_lost", "cluster_lost"):
        return stop.reason
    return status


def _give_up_in_flight(backend: Backend) -> None:
    """Past the grace period: stop the engine without waiting for its workers' last writes."""
    if hasattr(backend, "close_timeout"):
        backend.close_timeout = 5.0


def _close(writer: ResultWriter, what: str) -> None:
    _call(writer.close, what)


def _call(fn, what: str):
    """Run a step of the run's teardown; a failure (the store is down) is logged, the teardown goes on."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the rest of the teardown still runs
        log.error("could not %s: %s", what, storage.describe(e))
        return None


def stopped_message(req: RunRequest, run_id: str, e: ClusterLost, counts: dict, p: Plan) -> str:
    """The one paragraph a user reads when the cluster stopped the run."""
    ok, failed = counts.get("ok", 0), counts.get("failed", 0)
    return (
        f"the run stopped: {e}. This run recorded {ok} rows ok and {failed} failed; "
        f"{p.todo - ok - failed} rows are still to do (the groups in flight were left to do, not recorded "
        f"failed: nothing is wrong with them). Run summary: {storage.join(req.out, 'runs', run_id + '.json')} "
        f"(status cluster_lost). Re-run the same command once the cluster is back to finish the rest."
    )


def _summary(req: RunRequest, manifest_uri: str, run_id: str, started: datetime, t0: float, p: Plan, counts: dict, stats: dict,
             status: str, engine: str, writer: ResultWriter | None, stop: StopRequest) -> None:
    wall = time.monotonic() - t0
    summary = {
        "run_id": run_id,
        "status": status,
        "reason": stop.message or None,
        "signal": stop.signal_name,
        "manifest": manifest_uri,
        "out": req.out,
        "features": req.features_uri,
        "engine": engine,
        "pipeline": req.cfg.name,
        "config": req.cfg.to_dict(),
        "config_hash": req.cfg.hash(),
        "counts": {
            "manifest_rows": p.total,
            "done_before": p.done_before,
            "attempted": counts.get("ok", 0) + counts.get("failed", 0),
            "ok": counts.get("ok", 0),
            "failed": counts.get("failed", 0),
            "companions": counts.get("companions", 0),
            "left_pending": counts.get("left_pending", 0),
            **({"scored": counts.get("scored", 0)} if req.eval else {}),
        },
        "started_at": started.isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "wall_seconds": round(wall, 3),
        "rows_per_second": round((counts.get("ok", 0) + counts.get("failed", 0)) / wall, 4) if wall > 0 else None,
        "result_files": getattr(writer, "files_written", None),
        "stats": stats,
        "versions": versions(),
        "options": {"limit": req.limit, "overwrite": req.overwrite, "workers": req.workers,
                    "grace_seconds": req.grace_seconds, "lease_ttl": req.lease_ttl,
                    "outage_timeout": retry.OUTAGE.limit(),
                    "sweep": req.sweep.to_items() if req.sweep is not None else None},
    }
    write_run_summary(req.out, run_id, summary)
