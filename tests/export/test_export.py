"""`pnp-batch export` end to end on a real `run --eval` of the tiny model: the row set equals DuckDB's query on
OUT/results and OUT/eval, the real readers (webdataset, datasets) read every format back with the pixels of
OUT/images, a re-run writes the same bytes and skips finished shards, bad input is exit 2 or a skipped row."""

from __future__ import annotations

import datetime as dt
import glob
import hashlib
import io
import json
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pnp_batch.cli import main
from pnp_batch.export.samples import Prep, SampleReader, Skipped
from pnp_batch.export.writers import sample_key
from pnp_batch.io.images import decode_image, resize_source
from pnp_batch.io.metrics import ScoreWriter
from pnp_batch.io.results import ResultWriter, latest_results

FAST = ["--pipeline", "tiny", "--set", "steps=4", "--set", "inversion_steps=4", "--set", "resolution=64"]
PROMPTS = ("a photo of a fox", "a watercolor painting of a cat")
WHERES = (
    None,
    "status = 'ok'",
    "status = 'ok' AND clip_gain > 0",
    "structure_dist < 0.43 OR eval_status IS NULL",
    "clip_score > 30 AND target_prompt LIKE '%fox%'",
    "id IN ('s0.0', 'bad') OR clip_gain < -100",
)


@pytest.fixture(scope="module")
def run_out(tmp_path_factory, tiny_model_dir) -> Path:
    """A `run --eval` over 3 sources x 2 prompts (ids with dots) and a row whose image is missing; then an older
    failed record of s0.0 and a newer failed score of s0.1 (the view takes each row's latest record and its
    latest ok score)."""
    root = tmp_path_factory.mktemp("export")
    folder = root / "in"
    folder.mkdir()
    rng = np.random.default_rng(5)
    rows = []
    for i in range(3):
        small = rng.integers(0, 256, (6, 7 + i, 3), dtype=np.uint8)
        Image.fromarray(small).resize((90 + 10 * i, 72), Image.BILINEAR).save(folder / f"s{i}.png")
        rows += [{"id": f"s{i}.{j}", "image": f"s{i}.png", "source_prompt": "a photo", "target_prompt": p}
                 for j, p in enumerate(PROMPTS)]
    rows.append({"id": "bad", "image": "missing.png", "source_prompt": "x", "target_prompt": "a dog"})
    pq.write_table(pa.Table.from_pylist(rows), folder / "m.parquet")
    out = root / "out"
    assert main(["run", str(folder / "m.parquet"), "--out", str(out), *FAST, "--eval", "--no-report"]) == 1
    latest = {r["id"]: r for r in latest_results(str(out)).to_pylist()}
    old = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)
    with ResultWriter(str(out), "zz-old") as w:  # sorts last by name, but is older: not the latest
        w.add({**{k: v for k, v in latest["s0.0"].items() if k in ("id", "image", "target_prompt", "config_hash")},
               "status": "failed", "error": "an older attempt", "finished_at": old})
    with ScoreWriter(str(out), "zz-eval") as w:  # a newer failure does not hide an ok score
        w.add({"id": "s0.1", "config_hash": latest["s0.1"]["config_hash"], "status": "failed", "error": "later"})
    return out


def duckdb_ids(out: Path, where: str | None) -> list[str]:
    """The same filter, written directly against the Parquet files with DuckDB (docs/quality.md's join)."""
    sql = f"""
    WITH r AS (
      SELECT * EXCLUDE (filename, file_row_number)
      FROM read_parquet('{out}/results/*.parquet', union_by_name=true, filename=true, file_row_number=true)
      QUALIFY row_number() OVER (PARTITION BY id ORDER BY finished_at DESC, filename DESC, file_row_number DESC) = 1
    ), e AS (
      SELECT * FROM read_parquet('{out}/eval/*.parquet', filename=true, file_row_number=true)
      QUALIFY row_number() OVER (PARTITION BY id, config_hash ORDER BY (status = 'ok') DESC, scored_at DESC,
                                 filename DESC, file_row_number DESC) = 1
    ), rows AS (
      SELECT r.*, e.status AS eval_status, e.error AS eval_error, e.clip_score, e.clip_score_source,
             e.structure_dist, e.clip_model, e.scored_at, e.clip_score - e.clip_score_source AS clip_gain
      FROM r LEFT JOIN e USING (id, config_hash)
    )
    SELECT id FROM rows WHERE {where or 'true'} ORDER BY id"""
    return [r[0] for r in duckdb.sql(sql).fetchall()]


def _export(out: Path, dest: Path, fmt: str, *extra: str) -> dict:
    assert main(["export", str(out), str(dest), "--format", fmt, *extra]) == 0
    return json.loads((dest / "export.json").read_text())


def _parquet_ids(dest: Path) -> list[str]:
    return [i for f in sorted(glob.glob(str(dest / "*.parquet"))) for i in pq.read_table(f, columns=["id"])["id"].to_pylist()]


def _pixels(data_or_path) -> np.ndarray:
    img = Image.open(io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path)
    return np.asarray(img.convert("RGB"))


def _prepared_source(out: Path, rid: str) -> np.ndarray:
    src = latest_results(str(out), ["image"]).to_pylist()
    uri = next(r["image"] for r in src if r["id"] == rid)
    return np.asarray(resize_source(decode_image(Path(uri).read_bytes(), 10**8), 64, "short_side").convert("RGB"))


@pytest.mark.parametrize("where", WHERES)
def test_the_exported_rows_are_duckdbs_rows_for_the_same_filter(run_out, tmp_path, where):
    expected = duckdb_ids(run_out, where)
    doc = _export(run_out, tmp_path / "d", "parquet", *(["--where", where] if where else []), "--shard-size", "3")
    ok = set(duckdb_ids(run_out, "status = 'ok'"))
    assert doc["counts"]["matched"] == len(expected)
    assert _parquet_ids(tmp_path / "d") == [i for i in expected if i in ok]  # id order, across shards
    assert sorted(s["id"] for s in doc["skipped"]) == sorted(i for i in expected if i not in ok)
    assert doc["counts"]["written"] + doc["counts"]["skipped"] == len(expected)


def test_the_latest_view_takes_the_latest_record_and_the_latest_ok_score(run_out):
    # s0.0's extra record is older: it stays ok; s0.1's newer failed score does not hide its ok score
    assert "s0.0" in duckdb_ids(run_out, "status = 'ok'")
    assert "s0.1" in duckdb_ids(run_out, "eval_status = 'ok'")
    assert len(duckdb_ids(run_out, None)) == 7


def test_webdataset_reads_every_shard_back_with_the_pixels_of_out_images(run_out, tmp_path):
    import webdataset as wds

    dest = tmp_path / "wds"
    doc = _export(run_out, dest, "webdataset", "--where", "status = 'ok'", "--shard-size", "4")
    tars = sorted(glob.glob(str(dest / "*.tar")))
    assert [Path(t).name for t in tars] == ["00000.tar", "00001.tar"]
    samples = list(wds.WebDataset(tars, shardshuffle=False))
    ids = duckdb_ids(run_out, "status = 'ok'")
    assert [s["__key__"] for s in samples] == [sample_key(i) for i in ids] and len(ids) == 6
    for s in samples:
        assert sorted(k for k in s if not k.startswith("__")) == ["edit.png", "json", "src.png", "txt"]
        meta = json.loads(s["json"])
        rid = meta["id"]
        assert sample_key(rid) == s["__key__"] and s["txt"].decode() == meta["target_prompt"]
        assert np.array_equal(_pixels(s["edit.png"]), _pixels(run_out / "images" / f"{rid}.png"))
        assert np.array_equal(_pixels(s["src.png"]), _prepared_source(run_out, rid))
        for key in ("clip_score", "clip_score_source", "structure_dist", "clip_gain", "seed", "config_hash",
                    "pipeline", "model", "feature_key", "pnp_f_t", "pnp_attn_t", "source_prompt", "lora"):
            assert key in meta
        assert meta["clip_gain"] == pytest.approx(meta["clip_score"] - meta["clip_score_source"])
    index = pq.read_table(dest / "00000.parquet")  # img2dataset's layout: an index beside each shard
    assert index["key"].to_pylist() == [s["__key__"] for s in samples[:4]]
    assert doc["shards"][0]["files"]["00000.tar"]["sha256"]


def test_datasets_loads_the_parquet_export_and_decodes_the_same_pixels(run_out, tmp_path):
    import datasets

    dest = tmp_path / "pq"
    _export(run_out, dest, "parquet", "--where", "status = 'ok' AND clip_gain > -1000", "--shard-size", "4")
    ds = datasets.load_dataset("parquet", data_files=sorted(glob.glob(str(dest / "*.parquet"))), split="train")
    assert isinstance(ds.features["input_image"], datasets.Image)
    assert isinstance(ds.features["edited_image"], datasets.Image)
    assert len(ds) == len(duckdb_ids(run_out, "status = 'ok' AND clip_gain > -1000")) == 6
    for row in ds:
        rid = row["id"]
        assert np.array_equal(np.asarray(row["edited_image"].convert("RGB")), _pixels(run_out / "images" / f"{rid}.png"))
        assert np.array_equal(np.asarray(row["input_image"].convert("RGB")), _prepared_source(run_out, rid))
        assert row["edit_prompt"] == row["edited_prompt"] == row["target_prompt"]
        assert row["original_prompt"] == "a photo"


def test_datasets_imagefolder_loads_the_imagefolder_export(run_out, tmp_path):
    import datasets

    dest = tmp_path / "if"
    _export(run_out, dest, "imagefolder", "--where", "status = 'ok'", "--shard-size", "4")
    assert sorted(p.name for p in (dest / "train").iterdir()) == ["00000", "00001"]
    ds = datasets.load_dataset("imagefolder", data_dir=str(dest), split="train")
    assert sorted(ds["id"]) == duckdb_ids(run_out, "status = 'ok'")
    for row in ds:
        assert np.array_equal(np.asarray(row["edited_image"].convert("RGB")),
                              _pixels(run_out / "images" / f"{row['id']}.png"))
        assert np.array_equal(np.asarray(row["input_image"].convert("RGB")), _prepared_source(run_out, row["id"]))


def _tree(dest: Path) -> dict[str, bytes]:
    return {str(p.relative_to(dest)): p.read_bytes() for p in sorted(dest.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fmt", ["webdataset", "parquet", "imagefolder"])
def test_the_same_export_writes_the_same_bytes_and_a_rerun_skips_finished_shards(run_out, tmp_path, fmt, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    _export(run_out, a, fmt, "--shard-size", "2")
    _export(run_out, b, fmt, "--shard-size", "2")
    assert _tree(a) == _tree(b) and len(_tree(a)) > 4
    mtimes = {p: p.stat().st_mtime_ns for p in a.rglob("*") if p.is_file() and p.name != "export.json"}
    (a / "_export" / "00001.json").unlink()  # as if killed before shard 00001 was recorded
    capsys.readouterr()
    _export(run_out, a, fmt, "--shard-size", "2")
    assert "4 shard(s) (3 already finished)" in capsys.readouterr().out
    assert _tree(a) == _tree(b)
    changed = {p.name for p, t in mtimes.items() if p.exists() and p.stat().st_mtime_ns != t}
    assert changed and all("00001" in n or n.startswith(("s0.1", "s1.0", "metadata")) for n in changed)


def test_a_different_export_into_the_same_dest_needs_overwrite(run_out, tmp_path):
    dest = tmp_path / "d"
    _export(run_out, dest, "parquet", "--shard-size", "2")
    assert main(["export", str(run_out), str(dest), "--format", "parquet", "--where", "status = 'ok'"]) == 2
    doc = _export(run_out, dest, "parquet", "--where", "status = 'ok'", "--overwrite")
    assert sorted(p.name for p in dest.glob("*.parquet")) == ["00000.parquet"]  # the 4 old shards went
    assert doc["counts"]["written"] == 6


def test_shards_closed_by_bytes(run_out, tmp_path):
    doc = _export(run_out, tmp_path / "d", "webdataset", "--where", "status = 'ok'", "--shard-bytes", "30k")
    sizes = [s["written"] for s in doc["shards"]]
    assert sum(sizes) == 6 and len(sizes) > 1
    again = _export(run_out, tmp_path / "e", "webdataset", "--where", "status = 'ok'", "--shard-bytes", "30k")
    assert again["shards"] == doc["shards"]


@pytest.mark.parametrize("where", ["bogus_column > 1", "status = 'ok' AND", "clip_score +", "1 +"])
def test_an_expression_that_does_not_parse_or_names_an_unknown_column_exits_2_with_the_columns(
        run_out, tmp_path, where, capsys):
    assert main(["export", str(run_out), str(tmp_path / "d"), "--where", where]) == 2
    err = capsys.readouterr().err
    assert "columns: id, status" in err and "clip_gain" in err and "structure_dist" in err
    assert not (tmp_path / "d").exists()


def test_an_unreadable_output_is_skipped_with_its_reason_and_the_export_goes_on(run_out, tmp_path):
    victim = run_out / "images" / "s1.1.png"
    backup = victim.read_bytes()
    victim.unlink()
    try:
        doc = _export(run_out, tmp_path / "d", "parquet", "--where", "status = 'ok'")
    finally:
        victim.write_bytes(backup)
    assert doc["counts"]["written"] == 5 and doc["counts"]["skipped"] == 1
    assert doc["skipped"][0]["id"] == "s1.1" and "output image unreadable" in doc["skipped"][0]["reason"]
    assert "s1.1" not in _parquet_ids(tmp_path / "d")


def test_dry_run_prints_the_counts_and_writes_nothing(run_out, tmp_path, capsys):
    assert main(["export", str(run_out), str(tmp_path / "d"), "--where", "status = 'ok'", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "matched: 6" in text and "rows in view: 7" in text and "id='s0.0'" in text
    assert not (tmp_path / "d").exists()


def test_a_mask_goes_into_the_sample(tmp_path, make_png):
    src, out, mask = tmp_path / "s.png", tmp_path / "o.png", tmp_path / "m.png"
    src.write_bytes(make_png(20, 16))
    out.write_bytes(make_png(16, 16, seed=1))
    mask.write_bytes(make_png(20, 16, mode="L", seed=2))
    reader = SampleReader({"h": Prep(16, "short_side")})
    row = {"id": "a", "status": "ok", "output": str(out), "image": str(src), "config_hash": "h", "mask": str(mask)}
    s = reader.read(row)
    assert not isinstance(s, Skipped) and s.mask_png is not None and s.edit == out.read_bytes()
    assert np.array_equal(_pixels(s.mask_png)[..., 0], np.asarray(Image.open(mask)))
    assert isinstance(reader.read({**row, "mask": str(tmp_path / "nope.png")}), Skipped)
    assert isinstance(reader.read({**row, "config_hash": "unknown"}), Skipped)


def test_export_to_an_object_store_prefix(run_out, s3_bucket):
    from pnp_batch.io import storage

    dest = f"{s3_bucket}/exports/one"
    assert main(["export", str(run_out), dest, "--format", "parquet", "--where", "status = 'ok'"]) == 0
    doc = json.loads(storage.read_text(f"{dest}/export.json"))
    data = storage.read_bytes(f"{dest}/00000.parquet")
    assert doc["shards"][0]["files"]["00000.parquet"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert pq.read_table(io.BytesIO(data), columns=["id"])["id"].to_pylist() == duckdb_ids(run_out, "status = 'ok'")


def test_ray_export_writes_the_same_bytes_as_the_local_one(run_out, tmp_path):
    _export(run_out, tmp_path / "local", "webdataset", "--shard-size", "2")
    _export(run_out, tmp_path / "ray", "webdataset", "--shard-size", "2", "--engine", "ray", "--workers", "2")
    assert _tree(tmp_path / "local") == _tree(tmp_path / "ray")
