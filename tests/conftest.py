"""Shared fixtures: an S3 endpoint on loopback (moto's threaded server) and small helpers.

Nothing here runs at import time; the S3 server starts only for tests that ask for it.
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from PIL import Image

S3_KEY_ID = "testing"
S3_SECRET = "testing-secret-Zq8uX2vLw9"  # distinctive, so tests can assert it never leaks


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Start moto's S3 server on 127.0.0.1 and point the AWS environment at it.

    The variables stay in ``os.environ`` for the session so that subprocesses and Ray workers
    inherit them; they are restored afterwards.
    """
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": S3_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in [*env, "AWS_SESSION_TOKEN", "AWS_PROFILE"]}
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.pop("AWS_PROFILE", None)
    os.environ.update(env)
    _reset_fs_caches()
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _reset_fs_caches()


@pytest.fixture
def s3_bucket(s3_server: str) -> Iterator[str]:
    """A fresh, empty bucket; yields ``s3://<bucket>``."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    _reset_fs_caches()
    try:
        yield f"s3://{name}"
    finally:
        _reset_fs_caches()


@pytest.fixture(autouse=True)
def _fresh_storage_options() -> Iterator[None]:
    """Process-wide storage options never leak from one test into the next."""
    yield
    from pnp_batch.io import storage

    storage.configure(None)


def _reset_fs_caches() -> None:
    from pnp_batch.io import storage

    storage.reset_cache()


def _png_bytes(width: int = 8, height: int = 6, mode: str = "RGB", seed: int = 0) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def make_png() -> Callable[..., bytes]:
    """``make_png(width=8, height=6, mode="RGB", seed=0)``: a deterministic PNG made in memory
    (no binary files in git)."""
    return _png_bytes


# --- the offline tiny model, built once per machine (PNP_BATCH_CACHE, keyed by its recipe) ---------


@pytest.fixture(scope="session")
def tiny_model_dir():
    """The tiny test model folder, written by `make_test_model` on first use."""
    from pnp_batch.models.tiny import tiny_model_dir as _tiny_dir

    return _tiny_dir()


# --- the engine's fixtures: the tiny model loaded once, a text embedder, an inverted source ------


@pytest.fixture(scope="session")
def tiny_models(tiny_model_dir):
    from pnp_batch.config import load_config
    from pnp_batch.models.load import load_models

    return load_models(load_config("tiny", {"model": str(tiny_model_dir)}))


@pytest.fixture(scope="session")
def embed(tiny_models):
    def _embed(prompts: list[str]) -> torch.Tensor:
        tok = tiny_models.tokenizer
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        with torch.no_grad():
            return tiny_models.text_encoder(ids)[0]

    return _embed


@pytest.fixture(scope="session")
def source_latents(tiny_models, embed):
    """10-step inversion of a seeded 128x128 image: (10, 1, 4, 16, 16); the mid block sees 2x2."""
    from pnp_batch.config import generation_timesteps
    from pnp_batch.pnp.inversion import ddim_invert

    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 3, 128, 128, generator=g) * 2 - 1
    with torch.no_grad():
        z0 = tiny_models.vae.encode(img).latent_dist.mean * tiny_models.scaling_factor
    inv = ddim_invert(tiny_models.unet, tiny_models.scheduler_config, z0, embed([""]), 10, generation_timesteps(10))
    return inv.latents



# --- the offline SDXL test model (tiny-sdxl), built once per machine like `tiny` ------------------


@pytest.fixture(scope="session")
def tiny_sdxl_dir():
    """The tiny SDXL test model folder, written by `make_tiny_sdxl` on first use."""
    from pnp_batch.models.tiny_sdxl import tiny_sdxl_dir as _dir

    return _dir()


@pytest.fixture(scope="session")
def tiny_sdxl_models(tiny_sdxl_dir):
    """tiny-sdxl loaded through the folder path, the same code as a real SDXL folder (fp32, CPU)."""
    from pnp_batch.config import load_config
    from pnp_batch.models.load import load_models

    return load_models(load_config("tiny-sdxl", {"model": str(tiny_sdxl_dir), "device": "cpu"}))


# -- evaluation (tests/eval): the random-weight metric models, loaded once, and seeded images --------------
@pytest.fixture(scope="session")
def metric_models():
    """tiny-clip and tiny-dino on the CPU in fp32 (built into the pnp-batch cache on first use)."""
    from pnp_batch.eval.models import load_metric_models

    return load_metric_models("tiny-clip", "tiny-dino", device="cpu", dtype="auto")


def _noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth random RGB image (low-frequency noise upsampled), so resizing keeps its structure."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(height // 8, 2), max(width // 8, 2), 3), dtype=np.uint8)
    return Image.fromarray(small, "RGB").resize((width, height), Image.BILINEAR)


@pytest.fixture
def noise_image() -> Callable[..., Image.Image]:
    """``noise_image(width, height, seed=0)``: a deterministic RGB test image made in memory."""
    return _noise_image


# --- resume tests: rows lost as if a run had died before writing them ------------------------------


def _forget_rows(out, ids: set[str]) -> None:
    """Drop these rows' records from OUT/results and their images and masks, as if a run had died before
    writing them (tests/packs/)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    for shard in (out / "results").glob("*.parquet"):
        t = pq.read_table(shard)
        pq.write_table(t.filter(pc.invert(pc.is_in(t["id"], value_set=pa.array(sorted(ids))))), shard)
    for i in ids:
        (out / "images" / f"{i}.png").unlink()
        (out / "masks" / f"{i}.png").unlink(missing_ok=True)


def output_images(out) -> dict[str, bytes]:
    """OUT/images: file name -> bytes."""
    return {p.name: p.read_bytes() for p in sorted((out / "images").glob("*.png"))}


def run_summaries(out) -> list[dict]:
    """OUT/runs/*.json, oldest run first."""
    import json

    return sorted((json.loads(p.read_text()) for p in (out / "runs").glob("*.json")), key=lambda d: d["started_at"])


@pytest.fixture
def forget() -> Callable[..., None]:
    return _forget_rows


# --- Ray: one small local instance for the whole session ---------------------------------------------


@pytest.fixture(scope="session")
def ray_instance() -> Iterator[str]:
    """One small local Ray instance for the whole session (the Ray engine's tests); yields its address."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        yield ray.get_runtime_context().gcs_address
        return
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=128 * 1024 * 1024,
             log_to_driver=True, configure_logging=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
