"""The offline SDXL test model `tiny-sdxl`: SDXL base's block topology, tiny widths, seeded weights.

Like `tiny` (models/tiny.py): built once into the local cache (`PNP_BATCH_CACHE`) with
StableDiffusionXLPipeline.save_pretrained and loaded through the same code as a real SDXL folder.
SDXL's topology is kept exactly: 3 down and 3 up blocks, 2 layers per block, transformer depth
(1, 2, 10) (the lowest decoder block and the mid block have 10 transformer blocks per attention),
dual text encoders (CLIPTextModel + CLIPTextModelWithProjection, hidden states concatenated, pooled
embedding from the second), `text_time` added conditioning with 6 size ids, SDXL's VAE scaling
factor 0.13025 and its scheduler config.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from pnp_batch.models.tiny import TOKENIZER_ASSETS, builder_hash, cached_model, save_test_model, sd_vae

log = logging.getLogger(__name__)

TINY_SDXL_VERSION = "tiny-sdxl-v1"
TINY_SDXL_SEED = 0
SDXL_SCALING_FACTOR = 0.13025
TIME_IDS = 6  # original size (2), crop top-left (2), target size (2)

# SDXL base 1.0's scheduler_config.json (EulerDiscreteScheduler; the DDIM scheduler built from it
# has the same leading spacing and steps_offset=1 as SD's).
SDXL_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "sample_max_value": 1.0,
    "prediction_type": "epsilon",
}


def sdxl_unet(block_out_channels: tuple[int, ...], norm_num_groups: int, attention_head_dim: tuple[int, ...],
              cross_attention_dim: int, addition_time_embed_dim: int, pooled_dim: int, sample_size: int = 128):
    """A UNet2DConditionModel with SDXL base's block topology; widths and text settings given.

    projection_class_embeddings_input_dim = 6 time ids x addition_time_embed_dim + the pooled text
    embedding's width (SDXL base: 6 x 256 + 1280 = 2816)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=block_out_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=attention_head_dim,
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=norm_num_groups,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=TIME_IDS * addition_time_embed_dim + pooled_dim,
    )


def sdxl_tokenizers() -> tuple[Any, Any]:
    """Two CLIP tokenizers on the shipped tiny vocabulary; the second pads with "!" as SDXL's
    tokenizer_2 does (OpenCLIP's convention)."""
    from transformers import CLIPTokenizer

    files = {"vocab": str(TOKENIZER_ASSETS / "vocab.json"), "merges": str(TOKENIZER_ASSETS / "merges.txt")}
    return CLIPTokenizer(**files, model_max_length=77), CLIPTokenizer(**files, model_max_length=77, pad_token="!")


def sdxl_text_encoders(tokenizer, text: dict[str, Any], text_2: dict[str, Any], vocab_size: int, seed: int):
    """CLIPTextModel and CLIPTextModelWithProjection from their config values, seeded."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    common = {"vocab_size": vocab_size, "max_position_embeddings": 77, "bos_token_id": tokenizer.bos_token_id,
              "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**common, **text))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**common, **text_2))
    return text_encoder, text_encoder_2


def make_tiny_sdxl(out_dir: str | os.PathLike, seed: int = TINY_SDXL_SEED) -> Path:
    """Write the tiny SDXL test model in diffusers format (StableDiffusionXLPipeline.save_pretrained)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    out = Path(out_dir)
    tokenizer, tokenizer_2 = sdxl_tokenizers()
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "hidden_act": "quick_gelu", "projection_dim": 32}
    text_2 = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "hidden_act": "gelu", "projection_dim": 32}
    text_encoder, text_encoder_2 = sdxl_text_encoders(tokenizer, text, text_2, len(tokenizer), seed)
    torch.manual_seed(seed + 1)
    unet = sdxl_unet((16, 32, 64), norm_num_groups=8, attention_head_dim=(1, 2, 4),
                     cross_attention_dim=text["hidden_size"] + text_2["hidden_size"], addition_time_embed_dim=8,
                     pooled_dim=text_2["projection_dim"])
    # Random weights give an eps whose size and dependence on x and t no trained model has; shrink the
    # output layer (|eps| ~ 0.06) so DDIM inversion is stable and converges with the step count as a
    # trained model's does (measured round trip: 0.096 at 50 steps, 0.028 at 200; at |eps| ~ 1 it diverges).
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.2)
        unet.conv_out.bias.zero_()
    torch.manual_seed(seed + 2)
    vae = sd_vae((8, 16, 16, 16), layers_per_block=1, norm_num_groups=4, scaling_factor=SDXL_SCALING_FACTOR)
    # As for `tiny`: scale the random posterior mean to latents of std ~1 after SDXL's scaling factor.
    with torch.no_grad():
        vae.quant_conv.weight[:4].mul_(20.0)
        vae.quant_conv.bias[:4].mul_(20.0)
        vae.post_quant_conv.weight.div_(20.0)
    scheduler = EulerDiscreteScheduler(**{k: v for k, v in SDXL_SCHEDULER.items()
                                          if k not in ("clip_sample", "set_alpha_to_one", "skip_prk_steps",
                                                       "sample_max_value")})
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    # the scheduler file as SDXL's own has it
    return save_test_model(pipe, out, SDXL_SCHEDULER, ("tokenizer", "tokenizer_2"),
                           {"name": TINY_SDXL_VERSION, "seed": seed})


def tiny_sdxl_dir() -> Path:
    """The tiny SDXL model in the local cache, built on first use (a few seconds, no download)."""
    import inspect
    import sys

    recipe = builder_hash(inspect.getsource(sys.modules[__name__]))
    return cached_model(TINY_SDXL_VERSION, recipe, make_tiny_sdxl, "SDXL test model")
