"""The offline test model `tiny`: Stable Diffusion's block topology, tiny widths, seeded weights.

Built once into the local cache (`PNP_BATCH_CACHE`) and loaded through the same diffusers code as a
real model folder; `pnp-batch make-test-model DIR` writes it anywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pnp_batch.resources import TOKENIZER_ASSETS

log = logging.getLogger(__name__)

TINY_VERSION = "tiny-v1"
TINY_SEED = 0
TEST_MODEL_NOTE = "random-weight test model: outputs show the plumbing, not quality"

# SD 2.1-base's scheduler config (the tiny model ships the same one, so the schedules match SD's).
SD_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def cache_dir() -> Path:
    """Where built test models live: PNP_BATCH_CACHE, default ~/.cache/pnp-batch."""
    root = os.environ.get("PNP_BATCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pnp-batch")
    return Path(root)


def sd_unet(block_out_channels: tuple[int, ...], norm_num_groups: int, **conditioning: Any):
    """A UNet2DConditionModel with Stable Diffusion's block topology (4 down, 4 up, 2 layers each,
    cross-attention in the first three down and last three up blocks); widths and text settings given."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=block_out_channels,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=norm_num_groups,
        **conditioning,
    )


def sd_vae(block_out_channels: tuple[int, ...], layers_per_block: int, norm_num_groups: int,
           scaling_factor: float = 0.18215):
    """An AutoencoderKL with Stable Diffusion's VAE layout (4 blocks, 4 latent channels, 0.18215;
    SDXL's VAE has the same layout and 0.13025)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=block_out_channels,
        latent_channels=4,
        layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups,
        sample_size=512,
        scaling_factor=scaling_factor,
    )


def make_test_model(out_dir: str | os.PathLike, seed: int = TINY_SEED) -> Path:
    """Write the tiny test model in diffusers format: SD's block topology, tiny widths, seeded weights.

    Every injection point of PNP_SPEC.md section 4 exists (up_blocks[1].resnets[1], and attn1 of
    up_blocks[1].attentions[1..2], up_blocks[2..3].attentions[0..2]). Saved with
    StableDiffusionPipeline.save_pretrained, so any diffusers code (ours or the authors') loads it.
    """
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out = Path(out_dir)
    tokenizer = CLIPTokenizer(
        vocab=str(TOKENIZER_ASSETS / "vocab.json"),
        merges=str(TOKENIZER_ASSETS / "merges.txt"),
        model_max_length=77,
    )
    vocab_size = len(tokenizer)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_act="gelu",
            projection_dim=32,
        )
    )
    torch.manual_seed(seed + 1)
    unet = sd_unet((16, 16, 32, 32), norm_num_groups=8, cross_attention_dim=32, attention_head_dim=1,
                   use_linear_projection=True)
    # Random weights give an eps prediction of large, arbitrary scale; shrink the output layer so the
    # model behaves like a trained one in magnitude (|eps| around 1) and DDIM inversion stays stable.
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.2)
        unet.conv_out.bias.zero_()
    torch.manual_seed(seed + 2)
    vae = sd_vae((8, 16, 16, 16), layers_per_block=1, norm_num_groups=4)
    # A random encoder gives latents of std ~0.07 after SD's 0.18215 scaling; SD's trained VAE gives
    # ~1, the scale the noise schedule assumes. Scale the posterior mean up (and the decoder's input
    # down by as much) so DDIM inversion sees latents of the size it does with real models.
    with torch.no_grad():
        vae.quant_conv.weight[:4].mul_(15.0)
        vae.quant_conv.bias[:4].mul_(15.0)
        vae.post_quant_conv.weight.div_(15.0)
    scheduler = PNDMScheduler(**{k: v for k, v in SD_SCHEDULER.items() if k not in ("clip_sample",)})
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    # SD's own scheduler_config.json carries clip_sample=false for the DDIM scheduler built from it
    # (DDIM's default is true); PNDMScheduler does not keep that key, so the file is written as SD has it.
    return save_test_model(pipe, out, SD_SCHEDULER, ("tokenizer",), {"name": TINY_VERSION, "seed": seed})


def save_test_model(pipe: Any, out: Path, scheduler: dict[str, Any], tokenizers: tuple[str, ...],
                    marker: dict[str, Any]) -> Path:
    """Save a built test pipeline as a diffusers folder, atomically (a temporary folder renamed into place):
    the scheduler file with the model's own keys, the slow-tokenizer files that older transformers read,
    and the marker file that says it is a test model."""
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    sched_json = tmp / "scheduler" / "scheduler_config.json"
    sched_cfg = json.loads(sched_json.read_text())
    sched_cfg.update(scheduler)
    sched_json.write_text(json.dumps(sched_cfg, indent=2, sort_keys=True) + "\n")
    for sub in tokenizers:
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(TOKENIZER_ASSETS / name, tmp / sub / name)
    (tmp / "PNP_BATCH_TEST_MODEL.json").write_text(json.dumps({**marker, "note": TEST_MODEL_NOTE}, indent=2) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def builder_hash(*recipes: str) -> str:
    """A short hash of a test model's recipe (the source of the code that builds it) and the tokenizer
    files it ships: it changes whenever the recipe does, so a stale cached build is never used."""
    h = hashlib.sha256()
    for source in recipes:
        h.update(source.encode())
    for name in ("vocab.json", "merges.txt"):
        h.update((TOKENIZER_ASSETS / name).read_bytes())
    return h.hexdigest()[:10]


def cached_model(version: str, recipe_hash: str, build: Callable[[Path], Any], what: str) -> Path:
    """A test model in the local cache (`{version}-{recipe_hash}`), built on first use (seconds, no
    download)."""
    path = cache_dir() / f"{version}-{recipe_hash}"
    if not (path / "model_index.json").is_file():
        log.info("building the offline %s in %s", what, path)
        build(path)
    return path


def tiny_model_dir() -> Path:
    """The tiny model in the local cache, built on first use (a few seconds, no download)."""
    import inspect

    return cached_model(TINY_VERSION, builder_hash(inspect.getsource(make_test_model)), make_test_model,
                        "test model")
