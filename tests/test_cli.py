"""`pnp-batch run` end to end on the tiny model: outputs, resume, determinism, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pnp_batch.cli import main

FAST = ["--pipeline", "tiny", "--set", "steps=4", "--set", "inversion_steps=4", "--set", "resolution=64"]


def _sources(tmp_path, n=2):
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        small = rng.integers(0, 255, (8, 10 + 2 * i, 3), dtype=np.uint8)
        Image.fromarray(small).resize((80 + 16 * i, 64), Image.BICUBIC).save(tmp_path / f"s{i}.png")
        names.append(f"s{i}.png")
    return names


def _manifest(tmp_path, rows, name="m.parquet"):
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / name)
    return str(tmp_path / name)


def _rows(names):
    prompts = ["a photo of a fox", "a watercolor painting of a cat", "a photo at night"]
    return [
        {"id": f"{n[:-4]}-{j}", "image": n, "source_prompt": "a photo", "target_prompt": p, "batch": "b1"}
        for n in names
        for j, p in enumerate(prompts)
    ]


def _summary(out):
    runs = sorted((out / "runs").glob("*.json"))
    return json.loads(runs[-1].read_text())


def test_run_writes_contract_outputs_and_resumes(tmp_path, capsys):
    m = _manifest(tmp_path, _rows(_sources(tmp_path)))
    out = tmp_path / "out"
    assert main(["run", m, "--out", str(out), *FAST]) == 0
    images = sorted(p.name for p in (out / "images").iterdir())
    assert images == sorted(f"s{i}-{j}.png" for i in range(2) for j in range(3))
    table = pads.dataset(str(out / "results"), format="parquet").to_table()
    assert table.num_rows == 6 and set(table.column("status").to_pylist()) == {"ok"}
    for col in ("id", "status", "error", "output", "image", "source_prompt", "target_prompt", "negative_prompt",
                "seed", "pipeline", "config_hash", "model", "feature_key", "feature_cache_hit", "width", "height",
                "invert_seconds", "translate_seconds", "worker", "finished_at", "batch"):
        assert col in table.column_names, col
    rec = table.to_pylist()
    assert all("test model" in r["model"] for r in rec)  # outputs of the tiny model say so
    assert {(r["width"], r["height"]) for r in rec} == {(80, 64), (96, 64)}  # short side 64, aspect kept
    # one inversion per source: 3 rows share a feature key, only the first is a miss
    assert len({r["feature_key"] for r in rec}) == 2
    s = _summary(out)
    assert s["counts"]["ok"] == 6 and s["stats"]["unet"]["inversions"] == 2
    assert s["stats"]["unet"]["invert_calls"] == 2 * 4
    assert list((out / "report").glob("*.png")) and list((out / "report").glob("*.html"))
    first = {p.name: p.read_bytes() for p in (out / "images").iterdir()}

    # re-running does no work and writes no duplicate
    assert main(["run", m, "--out", str(out), *FAST]) == 0
    # ...a run with another config refuses, saying the rows were done with a different one (exit 2)...
    assert main(["run", m, "--out", str(out), *FAST, "--set", "guidance_scale=5", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "6 row(s)" in err and "another pipeline config" in err and "--keep-done" in err
    # ...and with --keep-done counts them done and plans nothing
    assert main(["run", m, "--out", str(out), *FAST, "--set", "guidance_scale=5", "--dry-run", "--keep-done"]) == 0
    printed = capsys.readouterr().out
    assert "already done: 6" in printed and "to do: 0" in printed
    s2 = _summary(out)  # the re-run's summary (a dry run writes none)
    assert s2["counts"] == {"manifest_rows": 6, "done_before": 6, "changed": 0, "kept_other_config": 0,
                            "attempted": 0, "ok": 0, "failed": 0, "companions": 0, "left_pending": 0}
    assert pads.dataset(str(out / "results"), format="parquet").to_table().num_rows == 6

    # --overwrite redoes them with the same bytes, reusing the stored features (no inversion)
    assert main(["run", m, "--out", str(out), *FAST, "--overwrite"]) == 0
    s3 = _summary(out)
    assert s3["counts"]["ok"] == 6 and s3["stats"]["unet"]["invert_calls"] == 0
    assert s3["stats"]["unet"]["cache_hits"] == 2
    assert {p.name: p.read_bytes() for p in (out / "images").iterdir()} == first


def test_new_prompts_reuse_features_with_zero_inversion_calls(tmp_path):
    names = _sources(tmp_path, 1)
    out = tmp_path / "out"
    m1 = _manifest(tmp_path, _rows(names)[:1], "m1.parquet")
    assert main(["run", m1, "--out", str(out), *FAST, "--no-report"]) == 0
    m2 = _manifest(tmp_path, [{"id": "new", "image": names[0], "target_prompt": "a photo of a dog"}], "m2.parquet")
    assert main(["run", m2, "--out", str(out), *FAST, "--no-report"]) == 0
    s = _summary(out)
    assert s["stats"]["unet"]["invert_calls"] == 0 and s["stats"]["unet"]["cache_hits"] == 1


def test_batch_of_k_equals_single_prompt_runs(tmp_path):
    names = _sources(tmp_path, 1)
    rows = _rows(names)
    out_k = tmp_path / "k"
    assert main(["run", _manifest(tmp_path, rows, "k.parquet"), "--out", str(out_k), *FAST, "--no-report"]) == 0
    for r in rows:
        out1 = tmp_path / f"one-{r['id']}"
        m = _manifest(tmp_path, [r], f"{r['id']}.parquet")
        assert main(["run", m, "--out", str(out1), *FAST, "--no-report"]) == 0
        a = np.asarray(Image.open(out_k / "images" / f"{r['id']}.png")).astype(int)
        b = np.asarray(Image.open(out1 / "images" / f"{r['id']}.png")).astype(int)
        # batched and single UNet calls differ only by float rounding order: at most 1 level, rarely
        assert np.abs(a - b).max() <= 1 and np.abs(a - b).mean() < 0.01


def test_row_redone_after_a_failure_gets_the_bytes_of_an_uninterrupted_run(tmp_path):
    """A row's bytes depend on the batch it shares (previous test: up to 1 level). A row that failed
    and is redone must share its batch with the same rows as in an uninterrupted run: its group's
    rows that are already ok go along as companions, translated again but neither written nor
    recorded. At 128 px the tiny model's rows differ when sampled alone (checked: the test fails
    without companions)."""
    names = _sources(tmp_path, 1)
    m = _manifest(tmp_path, _rows(names))
    args = [*FAST, "--set", "resolution=128", "--no-report"]
    ref = tmp_path / "ref"
    assert main(["run", m, "--out", str(ref), *args]) == 0
    out = tmp_path / "out"
    blocker = out / "images" / "s0-1.png"  # a directory where the image goes: that write fails
    blocker.mkdir(parents=True)
    (blocker / "x").write_text("x")
    assert main(["run", m, "--out", str(out), *args]) == 1
    first = {p.name: p.stat().st_mtime_ns for p in (out / "images").glob("*.png") if p.is_file()}
    assert sorted(first) == ["s0-0.png", "s0-2.png"]
    (blocker / "x").unlink()
    blocker.rmdir()
    assert main(["run", m, "--out", str(out), *args]) == 0
    s = _summary(out)
    assert s["counts"]["ok"] == 1 and s["counts"]["done_before"] == 2 and s["counts"]["companions"] == 2
    assert s["stats"]["unet"]["sample_elements"] == 4 * (1 + 2 * 3) - 1  # all 3 targets; the source branch 3 steps
    assert (out / "images" / "s0-1.png").read_bytes() == (ref / "images" / "s0-1.png").read_bytes()
    # the companions' images were not written again, and every row has exactly one ok record
    assert {n: (out / "images" / n).stat().st_mtime_ns for n in first} == first
    recs = pads.dataset(str(out / "results"), format="parquet").to_table().to_pylist()
    assert sorted(r["id"] for r in recs if r["status"] == "ok") == ["s0-0", "s0-1", "s0-2"]


def test_failed_rows_exit_1_and_are_recorded(tmp_path):
    names = _sources(tmp_path, 1)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    rows = _rows(names)[:1] + [
        {"id": "bad", "image": "bad.png", "source_prompt": "", "target_prompt": "x", "batch": "b"},
        {"id": "gone", "image": "missing.png", "source_prompt": "", "target_prompt": "x", "batch": "b"},
        {"id": "empty", "image": names[0], "source_prompt": "", "target_prompt": "  ", "batch": "b"},
    ]
    out = tmp_path / "out"
    assert main(["run", _manifest(tmp_path, rows), "--out", str(out), *FAST, "--no-report"]) == 1
    res = {r["id"]: r for r in pads.dataset(str(out / "results"), format="parquet").to_table().to_pylist()}
    assert res[rows[0]["id"]]["status"] == "ok"
    assert res["bad"]["status"] == "failed" and "image" in res["bad"]["error"]
    assert res["gone"]["status"] == "failed" and "not found" in res["gone"]["error"]
    assert res["empty"]["status"] == "failed" and "target_prompt" in res["empty"]["error"]
    assert not (out / "images" / "bad.png").exists()


def test_usage_errors_exit_2_and_write_nothing(tmp_path, capsys):
    m = _manifest(tmp_path, _rows(_sources(tmp_path, 1)))
    out = tmp_path / "out"
    assert main(["run", m, "--out", str(out), *FAST, "--set", "colour=red"]) == 2
    assert "unknown pipeline key 'colour'" in capsys.readouterr().err
    assert main(["run", m, "--out", str(out), *FAST, "--set", "inversion_steps=3"]) == 2
    assert main(["run", str(tmp_path / "nope.parquet"), "--out", str(out), *FAST]) == 2
    dup = _manifest(tmp_path, [{"id": "a", "image": "s0.png", "target_prompt": "x"}] * 2, "dup.parquet")
    assert main(["run", dup, "--out", str(out), *FAST]) == 2
    assert not out.exists()
    with pytest.raises(SystemExit) as e:
        main(["run", m])  # --out missing
    assert e.value.code == 2


def test_dry_run_loads_no_model(tmp_path, capsys):
    m = _manifest(tmp_path, _rows(_sources(tmp_path, 1)))
    assert main(["run", m, "--out", str(tmp_path / "o"), *FAST, "--dry-run"]) == 0
    assert "to do: 3" in capsys.readouterr().out
    assert not (tmp_path / "o").exists()


def test_module_entry_point_and_make_test_model(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pnp_batch", "--help"], capture_output=True, text=True, check=False)
    assert r.returncode == 0 and "make-test-model" in r.stdout
    assert main(["make-test-model", str(tmp_path / "tiny")]) == 0
    assert (tmp_path / "tiny" / "model_index.json").is_file()
    assert (tmp_path / "tiny" / "tokenizer" / "vocab.json").is_file()
