"""Where metrics are computed, end to end on the tiny models: `run --eval` in the worker, `pnp-batch eval`
afterwards (local and Ray Data), resumable, failures as data, status and the contact sheet."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pnp_batch.cli import main
from pnp_batch.config import load_config
from pnp_batch.eval.metrics import clip_score, structure_dist
from pnp_batch.io.images import decode_image, resize_source
from pnp_batch.io.metrics import SCORE_SCHEMA, read_all_scores, read_scores
from pnp_batch.io.results import ResultWriter, latest_results, write_run_summary

FAST = ["--pipeline", "tiny", "--set", "steps=4", "--set", "inversion_steps=4", "--set", "resolution=64"]
PROMPTS = ("a photo of a fox", "a watercolor painting of a cat")
SCORE_COLS = ("clip_score", "clip_score_source", "structure_dist")


def _sources(folder: Path, n: int = 2) -> list[str]:
    rng = np.random.default_rng(3)
    names = []
    for i in range(n):
        small = rng.integers(0, 256, (6, 7 + i, 3), dtype=np.uint8)
        # 90x72 and 110x88: resized to 80x64 by the pipeline (resolution 64), so preprocessing matters
        Image.fromarray(small).resize((90 + 20 * i, 72 + 16 * i), Image.BILINEAR).save(folder / f"s{i}.png")
        names.append(f"s{i}.png")
    return names


def _manifest(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"{n[:-4]}-{j}", "image": n, "source_prompt": "a photo", "target_prompt": p}
            for n in _sources(folder) for j, p in enumerate(PROMPTS)]
    pq.write_table(pa.Table.from_pylist(rows), folder / "m.parquet")
    return str(folder / "m.parquet")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_model_dir):
    """One `run --eval` over 2 sources x 2 prompts; (manifest folder, OUT)."""
    root = tmp_path_factory.mktemp("run-eval")
    manifest = _manifest(root / "in")
    out = root / "out"
    assert main(["run", manifest, "--out", str(out), *FAST, "--eval"]) == 0
    return root / "in", out


def _by_id(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in read_scores(str(out)).to_pylist()}


def _copy_without_scores(out: Path, dest: Path) -> Path:
    shutil.copytree(out, dest)
    shutil.rmtree(dest / "eval")
    return dest


def test_run_eval_scores_equal_the_metrics_on_the_written_images_and_prepared_sources(evaluated, metric_models):
    folder, out = evaluated
    files = sorted(p.name for p in (out / "eval").iterdir())
    run_id = latest_results(str(out), ["run_id"]).column("run_id")[0].as_py()
    assert files == [f"{run_id}-00000.parquet"]  # the run's own id
    summary = json.loads((out / "runs" / f"{run_id}.json").read_text())
    assert summary["counts"]["scored"] == 4 and summary["config"]["eval_clip_model"] == "tiny-clip"
    assert pq.read_schema(out / "eval" / files[0]).equals(SCORE_SCHEMA, check_metadata=False)
    scores = _by_id(out)
    results = {r["id"]: r for r in latest_results(str(out)).to_pylist()}
    assert sorted(scores) == sorted(results) and len(scores) == 4
    for rid, s in scores.items():
        assert s["status"] == "ok" and s["error"] is None and s["config_hash"] == results[rid]["config_hash"]
        assert (s["clip_model"], s["dino_model"]) == ("tiny-clip", "tiny-dino")
        assert s["clip_revision"].startswith("tiny-clip-v1-") and s["dino_revision"].startswith("tiny-dino-v1-")
    _assert_scores_are_the_definitions(folder, out, metric_models)
    assert len({round(s["structure_dist"], 6) for s in scores.values()}) > 1  # not a constant


def _assert_scores_are_the_definitions(folder: Path, out: Path, metric_models) -> None:
    """Each stored score equals clip_score / structure_dist on the written image and the source as the
    pipeline prepares it (decoded, resized to resolution 64 along the short side)."""
    scores = _by_id(out)
    for res in latest_results(str(out)).to_pylist():
        output = Image.open(res["output"]).convert("RGB")
        source = resize_source(decode_image((folder / Path(res["image"]).name).read_bytes(), 10**8), 64,
                               "short_side")
        assert source.size == output.size
        want = {
            "clip_score": clip_score(metric_models, [output], [res["target_prompt"]])[0],
            "clip_score_source": clip_score(metric_models, [source], [res["target_prompt"]])[0],
            "structure_dist": structure_dist(metric_models, [source], [output])[0],
        }
        for col in SCORE_COLS:
            assert scores[res["id"]][col] == pytest.approx(want[col], rel=1e-5, abs=1e-6), (res["id"], col)


def test_eval_after_run_gives_the_numbers_of_run_eval(evaluated, tmp_path):
    _, out = evaluated
    copy = _copy_without_scores(out, tmp_path / "out")
    assert main(["eval", str(copy)]) == 0  # the metric models of the run's config: tiny-clip / tiny-dino
    want, got = _by_id(out), _by_id(copy)
    assert sorted(got) == sorted(want)
    for rid in want:
        for col in SCORE_COLS:
            assert got[rid][col] == pytest.approx(want[rid][col], rel=1e-5, abs=1e-6), (rid, col)
    assert main(["eval", str(copy)]) == 0  # nothing left to score: no second record
    assert read_all_scores(str(copy)).num_rows == 4


def test_run_eval_with_stored_features_prepares_the_source_itself(evaluated, tmp_path, metric_models):
    """Features from the store: the source is not decoded for inversion, so the scorer prepares it."""
    folder, out = evaluated
    copy = _copy_without_scores(out, tmp_path / "out")
    assert main(["run", str(folder / "m.parquet"), "--out", str(copy), *FAST, "--eval", "--overwrite",
                 "--no-report"]) == 0
    assert set(latest_results(str(copy), ["feature_cache_hit"]).column("feature_cache_hit").to_pylist()) == {True}
    want, got = _by_id(out), _by_id(copy)
    for rid in want:
        for col in SCORE_COLS:
            assert got[rid][col] == pytest.approx(want[rid][col], rel=1e-5, abs=1e-6), (rid, col)


def test_status_prints_the_metric_statistics_per_setting(evaluated, capsys):
    _, out = evaluated
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    cfg_hash = load_config("tiny", ["steps=4", "inversion_steps=4", "resolution=64"]).hash()
    assert f"setting {cfg_hash}" in text
    clip = [s["clip_score"] for s in _by_id(out).values()]
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("clip_score "))
    assert line.split()[1:4] == ["4", f"{np.mean(clip):.2f}", f"{np.median(clip):.2f}"]


def test_the_contact_sheet_shows_the_scores(evaluated):
    _, out = evaluated
    html = next((out / "report").glob("*.html")).read_text()
    s = _by_id(out)["s0-0"]
    assert f"CLIP {s['clip_score']:.1f}" in html and f"structure {s['structure_dist']:.4f}" in html
    assert next((out / "report").glob("*.png")).stat().st_size > 0


def test_unreadable_images_are_eval_failures_and_the_others_are_scored(evaluated, tmp_path):
    _, out = evaluated
    copy = _copy_without_scores(out, tmp_path / "out")
    (copy / "images" / "s0-0.png").write_bytes(b"not a png")
    # the records name the original's images: point them at the copy's, and s1's rows at a missing source
    table = latest_results(str(copy))
    shutil.rmtree(copy / "results")
    with ResultWriter(str(copy), "r-moved") as w:
        for rec in table.to_pylist():
            src = str(tmp_path / "gone.png") if rec["id"].startswith("s1-") else rec["image"]
            w.add({**rec, "image": src, "output": str(copy / "images" / f"{rec['id']}.png")})
    assert main(["eval", str(copy)]) == 1
    got = _by_id(copy)
    assert got["s0-1"]["status"] == "ok" and got["s0-1"]["clip_score"] == pytest.approx(
        _by_id(out)["s0-1"]["clip_score"], rel=1e-5)
    assert got["s0-0"]["status"] == "failed" and "output image unreadable" in got["s0-0"]["error"]
    for rid in ("s1-0", "s1-1"):
        assert got[rid]["status"] == "failed" and "source image unreadable" in got[rid]["error"]
        assert "gone.png" in got[rid]["error"]
    assert main(["eval", str(copy)]) == 1  # the failures are tried again; the ok row is not
    counts = Counter((r["id"], r["status"]) for r in read_all_scores(str(copy)).to_pylist())
    assert counts[("s0-1", "ok")] == 1 and counts[("s0-0", "failed")] == 2


def test_a_metric_model_that_cannot_be_loaded_exits_2_with_nothing_written(evaluated, tmp_path, capsys):
    folder, out = evaluated
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    copy = _copy_without_scores(out, tmp_path / "out")
    assert main(["eval", str(copy), "--set", f"eval_clip_model={empty}"]) == 2
    assert "could not load the CLIP metric model" in capsys.readouterr().err
    assert not (copy / "eval").exists()
    fresh = tmp_path / "fresh"
    assert main(["run", str(folder / "m.parquet"), "--out", str(fresh), *FAST, "--eval",
                 "--set", f"eval_dino_model={empty}"]) == 2
    assert "could not load the DINO metric model" in capsys.readouterr().err
    assert not any((fresh / d).exists() for d in ("results", "images", "eval"))
    assert main(["eval", str(tmp_path / "nothing-here")]) == 2
    assert "has no results" in capsys.readouterr().err
    assert main(["eval", str(copy), "--set", "steps=3"]) == 2  # a key that does not apply to eval


def test_source_bytes_rows_are_scored_from_memory_by_run_eval_and_partially_by_eval(tmp_path, tiny_model_dir):
    folder = tmp_path / "in"
    folder.mkdir()
    (name,) = _sources(folder, 1)
    pq.write_table(pa.Table.from_pylist([{"id": "b0", "image_bytes": (folder / name).read_bytes(),
                                          "target_prompt": PROMPTS[0]}]), folder / "m.parquet")
    out = tmp_path / "out"
    assert main(["run", str(folder / "m.parquet"), "--out", str(out), *FAST, "--eval", "--no-report"]) == 0
    full = _by_id(out)["b0"]
    assert all(full[c] is not None for c in SCORE_COLS) and full["error"] is None
    copy = _copy_without_scores(out, tmp_path / "copy")
    assert main(["eval", str(copy)]) == 0
    part = _by_id(copy)["b0"]
    assert part["status"] == "ok" and part["clip_score"] == pytest.approx(full["clip_score"], rel=1e-5)
    assert part["clip_score_source"] is None and part["structure_dist"] is None
    assert "image_bytes" in part["error"]


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for this module's Ray tests (the engines reuse an initialised Ray)."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        yield
        return
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=128 * 1024 * 1024, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_eval_on_ray_data_equals_eval_here(evaluated, tmp_path, local_ray):
    _, out = evaluated
    copy = _copy_without_scores(out, tmp_path / "out")
    assert main(["eval", str(copy), "--engine", "ray", "--workers", "1"]) == 0
    want, got = _by_id(out), _by_id(copy)
    assert sorted(got) == sorted(want)
    for rid in want:
        for col in SCORE_COLS:
            assert got[rid][col] == pytest.approx(want[rid][col], rel=1e-5, abs=1e-6), (rid, col)
    bad = _copy_without_scores(copy, tmp_path / "bad")
    (tmp_path / "empty").mkdir()
    assert main(["eval", str(bad), "--engine", "ray", "--set", f"eval_dino_model={tmp_path / 'empty'}"]) == 2
    assert not (bad / "eval").exists()  # checked on a Ray worker before the dataset starts


# --- killed midway and run again -------------------------------------------------------------------

N_ROWS = 40


def _fake_output(out: Path) -> list[str]:
    """An output of N_ROWS ok rows over 4 sources without running the diffusion model (scoring is
    what this tests): images, records, and a run summary with the tiny config."""
    cfg = load_config("tiny", ["resolution=64"])
    folder = out.parent / "in"
    folder.mkdir()
    names = _sources(folder, 2)
    rng = np.random.default_rng(0)
    (out / "images").mkdir(parents=True)
    ids = []
    with ResultWriter(str(out), "r0") as w:
        for i in range(N_ROWS):
            rid = f"row{i:03d}"
            src = folder / names[i % 2]
            w_, h_ = resize_source(Image.open(src), 64, "short_side").size
            arr = rng.integers(0, 256, (h_ // 8, w_ // 8, 3), dtype=np.uint8)
            img = Image.fromarray(arr).resize((w_, h_), Image.BILINEAR)
            buf = io.BytesIO()
            img.save(buf, "PNG")
            (out / "images" / f"{rid}.png").write_bytes(buf.getvalue())
            w.add({"id": rid, "status": "ok", "output": str(out / "images" / f"{rid}.png"), "image": str(src),
                   "target_prompt": PROMPTS[i % 2], "config_hash": cfg.hash()})
            ids.append(rid)
    write_run_summary(str(out), "r0", {"config": cfg.to_dict(), "config_hash": cfg.hash(), "started_at": "x",
                                        "manifest": str(folder / "m.parquet")})  # eval reads sources under its folder
    return ids


def _eval_proc(out: Path) -> subprocess.Popen:
    """`pnp-batch eval OUT` in a subprocess writing a shard every 2 scores (2 rows per batch)."""
    code = ("import sys; import pnp_batch.engines.evaluate as e; e.SHARD_ROWS = 2; e.BATCH_ROWS = 2; "
            "from pnp_batch.cli import main; sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", code, "eval", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_eval_killed_midway_and_run_again_scores_every_row_exactly_once(tmp_path, metric_models):
    out = tmp_path / "out"
    ids = _fake_output(out)
    proc = _eval_proc(out)
    try:
        deadline = time.monotonic() + 120
        while len(list((out / "eval").glob("*.parquet")) if (out / "eval").is_dir() else []) < 3:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no score shard within 120 s"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "eval finished before it could be killed"
    before = read_all_scores(str(out)).num_rows
    assert 0 < before < N_ROWS
    assert main(["eval", str(out)]) == 0
    every = read_all_scores(str(out)).to_pylist()
    counts = Counter((r["id"], r["config_hash"]) for r in every if r["status"] == "ok")
    assert sorted(i for i, _ in counts) == ids  # none lost
    assert max(counts.values()) == 1  # none twice
    assert len(every) == N_ROWS


@pytest.mark.slow
def test_run_eval_on_the_ray_engine_scores_in_the_actors_like_the_local_engine(evaluated, tmp_path, metric_models,
                                                                               local_ray):
    """The actors run torch with more threads than this test process, so their images can differ in the
    last bits (README): their scores are checked against the definitions on their own images."""
    folder, out = evaluated
    ray_out = tmp_path / "ray-out"
    assert main(["run", str(folder / "m.parquet"), "--out", str(ray_out), *FAST, "--eval", "--engine", "ray",
                 "--workers", "1", "--no-report"]) == 0
    want, got = _by_id(out), _by_id(ray_out)
    assert sorted(got) == sorted(want)
    run_id = latest_results(str(ray_out), ["run_id"]).column("run_id")[0].as_py()
    assert [p.name for p in (ray_out / "eval").iterdir()] == [f"{run_id}-00000.parquet"]
    _assert_scores_are_the_definitions(folder, ray_out, metric_models)
    for rid in want:
        assert got[rid]["clip_score"] == pytest.approx(want[rid]["clip_score"], abs=0.1)  # nearly the same images


def test_eval_of_an_output_on_s3(evaluated, s3_bucket):
    """An output on an object store: eval reads its images and writes its score shards through io/storage."""
    folder, out = evaluated
    remote = f"{s3_bucket}/out"
    assert main(["run", str(folder / "m.parquet"), "--out", remote, *FAST, "--no-report"]) == 0
    assert main(["eval", remote]) == 0
    got = {r["id"]: r for r in read_scores(remote).to_pylist()}
    assert sorted(got) == sorted(_by_id(out)) and {r["status"] for r in got.values()} == {"ok"}
    for rid, want in _by_id(out).items():  # the same images as the local run: the same scores
        assert got[rid]["structure_dist"] == pytest.approx(want["structure_dist"], rel=1e-5, abs=1e-6)
    assert main(["eval", remote]) == 0 and read_all_scores(remote).num_rows == 4  # nothing scored twice
