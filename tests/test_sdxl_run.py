"""`pnp-batch run --pipeline tiny-sdxl` end to end: images and records, resume, the feature key carries
the architecture; an SDXL refiner or inpainting folder exits 2 before anything is written."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from PIL import Image

from pnp_batch.cli import main
from pnp_batch.config import load_config
from pnp_batch.io.features import feature_key

FAST = ["--pipeline", "tiny-sdxl", "--set", "steps=4", "--set", "inversion_steps=4", "--set", "resolution=64",
        "--no-report"]


def _manifest(tmp_path) -> str:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(tmp_path / "s0.png")
    rows = [{"id": f"s0-{j}", "image": "s0.png", "source_prompt": "a photo", "target_prompt": p}
            for j, p in enumerate(["a photo of a fox", "a watercolor painting of a cat"])]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    return str(tmp_path / "m.parquet")


def test_run_tiny_sdxl_writes_resumes_and_keys_features_by_architecture(tmp_path, tiny_sdxl_dir):
    import hashlib

    m = _manifest(tmp_path)
    out = tmp_path / "out"
    assert main(["run", m, "--out", str(out), *FAST]) == 0
    images = sorted(p.name for p in (out / "images").iterdir())
    assert images == ["s0-0.png", "s0-1.png"]
    assert Image.open(out / "images" / "s0-0.png").size == (80, 64)
    table = pads.dataset(str(out / "results"), format="parquet").to_table().to_pylist()
    assert {r["status"] for r in table} == {"ok"} and len(table) == 2
    model = table[0]["model"]
    assert model.startswith("sdxl|tiny-sdxl-v1:") and "random-weight test model" in model
    # the feature key is computed from the fingerprint that names the architecture
    key = table[0]["feature_key"]
    records = list((out / "features").rglob(f"{key}.json"))
    assert len(records) == 1 and json.loads(records[0].read_text())["model"].startswith("sdxl|")
    sha = hashlib.sha256((tmp_path / "s0.png").read_bytes()).hexdigest()
    cfg = load_config("tiny-sdxl", {"steps": 4, "inversion_steps": 4, "resolution": 64})
    assert key == feature_key(sha, model.split(" (")[0], "float32", cfg)
    assert key != feature_key(sha, model.split(" (")[0].removeprefix("sdxl|"), "float32", cfg)
    before = {p.name: p.read_bytes() for p in (out / "images").iterdir()}
    # resume: nothing left to do, nothing rewritten, no duplicate record
    assert main(["run", m, "--out", str(out), *FAST]) == 0
    assert {p.name: p.read_bytes() for p in (out / "images").iterdir()} == before
    again = pads.dataset(str(out / "results"), format="parquet").to_table().to_pylist()
    assert sorted(r["id"] for r in again) == ["s0-0", "s0-1"]
    # a failed row is redone with the stored features (a cache hit), to the same bytes
    (out / "images" / "s0-1.png").unlink()
    assert main(["run", m, "--out", str(out), "--overwrite", *FAST]) == 0
    latest = pads.dataset(str(out / "results"), format="parquet").to_table().to_pylist()
    assert any(r["feature_cache_hit"] for r in latest)
    assert (out / "images" / "s0-1.png").read_bytes() == before["s0-1.png"]


def _refuse(tmp_path, folder, capsys, *reason: str) -> None:
    out = tmp_path / f"out-{folder.name}"
    assert main(["run", _manifest(tmp_path), "--out", str(out), *FAST, "--set", f"model={folder}"]) == 2
    err = capsys.readouterr().err
    assert str(folder) in err
    for r in reason:
        assert r in err
    assert not (out / "images").exists() and not (out / "results").exists()


def test_refiner_and_inpainting_folders_exit_2_before_any_work(tmp_path, tiny_sdxl_dir, capsys):
    refiner = tmp_path / "sdxl-refiner"
    shutil.copytree(tiny_sdxl_dir, refiner)
    index = json.loads((refiner / "model_index.json").read_text())
    index.update(_class_name="StableDiffusionXLImg2ImgPipeline", text_encoder=[None, None], tokenizer=[None, None],
                 requires_aesthetics_score=True)
    (refiner / "model_index.json").write_text(json.dumps(index))
    _refuse(tmp_path, refiner, capsys, "SDXL refiner")
    inpaint = tmp_path / "sdxl-inpaint"
    shutil.copytree(tiny_sdxl_dir, inpaint)
    index = json.loads((inpaint / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLInpaintPipeline"
    (inpaint / "model_index.json").write_text(json.dumps(index))
    _refuse(tmp_path, inpaint, capsys, "inpainting")


def test_sdxl_presets():
    sdxl = load_config("sdxl")
    assert (sdxl.model, sdxl.resolution, sdxl.steps, sdxl.inversion_steps) == (
        "stabilityai/stable-diffusion-xl-base-1.0", 1024, 50, 50)
    assert (sdxl.guidance_scale, sdxl.pnp_f_t, sdxl.pnp_attn_t) == (7.5, 0.8, 0.5)
    assert sdxl.negative_prompt == "ugly, blurry, black, low res, unrealistic"
    tiny = load_config("tiny-sdxl")
    assert tiny.model == "tiny-sdxl" and tiny.replace(model=sdxl.model, dtype="auto", name="sdxl") == sdxl
