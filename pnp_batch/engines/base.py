"""The run driver shared by every engine: manifest -> to-do rows -> groups -> backend -> results."""

from __future__ import annotations

import logging
import os
import platform
import re
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any, Protocol

from pnp_batch import __version__
from pnp_batch.engines.plan import Plan, RunRequest, count_work, open_checked, work_groups
from pnp_batch.engines.progress import Progress
from pnp_batch.engines.stop import SIGNALS, GraceExpired, StopRequest
from pnp_batch.errors import ClusterLost, StoreRefused, StoreUnavailable, UsageError
from pnp_batch.io import refusal, retry, storage, write_check
from pnp_batch.io.lease import Lease, LeaseHeld
from pnp_batch.io.manifest import Manifest, Row
from pnp_batch.io.metrics import ScoreWriter
from pnp_batch.io.records import SCORES_FIELD
from pnp_batch.io.refusal import FULL, REFUSED
from pnp_batch.io.results import ResultWriter, make_run_id, write_run_summary
from pnp_batch.report.write import write_report, write_sweep_reports

# Run statuses of a store that refused writes (io/refusal.py); a record failed for one carries this marker.
STORE_STOPS = (FULL, REFUSED)
_REFUSED_RECORD = re.compile(r"StoreRefused: \[(store_full|store_refused)\]")

log = logging.getLogger(__name__)


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
    preflight(req)  # OUT (and the feature store) take a write, before any model loads: else exit 2
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
    except StoreRefused as e:
        raise UsageError(f"OUT {storage.redact(req.out)} cannot take writes: {e.reason}. Nothing was loaded or "
                         "written.") from None
    stop.on_force = lease.release
    try:
        return _run_leased(req, backend, stop, manifest, total, run_id, started, t0)
    except StoreUnavailable as e:
        log.error("%s; stopped: re-run the same command when the store is back to finish the rest", e)
        return 1
    except StoreRefused as e:
        log.error("%s", e)
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
        "run %s: %d rows in the manifest, %d already done, %d to do, %d of them changed (engine %s, pipeline %s)",
        run_id, p.total, p.done_before, p.todo, p.changed, backend.name, req.cfg.name,
    )
    counts = {"ok": 0, "failed": 0, "companions": 0, "left_pending": 0}
    sample: list[dict[str, Any]] = []
    if p.todo and not stop.requested:
        try:
            backend.start(req)  # loads the model: an unusable one stops here, before anything is written
        except GraceExpired as e:  # a signal came while the model was loading
            log.warning("%s", e)
        except SystemExit as e:  # ray.init's own SIGTERM handler exits where a signal lands while Ray starts
            if e.code not in SIGNALS:
                raise
            stop.signalled(int(e.code))  # the engine is stopped below, with nothing in flight
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
        except StoreRefused as e:  # a results shard was refused: its rows stay pending with the rest
            stop.request(e.kind, f"{e}; stopping: the rows in flight stay pending")
            for rec in writer.unwritten:
                counts[rec["status"]] = counts.get(rec["status"], 0) - 1
            writer.unwritten.clear()
        except BaseException as e:
            status = "error" if isinstance(e, Exception) else "interrupted"
            stop.message = stop.message or storage.redact(f"{type(e).__name__}: {e}")[:500]
            raise
        finally:
            stop.disarm()
            _close_results(writer, stop, counts)
            status = _status(stop, status)
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
    if req.report and sample and status not in STORE_STOPS:
        try:
            write_report(req.out, req.cfg, run_id, sample, scores=sample_scores, policy=req.input_policy)
        except Exception as e:  # noqa: BLE001 - a report failure must not fail the run
            log.warning("could not write the contact sheet: %s", storage.redact(str(e)))
    if req.report and (req.sweep is not None or req.eval) and status not in STORE_STOPS:
        try:  # the sweep's contact sheet, and the trade-off plot where scores exist
            write_sweep_reports(req.out, req.cfg.max_pixels, sheet=req.sweep is not None, policy=req.input_policy)
        except Exception as e:  # noqa: BLE001 - a report failure must not fail the run
            log.warning("could not write the sweep report: %s", storage.redact(str(e)))
    failed = counts.get("failed", 0)
    if lost is not None:
        raise ClusterLost(stopped_message(req, run_id, lost, counts, p)) from None
    if stop.requested:
        log.warning("run %s stopped (%s): %d ok, %d failed, %d left pending; re-run the same command to finish "
                    "the rest", run_id, status, counts["ok"], failed, counts["left_pending"])
        if stop.reason in (FULL, REFUSED):
            log.error("%s", refusal_message(req, stop))
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
        counts[rec["status"]] = counts.get(rec["status"], 0) + 1  # before the write: a refused shard uncounts it
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
    """Whether a failed record is the store's condition, not the row's: an outage past its limit, or a
    refused write (full, read-only, denied). Such a row is not recorded (it stays pending) and the run
    stops; once it stops for the store, no other failure is recorded either (it may be the store's)."""
    error = str(rec.get("error") or "")
    if StoreUnavailable.__name__ in error:
        stop.request("outage", f"{rec['error']}; stopping: the rows in flight stay pending")
        return True
    refused = _REFUSED_RECORD.search(error)
    if refused:
        stop.request(refused.group(1), f"{error[refused.start(1) - 1:]}; stopping: the rows in flight stay pending")
        return True
    return stop.reason in ("outage", *STORE_STOPS)


def _status(stop: StopRequest, status: str) -> str:
    if stop.reason == "signal":
        return "interrupted"
    if stop.reason in ("outage", "lease_lost", "cluster_lost", *STORE_STOPS):
        return stop.reason
    return status


def preflight(req: RunRequest) -> None:
    """`run` checks that OUT and the feature store take a write before anything is loaded: exit 2 naming
    the location and the reason (read-only, denied, full, no such bucket)."""
    write_check.probe(req.out, "OUT")
    if not storage.join(req.features_uri, "").startswith(storage.join(req.out, "")):
        write_check.probe(req.features_uri, "the feature store (--features)")


def refusal_message(req: RunRequest, stop: StopRequest) -> str:
    """What the user reads when the output refused writes: where, why, what to fix, and how to resume."""
    what = "is full" if stop.reason == FULL else "refuses writes"
    first = re.sub(r"^\[\w+\] ", "", stop.message.split("; ")[0])
    return (f"the output {storage.redact(req.out)} {what} ({first}). No row was recorded failed for this: the "
            f"rows not written stay pending. To finish: {refusal.FIX[stop.reason]}.")


def _give_up_in_flight(backend: Backend) -> None:
    """Past the grace period: stop the engine without waiting for its workers' last writes."""
    if hasattr(backend, "close_timeout"):
        backend.close_timeout = 5.0


def _close_results(writer: ResultWriter, stop: StopRequest, counts: dict[str, int]) -> None:
    """Write the last results shard. Rows whose shard the store refused were not recorded: they stay
    pending (not counted ok or failed), and a refusal stops the run like one met mid-run."""
    try:
        writer.close()
    except StoreRefused as e:
        stop.request(e.kind, f"{e}; stopping: the rows in flight stay pending")
    except Exception as e:  # noqa: BLE001 - the rest of the teardown still runs
        log.error("could not write the last results shard: %s", storage.describe(e))
    for rec in writer.unwritten:
        counts[rec["status"]] = counts.get(rec["status"], 0) - 1
    writer.unwritten.clear()


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
        "input_policy": req.input_policy.describe(),
        "counts": {
            "manifest_rows": p.total,
            "done_before": p.done_before,
            "changed": p.changed,
            "kept_other_config": p.other_config if req.keep_done else 0,
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
        "options": {"limit": req.limit, "overwrite": req.overwrite, "keep_done": req.keep_done, "workers": req.workers,
                    "grace_seconds": req.grace_seconds, "lease_ttl": req.lease_ttl,
                    "outage_timeout": retry.OUTAGE.limit(),
                    "sweep": req.sweep.to_items() if req.sweep is not None else None},
    }
    write_run_summary(req.out, run_id, summary)
