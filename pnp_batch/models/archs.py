"""Random-weight models of real Stable Diffusion architectures, built from configs (no download).

For cost benchmarks only: a full-size UNet with random weights costs exactly what the trained one
does per evaluation, so UNet calls, batch elements, time and memory are the real figures; the
images are noise. `tiny` is the offline test model (models.tiny.tiny_model_dir) loaded the normal way.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from pnp_batch.backbones import SDXL
from pnp_batch.models.load import Models, resolve_device, resolve_dtype
from pnp_batch.models.sdxl import vae_dtype
from pnp_batch.models.tiny import SD_SCHEDULER, TOKENIZER_ASSETS, sd_unet, sd_vae
from pnp_batch.models.tiny_sdxl import (
    SDXL_SCALING_FACTOR,
    SDXL_SCHEDULER,
    sdxl_text_encoders,
    sdxl_tokenizers,
    sdxl_unet,
)

ARCHS = ("tiny", "sd21-base", "sd15", "sdxl")

# SDXL base 1.0's configs (unet/config.json, text_encoder*/config.json, vae/config.json), written out.
SDXL_CONFIG: dict[str, Any] = {
    "unet": {"block_out_channels": (320, 640, 1280), "norm_num_groups": 32, "attention_head_dim": (5, 10, 20),
             "cross_attention_dim": 2048, "addition_time_embed_dim": 256, "pooled_dim": 1280},
    # CLIP ViT-L/14's text tower (penultimate hidden states, 768 wide) ...
    "text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
             "hidden_act": "quick_gelu", "projection_dim": 768},
    # ... and OpenCLIP ViT-bigG/14's (1280 wide, projected pooled embedding 1280): 768 + 1280 = 2048.
    "text_2": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
               "hidden_act": "gelu", "projection_dim": 1280},
}


# Per architecture: the UNet's text-conditioning settings and the text encoder's config.
_ARCH: dict[str, dict[str, Any]] = {
    "sd21-base": {
        "unet": {"cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True},
        # SD 2.x's OpenCLIP ViT-H text tower (the penultimate-layer variant diffusers ships: 23 layers).
        "text": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                 "num_attention_heads": 16, "hidden_act": "gelu", "projection_dim": 512},
    },
    "sd15": {
        "unet": {"cross_attention_dim": 768, "attention_head_dim": 8, "use_linear_projection": False},
        # CLIP ViT-L/14's text tower.
        "text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                 "num_attention_heads": 12, "hidden_act": "quick_gelu", "projection_dim": 768},
    },
}


def _tokenizer():
    from transformers import CLIPTokenizer

    # The tiny tokenizer's vocabulary is smaller than CLIP's 49,408, so its ids stay in range of the
    # full-size embedding table; token ids do not change the cost of a UNet or text-encoder call.
    return CLIPTokenizer(
        vocab=str(TOKENIZER_ASSETS / "vocab.json"),
        merges=str(TOKENIZER_ASSETS / "merges.txt"),
        model_max_length=77,
    )


def _device_context(device: torch.device):
    """Build parameters directly on the target device where torch supports it."""
    if device.type == "cpu":
        return contextlib.nullcontext()
    return torch.device(device)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Create parameters in `dtype` directly: SDXL's UNet alone is 10 GB in float32, so building it in
    float32 and casting afterwards would need that much memory on a half-precision run."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def _as_dtype(dtype: Any, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    return resolve_dtype(str(dtype), device)


def build_random_models(arch: str, device: Any = "auto", dtype: Any = "auto", seed: int = 0) -> Models:
    """The named architecture with seeded random weights on `device` in `dtype` (eval, no grads)."""
    dev = device if isinstance(device, torch.device) else resolve_device(str(device))
    dt = _as_dtype(dtype, dev)
    if arch == "tiny":
        from pnp_batch.config import PipelineConfig
        from pnp_batch.models.load import load_models

        name = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dt]
        return load_models(PipelineConfig(model="tiny", device=str(dev), dtype=name))
    if arch == SDXL:
        return _build_sdxl(dev, dt, seed)
    if arch not in _ARCH:
        raise ValueError(f"unknown arch {arch!r}; one of {', '.join(ARCHS)}")
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = _ARCH[arch]
    tokenizer = _tokenizer()
    with _device_context(dev):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **spec["text"],
            )
        )
        torch.manual_seed(seed + 1)
        unet = sd_unet((320, 640, 1280, 1280), norm_num_groups=32, **spec["unet"])
        torch.manual_seed(seed + 2)
        vae = sd_vae((128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
    with torch.no_grad():
        # Random weights give an eps of arbitrary scale; keep it near a trained model's (|eps| ~ 1)
        # so a long DDIM inversion stays finite (inf/NaN would distort timings, not just images).
        unet.conv_out.weight.mul_(0.2)
        unet.conv_out.bias.zero_()
    for m in (text_encoder, unet, vae):
        m.to(dev)
        if dt != torch.float32:
            m.to(dtype=dt)
        m.eval()
        m.requires_grad_(False)
    return Models(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler_config=dict(SD_SCHEDULER),
        device=dev,
        dtype=dt,
        fingerprint=f"random:{arch}:{seed}",
        name=arch,
        is_test_model=True,
    )


def _build_sdxl(dev: torch.device, dt: torch.dtype, seed: int) -> Models:
    """SDXL base at full size, random weights; the VAE in float32 where the model runs in float16, as
    loading a real SDXL does (models/sdxl.vae_dtype)."""
    tokenizer, tokenizer_2 = sdxl_tokenizers()
    with _device_context(dev), _default_dtype(dt):
        text_encoder, text_encoder_2 = sdxl_text_encoders(tokenizer, SDXL_CONFIG["text"], SDXL_CONFIG["text_2"],
                                                          49408, seed)
        torch.manual_seed(seed + 1)
        unet = sdxl_unet(**SDXL_CONFIG["unet"])
    with _device_context(dev):
        torch.manual_seed(seed + 2)
        vae = sd_vae((128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, scaling_factor=SDXL_SCALING_FACTOR)
    with torch.no_grad():  # |eps| of a trained model's order, as for SD above
        unet.conv_out.weight.mul_(0.2)
        unet.conv_out.bias.zero_()
    for m, d in ((text_encoder, dt), (text_encoder_2, dt), (unet, dt), (vae, vae_dtype(dict(vae.config), dt))):
        m.to(dev)
        if next(m.parameters()).dtype != d:
            m.to(dtype=d)
        m.eval()
        m.requires_grad_(False)
    return Models(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler_config=dict(SDXL_SCHEDULER),
        device=dev, dtype=dt, fingerprint=f"random:sdxl:{seed}", name="sdxl", is_test_model=True,
        architecture=SDXL, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
    )
