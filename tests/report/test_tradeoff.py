"""The trade-off report: scores read from eval shards in the eval stage's schema, joined with the results
on (id, config_hash), grouped by setting; the plot is a PNG; the sweep contact sheet has one row per
source and one column per setting."""

from __future__ import annotations

import datetime as dt
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pnp_batch.io.metrics import SCORE_SCHEMA as EVAL_SCHEMA
from pnp_batch.io.metrics import ok_scores
from pnp_batch.io.results import ResultWriter
from pnp_batch.report.tradeoff import SettingScores, tradeoff_png, tradeoff_points
from pnp_batch.report.write import write_sweep_reports, write_sweep_sheet, write_tradeoff

T0 = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.timezone.utc)
SETTINGS = ["pnp_f_t=0.4", "pnp_f_t=0.8"]


def _write_results(out, tmp_path, sources=("a", "b", "c"), config_hash="h1"):
    src = tmp_path / "src.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(src)
    schema = pa.schema([("source_id", pa.string()), ("setting", pa.string())])
    with ResultWriter(str(out), "run1", extra_schema=schema) as w:
        for s in sources:
            for g, setting in enumerate(SETTINGS):
                rid = f"{s}.s{g}"
                img = out / "images" / f"{rid}.png"
                img.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (32, 32), (40 * g, 100, 150)).save(img)
                w.add({"id": rid, "status": "ok", "output": str(img), "image": str(src), "target_prompt": "a cat",
                       "config_hash": config_hash, "source_id": s, "setting": setting, "finished_at": T0})


def _write_scores(out, name, rows):
    cols = {f.name: [] for f in EVAL_SCHEMA}
    for r in rows:
        for f in EVAL_SCHEMA:
            cols[f.name].append(r.get(f.name))
    (out / "eval").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols, schema=EVAL_SCHEMA), out / "eval" / f"{name}.parquet")


def _score(rid, clip, struct, minutes=0, status="ok", config_hash="h1"):
    return {"id": rid, "config_hash": config_hash, "status": status, "clip_score": clip, "structure_dist": struct,
            "clip_score_source": 20.0, "clip_model": "tiny-clip", "dino_model": "tiny-dino",
            "scored_at": T0 + dt.timedelta(minutes=minutes)}


def test_latest_ok_score_per_id_and_config(tmp_path):
    out = tmp_path / "out"
    _write_scores(out, "one", [_score("a.s0", 10.0, 0.5), _score("a.s0", 11.0, 0.4, minutes=5),
                               _score("a.s0", 99.0, 9.9, minutes=9, status="failed"),
                               _score("a.s0", 12.0, 0.3, config_hash="h2")])
    _write_scores(out, "two", [_score("a.s0", 13.0, 0.2, minutes=7)])
    got = {(r["id"], r["config_hash"]): (r["clip_score"], r["structure_dist"]) for r in ok_scores(str(out)).to_pylist()}
    assert got == {("a.s0", "h1"): (13.0, 0.2), ("a.s0", "h2"): (12.0, 0.3)}
    assert ok_scores(str(tmp_path / "nothing")).num_rows == 0


def test_points_group_by_setting_and_join_on_config_hash(tmp_path):
    out = tmp_path / "out"
    _write_results(out, tmp_path)
    clip = {"a": (20.0, 30.0), "b": (22.0, 31.0), "c": (24.0, 35.0)}
    struct = {"a": (0.01, 0.05), "b": (0.02, 0.06), "c": (0.03, 0.10)}
    rows = [_score(f"{s}.s{g}", clip[s][g], struct[s][g]) for s in "abc" for g in (0, 1)]
    rows.append(_score("c.s1", 0.0, 9.0, config_hash="other"))  # another config's score of that id: not joined
    _write_scores(out, "scores", rows)
    points = {p.label: p for p in tradeoff_points(str(out))}
    assert list(points) == SETTINGS
    assert sorted(points["pnp_f_t=0.4"].clip) == [20.0, 22.0, 24.0]
    assert sorted(points["pnp_f_t=0.8"].structure) == [0.05, 0.06, 0.10]
    s = points["pnp_f_t=0.8"].summary()
    assert s["clip_score_mean"] == pytest.approx(32.0) and s["structure_dist_mean"] == pytest.approx(0.07)
    assert s["clip_score_q25"] == pytest.approx(30.5) and s["clip_score_q75"] == pytest.approx(33.0)

    uri = write_tradeoff(str(out))
    img = Image.open(out / "report" / "tradeoff.png")
    assert uri.endswith("tradeoff.png") and img.size[0] > 600 and img.size[1] > 400
    assert len(np.unique(np.asarray(img.convert("L")))) > 10  # drawn, not blank
    summary = json.loads((out / "report" / "tradeoff.json").read_text())
    assert [d["setting"] for d in summary] == SETTINGS and summary[1]["count"] == 3


def test_without_a_setting_column_points_are_per_config(tmp_path):
    out = tmp_path / "out"
    with ResultWriter(str(out), "run1") as w:
        for i, h in enumerate(["h1", "h1", "h2"]):
            w.add({"id": f"r{i}", "status": "ok", "config_hash": h, "finished_at": T0})
    _write_scores(out, "s", [_score("r0", 1.0, 0.1), _score("r1", 3.0, 0.3), _score("r2", 5.0, 0.5, config_hash="h2")])
    points = {p.label: (p.clip, p.structure) for p in tradeoff_points(str(out))}
    assert points == {"config h1": ([1.0, 3.0], [0.1, 0.3]), "config h2": ([5.0], [0.5])}


def test_no_scores_no_plot(tmp_path):
    out = tmp_path / "out"
    _write_results(out, tmp_path)
    assert tradeoff_points(str(out)) == [] and write_tradeoff(str(out)) is None
    with pytest.raises(ValueError, match="no setting has scores"):
        tradeoff_png([SettingScores("x", [], [])])


def test_tradeoff_png_is_a_pure_function():
    png = tradeoff_png([SettingScores("a=1", [0.1, 0.2, 0.3], [20.0, 21.0, 25.0]),
                        SettingScores("a=2", [0.4, 0.5], [28.0, 30.0])], title="t")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(io.BytesIO(png)).size[0] > 600


def test_sweep_sheet_has_a_row_per_source_and_a_column_per_setting(tmp_path):
    out = tmp_path / "out"
    _write_results(out, tmp_path, sources=("a", "b"))
    uri = write_sweep_sheet(str(out))
    sheet = Image.open(uri)
    # 2 rows of (source + 2 settings) tiles of 160 px: 3 columns wide, 2 rows tall
    assert 3 * 160 < sheet.size[0] < 4 * 160 and 2 * 160 < sheet.size[1] < 4 * 160
    assert write_sweep_reports(str(out)) == [uri]  # no scores: the sheet only
    plain = tmp_path / "plain"
    with ResultWriter(str(plain), "run1") as w:
        w.add({"id": "r0", "status": "ok", "config_hash": "h", "finished_at": T0})
    assert write_sweep_sheet(str(plain)) is None
