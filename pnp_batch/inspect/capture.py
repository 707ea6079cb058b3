"""Record, during one UNet call of the source branch, each decoder layer's ResNet features (the `conv2`
output, the tensor PnP's feature injection replaces) and its self-attention queries and keys (the
tensors PnP's attention injection replaces), by forward hooks that only read: the call's output is
unchanged (tests check it).

Layers are the paper's decoder layer numbers, as the layer keys use them: layer n is
``up_blocks[n // 3]``, resnet / attention ``n % 3`` (SD 0-11, SDXL 0-8). The attention of a layer is
the first transformer block's ``attn1`` (SDXL stacks 2 or 10; the first is shown)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

KINDS = ("features", "queries", "keys", "attention")


def decoder_layers(unet) -> list[int]:
    """Every decoder layer number of this UNet."""
    return [3 * b + r for b, block in enumerate(unet.up_blocks) for r in range(len(block.resnets))]


def attention_of(unet, n: int):
    """The self-attention module of decoder layer n, or None where that layer has none."""
    block = unet.up_blocks[n // 3]
    atts = getattr(block, "attentions", None)
    if not atts or n % 3 >= len(atts):
        return None
    return atts[n % 3].transformer_blocks[0].attn1


@dataclass
class Captured:
    """One call's tensors: kind -> layer -> (B, tokens, dim) float32 on the CPU, with the spatial size."""

    tensors: dict[str, dict[int, torch.Tensor]] = field(default_factory=lambda: {k: {} for k in KINDS[:3]})
    sizes: dict[int, tuple[int, int]] = field(default_factory=dict)


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = t.shape
    return t.view(b, n, heads, d // heads).transpose(1, 2)


def attention_rows(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """Each token's attention row, softmax(q k^T / sqrt(d)) averaged over heads: (B, tokens, tokens)."""
    qh, kh = _heads(q.float(), heads), _heads(k.float(), heads)
    scale = qh.shape[-1] ** -0.5
    return torch.softmax(qh @ kh.transpose(-1, -2) * scale, dim=-1).mean(dim=1)


class FeatureCapture:
    """Hooks on the chosen decoder layers; `with capture.recording() as got:` around a UNet call."""

    def __init__(self, unet, layers: list[int]) -> None:
        self.unet, self.layers = unet, layers
        self.heads: dict[int, int] = {}
        self._handles = []
        self._got: Captured | None = None
        for n in layers:
            resnet = unet.up_blocks[n // 3].resnets[n % 3]
            self._handles.append(resnet.conv2.register_forward_hook(self._conv_hook(n)))
            attn = attention_of(unet, n)
            if attn is not None:
                self.heads[n] = attn.heads
                self._handles.append(attn.register_forward_pre_hook(self._attn_hook(n, attn), with_kwargs=True))

    def _conv_hook(self, n: int):
        def hook(module, inputs, output):
            if self._got is not None:
                h, w = output.shape[-2:]
                self._got.tensors["features"][n] = output.detach().float().flatten(2).transpose(1, 2).cpu()
                self._got.sizes[n] = (h, w)
        return hook

    def _attn_hook(self, n: int, attn):
        def hook(module, args, kwargs):
            if self._got is not None:
                hidden = args[0] if args else kwargs["hidden_states"]
                with torch.no_grad():
                    self._got.tensors["queries"][n] = attn.to_q(hidden).detach().float().cpu()
                    self._got.tensors["keys"][n] = attn.to_k(hidden).detach().float().cpu()
        return hook

    def record(self) -> Captured:
        self._got = Captured()
        return self._got

    def stop(self) -> None:
        self._got = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
