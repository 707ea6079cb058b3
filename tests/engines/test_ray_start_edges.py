"""The Ray engine's start: no cluster at --ray-address (exit 3 with a message, no traceback) and a
SIGTERM that lands while ray.init runs (Ray's own handler raises SystemExit(15) there): exit 143 with a
run summary, every row left to do."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from test_ray_engine import FAST, ROOT, run_cli, write_manifest


def _summaries(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]


def test_no_cluster_at_auto_exits_3_with_a_message(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    m = write_manifest(folder, sources=1, per_source=2)
    out = tmp_path / "out"
    # an empty Ray temp folder: `auto` finds no address file. `auto` also joins any gcs_server process it
    # sees on the machine, and this session's own Ray instance (test_ray_engine's fixture) may be running:
    # the run is started with that process scan answering "none", as on a machine without Ray.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(tmp_path / "ray-tmp"), OMP_NUM_THREADS="1")
    (tmp_path / "ray-tmp").mkdir()
    args = [str(m), "--out", str(out), *FAST, "--engine", "ray", "--ray-address", "auto"]
    code = ("import sys, ray._private.services as s; none = lambda: []; none.cache_clear = lambda: None; "
            "s.find_gcs_addresses = none; from pnp_batch.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "run", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "no Ray cluster at --ray-address auto" in proc.stderr
    assert "Traceback" not in proc.stderr
    (summary,) = _summaries(out)
    assert summary["status"] == "cluster_lost" and summary["counts"]["left_pending"] == 2


def test_sigterm_while_ray_starts_exits_143_with_a_summary(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    m = write_manifest(folder, sources=1, per_source=2)
    out = tmp_path / "out"
    started = []

    def init_cut_by_sigterm(*args, **kwargs):  # what Ray's handler does when SIGTERM lands inside ray.init
        started.append(kwargs.get("address"))
        raise SystemExit(signal.SIGTERM)

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init_cut_by_sigterm)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    assert run_cli(str(m), "--out", str(out), *FAST, "--engine", "ray") == 143
    assert started == ["local"]
    (summary,) = _summaries(out)
    assert summary["status"] == "interrupted" and summary["counts"]["left_pending"] == 2
    assert summary["counts"]["ok"] == 0
