"""Resume by work key, end to end through the CLI on the tiny model: a grid grown and shrunk across runs,
a row corrected under the same id, a config change under each of the three choices, CSV text columns,
rows with both image and image_bytes, a pass-through column whose type changes (docs/resume.md)."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from PIL import Image

from pnp_batch.cli import main

FAST = ["--pipeline", "tiny", "--set", "steps=3", "--set", "inversion_steps=3", "--set", "resolution=64",
        "--no-report"]


def _img(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


def _records(out: Path) -> list[dict]:
    return ds.dataset(str(out / "results")).to_table().to_pylist()


def _last_counts(out: Path) -> dict:
    docs = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    return max(docs, key=lambda d: d["started_at"])["counts"]


def test_grid_grown_and_shrunk_makes_each_setting_once(tmp_path, capsys):
    _img(tmp_path / "a.png", 1)
    (tmp_path / "m.csv").write_text("id,image,source_prompt,target_prompt\nrow7,a.png,a photo,a statue\n")
    out = tmp_path / "out"
    run = ["run", str(tmp_path / "m.csv"), "--out", str(out), *FAST]
    assert main([*run, "--sweep", "pnp_f_t=0.4,0.8"]) == 0
    assert main([*run, "--sweep", "pnp_f_t=0.4,0.6,0.8"]) == 0  # grown: only 0.6 is made
    c = _last_counts(out)
    assert (c["done_before"], c["ok"]) == (2, 1)
    capsys.readouterr()
    assert main([*run, "--sweep", "pnp_f_t=0.6,0.8", "--dry-run"]) == 0  # shrunk: both done
    assert "already done: 2\nto do: 0" in capsys.readouterr().out
    assert main([*run, "--sweep", "pnp_f_t=0.5,0.6", "--dry-run"]) == 0  # a new point is to do
    assert "already done: 1\nto do: 1" in capsys.readouterr().out
    recs = _records(out)
    ids = sorted(r["id"] for r in recs)
    assert ids == ["row7.ft0.4", "row7.ft0.6", "row7.ft0.8"]  # every (row, setting) exactly once
    by_id = {r["id"]: r for r in recs}
    assert by_id["row7.ft0.6"]["pnp_f_t"] == 0.6 and by_id["row7.ft0.6"]["setting"] == "pnp_f_t=0.6"
    # the point made by the grown run equals a fresh run of the whole grid, byte for byte
    fresh = tmp_path / "fresh"
    assert main(["run", str(tmp_path / "m.csv"), "--out", str(fresh), *FAST, "--sweep", "pnp_f_t=0.4,0.6,0.8"]) == 0
    got = (out / "images" / "row7.ft0.6.png").read_bytes()
    assert got == (fresh / "images" / "row7.ft0.6.png").read_bytes()
    assert by_id["row7.ft0.6"]["output_sha256"] == hashlib.sha256(got).hexdigest()
    # adding a key makes every point new (none ran at guidance_scale 5)
    assert main([*run, "--sweep", "pnp_f_t=0.4,0.8", "--sweep", "guidance_scale=5,7.5", "--dry-run"]) == 0
    assert "already done: 0\nto do: 4" in capsys.readouterr().out


def test_row_corrected_upstream_is_redone(tmp_path, capsys):
    _img(tmp_path / "a.png", 1)
    _img(tmp_path / "b.png", 2)
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("id,image,target_prompt\nr1,a.png,a cat\nr2,a.png,a dog\n")
    b.write_text("id,image,target_prompt\nr1,b.png,a red cat\nr2,a.png,a dog\n")
    out = tmp_path / "out"
    assert main(["run", str(a), "--out", str(out), *FAST]) == 0
    first = (out / "images" / "r1.png").read_bytes()
    assert main(["run", str(b), "--out", str(out), *FAST]) == 0
    c = _last_counts(out)
    assert (c["done_before"], c["changed"], c["ok"]) == (1, 1, 1)
    recs = [r for r in _records(out) if r["id"] == "r1"]
    assert len(recs) == 2  # the old record stays in the history
    latest = max(recs, key=lambda r: r["finished_at"])
    now = (out / "images" / "r1.png").read_bytes()
    assert latest["target_prompt"] == "a red cat" and now != first
    assert latest["output_sha256"] == hashlib.sha256(now).hexdigest()
    assert latest["image_sha256"] == hashlib.sha256((tmp_path / "b.png").read_bytes()).hexdigest()
    assert main(["run", str(b), "--out", str(out), *FAST]) == 0  # and then it is done
    assert _last_counts(out)["attempted"] == 0
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "done: 2\n" in text and "pending: 0 " in text


def test_config_change_is_a_stated_choice(tmp_path, capsys):
    _img(tmp_path / "a.png", 1)
    m = tmp_path / "m.csv"
    m.write_text("id,image,target_prompt\nr1,a.png,a cat\nr2,a.png,a dog\n")
    out = tmp_path / "out"
    assert main(["run", str(m), "--out", str(out), *FAST]) == 0
    other = [*FAST, "--set", "guidance_scale=5"]
    capsys.readouterr()
    assert main(["run", str(m), "--out", str(out), *other]) == 2  # neither flag: exit 2, nothing done
    err = capsys.readouterr().err
    assert "2 row(s)" in err and "--overwrite" in err and "--keep-done" in err
    assert len(_records(out)) == 2
    assert main(["run", str(m), "--out", str(out), *other, "--dry-run"]) == 2
    assert main(["run", str(m), "--out", str(out), *other, "--keep-done"]) == 0
    assert _last_counts(out)["attempted"] == 0 and len(_records(out)) == 2
    assert main(["run", str(m), "--out", str(out), *other, "--overwrite"]) == 0
    assert _last_counts(out)["ok"] == 2
    assert {r["guidance_scale"] for r in _records(out)} == {7.5, 5.0}
    assert main(["run", str(m), "--out", str(out), *other]) == 0  # the new config is now the one done
    assert _last_counts(out)["attempted"] == 0
    assert main(["run", str(m), "--out", str(out), *FAST, "--overwrite", "--keep-done"]) == 2


def test_csv_text_columns_and_image_bytes_recorded_as_used(tmp_path):
    _img(tmp_path / "a.png", 1)
    (tmp_path / "m.csv").write_text(
        "id,image,target_prompt,zip,country,seed\nNA,a.png,a cat,02134,NA,\nnull,a.png,a dog,00001,null,NA\n")
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "m.csv"), "--out", str(out), *FAST]) == 0
    t = ds.dataset(str(out / "results")).to_table()
    assert t.schema.field("zip").type == pa.string()
    got = {r["id"]: (r["zip"], r["country"]) for r in t.to_pylist()}
    assert got == {"NA": ("02134", "NA"), "null": ("00001", "null")}
    # two rows of one source (its bytes read once, for both): each record names the file
    assert {r["image"] for r in t.to_pylist()} == {str(tmp_path / "a.png")}

    # image and image_bytes in one row: the bytes win, and the record says so
    buf = io.BytesIO()
    Image.open(_img(tmp_path / "b.png", 2)).save(buf, format="PNG")
    pq.write_table(pa.table({"id": ["both"], "image": ["a.png"], "image_bytes": [buf.getvalue()],
                             "target_prompt": ["a cat"]}), tmp_path / "m.parquet")
    out2 = tmp_path / "out2"
    assert main(["run", str(tmp_path / "m.parquet"), "--out", str(out2), *FAST]) == 0
    (rec,) = _records(out2)
    assert rec["image"] == "<image_bytes>"
    assert rec["image_sha256"] == hashlib.sha256(buf.getvalue()).hexdigest()


def test_passthrough_type_change_exits_2_before_work(tmp_path, capsys):
    _img(tmp_path / "a.png", 1)
    pq.write_table(pa.table({"id": ["r1"], "image": ["a.png"], "target_prompt": ["a cat"], "tag": [1]}),
                   tmp_path / "m1.parquet")
    pq.write_table(pa.table({"id": ["r2"], "image": ["a.png"], "target_prompt": ["a cat"], "tag": ["x"]}),
                   tmp_path / "m2.parquet")
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "m1.parquet"), "--out", str(out), *FAST]) == 0
    capsys.readouterr()
    assert main(["run", str(tmp_path / "m2.parquet"), "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert "'tag'" in err and "string" in err and "int64" in err
    assert ds.dataset(str(out / "results")).count_rows() == 1


def test_edges_out_inside_manifest_duplicates_blank_prompts_status(tmp_path, capsys):
    _img(tmp_path / "a.png", 1)
    folder = tmp_path / "manifest"
    folder.mkdir()
    pq.write_table(pa.table({"id": ["r1", "r2"], "image": ["../a.png"] * 2, "target_prompt": ["a", "b"]}),
                   folder / "part-0.parquet")
    pq.write_table(pa.table({"id": ["r3", "r1"], "image": ["../a.png"] * 2, "target_prompt": ["c", "d"]}),
                   folder / "part-1.parquet")
    capsys.readouterr()
    assert main(["run", str(folder), "--out", str(folder / "out"), *FAST, "--dry-run"]) == 2
    assert "inside the manifest" in capsys.readouterr().err
    assert main(["run", str(folder), "--out", str(tmp_path / "out"), *FAST, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "'r1' (rows 0 (row 0 of" in err and "part-0.parquet" in err and "3 (row 1 of" in err
    assert "part-1.parquet" in err

    # a prompt of only invisible characters is empty: validate and run --dry-run agree (exit 2)
    m = tmp_path / "m.csv"
    m.write_text("id,image,target_prompt\nr1,a.png,\u200b \ufeff\nr2,a.png,a cat\n", encoding="utf-8")
    assert main(["validate", str(m)]) == 2
    assert "empty target_prompt" in capsys.readouterr().out
    assert main(["run", str(m), "--out", str(tmp_path / "o2"), *FAST, "--dry-run"]) == 2
    assert "empty target_prompt" in capsys.readouterr().out

    assert main(["status", str(tmp_path / "missing")]) == 2
    assert "output not found" in capsys.readouterr().err


def test_ray_engine_redoes_a_corrected_row_and_a_new_grid_point(tmp_path):
    """The Ray engine plans from the same work keys: a corrected row and a grown grid's new point are
    made, the rest is kept, and every latest record names the bytes of its image."""
    _img(tmp_path / "a.png", 1)
    _img(tmp_path / "b.png", 2)
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("id,image,target_prompt\nr1,a.png,a cat\nr2,a.png,a dog\n")
    b.write_text("id,image,target_prompt\nr1,b.png,a red cat\nr2,a.png,a dog\n")
    out = tmp_path / "out"
    ray_run = ["--engine", "ray", "--workers", "1"]
    assert main(["run", str(a), "--out", str(out), *FAST, "--sweep", "pnp_f_t=0.4,0.8", *ray_run]) == 0
    assert main(["run", str(b), "--out", str(out), *FAST, "--sweep", "pnp_f_t=0.4,0.6,0.8", *ray_run]) == 0
    c = _last_counts(out)
    # r1: both old points changed (new image) + its new point; r2: only its new point
    assert (c["done_before"], c["changed"], c["ok"]) == (2, 2, 4)
    recs = _records(out)
    latest: dict[str, dict] = {}
    for r in sorted(recs, key=lambda r: r["finished_at"]):
        latest[r["id"]] = r
    assert sorted(latest) == [f"{i}.ft{v}" for i in ("r1", "r2") for v in ("0.4", "0.6", "0.8")]
    assert all(r["status"] == "ok" for r in latest.values())
    assert latest["r1.ft0.4"]["image_sha256"] == hashlib.sha256((tmp_path / "b.png").read_bytes()).hexdigest()
    for rid, r in latest.items():
        got = (out / "images" / f"{rid}.png").read_bytes()
        assert r["output_sha256"] == hashlib.sha256(got).hexdigest(), rid
