"""SDXL's part of loading (called from models/load.py): what the pipeline folder is, its second text
encoder, and the VAE's precision.

A diffusers folder (or hub snapshot) says what it holds in model_index.json. SDXL base has two text
encoders (`text_encoder`: CLIPTextModel, `text_encoder_2`: CLIPTextModelWithProjection) and their
tokenizers; the refiner has only the second and `requires_aesthetics_score`; inpainting variants name
an inpainting pipeline (and their UNet takes 9 input channels, which backbones.recognise rejects too).
PnP runs the base model only: the others are refused before anything else is loaded.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


def pipeline_index(src: str, kw: dict[str, Any]) -> dict[str, Any]:
    """The folder's model_index.json as a dict; {} where there is none (or it cannot be read yet:
    the component loading that follows then reports the problem)."""
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(src, **kw))
    except (OSError, ValueError) as e:
        log.debug("no model_index.json for %s: %s", src, e)
        return {}


def _component(index: dict[str, Any], name: str) -> str | None:
    """The class a pipeline component names in model_index.json (None when absent or null)."""
    entry = index.get(name)
    if isinstance(entry, (list, tuple)) and len(entry) == 2:
        return entry[1]
    return None


def is_sdxl(index: dict[str, Any]) -> bool:
    """An SDXL pipeline folder: it names a second text encoder."""
    return _component(index, "text_encoder_2") is not None


def unsupported(index: dict[str, Any]) -> str | None:
    """Why this pipeline folder cannot be used for PnP, or None."""
    cls = str(index.get("_class_name", ""))
    if "Inpaint" in cls:
        return (f"it is an inpainting pipeline ({cls}): its UNet takes latents + mask + masked image; "
                "PnP needs the text-to-image base model")
    if index.get("requires_aesthetics_score") or (
        _component(index, "text_encoder_2") is not None and _component(index, "text_encoder") is None
    ):
        return (f"it is an SDXL refiner ({cls or 'no pipeline class'}: only text_encoder_2, "
                "requires_aesthetics_score): an img2img model for the last denoising steps, not a base model; "
                "use stabilityai/stable-diffusion-xl-base-1.0 or a fine-tune of it")
    return None


def load_second_encoder(src: str, dtype: torch.dtype, kw: dict[str, Any]) -> dict[str, Any]:
    """SDXL's tokenizer_2 and text_encoder_2 (CLIPTextModelWithProjection: hidden states + pooled)."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    return {
        "tokenizer_2": CLIPTokenizer.from_pretrained(src, subfolder="tokenizer_2", **kw),
        "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(src, subfolder="text_encoder_2",
                                                                      torch_dtype=dtype, **kw),
    }


def vae_dtype(vae_config: dict[str, Any], dtype: torch.dtype) -> torch.dtype:
    """The dtype SDXL's VAE runs in: float32 where the model runs in float16 and the VAE's config asks
    for it (`force_upcast`, true for SDXL's VAE, which overflows to inf/NaN in float16), as diffusers'
    SDXL pipeline does; otherwise the model's. Encoding and decoding then cost fp32 VAE time, a small
    part of a translation (2 VAE calls against 100-200 UNet calls per image)."""
    if dtype == torch.float16 and bool(vae_config.get("force_upcast", False)):
        return torch.float32
    return dtype
