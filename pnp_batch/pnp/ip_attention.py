"""IP-Adapter cross-attention with a scale per batch element, so one UNet call can mix rows that have an
image prompt, rows that have none (scale 0: text only) and the PnP source branch (scale 0).

diffusers' `IPAdapterAttnProcessor2_0` (installed by `load_ip_adapter` on every cross-attention layer,
attn2) adds `scale * attention(query, image tokens)` with one scale per layer for the whole batch.
`RowScaledIPAttnProcessor` is that processor (a subclass: `set_ip_adapter_scale` and
`unload_ip_adapter` still recognise it) sharing the loaded `to_k_ip` / `to_v_ip` modules, whose scale
is a column of a (batch, layers) tensor handed to the UNet call as `cross_attention_kwargs=
{"ip_adapter_masks": RowScales(weights)}`: `ip_adapter_masks` is the keyword diffusers' Attention
passes to IP-Adapter processors and silently drops for every other processor (attn1, PnP's included),
so no other layer sees it. Without it the processor is diffusers' own (its per-layer `scale`).

The arithmetic is diffusers' own, step for step, with `scale` replaced by the element's weight, so an
element with weight w gives the bits diffusers gives with scale w, and weight 0 adds an exact zero (the
layer's output equals the plain cross-attention's: a row without image prompt is text-only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

from pnp_batch.pnp.conditioning import RowScales


class RowScaledIPAttnProcessor(IPAdapterAttnProcessor2_0):
    """diffusers' IP-Adapter processor with a weight per batch element (see the module doc)."""

    def __init__(self, loaded: IPAdapterAttnProcessor2_0, column: int) -> None:
        torch.nn.Module.__init__(self)
        self.hidden_size = loaded.hidden_size
        self.cross_attention_dim = loaded.cross_attention_dim
        self.num_tokens = loaded.num_tokens
        self.scale = loaded.scale
        self.to_k_ip = loaded.to_k_ip  # the loaded weights themselves, not a copy
        self.to_v_ip = loaded.to_v_ip
        self.column = column

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 scale: float = 1.0, ip_adapter_masks=None):
        if not isinstance(ip_adapter_masks, RowScales):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, scale,
                                    ip_adapter_masks)
        residual = hidden_states
        encoder_hidden_states, ip_hidden_states = encoder_hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                       is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        # one adapter (pnp-batch loads one): its tokens, its weight per element
        weight = ip_adapter_masks.weights[:, self.column].to(query.dtype).view(batch_size, 1, 1)
        ip_tokens = ip_hidden_states[0]
        ip_key = self.to_k_ip[0](ip_tokens)
        ip_value = self.to_v_ip[0](ip_tokens)
        ip_key = ip_key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        ip_value = ip_value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        ip_out = F.scaled_dot_product_attention(query, ip_key, ip_value, attn_mask=None, dropout_p=0.0, is_causal=False)
        ip_out = ip_out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = hidden_states + weight * ip_out
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def ip_layers(unet) -> list[str]:
    """Module paths of the UNet's IP-Adapter attention layers, in diffusers' processor order."""
    return [name.removesuffix(".processor") for name, proc in unet.attn_processors.items()
            if isinstance(proc, IPAdapterAttnProcessor2_0)]


def install_row_scaled(unet) -> list[str]:
    """Put a RowScaledIPAttnProcessor on each IP-Adapter layer, module by module (`Attention.set_processor`):
    no other layer's processor is touched, so PnP's on attn1 stay. Returns the layers, in column order."""
    layers = ip_layers(unet)
    for j, layer in enumerate(layers):
        module = unet.get_submodule(layer)
        proc = module.processor
        if not isinstance(proc, RowScaledIPAttnProcessor) or proc.column != j:
            module.set_processor(RowScaledIPAttnProcessor(proc, j))
    return layers
