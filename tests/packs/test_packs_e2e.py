"""`sources_per_batch` end to end on the tiny model: the counted figures (UNet calls per image fall
with N, elements do not), a run resumed mid-pack writes the bytes of an uninterrupted run with the same
N, and `sources_per_batch: 1` keeps today's config hash (and so today's code path and bytes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from conftest import output_images, run_summaries
from PIL import Image

from pnp_batch.cli import main
from pnp_batch.config import load_config

FAST = ["--pipeline", "tiny", "--set", "steps=4", "--set", "inversion_steps=4", "--set", "resolution=64",
        "--no-report"]
N_SOURCES = 6


def _inputs(folder: Path, prompts=("a photo of a fox",)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(11)
    lines = ["id,image,source_prompt,target_prompt"]
    for i in range(N_SOURCES):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"s{i}.png")
        lines += [f"s{i}-{j},s{i}.png,a photo,{p}" for j, p in enumerate(prompts)]
    (folder / "m.csv").write_text("\n".join(lines) + "\n")
    return folder / "m.csv"


def _run(manifest: Path, out: Path, n: int, *extra: str) -> int:
    return main(["run", str(manifest), "--out", str(out), *FAST, "--set", f"sources_per_batch={n}", *extra])


@pytest.fixture(scope="module")
def packed_reference(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("packs")
    manifest = _inputs(root / "in")
    out = root / "ref"
    assert _run(manifest, out, 4) == 0
    return manifest, out


def test_packs_cut_unet_calls_per_image_and_keep_elements(packed_reference, tmp_path):
    manifest, ref = packed_reference
    assert _run(manifest, tmp_path / "n1", 1) == 0
    one = run_summaries(tmp_path / "n1")[0]["stats"]["unet"]
    four = run_summaries(ref)[0]["stats"]["unet"]
    images = N_SOURCES  # K = 1
    calls = {n: (u["invert_calls"] + u["sample_calls"]) / images for n, u in ((1, one), (4, four))}
    # 6 sources in packs of 4: [4, 2], 2 calls a step where N = 1 makes 6
    assert calls[1] / calls[4] == pytest.approx(3.0)
    assert four["sample_elements"] == one["sample_elements"]
    assert four["source_elements"] == one["source_elements"]
    assert four["inversions"] == one["inversions"] == N_SOURCES
    rows = ds.dataset(str(ref / "results")).to_table().to_pylist()
    assert len(rows) == N_SOURCES and {r["status"] for r in rows} == {"ok"}
    # each image is its own source's translation: close to the unpacked one, not another source's
    a, b = output_images(tmp_path / "n1"), output_images(ref)
    assert a.keys() == b.keys()
    for name in a:
        x = np.asarray(Image.open(tmp_path / "n1" / "images" / name), dtype=int)
        y = np.asarray(Image.open(ref / "images" / name), dtype=int)
        assert np.abs(x - y).max() <= 2, name


def test_a_run_resumed_mid_pack_writes_the_bytes_of_an_uninterrupted_run(packed_reference, tmp_path, forget):
    manifest, ref = packed_reference
    out = tmp_path / "out"
    assert _run(manifest, out, 4) == 0
    # rows of the first pack (slots 1 and 2 of 4) and of the second (slot 1 of 2) are lost
    forget(out, {"s1-0", "s2-0", "s5-0"})
    assert _run(manifest, out, 4) == 0
    assert output_images(out) == output_images(ref)
    last = run_summaries(out)[-1]
    assert last["counts"]["ok"] == 3 and last["counts"]["companions"] == 3  # s0, s3 with the first; s4
    unet = last["stats"]["unet"]
    assert unet["inversions"] == 0 and unet["cache_hits"] == N_SOURCES  # companions' features from the store


def test_a_pack_keeps_its_slots_when_a_source_cannot_be_read(packed_reference, tmp_path):
    """An unreadable source keeps its slot: its neighbours' bytes are those of a run where it was read."""
    manifest, ref = packed_reference
    folder = tmp_path / "in"
    folder.mkdir()
    for p in manifest.parent.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "s1.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    assert _run(folder / "m.csv", out, 4) == 1  # s1's row failed
    got = output_images(out)
    assert "s1-0.png" not in got
    assert got == {k: v for k, v in output_images(ref).items() if k != "s1-0.png"}


def test_sources_per_batch_one_keeps_the_config_hash_and_checks_its_values():
    base = load_config("tiny")
    assert load_config("tiny", {"sources_per_batch": 1}).hash() == base.hash()
    assert load_config("tiny", {"sources_per_batch": 4}).hash() != base.hash()
    assert load_config("tiny", ["sources_per_batch=auto"]).sources_per_batch == "auto"
    for bad in (0, 65, "many", True):
        with pytest.raises(Exception, match="sources_per_batch"):
            load_config("tiny", {"sources_per_batch": bad})


def test_packs_score_with_run_eval_and_auto_packs_masks_and_image_prompts(tmp_path):
    """run --eval scores every packed row; `auto` packs runs with masks or image prompts too
    (tests/packs/test_packs_regions.py), by the resolution alone."""
    manifest = _inputs(tmp_path / "in")
    out = tmp_path / "o"
    assert _run(manifest, out, 4, "--eval") == 0
    scores = pq.read_table(out / "eval").to_pylist()
    assert len(scores) == N_SOURCES and {s["status"] for s in scores} == {"ok"}
    from pnp_batch.translate.pack_plan import pack_size

    cfg = load_config("tiny", {"sources_per_batch": "auto", "mask_mode": "auto"})
    assert pack_size(cfg) == pack_size(cfg.replace(mask_mode="none")) == 4
    assert pack_size(cfg.replace(resolution=768)) == 2 and pack_size(cfg.replace(resolution=1024)) == 1
