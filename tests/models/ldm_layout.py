"""Test scaffolding: write a diffusers SD model in the original (CompVis/LDM) single-file key layout.

The inverse of what diffusers' `from_single_file` converts, for SD's topology (any widths, any
layers per block): UNet `model.diffusion_model.*`, VAE `first_stage_model.*`, text encoder as
SD 1.x's CLIP (`cond_stage_model.transformer.text_model.*`) or SD 2.x's OpenCLIP
(`cond_stage_model.model.*`, fused q/k/v `in_proj`). Checkpoint files from model-sharing sites use
this layout.
"""

from __future__ import annotations

import torch

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _sub(key: str, table: dict[str, str]) -> str:
    head, _, tail = key.rpartition(".")  # tail: weight / bias
    for old, new in table.items():
        if head.endswith("." + old) or head == old:
            return head[: len(head) - len(old)] + new + "." + tail
    raise KeyError(f"no mapping for {key}")


def unet_to_ldm(sd: dict[str, torch.Tensor], layers_per_block: int, n_blocks: int) -> dict[str, torch.Tensor]:
    out = {}
    top = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",  # SDXL
           "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for key, value in sd.items():
        parts = key.split(".")
        prefix = ".".join(parts[:2]) if parts[0] in ("time_embedding", "add_embedding") else parts[0]
        if prefix in top:
            new = top[prefix] + key[len(prefix):]
        elif parts[0] == "down_blocks":
            i, kind, j = int(parts[1]), parts[2], int(parts[3])
            rest = ".".join(parts[4:])
            if kind == "resnets":
                new = f"input_blocks.{(layers_per_block + 1) * i + j + 1}.0." + _sub(rest, _RESNET)
            elif kind == "attentions":
                new = f"input_blocks.{(layers_per_block + 1) * i + j + 1}.1.{rest}"
            else:  # downsamplers.0.conv
                new = f"input_blocks.{(layers_per_block + 1) * (i + 1)}.0.op." + ".".join(parts[5:])
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            new = (f"middle_block.{2 * j}." + _sub(rest, _RESNET)) if kind == "resnets" else f"middle_block.1.{rest}"
        elif parts[0] == "up_blocks":
            i, kind, j = int(parts[1]), parts[2], int(parts[3])
            rest = ".".join(parts[4:])
            block = (layers_per_block + 1) * i
            if kind == "resnets":
                new = f"output_blocks.{block + j}.0." + _sub(rest, _RESNET)
            elif kind == "attentions":
                new = f"output_blocks.{block + j}.1.{rest}"
            else:  # upsamplers.0.conv: after the resnet (and the attention, where the block has one)
                has_attn = any(k.startswith(f"up_blocks.{i}.attentions.") for k in sd)
                new = f"output_blocks.{block + layers_per_block}.{2 if has_attn else 1}.conv." + ".".join(parts[5:])
        else:
            raise KeyError(f"no mapping for UNet key {key}")
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(sd: dict[str, torch.Tensor], n_blocks: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] in ("quant_conv", "post_quant_conv"):
            new = key
        else:
            coder, rest = parts[0], parts[1:]
            if rest[0] in ("conv_in", "conv_out"):
                new = key
            elif rest[0] == "conv_norm_out":
                new = f"{coder}.norm_out." + rest[-1]
            elif rest[0] in ("down_blocks", "up_blocks"):
                i = int(rest[1]) if rest[0] == "down_blocks" else n_blocks - 1 - int(rest[1])
                where = "down" if rest[0] == "down_blocks" else "up"
                if rest[2] == "resnets":
                    tail = ".".join(rest[4:])
                    tail = _sub(tail, _VAE_RESNET) if tail.startswith("conv_shortcut") else tail
                    new = f"{coder}.{where}.{i}.block.{rest[3]}.{tail}"
                else:  # downsamplers.0.conv / upsamplers.0.conv
                    new = f"{coder}.{where}.{i}.{'downsample' if where == 'down' else 'upsample'}.conv.{rest[-1]}"
            elif rest[0] == "mid_block":
                if rest[1] == "resnets":
                    new = f"{coder}.mid.block_{int(rest[2]) + 1}." + ".".join(rest[3:])
                else:  # attentions.0.<layer>: 1x1 convolutions in the original
                    new = f"{coder}.mid.attn_1." + _sub(".".join(rest[3:]), _VAE_ATTN)
                    if value.dim() == 2:
                        value = value[:, :, None, None]
            else:
                raise KeyError(f"no mapping for VAE key {key}")
        out["first_stage_model." + new] = value
    return out


def clip_to_ldm(sd: dict[str, torch.Tensor], prefix: str = "cond_stage_model.transformer.") -> dict[str, torch.Tensor]:
    """SD 1.x (and SDXL's first encoder, prefix conditioner.embedders.0.transformer.): the HF CLIP text
    model under PREFIX + text_model."""
    out = {}
    for key, value in sd.items():
        if key.endswith("position_ids"):
            continue
        k = key.removeprefix("text_model.")
        out[prefix + "text_model." + k] = value
    return out


def open_clip_to_ldm(sd: dict[str, torch.Tensor], prefix: str = "cond_stage_model.model.") -> dict[str, torch.Tensor]:
    """SD 2.x (and SDXL's second encoder, prefix conditioner.embedders.1.model.): OpenCLIP's layout,
    q/k/v fused into in_proj, the projection (if any) stored transposed."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items() if not k.endswith("position_ids")}
    out = {prefix + "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           prefix + "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           prefix + "ln_final.weight": sd.pop("final_layer_norm.weight"),
           prefix + "ln_final.bias": sd.pop("final_layer_norm.bias")}
    if "text_projection.weight" in sd:
        out[prefix + "text_projection"] = sd.pop("text_projection.weight").T
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat(
                [sd.pop(src + f"self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")])
            for old, new in names.items():
                out[dst + f"{new}.{kind}"] = sd.pop(src + f"{old}.{kind}")
    assert not sd, f"unmapped text encoder keys: {sorted(sd)[:5]}"
    return out


def to_ldm_checkpoint(unet, vae, text_encoder, text_layout: str = "clip", text_encoder_2=None) -> dict[str, torch.Tensor]:
    """One state dict in the original single-file layout ('clip': SD 1.x, 'open_clip': SD 2.x, 'sdxl':
    CLIP-L as conditioner.embedders.0 and OpenCLIP bigG as conditioner.embedders.1)."""
    n = len(unet.config.block_out_channels)
    ckpt = unet_to_ldm(unet.state_dict(), unet.config.layers_per_block, n)
    ckpt.update(vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels)))
    te = text_encoder.state_dict()
    if text_layout == "sdxl":
        ckpt.update(clip_to_ldm(te, "conditioner.embedders.0.transformer."))
        ckpt.update(open_clip_to_ldm(text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    else:
        ckpt.update(clip_to_ldm(te) if text_layout == "clip" else open_clip_to_ldm(te))
    return {k: v.detach().clone().contiguous() for k, v in ckpt.items()}
