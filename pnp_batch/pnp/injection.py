"""PnP injection: one controller, a self-attention processor and a conv2 forward hook (PNP_SPEC.md §4).

Everything goes through diffusers' own extension points: `unet.set_attn_processor` with the standard
processor call signature for the injected self-attention layers, and a forward hook on the `conv2` of
each injected resnet; which ones is data (layers.py: SD's are the 8 decoder self-attention layers
4-11 and `up_blocks[1].resnets[1]`). No module's forward is replaced and no state hangs on modules:
the `PnPController` holds the step and which batch rows receive the source's features.

Batch convention: when a UNet call carries the source branch, it is row 0; every other row is a
target element (unconditional/negative/conditional copies of the K targets). When a target batch is
split across several UNet calls, the call with the source records its features and the later calls
inject the recorded ones, so the source branch runs once per step however the targets are split.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pnp_batch.pnp.layers import InjectionPoints, injection_points

Rows = slice | torch.Tensor | None


@dataclass
class PnPController:
    """Which rows to inject at the current UNet call, and the recorded source features.

    `conv_rows` / `attn_rows` select the target rows (of the current call's batch) that receive the
    source's conv features / queries and keys; None means no injection in this call.
    """

    conv_rows: Rows = None
    attn_rows: Rows = None
    has_source: bool = True
    record: bool = False
    recorded: dict[str, torch.Tensor] = field(default_factory=dict)

    def set_call(self, conv_rows: Rows, attn_rows: Rows, has_source: bool, record: bool) -> None:
        """Arm the controller for the next UNet call."""
        self.conv_rows, self.attn_rows = conv_rows, attn_rows
        self.has_source, self.record = has_source, record
        if has_source:
            self.recorded.clear()

    def disable(self) -> None:
        self.conv_rows = self.attn_rows = None
        self.recorded.clear()

    def _source(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if self.has_source:
            src = t[:1]
            if self.record:
                self.recorded[name] = src.clone()
            return src
        return self.recorded[name]

    def inject(self, name: str, t: torch.Tensor, rows: Rows) -> torch.Tensor:
        """Copy the source element's values into `rows` of t (in place) and return t. A call that records
        for later calls records even when none of its own rows is injected: with per-target thresholds
        (a sweep) a later call of the same step can need what this one does not."""
        if rows is None:
            if self.record and self.has_source:
                self._source(name, t)
            return t
        src = self._source(name, t)
        if isinstance(rows, slice):
            t[rows] = src
        else:
            t.index_copy_(0, rows, src.expand(rows.shape[0], *src.shape[1:]).contiguous())
        return t


class PnPAttnProcessor:
    """Scaled-dot-product self-attention whose target rows use the source's queries and keys."""

    def __init__(self, controller: PnPController, name: str) -> None:
        self.controller = controller
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, seq, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.to_q(hidden_states)
        key = attn.to_k(context)
        value = attn.to_v(context)
        rows = self.controller.attn_rows
        if encoder_hidden_states is None and (rows is not None or self.controller.record):
            query = self.controller.inject(self.name + ".q", query, rows)
            key = self.controller.inject(self.name + ".k", key, rows)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class PnPInjector:
    """Installs the processors and the conv hook on a UNet once; the controller drives them."""

    def __init__(self, unet, points: InjectionPoints | None = None, controller: PnPController | None = None) -> None:
        self.unet = unet
        self.points = points if points is not None else injection_points(unet)
        self.controller = controller if controller is not None else PnPController()  # pnp/packs.py: its own
        # Module by module (Attention.set_processor), never a whole-UNet set_attn_processor: the other
        # layers keep their processors, an IP-Adapter's on the cross-attention layers included.
        self._original = {layer: unet.get_submodule(layer).processor for layer in self.points.attn_layers}
        self._procs = {layer: PnPAttnProcessor(self.controller, layer) for layer in self.points.attn_layers}
        self.reinstall()
        self._hooks = [
            unet.get_submodule(block).conv2.register_forward_hook(self._conv_hook(f"conv:{block}"))
            for block in self.points.feature_blocks
        ]

    def _conv_hook(self, name: str):
        def hook(module, inputs, output):
            return self.controller.inject(name, output, self.controller.conv_rows)

        return hook

    def reinstall(self) -> None:
        """Put the PnP processors (back) on their self-attention layers, e.g. after diffusers' IP-Adapter
        loader reset every attn1 processor; no other layer is touched."""
        for layer, proc in self._procs.items():
            self.unet.get_submodule(layer).set_processor(proc)

    def restore(self) -> None:
        """Give the injected layers back the processors they had before (the hooks stay)."""
        for layer, proc in self._original.items():
            self.unet.get_submodule(layer).set_processor(proc)

    def remove(self) -> None:
        """Take the hooks off and give the injected layers back their original processors."""
        for h in self._hooks:
            h.remove()
        self.restore()
