"""GPU checks for the SDXL path (skipped without CUDA; tools/gpu_check.sh runs them): tiny-sdxl in fp16
on cuda with its VAE in fp32, CUDA graphs replaying the eager images with the added conditioning, and
fp32 on cuda against the CPU."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.gpu
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
PROMPTS = ["a photo of a fox", "a watercolor painting", "a pencil sketch"]


def _pngs(n: int) -> list[bytes]:
    rng = np.random.default_rng(1)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (128, 192, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def _images(tmp_path, tiny_sdxl_dir, device: str, dtype: str, graphs: bool | str = "auto"):
    from pnp_batch.config import load_config
    from pnp_batch.io.rows import Row
    from pnp_batch.translate.translator import Translator

    cfg = load_config("tiny-sdxl", {"model": str(tiny_sdxl_dir), "device": device, "dtype": dtype, "steps": 10,
                                    "inversion_steps": 10, "resolution": 128, "cuda_graphs": graphs})
    out = tmp_path / f"{device}-{dtype}-{graphs}"
    tr = Translator(cfg, str(out), worker="test")
    for src, png in enumerate(_pngs(2)):  # a second source of the same size replays the first one's graphs
        rows = [Row(index=i, id=f"r{10 * src + i}", image=None, image_bytes=png, source_prompt="a photo",
                    target_prompt=p) for i, p in enumerate(PROMPTS)]
        assert [r["status"] for r in tr.process(rows)] == ["ok"] * 3
    imgs = [np.asarray(Image.open(out / "images" / f"r{10 * s + i}.png")).astype(int) for s in range(2) for i in range(3)]
    return imgs, tr


@cuda
def test_sdxl_fp16_graphs_replay_eager_and_vae_stays_fp32(tmp_path, tiny_sdxl_dir):
    from pnp_batch.pnp.graphs import GraphedUNet

    eager, _ = _images(tmp_path, tiny_sdxl_dir, "cuda", "float16", graphs=False)
    graphed, tr_g = _images(tmp_path, tiny_sdxl_dir, "cuda", "float16", graphs=True)
    assert tr_g.models.vae.dtype == torch.float32 and tr_g.models.unet.dtype == torch.float16
    unet = tr_g.models.unet
    assert isinstance(unet, GraphedUNet) and unet.failed is None, getattr(unet, "failed", None)
    assert unet.eager_calls == 0 and unet.replays == 2 * (10 + 10)
    for a, b in zip(eager, graphed):
        assert np.abs(a - b).max() <= 1, np.abs(a - b).max()
        assert a.std() > 1  # not a black (NaN) image


@cuda
def test_sdxl_cuda_fp32_matches_cpu(tmp_path, tiny_sdxl_dir):
    cpu, _ = _images(tmp_path, tiny_sdxl_dir, "cpu", "float32", graphs=False)
    gpu, _ = _images(tmp_path, tiny_sdxl_dir, "cuda", "float32", graphs=False)
    for a, b in zip(cpu, gpu):
        assert np.abs(a - b).mean() < 2.0  # TF32 convolutions: small rounding only
