"""The crash test: a run SIGKILLed at any moment, then started again, ends exactly as an
uninterrupted run does (every row ok once, every image present, the same bytes), and the killed
run never leaves a partial object that a reader would take for a result.

Output bytes on a CPU depend on torch's thread count, so every run here is a subprocess with
OMP_NUM_THREADS=1 (the reference included).
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pnp_batch.io.results import latest_results, read_results

FAST = ["--pipeline", "tiny", "--set", "steps=4", "--set", "inversion_steps=4", "--set", "resolution=64"]
N_SOURCES = 6
PROMPTS = ("a photo of a fox", "a watercolor painting of a cat")
IDS = sorted(f"s{i}-{j}" for i in range(N_SOURCES) for j in range(len(PROMPTS)))
START_TIMEOUT = 120.0  # the subprocess imports torch and loads the model before the first image


def _inputs(folder: Path) -> Path:
    """6 small sources x 2 prompts = 12 rows; the manifest sits next to its images."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    rows = []
    for i in range(N_SOURCES):
        arr = rng.integers(0, 256, (48, 56 + 8 * i, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"s{i}.png")
        for j, p in enumerate(PROMPTS):
            rows.append({"id": f"s{i}-{j}", "image": f"s{i}.png", "source_prompt": "a photo", "target_prompt": p})
    pq.write_table(pa.Table.from_pylist(rows), folder / "manifest.parquet")
    return folder / "manifest.parquet"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _cmd(manifest: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "pnp_batch", "run", str(manifest), "--out", str(out), *FAST, "--no-report"]


def _run(manifest: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(manifest, out), check=False, env=_env(), capture_output=True, text=True,
                          timeout=300)


def _visible(folder: Path, suffix: str) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.endswith(suffix) and not p.name.startswith("."))


def _images(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in _visible(out / "images", ".png")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """Inputs and the images of one uninterrupted run."""
    root = tmp_path_factory.mktemp("resume-ref")
    manifest = _inputs(root / "in")
    out = root / "out"
    r = _run(manifest, out)
    assert r.returncode == 0, r.stderr[-3000:]
    images = _images(out)
    assert sorted(images) == [f"{i}.png" for i in IDS]
    return manifest, images


def _kill_point_reached(out: Path, when: str) -> bool:
    images = _visible(out / "images", ".png")
    if when == "first-image":
        return len(images) >= 1
    if when == "half-images":
        return len(images) >= len(IDS) // 2
    if when == "results-shard":
        return bool(_visible(out / "results", ".parquet"))
    raise AssertionError(when)


def _assert_no_visible_partial(out: Path) -> None:
    for p in _visible(out / "images", ".png"):
        with Image.open(io.BytesIO(p.read_bytes())) as im:
            im.load()  # a half-written PNG would fail to decode here
            assert im.format == "PNG" and im.size[0] > 0
    if (out / "results").is_dir():
        # hidden temp files (".name.tmp") are ignored by pyarrow; every visible shard must read
        pads.dataset(str(out / "results"), format="parquet").to_table()
        read_results(str(out))


@pytest.mark.parametrize("when", ["first-image", "half-images", "results-shard"])
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path, reference, when):
    ref_manifest, ref_images = reference
    out = tmp_path / "out"
    proc = subprocess.Popen(_cmd(ref_manifest, out), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _kill_point_reached(out, when):
            if proc.poll() is not None:
                break  # finished before the kill point: still a valid (if late) "kill"
            assert time.monotonic() < deadline, f"no {when} within {START_TIMEOUT}s"
            time.sleep(0.005)
        proc.kill()  # SIGKILL: no handler, no cleanup
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _visible(out / "images", ".png"), "the kill point was never reached"
    if when != "results-shard":  # the shard is written at the very end: the run may have exited first
        assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-way"
    _assert_no_visible_partial(out)

    r = _run(ref_manifest, out)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_no_visible_partial(out)

    latest = latest_results(str(out)).to_pylist()
    assert sorted(rec["id"] for rec in latest) == IDS  # every id exactly once
    assert {rec["status"] for rec in latest} == {"ok"}
    every = read_results(str(out)).to_pylist()
    ok_counts = Counter(rec["id"] for rec in every if rec["status"] == "ok")
    assert max(ok_counts.values()) == 1, f"duplicate ok records: {ok_counts}"
    assert set(ok_counts) == set(IDS)
    assert _images(out) == ref_images  # every image present, byte-identical to the uninterrupted run


def _run_summaries(out: Path) -> list[dict]:
    import json

    return sorted((json.loads(p.read_text()) for p in _visible(out / "runs", ".json")), key=lambda d: d["started_at"])


@pytest.mark.parametrize("signals", [1, 2])
def test_sigterm_then_resume_equals_uninterrupted_run(tmp_path, reference, signals):
    """SIGTERM midway (a pod eviction): the run finishes the groups in flight, writes their records and a
    summary marked interrupted, gives back the lease and exits 143; a second SIGTERM exits at once. Either
    way nothing visible is partial, and the resumed run ends as an uninterrupted one: every id ok exactly
    once, the same bytes."""
    ref_manifest, ref_images = reference
    out = tmp_path / "out"
    proc = subprocess.Popen(_cmd(ref_manifest, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _kill_point_reached(out, "first-image"):
            assert proc.poll() is None, "the run ended before the signal: " + proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline, f"no image within {START_TIMEOUT}s"
            time.sleep(0.005)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
        reader.start()
        if signals == 2:  # the second signal once the first is acknowledged: signals do not queue
            while not any("received SIGTERM" in line for line in lines) and proc.poll() is None:
                assert time.monotonic() - sent < 60, "the first SIGTERM was never acknowledged"
                time.sleep(0.005)
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        reader.join(timeout=10)
        err = "".join(lines)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err[-3000:]
    _assert_no_visible_partial(out)
    assert not (out / "_lease.json").exists() or signals == 2  # given back (a second signal may leave it)
    if signals == 1:
        assert "Traceback" not in err
        (summary,) = _run_summaries(out)
        assert summary["status"] == "interrupted" and summary["signal"] == "SIGTERM", summary
        counts = summary["counts"]
        assert counts["ok"] >= 1 and counts["failed"] == 0
        assert counts["ok"] + counts["left_pending"] == len(IDS)
        assert counts["left_pending"] >= 1, "the signal came too late to leave anything pending"
        recorded = read_results(str(out)).to_pylist()
        assert len(recorded) == counts["ok"] and {r["status"] for r in recorded} == {"ok"}
        assert len(_images(out)) == counts["ok"]  # the groups in flight were finished: images with records
    else:  # the resume after an exit like this one is the SIGKILL test's
        assert "exiting now" in err and took < 10
        assert not _visible(out / "runs", ".json")  # a second signal writes nothing more
        return

    r = _run(ref_manifest, out)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_no_visible_partial(out)
    latest = latest_results(str(out)).to_pylist()
    assert sorted(rec["id"] for rec in latest) == IDS and {rec["status"] for rec in latest} == {"ok"}
    ok_counts = Counter(rec["id"] for rec in read_results(str(out)).to_pylist() if rec["status"] == "ok")
    assert set(ok_counts) == set(IDS) and max(ok_counts.values()) == 1, f"duplicate ok records: {ok_counts}"
    assert _images(out) == ref_images
    assert _run_summaries(out)[-1]["status"] == "finished"
