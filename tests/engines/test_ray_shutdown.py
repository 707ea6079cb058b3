"""SIGTERM to a `--engine ray` driver midway: it submits no new window, lets the windows in flight finish,
records them, writes a summary marked interrupted and exits 143 (despite the SIGTERM handler ray.init
installs); the groups it did not finish stay pending, none is recorded as failed; the next run finishes
the rest, each row ok exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from test_ray_engine import FAST, ROOT, records, run_cli, write_manifest

ray = pytest.importorskip("ray")


@pytest.mark.slow
def test_sigterm_stops_the_ray_driver_cleanly_and_the_rest_resumes(tmp_path: Path, ray_instance: str) -> None:
    manifest = write_manifest(tmp_path / "in", sources=16, per_source=2)  # 32 rows, one window per group
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pnp_batch", "run", str(manifest), "--out", str(out), "--engine", "ray",
           "--workers", "1", "--ray-address", ray_instance, *FAST]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (out / "images").is_dir() or not any((out / "images").glob("*.png")):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no image within 180 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, output[-3000:]
    assert "received SIGTERM" in output and "Traceback" not in output, output[-3000:]
    summary = json.loads(next((out / "runs").glob("*.json")).read_text())
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGTERM" and summary["engine"] == "ray"
    counts = summary["counts"]
    assert counts["failed"] == 0 and 1 <= counts["ok"] < 32 and counts["ok"] + counts["left_pending"] == 32
    recs = records(str(out))
    assert len(recs) == counts["ok"] and {r["status"] for r in recs} == {"ok"}  # the windows in flight finished
    assert not (out / "_lease.json").exists()

    assert run_cli(str(manifest), "--out", str(out), "--engine", "ray", "--workers", "1", *FAST) == 0
    recs = records(str(out))
    ok = Counter(r["id"] for r in recs if r["status"] == "ok")
    assert set(ok) == {f"s{s}-t{k}" for s in range(16) for k in range(2)} and max(ok.values()) == 1, ok
    assert not any(r["status"] == "failed" for r in recs)
