"""Fidelity: with injection off (pnp_f_t = pnp_attn_t = 0) and the same starting latents, the Translator's
image equals diffusers' own text-to-image pipeline with a DDIM scheduler built from the model's
scheduler config, the same prompts, negative prompt and guidance, within 1 level (fp32).

SDXL (tiny-sdxl) against StableDiffusionXLPipeline: both text encoders, the pooled embedding and the
size/crop time ids must be built exactly as the pipeline builds them; SD (tiny) against
StableDiffusionPipeline. PnP starts from the inverted latent; here both start from one random latent
(row 0 of the latents handed to the Translator; the rest is never read with injection off).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pnp_batch.config import load_config
from pnp_batch.io.rows import Row
from pnp_batch.translate.translator import Translator

STEPS = 6
NEGATIVE = "ugly, blurry, black, low res, unrealistic"
PROMPTS = ["a watercolor painting of a cat", "a photo of a bronze statue"]


def _ours(preset: str, model_dir, tmp_path, x: torch.Tensor, k: int) -> tuple[np.ndarray, Translator]:
    cfg = load_config(preset, {"model": str(model_dir), "device": "cpu", "dtype": "float32", "steps": STEPS,
                               "inversion_steps": STEPS, "pnp_f_t": 0, "pnp_attn_t": 0,
                               "negative_prompt": NEGATIVE, "guidance_scale": 7.5})
    tr = Translator(cfg, str(tmp_path / "out"))
    latents = torch.zeros(STEPS, 1, *x.shape[1:])
    latents[0] = x
    rows = [Row(index=j, id=f"r{j}", image=None, image_bytes=None, source_prompt="a photo", target_prompt=p)
            for j, p in enumerate(PROMPTS[:k])]
    images, negs = tr.translate(latents, rows)
    assert negs == [NEGATIVE] * k
    return images, tr


def _theirs(pipe, x: torch.Tensor, k: int) -> np.ndarray:
    h, w = x.shape[-2] * 8, x.shape[-1] * 8
    out = pipe(prompt=PROMPTS[:k], negative_prompt=[NEGATIVE] * k, guidance_scale=7.5, num_inference_steps=STEPS,
               height=h, width=w, latents=x.repeat(k, 1, 1, 1), output_type="np").images
    return np.round(out * 255).astype(np.uint8)


def _compare(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape
    diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    assert diff.max() <= 1, f"max difference {diff.max()} levels"
    assert ours.std() > 10  # real images, not a constant that would match trivially


def _latent(h: int, w: int) -> torch.Tensor:
    return torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("k", [1, 2])
def test_sdxl_path_equals_diffusers_sdxl_pipeline(tiny_sdxl_dir, tmp_path, k):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    x = _latent(8, 12)  # 64x96 px: height and width differ, so swapped time ids would show
    ours, tr = _ours("tiny-sdxl", tiny_sdxl_dir, tmp_path, x, k)
    m = tr.models
    tr.injector.remove()  # diffusers' own attention processors
    pipe = StableDiffusionXLPipeline(
        vae=m.vae, text_encoder=m.text_encoder, text_encoder_2=m.text_encoder_2, tokenizer=m.tokenizer,
        tokenizer_2=m.tokenizer_2, unet=m.unet, scheduler=DDIMScheduler.from_config(m.scheduler_config),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    _compare(ours, _theirs(pipe, x, k))


def test_sd_path_equals_diffusers_sd_pipeline(tiny_model_dir, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    x = _latent(8, 12)
    ours, tr = _ours("tiny", tiny_model_dir, tmp_path, x, 2)
    m = tr.models
    tr.injector.remove()
    pipe = StableDiffusionPipeline(
        vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=m.unet,
        scheduler=DDIMScheduler.from_config(m.scheduler_config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    _compare(ours, _theirs(pipe, x, 2))
