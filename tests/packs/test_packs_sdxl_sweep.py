"""Packs with SDXL's added conditioning (tiny-sdxl) and with a sweep's grid (rows of one source with
other thresholds and layer settings): every row ok, counted calls fall, and a run resumed mid-pack
writes the uninterrupted run's bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
from conftest import output_images, run_summaries
from PIL import Image

from pnp_batch.cli import main

FAST = ["--set", "steps=4", "--set", "inversion_steps=4", "--set", "resolution=64", "--no-report"]
SWEEP = ["--sweep", "pnp_f_t=0.4,0.8", "--sweep", "pnp_attn_layers=default,9-11"]


def _manifest(folder: Path, sources: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(21)
    lines = ["id,image,source_prompt,target_prompt"]
    for i in range(sources):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"s{i}.png")
        lines.append(f"s{i},s{i}.png,a photo,a painting of a fox")
    (folder / "m.csv").write_text("\n".join(lines) + "\n")
    return folder / "m.csv"


def _run(manifest: Path, out: Path, *args: str) -> int:
    return main(["run", str(manifest), "--out", str(out), *FAST, *args])


@pytest.mark.parametrize("pipeline", ["tiny", "tiny-sdxl"])
def test_packs_resume_mid_pack_with_the_uninterrupted_bytes(tmp_path, pipeline, request, forget):
    request.getfixturevalue("tiny_sdxl_dir" if pipeline == "tiny-sdxl" else "tiny_model_dir")
    manifest = _manifest(tmp_path / "in", 3)
    args = ["--pipeline", pipeline, "--set", "sources_per_batch=2"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert _run(manifest, ref, *args) == 0
    assert _run(manifest, out, *args) == 0
    forget(out, {"s1"})
    assert _run(manifest, out, *args) == 0
    assert output_images(out) == output_images(ref) and len(output_images(ref)) == 3
    assert run_summaries(out)[-1]["counts"]["companions"] == 1
    assert run_summaries(ref)[0]["stats"]["unet"]["sample_calls"] == 2 * 4  # packs [s0, s1], [s2]: 2 calls a step


def test_a_sweep_in_packs(tmp_path, tiny_model_dir, forget):
    """Each source's grid is 4 rows in 2 groups (two layer settings); a pack of 4 groups holds both
    sources' groups: the groups of one layer setting share calls (thresholds differ within a call), the
    two settings are sampled apart (another injector), and each source is inverted once."""
    manifest = _manifest(tmp_path / "in", 2)
    ref, out, one = tmp_path / "ref", tmp_path / "out", tmp_path / "one"
    packed = ["--pipeline", "tiny", *SWEEP, "--set", "sources_per_batch=4"]
    assert _run(manifest, ref, *packed) == 0
    rows = ds.dataset(str(ref / "results")).to_table().to_pylist()
    assert len(rows) == 8 and {r["status"] for r in rows} == {"ok"}
    assert _run(manifest, one, "--pipeline", "tiny", *SWEEP) == 0
    u1, u2 = run_summaries(one)[0]["stats"]["unet"], run_summaries(ref)[0]["stats"]["unet"]
    assert u2["sample_elements"] == u1["sample_elements"]
    assert u1["sample_calls"] == 4 * 4 and u2["sample_calls"] == 2 * 4  # 4 groups; 2 layer settings a step
    assert u2["inversions"] == u1["inversions"] == 2 and u2["invert_calls"] == 4  # both sources in one call
    for name in output_images(one):
        x = np.asarray(Image.open(ref / "images" / name), dtype=int)
        assert np.abs(x - np.asarray(Image.open(one / "images" / name), dtype=int)).max() <= 2, name
    assert _run(manifest, out, *packed) == 0
    third = sorted(r["id"] for r in ds.dataset(str(out / "results")).to_table().to_pylist() if r["id"].startswith("s1."))[2]
    forget(out, {third})  # a row of the second source's grid (ids from the swept values, docs/sweeps.md)
    assert _run(manifest, out, *packed) == 0
    assert output_images(out) == output_images(ref)
