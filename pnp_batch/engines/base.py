"""The run driver shared by every engine: manifest -> to-do rows -> groups -> backend -> results."""

from __future__ import annotations

import logging
import platform
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Protocol

from pnp_batch import __version__
from pnp_batch.config import PipelineConfig
from pnp_batch.io import storage
from pnp_batch.io.manifest import Manifest, Row, group_rows, open_manifest
from pnp_batch.io.results import ResultWriter, latest_results, load_latest, make_run_id, write_run_summary
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
    storage_options: dict[str, Any] = field(default_factory=dict)
    sweep: Sweep | None = None

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

    @property
    def window_rows(self) -> int:
        """Rows grouped at once: a whole number of grids, so a source's grid is never cut in two."""
        return self.grid * max(1, -(-self.group_window // self.grid))


class Backend(Protocol):
    """Where groups are translated: in this process, or on Ray actors."""

    name: str

    def start(self, req: RunRequest) -> None: ...

    def map_groups(self, groups: Iterator[list[Row]]) -> Iterator[list[dict[str, Any]]]: ...

    def stats(self) -> dict[str, Any]: ...

    def stop(self) -> None: ...


class Progress:
    """A bar on a terminal, periodic log lines otherwise (CI, Ray jobs)."""

    def __init__(self, total: int, desc: str, interval: float = 30.0) -> None:
        self.total, self.done, self.failed = total, 0, 0
        self.start = time.monotonic()
        self.last = self.start
        self.interval = interval
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="row", dynamic_ncols=True)
        else:
            log.info("%s: %d rows to do", desc, total)

    def update(self, ok: int, failed: int) -> None:
        self.done += ok + failed
        self.failed += failed
        if self.bar is not None:
            self.bar.update(ok + failed)
            self.bar.set_postfix(failed=self.failed)
            return
        now = time.monotonic()
        if now - self.last >= self.interval or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            log.info(
                "progress: %d/%d rows done (%d failed), %.2f rows/s, ETA %s",
                self.done, self.total, self.failed, rate, _fmt_eta(eta),
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt_eta(s: float) -> str:
    if s == float("inf"):
        return "unknown"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"


@dataclass
class Plan:
    total: int
    done_before: int
    todo: int


def work_groups(manifest: Manifest, done: dict[str, str], req: RunRequest,
                counts: dict[str, int] | None = None) -> Iterator[list[Row]]:
    """The groups (rows sharing a source) with rows not yet ok (all rows with --overwrite), streaming.

    Groups are formed from every row, done or not, so they are the groups of an uninterrupted run. A
    group's rows that are already ok stay in it as companions (translated, not written): a row's bytes
    depend on the batch it is sampled in, so a row redone after a failure or a crash must share its
    batch with the same rows as before to get the bytes an uninterrupted run gives it (CONTRACT).
    """
    for group in group_rows(manifest.iter_rows(limit=req.row_limit), window=req.window_rows):
        if req.overwrite:
            yield group
            continue
        marked = [replace(r, companion=True) if done.get(r.id) == "ok" else r for r in group]
        if not all(r.companion for r in marked):
            if counts is not None:
                counts["companions"] = counts.get("companions", 0) + sum(r.companion for r in marked)
            yield marked


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


def open_run_manifest(req: RunRequest) -> Manifest | SweptManifest:
    """The manifest, expanded into the sweep's grid when there is one."""
    manifest = open_manifest(req.manifest)
    return SweptManifest(manifest, req.sweep) if req.sweep is not None else manifest


def plan(req: RunRequest) -> tuple[Manifest, dict[str, str], Plan]:
    """Open and check the manifest (exit 2 on failure), read the done-index, count the work."""
    manifest = open_run_manifest(req)
    total = manifest.check_ids()
    limit = req.row_limit
    if limit is not None:
        total = min(total, limit)
    done = {} if req.overwrite else load_latest(req.out)
    if done:
        _warn_other_config(req)
    # counted from the id column alone (no image bytes, prompts or overrides decoded)
    todo = sum(
        1
        for index, row_id in manifest.iter_ids()
        if (limit is None or index < limit) and (req.overwrite or done.get(row_id) != "ok")
    )
    return manifest, done, Plan(total=total, done_before=total - todo, todo=todo)


def _warn_other_config(req: RunRequest) -> None:
    """Rows done under another pipeline config stay done (resume is by id): say so, once."""
    import pyarrow.compute as pc

    table = latest_results(req.out, ["status", "config_hash"])
    ok = table.filter(pc.equal(table.column("status"), "ok"))
    other = ok.filter(pc.not_equal(ok.column("config_hash"), req.cfg.hash())).num_rows
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
    """Run the request on the backend; returns the exit status (0 all done, 1 some rows failed)."""
    started = datetime.now(timezone.utc)
    t0 = time.monotonic()
    manifest, done, p = plan(req)
    run_id = make_run_id()
    log.info(
        "run %s: %d rows in the manifest, %d already done, %d to do (engine %s, pipeline %s)",
        run_id, p.total, p.done_before, p.todo, backend.name, req.cfg.name,
    )
    counts = {"ok": 0, "failed": 0, "companions": 0}
    sample: list[dict[str, Any]] = []
    if p.todo:
        backend.start(req)  # loads the model: an unusable one stops here, before anything is written
    # A shard every 1,000 rows or 2 minutes: few files, and a crash loses at most 2 minutes of records
    # (their images exist; the next run redoes those rows and rewrites the same bytes).
    writer = ResultWriter(req.out, run_id, shard_rows=1000, flush_seconds=120.0, extra_schema=manifest.extra_schema)
    status = "finished"
    if p.todo:
        progress = Progress(p.todo, f"pnp-batch {run_id}")
        try:
            groups = work_groups(manifest, done, req, counts)
            for records in backend.map_groups(groups):
                for rec in records:
                    rec["run_id"] = run_id
                    writer.add(rec)
                    counts[rec["status"]] = counts.get(rec["status"], 0) + 1
                    if rec["status"] == "failed":
                        log.warning("row %s failed: %s", rec["id"], rec["error"])
                    if len(sample) < 200:
                        sample.append(rec)
                ok = sum(1 for r in records if r["status"] == "ok")
                progress.update(ok, len(records) - ok)
        except BaseException:
            status = "interrupted"
            raise
        finally:
            writer.close()
            progress.close()
            stats = backend.stats()
            backend.stop()
            _summary(req, manifest.uri, run_id, started, t0, p, counts, stats, status, backend.name, writer)
    else:
        writer.close()
        _summary(req, manifest.uri, run_id, started, t0, p, counts, {}, status, backend.name, writer)
        log.info("nothing to do: every row is already done (use --overwrite to redo them)")
    if req.report and sample:
        try:
            write_report(req.out, req.cfg, run_id, sample)
        except Exception as e:  # noqa: BLE001 - a report failure must not fail the run
            log.warning("could not write the contact sheet: %s", storage.redact(str(e)))
    if req.report:
        try:  # the sweep's contact sheet, and the trade-off plot where scores exist
            write_sweep_reports(req.out, req.cfg.max_pixels, sheet=req.sweep is not None)
        except Exception as e:  # noqa: BLE001 - a report failure must not fail the run
            log.warning("could not write the sweep report: %s", storage.redact(str(e)))
    failed = counts.get("failed", 0)
    log.info("run %s finished: %d ok, %d failed, %d done before", run_id, counts["ok"], failed, p.done_before)
    if counts["companions"]:
        log.info("%d rows done before were translated again, not written, as companions of rows redone in their "
                 "groups (a row's bytes depend on the batch it shares)", counts["companions"])
    return 1 if failed else 0


def _summary(req: RunRequest, manifest_uri: str, run_id: str, started: datetime, t0: float, p: Plan, counts: dict, stats: dict,
             status: str, engine: str, writer: ResultWriter) -> None:
    wall = time.monotonic() - t0
    summary = {
        "run_id": run_id,
        "status": status,
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
        },
        "started_at": started.isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "wall_seconds": round(wall, 3),
        "rows_per_second": round((counts.get("ok", 0) + counts.get("failed", 0)) / wall, 4) if wall > 0 else None,
        "result_files": getattr(writer, "files_written", None),
        "stats": stats,
        "versions": versions(),
        "options": {"limit": req.limit, "overwrite": req.overwrite, "workers": req.workers,
                    "sweep": req.sweep.to_items() if req.sweep is not None else None},
    }
    write_run_summary(req.out, run_id, summary)
