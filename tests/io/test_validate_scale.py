"""validate on whole columns: only rows that may have a problem become Row objects, and the report is
the one that checking every row gives."""

from __future__ import annotations

import base64
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pnp_batch.io import manifest as manifest_module
from pnp_batch.io import validate
from pnp_batch.io.validate import validate_manifest

LONG = "word " * 80


def _rows() -> list[dict]:
    good = {"image": "a.png", "source_prompt": "a photo", "target_prompt": "a fox", "seed": 1,
            "guidance_scale": 7.5, "pnp_f_t": 0.8, "pnp_attn_t": 0.5, "negative_prompt": None,
            "image_bytes": None}
    odd = [
        {"id": "bad id!"}, {"id": "-starts-with-dash"}, {"id": "x" * 129}, {"id": "ok\n"}, {"id": None},
        {"id": ""}, {"image": None}, {"image": ""}, {"image": None, "image_bytes": base64.b64encode(b"png")},
        {"image": None, "image_bytes": "not base64!!"}, {"target_prompt": ""}, {"target_prompt": "  \t"},
        {"target_prompt": "\u3000\u2003"}, {"target_prompt": "\x1c\x1f"}, {"target_prompt": None},
        {"target_prompt": "日本"}, {"target_prompt": "!!!"}, {"seed": -1}, {"seed": 2.5}, {"seed": math.inf},
        {"seed": math.nan}, {"seed": None}, {"guidance_scale": -0.5}, {"guidance_scale": math.inf},
        {"guidance_scale": math.nan}, {"pnp_f_t": 1.5}, {"pnp_attn_t": -0.1}, {"pnp_f_t": math.nan},
        {"target_prompt": LONG}, {"source_prompt": LONG}, {"negative_prompt": LONG},
        {"target_prompt": "é" * 76}, {"negative_prompt": ""},
    ]
    rows = []
    for i in range(300):
        row = {"id": f"r{i}", **good}
        if i % 7 == 3:
            row.update(odd[(i // 7) % len(odd)])
        rows.append(row)
    return rows


def _write(tmp_path, rows: list[dict]) -> str:
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("id", pa.string()), ("image", pa.string()), ("image_bytes", pa.string()), ("source_prompt", pa.string()),
        ("target_prompt", pa.string()), ("negative_prompt", pa.string()), ("seed", pa.float64()),
        ("guidance_scale", pa.float64()), ("pnp_f_t", pa.float64()), ("pnp_attn_t", pa.float64()),
    ]))
    pq.write_table(table, tmp_path / "m.parquet")
    return str(tmp_path / "m.parquet")


def test_the_report_is_the_one_every_row_checked_gives(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(manifest_module, "BATCH_ROWS", 64)
    uri = _write(tmp_path, _rows())
    picked = []
    real = validate._maybe_problem

    def counting(batch, limit):
        mask = real(batch, limit)
        picked.append(int(mask.sum()))
        return mask

    monkeypatch.setattr(validate, "_maybe_problem", counting)
    report = validate_manifest(uri)
    monkeypatch.setattr(validate, "_maybe_problem", lambda batch, limit: np.ones(batch.num_rows, bool))
    every_row = validate_manifest(uri)
    assert report.format() == every_row.format()
    assert report.row_problem_count > 20 and report.warning_count >= 3 and not report.ok
    assert sum(picked) < 80  # the good rows were never made into Row objects


@pytest.mark.parametrize("seed_type", [pa.int64(), pa.float64()])
def test_a_clean_manifest_makes_no_rows(tmp_path, monkeypatch, seed_type) -> None:
    rows = [{"id": f"r{i}", "image": "a.png", "target_prompt": "a fox", "seed": i} for i in range(100)]
    pq.write_table(pa.Table.from_pylist(rows).cast(pa.schema([("id", pa.string()), ("image", pa.string()),
                                                                ("target_prompt", pa.string()), ("seed", seed_type)])),
                   tmp_path / "m.parquet")
    made = []
    real = manifest_module.Manifest.rows_of
    monkeypatch.setattr(manifest_module.Manifest, "rows_of", lambda self, *a: made.extend(real(self, *a)) or [])
    report = validate_manifest(str(tmp_path / "m.parquet"))
    assert report.ok and report.rows == 100 and made == []
