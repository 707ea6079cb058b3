"""The Ray engine: a pool of actors, each holding one loaded model; groups streamed to them, bounded,
and resubmitted when a worker is lost.

Why our own actor pool and not Ray Data: a group (the rows sharing one source image) must stay on
one actor (one inversion, one shared source branch), the driver must be the only writer of result
records (so a retried group is recorded once, from the attempt that completed), and a lost worker
must cost one group's retry, not a restarted dataset stage. See docs/ray.md.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pnp_batch.config import PipelineConfig
from pnp_batch.engines.plan import RunRequest, windows
from pnp_batch.engines.ray_cluster import cluster_gone
from pnp_batch.engines.ray_worker import TranslatorWorker, worker_env
from pnp_batch.errors import ClusterLost, UsageError
from pnp_batch.io import storage
from pnp_batch.io.manifest import Row
from pnp_batch.io.records import row_record

log = logging.getLogger(__name__)

# Test hook: when set, the driver writes "pid<TAB>worker" of every live actor to this file.
PIDFILE_ENV = "PNP_BATCH_TEST_PIDFILE"

MAX_ATTEMPTS = 3  # attempts per group when its worker is lost
IN_FLIGHT_PER_WORKER = 2  # one group sampling, the other reading its source or writing its images
CPUS_PER_WORKER = 0.5  # Ray's accounting, so a small machine never deadlocks; threads are set separately
# How long the run waits with no usable worker (none alive and ready) before it stops (--worker-timeout):
# long enough for an autoscaler to bring up a GPU node and for its worker to load the model.
DEFAULT_WORKER_TIMEOUT = 900.0
POLL_SECONDS = 5.0  # the driver checks the cluster at least this often (ray.wait is never unbounded)


# Exceptions that mean "the worker (or its node, or the result) is gone", not "the row is bad".
def _loss_types() -> tuple[type[BaseException], ...]:
    import ray.exceptions as rex

    names = ("RayActorError", "WorkerCrashedError", "NodeDiedError", "OutOfMemoryError", "ObjectLostError",
             "OwnerDiedError", "LocalRayletDiedError", "TaskCancelledError")
    return tuple(getattr(rex, n) for n in names if hasattr(rex, n))


def _reason(e: BaseException) -> str:
    """A short, credential-free description of why a worker was lost."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    keep = [ln for ln in lines if not ln.startswith(("class_name", "actor_id", "namespace", "name:"))]
    text = "; ".join(keep[:3]) if keep else ""
    return storage.redact(f"{type(e).__name__}: {text}" if text else type(e).__name__)[:400]


def lost_record(row: Row, cfg: PipelineConfig, model: str, worker: str, attempt: int, error: str) -> dict[str, Any]:
    """The record of a row whose group lost its worker too often."""
    return row_record(row, cfg, "failed", model, worker, attempt, error=error)


@dataclass
class _Slot:
    """One actor of the pool and the groups it holds."""

    handle: Any
    ready_ref: Any
    ready: bool = False
    alive: bool = True
    info: dict[str, Any] = field(default_factory=dict)
    inflight: int = 0

    @property
    def name(self) -> str:
        return self.info.get("worker", "ray:<starting>")


@dataclass
class _Task:
    slot: _Slot
    groups: list[list[Row]]
    attempt: int

    @property
    def rows(self) -> list[Row]:
        return [r for g in self.groups for r in g]


class RayBackend:
    """Translate groups on a pool of Ray actors (see docs/ray.md)."""

    name = "ray"
    # Shutdown (engines/stop.py): the driver sets `stopping` and stops handing out groups, so no new window
    # is submitted; after the grace period it lowers `close_timeout`, the wait for the workers' last writes.
    stopping: threading.Event | None = None
    close_timeout: float = 120.0

    def __init__(self, max_attempts: int = MAX_ATTEMPTS, in_flight_per_worker: int = IN_FLIGHT_PER_WORKER,
                 threads_per_worker: int | None = None, worker_timeout: float = DEFAULT_WORKER_TIMEOUT,
                 poll_seconds: float = POLL_SECONDS) -> None:
        self.max_attempts = max_attempts
        self.worker_timeout = worker_timeout
        self.poll_seconds = poll_seconds
        self.idle_since: float | None = None  # since when no worker is alive and ready (None: one is)
        self.idle_logged = 0.0
        self.start_deaths = 0  # workers that died while starting since one last became ready
        self.checked_at = 0.0  # when the cluster was last checked (monotonic)
        self.threads_per_worker = threads_per_worker
        self.in_flight_per_worker = in_flight_per_worker
        self.req: RunRequest | None = None
        self.slots: list[_Slot] = []
        self.owns_ray = False
        self.workers = 0
        self.gpus_per_worker = 0.0
        self.threads = 1
        self.retries = 0
        self.restarts = 0
        self.lost_groups = 0
        self.model = ""
        self.counters: dict[str, dict[str, int]] = {}  # worker name -> last counters it reported
        self.seen_workers: list[str] = []
        self._actor_cls = None
        self._env: dict[str, str] = {}

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self, req: RunRequest) -> None:
        import ray

        self.req = req
        self.model = req.cfg.model
        self._env = worker_env()
        if self._env:
            log.info("passing to Ray workers: %s", ", ".join(sorted(self._env)))
        if ray.is_initialized():
            log.info("using the Ray instance already initialised in this process")
        elif req.ray_address:
            try:
                ray.init(address=req.ray_address, log_to_driver=True, ignore_reinit_error=True)
            except (ConnectionError, TimeoutError) as e:  # no cluster there (Ray raises ConnectionError)
                raise ClusterLost(
                    f"no Ray cluster at --ray-address {req.ray_address}: {str(e).splitlines()[0] if str(e) else e!r} "
                    f"(start one with `ray start --head`, check the address, or leave out --ray-address to start a "
                    f"local instance)") from None
            log.info("joined the Ray cluster at %s", req.ray_address)
        else:
            cpus = os.cpu_count() or 1
            self.owns_ray = True  # set first: a signal during ray.init still shuts down what it started
            # address="local": a new instance, as documented, even where another Ray runs on this machine
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, ignore_reinit_error=True,
                     log_to_driver=True, object_store_memory=256 * 1024 * 1024)
            log.info("started a local Ray instance (%d CPUs)", cpus)
        res = ray.cluster_resources()
        cpus, gpus = float(res.get("CPU", 1)), float(res.get("GPU", 0))
        self.gpus_per_worker = req.gpus_per_worker if req.gpus_per_worker is not None else (1.0 if gpus else 0.0)
        if req.workers is not None:
            self.workers = req.workers
        elif self.gpus_per_worker:
            self.workers = max(1, int(gpus // self.gpus_per_worker))
            if not gpus:
                log.warning("the cluster has no GPUs yet: starting 1 worker; with an autoscaler pass --workers N")
        else:
            self.workers = max(1, int(cpus // 2))
        if self.gpus_per_worker * self.workers > gpus:
            msg = (f"{self.workers} workers x {self.gpus_per_worker:g} GPUs need more GPUs than the cluster has "
                   f"({gpus:g})")
            if self.owns_ray:
                raise UsageError(msg + "; use --gpus-per-worker 0 or fewer --workers")
            log.warning("%s: the workers that do not fit wait for the autoscaler", msg)
        # CPU actors share the cluster's cores; GPU actors leave the threads to the GPU work.
        self.threads = self.threads_per_worker or max(1, int(cpus // self.workers))
        opts: dict[str, Any] = {
            "num_cpus": min(CPUS_PER_WORKER, cpus / self.workers),
            "num_gpus": self.gpus_per_worker,
            "max_restarts": 0,  # a lost worker is replaced explicitly (no group recorded twice)
            "max_concurrency": 2,
        }
        if self._env:
            opts["runtime_env"] = {"env_vars": self._env}
        self._actor_cls = ray.remote(TranslatorWorker).options(**opts)
        log.info("starting %d Ray workers (%g GPU, %d threads each)", self.workers, self.gpus_per_worker,
                 self.threads)
        self.slots = [self._new_slot() for _ in range(self.workers)]
        self._wait_first_ready()

    def _new_slot(self) -> _Slot:
        req = self.req
        handle = self._actor_cls.remote(req.cfg, req.out, req.features_uri, req.storage_options, self.threads,
                                        req.eval, req.layer_settings(), req.input_policy)
        return _Slot(handle=handle, ready_ref=handle.info.remote())

    def _wait_first_ready(self) -> None:
        """Block until one worker has its model loaded (bounded: see _wait_one); raise its error when the
        model cannot load."""
        self._note_pool()
        while not self._usable():
            starting = {s.ready_ref: s for s in self.slots if s.alive and not s.ready}
            if not starting:
                raise self._cluster_lost("every Ray worker was lost and none could be started")
            self._on_ready(starting[self._wait_one(list(starting))])

    def _on_ready(self, slot: _Slot) -> None:
        """A worker's constructor finished (or failed): mark it usable, or dead with its reason."""
        import ray

        try:
            info = ray.get(slot.ready_ref)
        except _loss_types() as e:
            slot.alive = False
            reason = _reason(e)
            log.warning("a Ray worker died while starting: %s", reason)
            self._check_cluster()  # its node, or the whole cluster, gone: stop here
            self.start_deaths += 1
            if self.start_deaths > self.max_attempts * max(1, self.workers):
                raise self._cluster_lost(f"Ray workers keep dying while starting ({self.start_deaths} since one "
                                         f"was last ready; last: {reason})") from None
            self.restarts += 1  # its node may be going while others stay: try again elsewhere
            self.slots.append(self._new_slot())
            return
        slot.info = info
        if info.get("error"):
            slot.alive = False
            err = info["error"]
            ray.kill(slot.handle, no_restart=True)
            msg = f"{err['type']}: {err['message']}"
            if err.get("usage"):
                raise UsageError(msg)
            if not any(s.alive for s in self.slots):
                raise RuntimeError(f"no Ray worker could load the model: {msg}")
            log.warning("a Ray worker could not start: %s", msg)
            return
        slot.ready = True
        self.start_deaths = 0
        self._note_pool()
        self.model = info.get("model", self.model)
        if info["worker"] not in self.seen_workers:
            self.seen_workers.append(info["worker"])
        log.info("Ray worker %s ready (%s)", info["worker"], info.get("device", "?"))
        self._write_pidfile()

    # -- bounded waiting -------------------------------------------------------------------------
    def _usable(self) -> bool:
        return any(s.alive and s.ready for s in self.slots)

    def _note_pool(self) -> None:
        """Start (or stop) the --worker-timeout clock: it runs while no worker is alive and ready."""
        if self._usable():
            self.idle_since = None
        elif self.idle_since is None:
            self.idle_since = time.monotonic()
            self.idle_logged = self.idle_since

    def _wait_one(self, refs: list[Any]) -> Any:
        """The first of `refs` to finish. Never unbounded: every POLL_SECONDS without one, the cluster is
        checked, and the run stops (ClusterLost) when it is gone or no worker was usable for worker_timeout."""
        import ray

        while True:
            timeout = self.poll_seconds
            if self.idle_since is not None:
                timeout = min(timeout, max(0.05, self.idle_since + self.worker_timeout - time.monotonic()))
            ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
            if ready and time.monotonic() - self.checked_at < self.poll_seconds:
                return ready[0]
            # also while results flow: workers outlive a dead GCS for a while, and Ray ends a driver
            # that cannot reach its GCS within 60 s; stopping first leaves a summary that says why
            self._check_cluster()
            if ready:
                return ready[0]

    def _check_cluster(self) -> None:
        """Raise ClusterLost when the cluster is gone, or when no worker has been usable for worker_timeout."""
        self.checked_at = time.monotonic()
        if reason := cluster_gone(self.owns_ray):
            raise self._cluster_lost(reason)
        self._note_pool()
        if self.idle_since is None:
            return
        now = time.monotonic()
        idle = now - self.idle_since
        if idle >= self.worker_timeout:
            raise self._cluster_lost(
                f"no Ray worker became ready within --worker-timeout {self.worker_timeout:g} s (the cluster "
                f"has no node that can run one, or none loaded the model in time)")
        if now - self.idle_logged >= 30:
            self.idle_logged = now
            log.info("no Ray worker ready for %.0f s (loading the model, or waiting for a node); the run stops "
                     "after --worker-timeout %g s", idle, self.worker_timeout)

    def _cluster_lost(self, reason: str) -> ClusterLost:
        """The exception that stops the run; every actor is written off (none is waited for any more)."""
        for slot in self.slots:
            slot.alive = False
        log.error("stopping: %s", reason)
        return ClusterLost(reason)

    def _write_pidfile(self) -> None:
        path = os.environ.get(PIDFILE_ENV)
        if not path:
            return
        lines = [f"{s.info['pid']}\t{s.name}\n" for s in self.slots if s.ready and s.alive]
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(lines)
        os.replace(tmp, path)

    def _replace(self, slot: _Slot, reason: str) -> None:
        """Retire a lost worker and start another in its place."""
        import ray

        if not slot.alive:
            return
        slot.alive = False
        log.warning("Ray worker %s lost (%s); starting a replacement", slot.name, reason)
        try:
            ray.kill(slot.handle, no_restart=True)
        except Exception as e:  # noqa: BLE001 - it is gone already
            log.debug("killing a lost worker: %s", type(e).__name__)
        self._note_pool()
        self._check_cluster()  # a dead node or cluster: stop, rather than wait for actors it cannot start
        self.restarts += 1
        self.slots.append(self._new_slot())
        self._write_pidfile()

    # -- the work -----------------------------------------------------------------------------
    def map_groups(self, groups: Iterator[list[Row]]) -> Iterator[list[dict[str, Any]]]:
        import ray

        loss = _loss_types()
        retry: deque[tuple[list[list[Row]], int, str]] = deque()
        tasks: dict[Any, _Task] = {}
        source = windows(groups, self.req.cfg.window)
        exhausted = False
        while True:
            # 1. fill every ready worker up to its bound; retries first, then new groups, lazily
            for slot in self.slots:
                while slot.ready and slot.alive and slot.inflight < self.in_flight_per_worker and not self._stopping():
                    if retry:
                        window, attempt, _ = retry.popleft()
                    elif not exhausted:
                        window = next(source, None)
                        if window is None:
                            exhausted = True
                            break
                        attempt = 1
                    else:
                        break
                    ref = slot.handle.process.remote(window, attempt)
                    tasks[ref] = _Task(slot, window, attempt)
                    slot.inflight += 1
            starting = {s.ready_ref: s for s in self.slots if s.alive and not s.ready}
            if not tasks and ((exhausted and not retry) or self._stopping()):
                return  # done; or stopping (engines/stop.py): groups not finished stay pending, never failed
            if not tasks and not starting:
                raise self._cluster_lost("every Ray worker was lost and none could be started")
            # 2. wait for a group to finish or a worker to come up (bounded: ClusterLost leaves the groups
            # in flight and in `retry` unrecorded, i.e. still to do)
            ref = self._wait_one([*tasks, *starting])
            if ref in starting:
                self._on_ready(starting[ref])
                continue
            task = tasks.pop(ref)
            task.slot.inflight -= 1
            try:
                out = ray.get(ref)
            except loss as e:
                reason = _reason(e)
                self._replace(task.slot, reason)
                if task.attempt < self.max_attempts:
                    self.retries += 1
                    log.warning("resubmitting %d rows of %s (attempt %d of %d)", len(task.rows),
                                task.rows[0].image or task.rows[0].id, task.attempt + 1, self.max_attempts)
                    retry.append((task.groups, task.attempt + 1, reason))
                    continue
                self._check_cluster()  # a group is failed for its own losses, never for the cluster's end
                self.lost_groups += 1
                msg = f"worker lost {task.attempt} times: {reason}"
                yield self._lost(task, msg)
                continue
            except ray.exceptions.RayTaskError as e:  # process() raises only on bugs: fail the group, go on
                msg = storage.redact(f"{type(e.cause).__name__ if e.cause else 'RayTaskError'}: "
                                     f"{str(e.cause or e).splitlines()[0] if str(e.cause or e) else ''}")[:500]
                log.error("groups from %s failed on %s: %s", task.rows[0].image or task.rows[0].id,
                          task.slot.name, msg)
                yield self._lost(task, msg)
                continue
            self.counters[task.slot.name] = out["counters"]
            yield out["records"]

    def _stopping(self) -> bool:
        return self.stopping is not None and self.stopping.is_set()

    # -- reporting and teardown ------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        import ray

        for slot in self.slots:  # the latest counters of the live workers
            if slot.alive and slot.ready:
                try:
                    info = ray.get(slot.handle.process_counters.remote(), timeout=30)
                    self.counters[slot.name] = info
                except Exception as e:  # noqa: BLE001 - keep the counters the worker last reported
                    log.debug("counters of %s: %s", slot.name, type(e).__name__)
        unet: dict[str, int] = {}
        for c in self.counters.values():
            for k, v in c.items():
                unet[k] = unet.get(k, 0) + v
        first = next((s.info for s in self.slots if s.ready), {})
        return {
            "unet": unet,
            "workers": list(self.seen_workers),
            "workers_requested": self.workers,
            "gpus_per_worker": self.gpus_per_worker,
            "threads_per_worker": self.threads,
            "retries": self.retries,
            "actor_restarts": self.restarts,
            "groups_lost": self.lost_groups,
            "worker_timeout": self.worker_timeout,
            "device": first.get("device"),
            "dtype": first.get("dtype"),
            "model": first.get("fingerprint"),
        }

    def _lost(self, task: _Task, msg: str) -> list[dict[str, Any]]:
        """Failed records for the rows of a window that could not be translated (not its companions)."""
        return [lost_record(r, self.req.cfg, self.model, task.slot.name, task.attempt, msg) for r in task.rows
                if not r.companion]

    def stop(self) -> None:
        import ray

        live = [s for s in self.slots if s.alive and s.ready]  # a lost or unstarted actor never answers
        try:  # let live workers finish their feature-store writes (bounded: stopping must not hang)
            if live:
                ray.wait([s.handle.close.remote() for s in live], num_returns=len(live), timeout=self.close_timeout)
        except Exception as e:  # noqa: BLE001 - lost workers: nothing to finish
            log.debug("closing workers: %s", type(e).__name__)
        for slot in self.slots:
            try:
                ray.kill(slot.handle, no_restart=True)
            except Exception as e:  # noqa: BLE001
                log.debug("stopping %s: %s", slot.name, type(e).__name__)
        self.slots = []
        if self.owns_ray:  # also after a ray.init cut short by a signal
            ray.shutdown()
            self.owns_ray = False
