"""The Ray cluster failing under a run: the node taken away (its dashboard agent killed, whose raylet
fate-shares with it; or all its processes killed at once, the driver and GCS left), no worker within
--worker-timeout, and one node of two removed. The first three stop the run with exit 3, a message, a
summary and rows left to do; the last goes on with the survivor."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from test_ray_engine import FAST, ROOT, records, run_cli, write_manifest

SOURCES, PER_SOURCE = 20, 2  # 40 rows: a few seconds of work for 2 workers, long enough to kill mid-run
IDS = {f"s{s}-t{k}" for s in range(SOURCES) for k in range(PER_SOURCE)}
MB = 1024 * 1024
# CPU float results depend on the intra-op thread count: a run that starts its own Ray gives each of its
# 2 workers CPUs // 2 threads; the local reference and the two-node cluster use the same count.
THREADS = max(1, (os.cpu_count() or 1) // 2)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_manifest(tmp_path_factory.mktemp("in"), sources=SOURCES, per_source=PER_SOURCE)


@pytest.fixture(scope="module")
def local_images(manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The local engine's images of the manifest, at the Ray workers' thread count: the reference bytes."""
    import torch

    out = tmp_path_factory.mktemp("local")
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        assert run_cli(str(manifest), "--out", str(out), *FAST) == 0
    finally:
        torch.set_num_threads(threads)
    return out / "images"


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def _raylet(driver: psutil.Process) -> psutil.Process:
    """The raylet of the local Ray instance the driver started (its child)."""
    found = [p for p in driver.children(recursive=True) if _cmdline(p).split(" ")[0].endswith("/raylet")]
    assert len(found) == 1, [_cmdline(p)[:80] for p in driver.children(recursive=True)]
    return found[0]


def dashboard_agent(driver: psutil.Process) -> list[psutil.Process]:
    """Only the dashboard agent: the raylet exits when it dies (Ray's fate sharing) and takes the workers."""
    return [p for p in _raylet(driver).children() if _cmdline(p).startswith("ray::DashboardAgent")]


def whole_node(driver: psutil.Process) -> list[psutil.Process]:
    """The raylet and everything under it (agents, workers) at once; the driver and the GCS stay."""
    raylet = _raylet(driver)
    return [raylet, *raylet.children(recursive=True)]


def start_run(manifest: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PNP_BATCH_TEST_PIDFILE": f"{out}.pids", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pnp_batch", "run", str(manifest), "--out", str(out), "--engine", "ray",
           "--workers", "2", *FAST, *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_mid_run(proc: subprocess.Popen, out: Path, images: int = 4, limit: float = 180) -> list[int]:
    """Wait until both workers are up and `images` images are written; returns the workers' pids."""
    pidfile = Path(f"{out}.pids")
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None:
        pids = [int(ln.split("\t")[0]) for ln in pidfile.read_text().splitlines()] if pidfile.exists() else []
        if len(pids) >= 2 and len(list((out / "images").glob("*.png"))) >= images:
            return pids
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"the run never got mid-way: {proc.communicate()[1][-3000:]}")


def summaries(out: Path) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in (out / "runs").glob("*.json")), key=lambda s: s["started_at"])


def assert_finished_like_local(out: Path, local_images: Path) -> None:
    """Every row ok exactly once over all runs, none failed, the images byte-equal to the local engine's."""
    recs = records(str(out))
    ok = Counter(r["id"] for r in recs if r["status"] == "ok")
    assert set(ok) == IDS and all(n == 1 for n in ok.values()), ok
    assert not [r for r in recs if r["status"] != "ok"]
    for name in sorted(p.name for p in local_images.iterdir()):
        assert (out / "images" / name).read_bytes() == (local_images / name).read_bytes(), name


@pytest.mark.slow
@pytest.mark.parametrize("take", [dashboard_agent, whole_node], ids=["dashboard-agent", "whole-node"])
def test_the_node_taken_away_stops_the_run_and_the_next_run_finishes(
    take: Callable[[psutil.Process], list[psutil.Process]], manifest: Path, local_images: Path, tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    proc = start_run(manifest, out, "--worker-timeout", "120")  # a local Ray of its own, as a user's run
    try:
        wait_mid_run(proc, out)
        victims = take(psutil.Process(proc.pid))
        assert victims
        killed = time.monotonic()
        for p in victims:
            p.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
    # detected when the node went (not after --worker-timeout): the raylet's exit, or the node marked dead
    assert proc.returncode == 3, err[-3000:]
    assert took < 60, took
    assert "Traceback" not in err, err[-3000:]
    message = [ln for ln in err.splitlines() if ln.startswith("pnp-batch: ")]
    assert len(message) == 1, err[-3000:]
    assert re.search(r"raylet exited|node.* dead", message[0]) and "still to do" in message[0], message[0]
    assert "Re-run the same command" in message[0] and "status cluster_lost" in message[0]

    [summary] = summaries(out)
    assert summary["status"] == "cluster_lost" and summary["reason"] in message[0], summary["reason"]
    counts = summary["counts"]
    recs = records(str(out))
    # the rows finished before are recorded; the groups in flight are not recorded at all (not failed)
    assert counts["failed"] == 0 and not [r for r in recs if r["status"] != "ok"]
    assert counts["ok"] == len(recs) == len({r["id"] for r in recs}) < len(IDS)
    assert f"recorded {counts['ok']} rows ok and 0 failed; {len(IDS) - counts['ok']} rows are still to do" in message[0]

    # the same command again finishes the rest, as if nothing had happened
    again = start_run(manifest, out)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    assert summaries(out)[-1]["counts"]["ok"] == len(IDS) - counts["ok"]
    assert_finished_like_local(out, local_images)


@pytest.mark.slow
def test_no_worker_within_the_timeout_stops_the_run(manifest: Path, tmp_path: Path, ray_instance: str,
                                                    capfd: pytest.CaptureFixture) -> None:
    """Actors that no node can host (a GPU each on a CPU cluster: they wait for an autoscaler that never
    comes) stop the run after --worker-timeout, with nothing recorded and the summary saying why."""
    out = tmp_path / "out"
    t0 = time.monotonic()
    code = run_cli(str(manifest), "--out", str(out), "--engine", "ray", "--workers", "1", "--ray-address",
                   ray_instance, "--gpus-per-worker", "1", "--worker-timeout", "2", *FAST)
    took = time.monotonic() - t0
    err = capfd.readouterr().err
    assert code == 3, err[-3000:]
    assert 2 <= took < 90, took  # stops soon after the timeout (90: a loaded 2-core machine starts Ray slowly)
    assert "no Ray worker became ready within --worker-timeout 2 s" in err and "Traceback" not in err
    [summary] = summaries(out)
    assert summary["status"] == "cluster_lost" and "--worker-timeout 2 s" in summary["reason"]
    assert summary["counts"]["attempted"] == 0 and not (out / "results").exists()


@pytest.mark.slow
def test_losing_one_node_of_two_goes_on_with_the_survivor(manifest: Path, local_images: Path, tmp_path: Path) -> None:
    from ray.cluster_utils import Cluster

    # the head hosts no worker (0 CPUs): the driver stays attached to it; one worker node goes away
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 80 * MB,
                                                            "include_dashboard": False})
    try:
        nodes = [cluster.add_node(num_cpus=THREADS, object_store_memory=80 * MB) for _ in range(2)]
        out = tmp_path / "out"
        proc = start_run(manifest, out, "--ray-address", cluster.address, "--worker-timeout", "120")
        try:
            pids = wait_mid_run(proc, out)
            raylet = psutil.Process(pids[0]).ppid()  # the node of one worker (maybe of both)
            [victim] = [n for n in nodes if n.all_processes["raylet"][0].process.pid == raylet]
            cluster.remove_node(victim)  # its raylet stops and the cluster marks the node dead at once
            _, err = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    finally:
        cluster.shutdown()
    assert proc.returncode == 0, err[-3000:]
    [summary] = summaries(out)
    assert summary["status"] == "finished" and summary["counts"]["ok"] == len(IDS)
    stats = summary["stats"]
    assert stats["actor_restarts"] >= 1 and stats["retries"] >= 1 and stats["groups_lost"] == 0, stats
    assert any(r["attempt"] == 2 for r in records(str(out)))  # the lost worker's groups, done again elsewhere
    assert_finished_like_local(out, local_images)


@pytest.mark.parametrize("value", ["0", "-5"])
def test_a_worker_timeout_that_is_not_positive_is_refused(value: str, manifest: Path, tmp_path: Path,
                                                          capfd: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert run_cli(str(manifest), "--out", str(out), "--engine", "ray", "--worker-timeout", value, *FAST) == 2
    assert "--worker-timeout must be > 0" in capfd.readouterr().err and not out.exists()


class _Context:
    def __init__(self, node_id: str) -> None:
        self.node_id = node_id

    def get_node_id(self) -> str:
        return self.node_id


@pytest.mark.parametrize(("alive", "mine", "expected"), [
    ({"a": True, "b": True}, "a", None),
    ({"a": True, "b": False}, "a", None),  # one node of two lost: the run goes on with the other
    ({"a": False, "b": True}, "a", "the Ray node this driver is attached to (a) is dead"),
    ({"a": False, "b": False}, "a", "every node of the Ray cluster is dead (2 known)"),
    ({}, "a", "every node of the Ray cluster is dead (0 known)"),
])
def test_what_counts_as_the_cluster_gone_on_a_joined_cluster(
    alive: dict[str, bool], mine: str, expected: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pnp_batch.engines.ray_cluster import cluster_gone

    monkeypatch.setattr(ray, "nodes", lambda: [{"NodeID": k, "Alive": v} for k, v in alive.items()])
    monkeypatch.setattr(ray, "get_runtime_context", lambda: _Context(mine))
    reason = cluster_gone(owns_ray=False)
    assert (reason is None) if expected is None else reason.startswith(expected), reason


def test_a_cluster_that_does_not_answer_is_asked_again(monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    from pnp_batch.engines.ray_cluster import cluster_gone

    def down() -> list:
        raise ConnectionError("GCS at 10.0.0.1:6379 unavailable")

    monkeypatch.setattr(ray, "nodes", down)
    assert cluster_gone(owns_ray=False) is None  # a restarting GCS must not end a long run
    assert "could not list the Ray cluster's nodes (ConnectionError: GCS at 10.0.0.1:6379" in caplog.text
