"""GPU checks (skipped without CUDA): the translator on cuda in fp16 and fp32, against the CPU."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.gpu
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _row(data: bytes, prompt: str, i: int):
    from pnp_batch.rows import Row

    return Row(index=i, id=f"r{i}", image=None, image_bytes=data, source_prompt="a photo", target_prompt=prompt)


def _translate(tmp_path, tiny_model_dir, device: str, dtype: str) -> list[np.ndarray]:
    from pnp_batch.config import load_config
    from pnp_batch.worker import Translator

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (8, 12, 3), dtype=np.uint8)).resize((192, 128), Image.BICUBIC).save(buf, "PNG")
    cfg = load_config("tiny", {"model": str(tiny_model_dir), "device": device, "dtype": dtype, "steps": 10,
                               "inversion_steps": 10, "resolution": 128})
    out = tmp_path / f"{device}-{dtype}"
    tr = Translator(cfg, str(out), worker="test")
    rows = [_row(buf.getvalue(), p, i) for i, p in enumerate(["a photo of a fox", "a watercolor painting"])]
    recs = tr.process(rows)
    assert [r["status"] for r in recs] == ["ok", "ok"], recs
    assert tr.counters.invert_calls == 10 and tr.counters.source_elements == 8
    return [np.asarray(Image.open(out / "images" / f"r{i}.png")).astype(int) for i in range(2)]


@cuda
def test_cuda_fp32_matches_cpu_and_fp16_runs(tmp_path, tiny_model_dir):
    cpu = _translate(tmp_path, tiny_model_dir, "cpu", "float32")
    gpu = _translate(tmp_path, tiny_model_dir, "cuda", "float32")
    half = _translate(tmp_path, tiny_model_dir, "cuda", "float16")
    for a, b, h in zip(cpu, gpu, half):
        assert a.shape == b.shape == h.shape == (128, 192, 3)
        assert np.abs(a - b).mean() < 2.0  # cuDNN may use TF32 convolutions: small rounding only
        assert np.abs(a - h).mean() < 8.0  # fp16 through 10 steps of a random model
