"""`pnp-batch status OUT`: counts of done / failed / pending, the rows changed since they were done, and the
failed rows with their errors, from OUT's done-index and the latest run's manifest (counted by work key,
as the next run counts them: io/work_key.count_keys)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pnp_batch.errors import UsageError
from pnp_batch.io import storage
from pnp_batch.io.done_index import DoneIndex
from pnp_batch.io.results import read_run_summaries, result_files, results_dir
from pnp_batch.io.work_key import count_keys

_MAX_FAILED_LISTED = 20


@dataclass
class StatusReport:
    """What ``pnp-batch status OUT`` prints."""

    out_uri: str
    done: int = 0
    failed: int = 0
    pending: int | None = None
    manifest: str | None = None
    manifest_rows: int | None = None
    manifest_error: str | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)
    results_location: str = ""
    result_files: int = 0
    runs: int = 0
    last_run: dict[str, Any] | None = None
    done_in_manifest: int = 0
    changed: int = 0  # manifest rows whose id was done under another work key (the next run redoes them)

    @property
    def remaining(self) -> int | None:
        """Rows of the manifest without an ok result (failed ones included)."""
        if self.manifest_rows is None:
            return None
        return self.manifest_rows - self.done_in_manifest

    def format(self) -> str:
        lines = [f"output: {storage.redact(self.out_uri)}"]
        if self.manifest:
            lines.append(f"manifest (latest run): {storage.redact(self.manifest)}")
        lines.append(f"done: {self.done}")
        lines.append(f"failed: {self.failed}")
        if self.pending is None:
            why = f" ({self.manifest_error})" if self.manifest_error else ""
            lines.append(f"pending: unknown{why}")
        else:
            lines.append(f"pending: {self.pending} (never attempted)")
            if self.changed:
                lines.append(f"changed: {self.changed} (done under other inputs or settings; the next run redoes "
                             f"them)")
        lines.append(f"results: {self.result_files} shard(s) under {storage.redact(self.results_location)}")
        lines.append(f"runs: {self.runs}")
        if self.last_run:
            counts = self.last_run.get("counts")
            lines.append(f"last run: {self.last_run.get('run_id')}" + (f" {json.dumps(counts)}" if counts else ""))
        if self.failures:
            lines.append("failed rows:")
            for rid, err in self.failures:
                lines.append(f"  {rid}: {err}")
            if self.failed > len(self.failures):
                lines.append(f"  ... and {self.failed - len(self.failures)} more")
        return "\n".join(lines)


def status_report(out_uri: str) -> StatusReport:
    """Counts of done / failed / pending for ``OUT`` and the failed rows with their errors.

    Streams: the done-index holds the ids as one sorted array, and the manifest's ids are looked up
    in it a batch at a time, so ten million rows take well under a gigabyte."""
    report = StatusReport(out_uri=out_uri, results_location=results_dir(out_uri))
    files = result_files(out_uri)
    report.result_files = len(files)
    runs = read_run_summaries(out_uri)
    report.runs = len(runs)
    if runs:
        report.last_run = runs[-1]
        report.manifest = runs[-1].get("manifest")
    config_hash = (runs[-1].get("config_hash") or "") if runs else ""
    # one index, under the latest run's config (its rows are counted by work key below): ten million
    # records are held once
    index = DoneIndex.from_files(files, config_hash if report.manifest else None)
    report.done, report.failed = index.ok_count, index.failed_count
    report.failures = [(rid, err or "(no message)") for rid, err in index.failures(_MAX_FAILED_LISTED)]
    if report.manifest:
        try:
            from pnp_batch.io.manifest import open_manifest

            m = open_manifest(report.manifest)
            sweep_items = (runs[-1].get("options") or {}).get("sweep")
            if sweep_items:  # the latest run's sweep: its rows are the grid points
                from pnp_batch.config import PipelineConfig
                from pnp_batch.io.sweep import SweptManifest, parse_sweeps

                m = SweptManifest(m, parse_sweeps(sweep_items, PipelineConfig(), yes=True))
            # done by work key under the latest run's config, as the next run of it counts (docs/resume.md)
            c = count_keys(m, index, config_hash)
            report.manifest_rows, report.pending, report.done_in_manifest = c.total, c.total - c.found, c.done
            report.changed = c.changed + c.other_config
        except (UsageError, OSError) as e:
            report.manifest_error = f"manifest unreadable: {storage.redact(str(e))}"
    elif not runs:
        report.manifest_error = "no run summary names a manifest"
    return report
