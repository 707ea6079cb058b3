"""Translator.decode bounds the output pixels per VAE call (SDXL's fp32 VAE at 1024 px would otherwise
grow past a GPU's memory with K): the slices give the images one call gives."""

from __future__ import annotations

import numpy as np
import torch

from pnp_batch.config import load_config
from pnp_batch.translate import translator as translator_module
from pnp_batch.translate.translator import Translator


def test_decode_in_slices_equals_one_call(tiny_models, tmp_path, monkeypatch):
    tr = Translator(load_config("tiny", {"model": "tiny"}), str(tmp_path), models=tiny_models)
    tr.injector.remove()  # the session's model is shared: leave its UNet as it was
    latents = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    whole = tr.decode(latents)
    calls = []
    hook = tiny_models.vae.decoder.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    try:
        # room for 2 images of 64x64 px in fp32 per call: 3 calls for 5 images
        monkeypatch.setattr(translator_module, "VAE_DECODE_PIXEL_BYTES", 2 * 64 * 64 * 4)
        sliced = tr.decode(latents)
    finally:
        hook.remove()
    assert calls == [2, 2, 1]
    assert sliced.shape == whole.shape == (5, 64, 64, 3)
    assert np.abs(sliced.astype(np.int16) - whole.astype(np.int16)).max() <= 1
