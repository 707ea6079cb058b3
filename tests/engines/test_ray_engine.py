"""`--engine ray` on a local Ray instance (CPU, the tiny model): byte-identical to the local engine,
survives a killed worker, fails bad rows alone, and works against S3 without leaking credentials."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

FAST = ["--pipeline", "tiny", "--set", "steps=4", "--set", "inversion_steps=4", "--set", "resolution=64",
        "--no-report"]
ROOT = Path(__file__).resolve().parents[2]


def _png(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, "PNG")
    return buf.getvalue()


def manifest_rows(sources: int, per_source: int, bad: set[int] = frozenset()) -> tuple[list[dict], dict[str, bytes]]:
    """Rows and image files: ``sources`` random PNGs (or random bytes for indices in ``bad``)."""
    import numpy as np

    rows, files = [], {}
    for s in range(sources):
        name = f"images/src{s}.png"
        files[name] = np.random.default_rng(1000 + s).bytes(777) if s in bad else _png(s)
        for k in range(per_source):
            rows.append({"id": f"s{s}-t{k}", "image": name, "source_prompt": f"a photo of thing {s}",
                         "target_prompt": f"a painting of thing {s} in style {k}", "batch": "b1"})
    return rows, files


def write_manifest(folder: Path, sources: int, per_source: int, bad: set[int] = frozenset()) -> Path:
    rows, files = manifest_rows(sources, per_source, bad)
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    path = folder / "manifest.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def run_cli(*args: str) -> int:
    from pnp_batch.cli import main

    return main(["run", *args])


def run_local_one_thread(*args: str) -> int:
    """The local engine at the Ray workers' thread count (2 CPUs / 2 workers): CPU float results depend
    on the intra-op thread count, so byte comparisons need the same one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_cli(*args)
    finally:
        torch.set_num_threads(threads)


def records(out: str) -> list[dict]:
    from pnp_batch.io.results import read_results

    return read_results(out).to_pylist()


@pytest.mark.slow
def test_two_workers_match_the_local_engine_byte_for_byte(tmp_path: Path, ray_instance: str) -> None:
    manifest = write_manifest(tmp_path / "in", sources=5, per_source=3)  # 15 rows
    out_ray, out_local = tmp_path / "ray", tmp_path / "local"
    blocker = out_ray / "images" / "s1-t1.png"  # a directory where that image goes: its write fails
    blocker.mkdir(parents=True)
    assert run_cli(str(manifest), "--out", str(out_ray), "--engine", "ray", "--workers", "2", *FAST) == 1
    failed = [r["id"] for r in records(str(out_ray)) if r["status"] != "ok"]
    assert failed == ["s1-t1"]
    blocker.rmdir()
    # the resumed run redoes s1-t1 in its group's batch: s1-t0 and s1-t2 go along, not written again
    written = {n: (out_ray / "images" / n).stat().st_mtime_ns for n in ("s1-t0.png", "s1-t2.png")}
    assert run_cli(str(manifest), "--out", str(out_ray), "--engine", "ray", "--workers", "2", *FAST) == 0
    resumed = json.loads(max((out_ray / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime_ns).read_text())
    assert resumed["counts"]["ok"] == 1 and resumed["counts"]["companions"] == 2
    assert {n: (out_ray / "images" / n).stat().st_mtime_ns for n in written} == written
    assert run_local_one_thread(str(manifest), "--out", str(out_local), *FAST) == 0

    recs = [r for r in records(str(out_ray)) if r["status"] == "ok"]
    assert len(recs) == 15
    assert {r["id"] for r in recs} == {f"s{s}-t{k}" for s in range(5) for k in range(3)}
    assert all(r["worker"].startswith("ray:") and r["attempt"] == 1 and r["batch"] == "b1" for r in recs)
    # which actor takes which group is Ray's scheduling: both usually do, one may be quicker to load
    for run_id in {r["run_id"] for r in recs}:
        workers = Counter(r["worker"] for r in recs if r["run_id"] == run_id)
        assert 1 <= len(workers) <= 2, workers
    local_images = sorted(p.name for p in (out_local / "images").iterdir())
    assert local_images == sorted(p.name for p in (out_ray / "images").iterdir()) and len(local_images) == 15
    for name in local_images:
        assert (out_ray / "images" / name).read_bytes() == (out_local / "images" / name).read_bytes(), name

    summary = min((json.loads(p.read_text()) for p in (out_ray / "runs").glob("*.json")), key=lambda x: x["started_at"])
    stats = summary["stats"]
    assert summary["engine"] == "ray" and stats["retries"] == 0 and stats["actor_restarts"] == 0
    # workers that reported ready; the run can end before the slower one has loaded its model
    assert stats["workers_requested"] == 2 and 1 <= len(stats["workers"]) <= 2, stats["workers"]
    assert stats["unet"]["inversions"] == 5 and stats["unet"]["cache_hits"] == 0

    # the same command again: nothing to do, nothing written twice
    assert run_cli(str(manifest), "--out", str(out_ray), "--engine", "ray", "--workers", "2", *FAST) == 0
    assert len(records(str(out_ray))) == 16  # 15 ok and the one failure


@pytest.mark.slow
def test_inversion_batch_windows_are_the_local_engines(tmp_path: Path, ray_instance: str) -> None:
    """With inversion_batch 2 the driver sends windows of 2 groups, whose sources an actor inverts in
    shared UNet calls: the same windows as the local engine's, so the same bytes."""
    manifest = write_manifest(tmp_path / "in", sources=5, per_source=2)  # 10 rows, windows of 2, 2, 1 groups
    out_ray, out_local = tmp_path / "ray", tmp_path / "local"
    batched = [*FAST, "--set", "inversion_batch=2"]
    assert run_cli(str(manifest), "--out", str(out_ray), "--engine", "ray", "--workers", "2", *batched) == 0
    assert run_local_one_thread(str(manifest), "--out", str(out_local), *batched) == 0
    for out in (out_ray, out_local):
        unet = json.loads(next((out / "runs").glob("*.json")).read_text())["stats"]["unet"]
        assert unet["inversions"] == 5 and unet["invert_calls"] == 3 * 4  # 3 windows x 4 inversion steps
        assert unet["invert_elements"] == 3 * 2 * 4  # the last window's single source is padded to 2 rows
    names = sorted(p.name for p in (out_local / "images").iterdir())
    assert len(names) == 10 and names == sorted(p.name for p in (out_ray / "images").iterdir())
    for name in names:
        assert (out_ray / "images" / name).read_bytes() == (out_local / "images" / name).read_bytes(), name


@pytest.mark.slow
def test_a_killed_worker_costs_a_retry_not_a_row(tmp_path: Path, ray_instance: str) -> None:
    manifest = write_manifest(tmp_path / "in", sources=16, per_source=2)  # 32 rows
    out = tmp_path / "out"
    pidfile = tmp_path / "pids.txt"
    env = {**os.environ, "PNP_BATCH_TEST_PIDFILE": str(pidfile), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pnp_batch", "run", str(manifest), "--out", str(out), "--engine", "ray",
           "--workers", "2", "--ray-address", ray_instance, *FAST]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            lines = pidfile.read_text().splitlines() if pidfile.exists() else []
            if len(lines) >= 2:  # both workers hold groups now: kill one mid-group
                time.sleep(0.2)
                victim = int(lines[0].split("\t")[0])
                os.kill(victim, signal.SIGKILL)
                break
            time.sleep(0.05)
        output, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert victim is not None, "the workers never came up"
    assert proc.returncode == 0, output[-3000:]

    recs = records(str(out))
    ok = Counter(r["id"] for r in recs if r["status"] == "ok")
    assert set(ok) == {f"s{s}-t{k}" for s in range(16) for k in range(2)}
    assert all(n == 1 for n in ok.values()), ok
    assert not any(r["status"] == "failed" for r in recs)
    # the victim's records are only those of groups it finished before it was killed
    stats = json.loads(next((out / "runs").glob("*.json")).read_text())["stats"]
    assert stats["actor_restarts"] >= 1 and stats["retries"] >= 1, stats
    assert any(r["attempt"] == 2 for r in recs)


@pytest.mark.slow
def test_a_bad_image_fails_its_rows_only(tmp_path: Path, ray_instance: str) -> None:
    manifest = write_manifest(tmp_path / "in", sources=3, per_source=2, bad={1})
    out = tmp_path / "out"
    assert run_cli(str(manifest), "--out", str(out), "--engine", "ray", "--workers", "2", *FAST) == 1
    recs = {r["id"]: r for r in records(str(out))}
    assert len(recs) == 6
    for k in range(2):
        bad = recs.pop(f"s1-t{k}")
        assert bad["status"] == "failed" and "not an image" in bad["error"], bad["error"]
        assert bad["output"] is None
    assert all(r["status"] == "ok" for r in recs.values())


@pytest.mark.slow
def test_s3_in_and_out_without_leaking_the_secret(
    s3_bucket: str, ray_instance: str, capfd: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    from conftest import S3_SECRET

    from pnp_batch.io import storage

    caplog.set_level(logging.INFO)
    rows, files = manifest_rows(sources=3, per_source=2)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    for name, data in files.items():
        storage.write_bytes_atomic(f"{s3_bucket}/in/{name}", data)
    storage.write_bytes_atomic(f"{s3_bucket}/in/manifest.csv", buf.getvalue().encode())
    out, features = f"{s3_bucket}/out", f"{s3_bucket}/features"

    code = run_cli(f"{s3_bucket}/in/manifest.csv", "--out", out, "--features", features, "--engine", "ray",
                   "--workers", "2", *FAST)
    text = capfd.readouterr()
    assert code == 0, text.err[-3000:]
    recs = records(out)
    assert len(recs) == 6 and all(r["status"] == "ok" for r in recs)
    assert all(r["output"].startswith(f"{out}/images/") for r in recs)
    assert len(storage.list_files(f"{out}/images", ".png")) == 6
    assert len(storage.list_files(features)) >= 3
    assert 1 <= len({r["worker"] for r in recs}) <= 2  # Ray decides which actor takes which group
    everything = text.out + text.err + caplog.text + repr(recs)
    for f in storage.list_files(f"{out}/runs"):
        everything += storage.read_text(f)
    assert "AWS_SECRET_ACCESS_KEY" in text.err + caplog.text  # the name is logged ...
    assert S3_SECRET not in everything  # ... never the value
