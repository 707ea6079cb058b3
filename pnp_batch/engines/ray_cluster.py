"""Is the Ray cluster still there for this driver? The checks behind the Ray engine's bounded waits:
a dead node or cluster stops the run (errors.ClusterLost) instead of leaving the driver waiting for
actors nothing can start. See docs/ray.md, "When the cluster fails"."""

from __future__ import annotations

import logging

from pnp_batch.io import storage

log = logging.getLogger(__name__)


def _local_node_dead() -> str | None:
    """For a Ray instance this process started: which of its vital processes (raylet, GCS) has exited.
    Seen at once, where the cluster's own health check takes ~15 s to mark a crashed node dead."""
    try:
        import ray._private.worker as rw

        node = rw.global_worker.node
        dead = {kind for kind, _ in node.dead_processes()} if node is not None else set()
    except Exception as e:  # noqa: BLE001 - a private API: without it, ray.nodes() still tells
        log.debug("local Ray processes: %s", type(e).__name__)
        return None
    gone = sorted(dead & {"raylet", "gcs_server"})
    return f"the local Ray instance's {' and '.join(gone)} exited" if gone else None


def cluster_gone(owns_ray: bool) -> str | None:
    """Why the Ray cluster can no longer run workers for this driver, or None while it can.

    Gone: the node this driver is attached to is dead (it can neither start nor reach workers), or no
    node of the cluster is alive. A cluster that lost some nodes, or has none with free GPUs yet (an
    autoscaler at work), is not gone: --worker-timeout bounds that wait.
    """
    import ray

    if owns_ray and (reason := _local_node_dead()):
        return reason
    try:
        nodes = ray.nodes()
    except Exception as e:  # noqa: BLE001 - a hiccup (a GCS restarting) must not end a long run: ask again
        log.warning("could not list the Ray cluster's nodes (%s); asking again in a moment",
                    storage.redact(f"{type(e).__name__}: {e}")[:300])
        return None
    try:
        mine = ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - e.g. a Ray Client driver: not attached to a node
        mine = None
    alive = {n.get("NodeID") for n in nodes if n.get("Alive")}
    if not alive:
        return f"every node of the Ray cluster is dead ({len(nodes)} known)"
    if mine and mine not in alive:
        return f"the Ray node this driver is attached to ({mine[:12]}) is dead: its raylet exited"
    return None
