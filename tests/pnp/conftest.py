"""Fixtures for the engine tests: the tiny model loaded once, an inverted source, a text embedder."""

from __future__ import annotations

import pytest
import torch

from pnp_batch.config import generation_timesteps, load_config
from pnp_batch.models import load_models
from pnp_batch.pnp.inversion import ddim_invert


@pytest.fixture(scope="session")
def tiny_models(tiny_model_dir):
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
    """10-step inversion of a seeded 64x64 image: (10, 1, 4, 8, 8)."""
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        z0 = tiny_models.vae.encode(img).latent_dist.mean * tiny_models.scaling_factor
    inv = ddim_invert(tiny_models.unet, tiny_models.scheduler_config, z0, embed([""]), 10, generation_timesteps(10))
    return inv.latents

