"""`pnp-batch run --sweep` end to end on the tiny model: grid rows with their columns, one inversion,
the sweep contact sheet, resume (the same command again does nothing), status counts the grid."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.dataset as ds
from PIL import Image

from pnp_batch.cli import main

FAST = ["--pipeline", "tiny", "--set", "steps=4", "--set", "inversion_steps=4", "--set", "resolution=64"]
SWEEP = ["--sweep", "pnp_f_t=0.4,0.8", "--sweep", "pnp_attn_layers=default,9-11"]


def _summaries(out):
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]


def test_run_sweep_resume_and_status(tmp_path, capsys):
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "src.png")
    (tmp_path / "m.csv").write_text("id,image,source_prompt,target_prompt,tag\nrow1,src.png,a photo,a statue,x\n")
    out = tmp_path / "out"
    argv = ["run", str(tmp_path / "m.csv"), "--out", str(out), *FAST, *SWEEP]
    assert main(argv) == 0
    t = ds.dataset(str(out / "results")).to_table().sort_by("id").to_pylist()
    assert [r["id"] for r in t] == ["row1.alayers9-11_ft0.4", "row1.alayers9-11_ft0.8",
                                        "row1.alayersdefault_ft0.4", "row1.alayersdefault_ft0.8"]
    assert {r["source_id"] for r in t} == {"row1"} and {r["tag"] for r in t} == {"x"}
    assert [r["setting"] for r in t] == [
        "pnp_attn_layers=9-11,pnp_f_t=0.4", "pnp_attn_layers=9-11,pnp_f_t=0.8",
        "pnp_attn_layers=default,pnp_f_t=0.4", "pnp_attn_layers=default,pnp_f_t=0.8"]
    assert [r["pnp_f_t"] for r in t] == [0.4, 0.8, 0.4, 0.8] and all(r["status"] == "ok" for r in t)
    assert len({r["work_key"] for r in t}) == 4 and all(len(r["output_sha256"]) == 64 for r in t)
    unet = _summaries(out)[0]["stats"]["unet"]
    assert unet["inversions"] == 1 and unet["invert_calls"] == 4  # two groups (two layer settings), one inversion
    assert (out / "report" / "sweep.png").exists()
    assert len({Image.open(r["output"]).tobytes() for r in t}) == 4  # every setting changes the image

    assert main(argv) == 0  # resume: nothing left to do
    assert _summaries(out)[-1]["counts"]["attempted"] == 0
    assert ds.dataset(str(out / "results")).count_rows() == 4
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "done: 4\n" in text and "pending: 0 " in text
