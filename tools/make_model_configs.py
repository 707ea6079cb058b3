"""Write the model configurations pnp-batch ships for offline single-file loading (no weights).

    python tools/make_model_configs.py            # rewrites pnp_batch/assets/model_configs/

One diffusers folder layout per family (sd15, sd21, sd21-base, sdxl): model_index.json and each
component's config, as the families' public diffusers repositories define them, written through
diffusers' and transformers' own config classes (so every default is the installed libraries').
The tokenizers' BPE vocabulary is not written here: models/single_file.py builds vocab.json and
merges.txt from assets/clip_bpe/ (CLIP's merges, MIT licence) when it lays a folder out.

`--bpe FILE` also rewrites assets/clip_bpe/clip_merges.txt.gz from CLIP's
bpe_simple_vocab_16e6.txt.gz (as shipped in the open_clip_torch wheel), keeping the 48,894 merges
CLIP's tokenizer uses.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import shutil
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parents[1] / "pnp_batch" / "assets"
OUT = ASSETS / "model_configs"
CLIP_MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 256 bytes, 256 word-final bytes, these merges, 2 specials

SD_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
                "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "hidden_act": "quick_gelu", "projection_dim": 768}
OPEN_CLIP_H = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23, "num_attention_heads": 16,
               "hidden_act": "gelu", "projection_dim": 512}
OPEN_CLIP_BIG_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
                   "hidden_act": "gelu", "projection_dim": 1280}
SD_UNET = {"block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
           "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
           "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3}
SDXL_UNET = {"block_out_channels": (320, 640, 1280), "layers_per_block": 2,
             "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
             "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20),
             "cross_attention_dim": 2048, "use_linear_projection": True, "addition_embed_type": "text_time",
             "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816, "sample_size": 128}

FAMILIES = {
    "sd15": {
        "pipeline": "StableDiffusionPipeline",
        "unet": {**SD_UNET, "cross_attention_dim": 768, "attention_head_dim": 8, "sample_size": 64},
        "vae": {"sample_size": 512, "scaling_factor": 0.18215},
        "text_encoder": ("CLIPTextModel", CLIP_L),
        "tokenizer_pad": "<|endoftext|>",
        "scheduler": ("DDIMScheduler", {**SD_SCHEDULER, "prediction_type": "epsilon"}),
    },
    "sd21-base": {
        "pipeline": "StableDiffusionPipeline",
        "unet": {**SD_UNET, "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20),
                 "use_linear_projection": True, "sample_size": 64},
        "vae": {"sample_size": 512, "scaling_factor": 0.18215},
        "text_encoder": ("CLIPTextModel", OPEN_CLIP_H),
        "tokenizer_pad": "!",
        "scheduler": ("DDIMScheduler", {**SD_SCHEDULER, "prediction_type": "epsilon"}),
    },
    "sd21": {
        "pipeline": "StableDiffusionPipeline",
        "unet": {**SD_UNET, "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20),
                 "use_linear_projection": True, "sample_size": 96},
        "vae": {"sample_size": 768, "scaling_factor": 0.18215},
        "text_encoder": ("CLIPTextModel", OPEN_CLIP_H),
        "tokenizer_pad": "!",
        "scheduler": ("DDIMScheduler", {**SD_SCHEDULER, "prediction_type": "v_prediction"}),
    },
    "sdxl": {
        "pipeline": "StableDiffusionXLPipeline",
        "unet": SDXL_UNET,
        "vae": {"sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        "text_encoder": ("CLIPTextModel", CLIP_L),
        "text_encoder_2": ("CLIPTextModelWithProjection", OPEN_CLIP_BIG_G),
        "tokenizer_pad": "<|endoftext|>",
        "tokenizer_2_pad": "!",
        # SDXL's own file keeps SD's DDIM keys (clip_sample and set_alpha_to_one false) beside Euler's: the
        # DDIM scheduler PnP builds from it needs them (DDIM's defaults are true for both)
        "scheduler": ("EulerDiscreteScheduler", {**SD_SCHEDULER, "sample_max_value": 1.0,
                                                 "prediction_type": "epsilon", "timestep_spacing": "leading",
                                                 "interpolation_type": "linear", "use_karras_sigmas": False}),
    },
}


def _unet(folder: Path, spec: dict) -> None:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        UNet2DConditionModel(in_channels=4, out_channels=4, norm_num_groups=32, **spec).save_config(folder)


def _vae(folder: Path, spec: dict) -> None:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                      up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                      latent_channels=4, layers_per_block=2, norm_num_groups=32, **spec).save_config(folder)


def _text_encoder(folder: Path, cls: str, spec: dict) -> None:
    from transformers import CLIPTextConfig

    # bos/eos/pad ids as in the families' own text_encoder/config.json
    cfg = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2,
                         pad_token_id=1, **spec)
    cfg.architectures = [cls]
    cfg.save_pretrained(folder)


def _tokenizer(folder: Path, pad: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    cfg = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
           "errors": "replace", "add_prefix_space": False, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _scheduler(folder: Path, cls: str, spec: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"_class_name": cls, **spec}
    (folder / "scheduler_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def write_family(name: str, spec: dict) -> None:
    root = OUT / name
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    index = {"_class_name": spec["pipeline"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", spec["scheduler"][0]],
             "text_encoder": ["transformers", spec["text_encoder"][0]], "tokenizer": ["transformers", "CLIPTokenizer"]}
    if spec["pipeline"] == "StableDiffusionPipeline":
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    else:
        index.update(text_encoder_2=["transformers", spec["text_encoder_2"][0]],
                     tokenizer_2=["transformers", "CLIPTokenizer"], image_encoder=[None, None],
                     feature_extractor=[None, None], force_zeros_for_empty_prompt=True)
    (root / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    _unet(root / "unet", spec["unet"])
    _vae(root / "vae", spec["vae"])
    _text_encoder(root / "text_encoder", *spec["text_encoder"])
    _tokenizer(root / "tokenizer", spec["tokenizer_pad"])
    if "text_encoder_2" in spec:
        _text_encoder(root / "text_encoder_2", *spec["text_encoder_2"])
        _tokenizer(root / "tokenizer_2", spec["tokenizer_2_pad"])
    _scheduler(root / "scheduler", *spec["scheduler"])
    for p in root.rglob("*.json"):  # drop the library versions, so a rerun changes nothing
        d = json.loads(p.read_text())
        for k in ("_diffusers_version", "transformers_version"):
            d.pop(k, None)
        p.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def write_merges(bpe_gz: Path) -> None:
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    keep = lines[: CLIP_MERGES + 1]  # the header line, then the merges
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as f:
        f.write(("\n".join(keep) + "\n").encode())
    out = ASSETS / "clip_bpe" / "clip_merges.txt.gz"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buf.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bpe", type=Path, help="CLIP's bpe_simple_vocab_16e6.txt.gz, to rewrite the shipped merges")
    a = ap.parse_args()
    if a.bpe:
        write_merges(a.bpe)
    for name, spec in FAMILIES.items():
        write_family(name, spec)
    print(f"wrote {', '.join(FAMILIES)} to {OUT}")


if __name__ == "__main__":
    main()
