"""What a UNet call is conditioned on, as tensors batched per element.

Stable Diffusion 1.x/2.x condition the UNet on the text encoder's hidden states alone; SDXL adds
diffusers' `added_cond_kwargs` (`text_embeds`: the pooled prompt embedding, `time_ids`: the size and
crop conditioning). `TextCond` carries both, one row per batch element, so the sampler and the
inversion batch them the same way whatever the architecture; which encoder made them is the
caller's business (translate/text.py). A plain tensor (B, L, D) is accepted wherever a TextCond is:
it means hidden states with nothing added.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

# Added inputs of an IP-Adapter run (translate/image_prompts.py): the image embeddings of each element,
# (B, 1, D), and its weight in each IP-Adapter layer, (B, layers).
IMAGE_EMBEDS = "image_embeds"
IP_WEIGHTS = "ip_weights"


@dataclass(frozen=True)
class RowScales:
    """Per-element IP-Adapter weights of one UNet call: (batch, layers), column j for the j-th IP layer
    (pnp/ip_attention.py); passed as `cross_attention_kwargs={"ip_adapter_masks": RowScales(w)}`."""

    weights: torch.Tensor


@dataclass(frozen=True)
class TextCond:
    """Per-element UNet conditioning: `hidden` (B, L, D) and `added` tensors, each (B, ...)."""

    hidden: torch.Tensor
    added: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, t in self.added.items():
            if t.shape[0] != self.hidden.shape[0]:
                raise ValueError(f"added conditioning {name!r} has {t.shape[0]} rows, the hidden states "
                                 f"{self.hidden.shape[0]}")

    @classmethod
    def of(cls, cond: torch.Tensor | TextCond) -> TextCond:
        """A TextCond from a TextCond or hidden states alone: (B, L, D), or (L, D) for one element."""
        if isinstance(cond, TextCond):
            return cond
        return cls(cond.unsqueeze(0) if cond.ndim == 2 else cond)

    @classmethod
    def cat(cls, parts: Sequence[torch.Tensor | TextCond]) -> TextCond:
        conds = [cls.of(p) for p in parts]
        names = set(conds[0].added)
        if any(set(c.added) != names for c in conds):
            raise ValueError("cannot batch conditionings with different added inputs")
        return cls(torch.cat([c.hidden for c in conds]),
                   {n: torch.cat([c.added[n] for c in conds]) for n in sorted(names)})

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def rows(self, index: torch.Tensor | slice | int) -> TextCond:
        """The elements at `index` (an index tensor, a slice, or one int kept as a batch of one)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        if isinstance(index, slice):
            return TextCond(self.hidden[index], {n: t[index] for n, t in self.added.items()})
        idx = index.to(self.hidden.device)
        return TextCond(self.hidden.index_select(0, idx), {n: t.index_select(0, idx) for n, t in self.added.items()})

    __getitem__ = rows

    def expand(self, batch: int) -> TextCond:
        """One element repeated for a batch (a view); a batch of `batch` elements as it is."""
        if len(self) == batch:
            return self
        if len(self) != 1:
            raise ValueError(f"conditioning for {len(self)} elements cannot serve a batch of {batch}")
        return TextCond(self.hidden.expand(batch, *self.hidden.shape[1:]),
                        {n: t.expand(batch, *t.shape[1:]) for n, t in self.added.items()})

    def to(self, dtype: torch.dtype) -> TextCond:
        """Hidden states and floating added inputs in the UNet's dtype."""
        return TextCond(self.hidden.to(dtype),
                        {n: t.to(dtype) if t.is_floating_point() else t for n, t in self.added.items()})

    def with_added(self, **added: torch.Tensor) -> TextCond:
        """The same with more added inputs (each one row, repeated for every element, or one per element)."""
        more = {n: t.expand(len(self), *t.shape[1:]) if t.shape[0] == 1 else t for n, t in added.items()}
        return TextCond(self.hidden, {**self.added, **more})

    def unet_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of diffusers' UNet2DConditionModel call. An IP-Adapter's image embeddings and
        per-element weights (pnp/ip_attention.py) go where diffusers reads them: `added_cond_kwargs`
        `image_embeds` as a list (one adapter), the weights as `cross_attention_kwargs`."""
        kw: dict[str, Any] = {"encoder_hidden_states": self.hidden}
        added = dict(self.added)
        weights = added.pop(IP_WEIGHTS, None)
        if IMAGE_EMBEDS in added:
            added[IMAGE_EMBEDS] = [added[IMAGE_EMBEDS]]
        if added:
            kw["added_cond_kwargs"] = added
        if weights is not None:
            kw["cross_attention_kwargs"] = {"ip_adapter_masks": RowScales(weights)}
        return kw
