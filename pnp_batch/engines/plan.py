"""What a run is asked (RunRequest) and what it has to do: the manifest opened and checked, the rows
left (the done-index), and the stream of groups and windows the engines translate."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from pnp_batch.config import PipelineConfig
from pnp_batch.engines import resume
from pnp_batch.engines.stop import DEFAULT_GRACE
from pnp_batch.errors import UsageError
from pnp_batch.io import storage
from pnp_batch.io.done_index import DoneIndex
from pnp_batch.io.lease import DEFAULT_TTL
from pnp_batch.io.manifest import Manifest, Row, group_rows, open_manifest
from pnp_batch.io.policy import InputPolicy
from pnp_batch.io.results import done_index
from pnp_batch.io.sweep import Sweep, SweptManifest
from pnp_batch.io.work_key import batch_keys, classify, count_keys
from pnp_batch.translate.pack_plan import Pack, pack_size, window_packs

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
    keep_done: bool = False  # rows ok under another config stay done (engines/resume.py)
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
    def input_policy(self) -> InputPolicy:
        """What rows may read (io/policy.py): from the manifest's location and the policy keys."""
        return InputPolicy.for_manifest(self.manifest, self.cfg.allow_uri, self.cfg.allow_private_network)

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


@dataclass
class Plan:
    total: int
    done_before: int
    todo: int
    changed: int = 0  # rows whose id was done under another work key (changed upstream): redone
    other_config: int = 0  # rows ok under another config (kept with --keep-done, redone with --overwrite)


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
    config_hash = req.cfg.hash()
    for start, batch in manifest.iter_batches(limit=req.row_limit):
        n = batch.num_rows
        ids, keys = batch_keys(manifest, batch, start, config_hash)
        ok = np.zeros(n, dtype=bool) if req.overwrite else classify(index, ids, keys, req.keep_done)[0]
        i = 0
        while i < n:
            end = min(n, ((start + i) // size + 1) * size - start)  # this window's end within the batch
            todo = not ok[i:end].all()
            if not window and end - i == size and not todo:
                i = end  # a whole window, every row done: nothing from it
                continue
            rows = resume.with_keys(manifest.rows_of(batch, start, i, end), keys, i)
            window.extend(replace(r, companion=True) if k else r for r, k in zip(rows, ok[i:end].tolist()))
            window_todo = window_todo or todo
            if (start + end) % size == 0:
                yield from _window_groups(window, window_todo, req.overwrite, counts, pack_size(req.cfg))
                window, window_todo = [], False
            i = end
    yield from _window_groups(window, window_todo, req.overwrite, counts, pack_size(req.cfg))


def _window_groups(rows: list[Row], todo: bool, overwrite: bool,
                   counts: dict[str, int] | None, pack: int = 1) -> Iterator[list[Row]]:
    """The groups of one window that have a row to do (every group with --overwrite); with packs of
    sources (sources_per_batch > 1), the packs that have one (translate/packs.py)."""
    if not rows or not todo:
        return
    if pack > 1:
        yield from window_packs(list(group_rows(rows, window=len(rows) + 1)), pack, overwrite, counts)
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
        if isinstance(g, Pack):  # a pack of sources is a window of its own, as formed from the manifest
            if window:
                yield window
                window = []
            yield list(g)
            continue
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
    resume.check_out_outside(req.manifest, req.out)
    manifest = open_run_manifest(req)
    if req.cfg.mask_mode == "manifest" and not {"mask", "mask_bytes"} & set(manifest.columns):
        raise UsageError(f"mask_mode: manifest needs a 'mask' or 'mask_bytes' column; {req.manifest} has: "
                         f"{', '.join(manifest.columns)} (docs/masks.md)")
    total = manifest.check_ids()
    if req.row_limit is not None:
        total = min(total, req.row_limit)
    return manifest, total


def count_work(req: RunRequest, manifest: Manifest, total: int) -> tuple[DoneIndex, Plan]:
    """The done-index of OUT and the rows left to do, by work key (engines/resume.py).

    The id and work-key columns stream batch by batch against the done-index's sorted array
    (io/done_index.py): no Python object per row but its key, so ten million rows plan in bounded
    memory. Rows ok under another config stop the run here (exit 2, before any work) unless
    --overwrite or --keep-done says what to do with them."""
    resume.check_passthrough(manifest, req.out)
    if req.overwrite:
        return DoneIndex.empty(), Plan(total=total, done_before=0, todo=total)
    config_hash = req.cfg.hash()
    done = done_index(req.out, config_hash)
    c = count_keys(manifest, done, config_hash, req.row_limit, req.keep_done)
    if c.other_config and not req.keep_done:
        raise resume.ConfigChanged(resume.config_change_message(
            req.out, config_hash, c.other_config, resume.other_config_hashes(req.out, config_hash)))
    if c.other_config:
        log.info("%d rows done under another pipeline config are kept (--keep-done)", c.other_config)
    if c.changed:
        log.info("%d rows changed since they were done (image, prompts, overrides or sweep setting): redone",
                 c.changed)
    return done, Plan(total=total, done_before=c.done, todo=total - c.done, changed=c.changed,
                      other_config=c.other_config)
