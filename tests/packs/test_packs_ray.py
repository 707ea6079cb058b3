"""Packs of sources on the Ray engine: the driver hands out the packs the local engine forms (fixed by
the manifest), so a Ray run resumed after a failure mid-pack writes the local engine's bytes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")

FAST = ["--pipeline", "tiny", "--set", "steps=4", "--set", "inversion_steps=4", "--set", "resolution=64",
        "--no-report", "--set", "sources_per_batch=2"]


def _manifest(folder: Path) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    lines = ["id,image,source_prompt,target_prompt"]
    for s in range(5):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"src{s}.png")
        lines += [f"s{s}-t{k},src{s}.png,a photo,a painting in style {k}" for k in range(2)]
    (folder / "m.csv").write_text("\n".join(lines) + "\n")
    return folder / "m.csv"


def _run(*args: str) -> int:
    from pnp_batch.cli import main

    return main(["run", *args])


def _run_local_one_thread(*args: str) -> int:
    """At the Ray workers' thread count (2 CPUs, 2 workers): CPU bits depend on it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(*args)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_ray_resumed_mid_pack_equals_the_local_engine(tmp_path: Path, ray_instance: str) -> None:
    manifest = _manifest(tmp_path / "in")
    out_ray, out_local = tmp_path / "ray", tmp_path / "local"
    blocker = out_ray / "images" / "s3-t0.png"  # a directory where that image goes: its write fails
    blocker.mkdir(parents=True)
    ray_args = ["--engine", "ray", "--workers", "2", *FAST]
    assert _run(str(manifest), "--out", str(out_ray), *ray_args) == 1
    blocker.rmdir()
    assert _run(str(manifest), "--out", str(out_ray), *ray_args) == 0
    resumed = max((json.loads(p.read_text()) for p in (out_ray / "runs").glob("*.json")),
                  key=lambda d: d["started_at"])
    # s3-t0 is redone in its pack (src2, src3): s3-t1 and src2's two rows go along, not written
    assert resumed["counts"]["ok"] == 1 and resumed["counts"]["companions"] == 3
    assert _run_local_one_thread(str(manifest), "--out", str(out_local), *FAST) == 0
    names = sorted(p.name for p in (out_local / "images").iterdir())
    assert len(names) == 10 and names == sorted(p.name for p in (out_ray / "images").iterdir())
    for name in names:
        assert (out_ray / "images" / name).read_bytes() == (out_local / "images" / name).read_bytes(), name
    first = min((json.loads(p.read_text()) for p in (out_ray / "runs").glob("*.json")),
                key=lambda d: d["started_at"])
    assert first["stats"]["unet"]["invert_calls"] == 3 * 4  # packs of 2, 2, 1 sources x 4 steps
