"""`pnp-batch eval OUT`: score the ok rows of an output that have no score yet, here or on Ray Data.

The driver reads the latest results (io/results.latest_results) and the scores already written
(io/metrics), and hands the rows still to score to the metric models: in this process (local), or
as a Ray Dataset mapped by an actor pool whose actors each hold the two models (`--engine ray`).
Either way the driver alone writes the score shards (io/metrics.ScoreWriter): a shard every
SHARD_ROWS scores or FLUSH_SECONDS, so a killed eval loses at most those, and the next one scores
exactly the rows without a score (none twice, none lost).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pnp_batch.config import PipelineConfig, config_from_dict, with_overrides
from pnp_batch.engines.progress import Progress
from pnp_batch.errors import StoreRefused, UsageError
from pnp_batch.io import storage, write_check
from pnp_batch.io.metrics import SCORE_SCHEMA, ScoreWriter, scored_keys
from pnp_batch.io.output_paths import locate_files
from pnp_batch.io.policy import InputPolicy
from pnp_batch.io.results import latest_results, make_run_id, read_run_summaries, result_files

log = logging.getLogger(__name__)

# Keys `pnp-batch eval --set` takes: the metric models, and where they run.
EVAL_SET_KEYS = ("eval_clip_model", "eval_clip_revision", "eval_dino_model", "eval_dino_revision", "device", "dtype")
TODO_COLUMNS = ["id", "config_hash", "target_prompt", "output", "image", "mask"]
BATCH_ROWS = 16  # rows per scoring call (one CLIP and one DINO forward per image size)
SHARD_ROWS = 1000
FLUSH_SECONDS = 30.0


@dataclass
class EvalRequest:
    """Everything `pnp-batch eval` was asked to do."""

    out: str
    overrides: list[str] = field(default_factory=list)
    engine: str = "local"
    ray_address: str | None = None
    workers: int | None = None
    gpus_per_worker: float | None = None
    limit: int | None = None
    overwrite: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict)
    allow_uri: tuple[str, ...] = ()  # the input policy's options (io/policy.py), added to the run's
    allow_private_network: bool = False


@dataclass
class EvalPlan:
    cfg: PipelineConfig  # the eval keys, device and dtype in use
    todo: pa.Table  # TODO_COLUMNS of the rows to score
    ok_rows: int  # ok rows in the output
    preprocessing: dict[str, dict[str, Any]]  # config_hash -> the run's resolved config
    policy: InputPolicy | None = None  # what the sources may be read from: the latest run's manifest and keys


def plan_eval(req: EvalRequest) -> EvalPlan:
    """The rows to score and the metric models' settings; UsageError (exit 2) when OUT has no results."""
    if not result_files(req.out):
        raise UsageError(f"{storage.redact(req.out)} has no results (OUT/results/*.parquet): nothing to score")
    if req.limit is not None and req.limit < 0:
        raise UsageError("--limit must be >= 0")
    configs: dict[str, dict[str, Any]] = {}
    newest: dict[str, Any] | None = None
    manifest: str | None = None
    for summary in read_run_summaries(req.out):  # oldest first: the latest run's config wins
        manifest = summary.get("manifest") or manifest
        cfg = summary.get("config")
        if isinstance(cfg, dict) and summary.get("config_hash"):
            configs[str(summary["config_hash"])] = newest = cfg
    base = PipelineConfig()
    if newest is not None:  # the metric models the latest run names (the tiny preset names tiny-clip / tiny-dino)
        try:
            base = config_from_dict(newest)
        except Exception as e:  # noqa: BLE001 - an old or foreign summary: take the defaults
            log.debug("the latest run's config does not load (%s); using the default metric models", e)
    cfg = with_overrides(base, req.overrides, allowed=EVAL_SET_KEYS)
    latest = latest_results(req.out, [c for c in TODO_COLUMNS if c != "id"] + ["status"])
    ok = latest.filter(pc.equal(latest.column("status"), "ok"))
    ok = ok.select([c for c in TODO_COLUMNS if c in ok.column_names])  # outputs before masks have no mask column
    if not req.overwrite:
        done = scored_keys(req.out)
        keep = [(i, h) not in done for i, h in zip(ok.column("id").to_pylist(), ok.column("config_hash").to_pylist())]
        todo = ok.filter(pa.array(keep, pa.bool_()))
    else:
        todo = ok
    if req.limit is not None:
        todo = todo.slice(0, req.limit)
    todo = locate_files(req.out, todo)  # outputs and masks recorded relative to where the run ran
    policy = InputPolicy.for_manifest(manifest, (*base.allow_uri, *req.allow_uri),
                                      base.allow_private_network or req.allow_private_network)
    return EvalPlan(cfg=cfg, todo=todo, ok_rows=ok.num_rows, preprocessing=configs, policy=policy)


def evaluate(req: EvalRequest) -> int:
    """Score the rows not scored yet; exit status 0 all scored, 1 some eval failures recorded."""
    p = plan_eval(req)
    run_id = make_run_id()
    cfg = p.cfg
    log.info("eval %s: %d ok rows in %s, %d to score (CLIP %s, DINO %s, engine %s)", run_id, p.ok_rows,
             storage.redact(req.out), p.todo.num_rows, cfg.eval_clip_model, cfg.eval_dino_model, req.engine)
    if p.todo.num_rows == 0:
        log.info("nothing to score: every ok row has a score (use --overwrite to score them again)")
        return 0
    write_check.probe(storage.join(req.out, "eval"), "OUT/eval")  # before any metric model loads: exit 2
    if req.engine == "ray":
        scores = RayScoring(req, p)
    else:
        scores = LocalScoring(req, p)
    try:
        scores.start()  # loads the metric models: an unusable one stops here, before anything is written
    except BaseException:
        scores.stop()  # a Ray instance started here goes down with it
        raise
    writer = ScoreWriter(req.out, run_id, shard_rows=SHARD_ROWS, flush_seconds=FLUSH_SECONDS)
    progress = Progress(p.todo.num_rows, f"pnp-batch eval {run_id}")
    counts = {"ok": 0, "failed": 0}
    refused: StoreRefused | None = None
    try:
        for records in scores.records():
            for rec in records:
                writer.add(rec)
                counts[rec["status"]] += 1
                if rec["status"] == "failed":
                    log.warning("row %s not scored: %s", rec["id"], rec["error"])
            failed = sum(r["status"] == "failed" for r in records)
            progress.update(len(records) - failed, failed)
    except StoreRefused as e:  # the scores not written stay to do: `eval` again scores them
        refused = e
    finally:
        try:
            writer.close()
        except StoreRefused as e:
            refused = refused or e
        progress.close()
        scores.stop()
    if refused is not None:
        log.error("eval %s stopped: %s (the rows whose scores were not written are scored by the next "
                  "`pnp-batch eval`)", run_id, refused)
        return 1
    log.info("eval %s finished: %d scored, %d failed; %d shard(s) in %s", run_id, counts["ok"], counts["failed"],
             len(writer.files_written), storage.redact(storage.join(req.out, "eval")))
    return 1 if counts["failed"] else 0


def _batches(table: pa.Table, size: int) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, table.num_rows, size):
        yield table.slice(start, size).to_pylist()


def _preprocessing(configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """config_hash -> how that config preprocessed its sources (None where the summary lacks it)."""
    from pnp_batch.eval.score import Preprocessing

    preps: dict[str, Any] = {}
    for h, cfg in configs.items():
        try:
            preps[h] = Preprocessing.of(cfg)
        except (KeyError, TypeError, ValueError):
            preps[h] = None
    return preps


def _read_items(rows: list[dict[str, Any]], preps: dict[str, Any], policy: InputPolicy | None) -> list:
    """A batch's ScoreItems, images read through storage, sources under the input policy (a source
    shared by rows read once)."""
    from pnp_batch.eval.score import read_item

    sources: dict[tuple, Any] = {}
    return [read_item(r, preps.get(r["config_hash"]), sources, policy) for r in rows]


class LocalScoring:
    """The metric models in this process; the next batch's images are read while this one is scored."""

    def __init__(self, req: EvalRequest, p: EvalPlan) -> None:
        self.req, self.p = req, p
        self.scorer = None

    def start(self) -> None:
        from pnp_batch.eval.score import load_scorer

        self.scorer = load_scorer(self.p.cfg)

    def records(self) -> Iterator[list[dict[str, Any]]]:
        preps = _preprocessing(self.p.preprocessing)

        def read(rows: list[dict[str, Any]]) -> list:
            return _read_items(rows, preps, self.p.policy)

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="eval-read") as pool:
            pending = None
            for rows in _batches(self.p.todo, BATCH_ROWS):
                fut = pool.submit(read, rows)
                if pending is not None:
                    yield self.scorer.score(pending.result())
                pending = fut
            if pending is not None:
                yield self.scorer.score(pending.result())

    def stop(self) -> None:
        self.scorer = None


class ScoreActor:
    """A Ray Data actor: the two metric models, loaded once; a batch of result rows -> score records."""

    def __init__(self, cfg: PipelineConfig, preprocessing: dict[str, dict[str, Any]],
                 storage_options: dict[str, Any], threads: int, policy: InputPolicy | None = None) -> None:
        import torch

        from pnp_batch.eval.score import load_scorer

        torch.set_num_threads(max(1, threads))
        storage.configure(storage_options)
        self.preps = _preprocessing(preprocessing)
        self.policy = policy
        self.scorer = load_scorer(cfg)

    def __call__(self, batch: pa.Table) -> pa.Table:
        records = self.scorer.score(_read_items(batch.to_pylist(), self.preps, self.policy))
        return pa.Table.from_pylist(records, schema=SCORE_SCHEMA)


def _check_models(cfg: PipelineConfig) -> str | None:
    """Load the metric models once where the actors will run; the reason when they cannot be loaded."""
    try:
        from pnp_batch.eval.score import load_scorer

        load_scorer(cfg)
    except UsageError as e:
        return storage.redact(str(e))
    return None


class RayScoring:
    """The rows to score as a Ray Dataset, `map_batches` over an actor pool holding the metric models
    (GPUs per actor when the cluster has GPUs); the driver iterates the scores as they come."""

    def __init__(self, req: EvalRequest, p: EvalPlan) -> None:
        self.req, self.p = req, p
        self.owns_ray = False
        self.workers = 1
        self.gpus = 0.0
        self.threads = 1

    def start(self) -> None:
        import ray

        from pnp_batch.engines.ray_worker import worker_env

        env = worker_env()
        if ray.is_initialized():
            log.info("using the Ray instance already initialised in this process")
        elif self.req.ray_address:
            ray.init(address=self.req.ray_address, ignore_reinit_error=True,
                     runtime_env={"env_vars": env} if env else None)
        else:
            ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, ignore_reinit_error=True,
                     object_store_memory=256 * 1024 * 1024, runtime_env={"env_vars": env} if env else None)
            self.owns_ray = True
        res = ray.cluster_resources()
        cpus, gpus = float(res.get("CPU", 1)), float(res.get("GPU", 0))
        self.gpus = self.req.gpus_per_worker if self.req.gpus_per_worker is not None else (1.0 if gpus else 0.0)
        if self.req.workers is not None:
            self.workers = self.req.workers
        elif self.gpus:
            self.workers = max(1, int(gpus // self.gpus))
        else:
            self.workers = max(1, int(cpus // 2))
        self.threads = max(1, int(cpus // self.workers)) if not self.gpus else 1
        check = ray.remote(_check_models).options(num_gpus=self.gpus, num_cpus=0.5)
        t0 = time.monotonic()
        why = ray.get(check.remote(self.p.cfg))
        if why:
            raise UsageError(why)
        log.info("metric models load on the Ray workers (%.1f s); %d actors, %g GPU each", time.monotonic() - t0,
                 self.workers, self.gpus)

    def records(self) -> Iterator[list[dict[str, Any]]]:
        import ray

        ds = ray.data.from_arrow(self.p.todo)
        scored = ds.map_batches(
            ScoreActor,
            fn_constructor_kwargs={"cfg": self.p.cfg, "preprocessing": self.p.preprocessing,
                                   "storage_options": self.req.storage_options, "threads": self.threads,
                                   "policy": self.p.policy},
            batch_size=BATCH_ROWS,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=self.workers),
            num_gpus=self.gpus,
            num_cpus=0.5,
        )
        for batch in scored.iter_batches(batch_format="pyarrow", batch_size=None):
            yield batch.to_pylist()

    def stop(self) -> None:
        import ray

        if self.owns_ray and ray.is_initialized():
            ray.shutdown()
            self.owns_ray = False
