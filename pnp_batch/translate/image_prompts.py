"""Image prompts of a Translator with an IP-Adapter (docs/ip_adapter.md): who sees which image, and its cost.

Every UNet call of an adapter run carries, per element, image embeddings and a weight per IP-Adapter
layer (pnp/conditioning.IMAGE_EMBEDS / IP_WEIGHTS, applied by pnp/ip_attention.py):
- a target's conditional element: its row's image embeddings, weighted by its row's scale;
- a target's negative (unconditional) element: the negative (zero-image) embeddings, as diffusers'
  pipelines give the unconditional half, with the same weights;
- the source branch, the inversion and rows without `ip_image`: the negative embeddings with weight 0,
  which adds an exact zero: those elements compute what they compute without an adapter, so the stored
  inversion and its feature key are the same whatever the image prompts, and a text-only row of a mixed
  group gives the bytes of a run without adapter.
Embeddings are computed by diffusers' `prepare_ip_adapter_image_embeds` once per distinct image (by
content) and cached, like prompt embeddings; `encoded` counts the image encoder's runs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch

from pnp_batch.errors import RowError, UsageError
from pnp_batch.io.images import decode_image
from pnp_batch.io.inputs import open_row_input
from pnp_batch.io.rows import Row
from pnp_batch.ip_keys import IP_SCALE, scale_key
from pnp_batch.pnp.conditioning import IMAGE_EMBEDS, IP_WEIGHTS, TextCond
from pnp_batch.pnp.ip_attention import install_row_scaled


class ImagePromptError(RowError):
    """A row's image prompt cannot be used (its row fails)."""


class ImagePrompts:
    """The adapter's image embeddings and per-row weights for one Translator (one loaded model)."""

    def __init__(self, adapter: Any, unet, max_pixels: int, default_scale: Any = 1.0, policy: Any = None) -> None:
        self.policy = policy  # the run's input policy (io/policy.py); None for trusted callers only
        self.pipe = adapter.pipe
        self.layers = install_row_scaled(unet)  # per module: PnP's attn1 processors are left alone
        self.max_pixels = max_pixels
        self.device = unet.device
        self.encoded = 0  # image encoder runs (one per distinct image)
        self._embeds: dict[str, torch.Tensor] = {}
        self._weights: dict[str, torch.Tensor] = {}
        self._zero_weights = torch.zeros(1, len(self.layers), device=self.device)
        from PIL import Image

        # the negative embeddings do not depend on the image (zeros, or the encoder's output for a black
        # image for adapters that read hidden states): diffusers' own, from any image
        neg, _ = self._prepare(Image.new("RGB", (8, 8)))
        self.negative = neg
        try:  # the pipeline's scale is checked before any work (exit 2)
            self.weights(default_scale)
        except ImagePromptError as e:
            raise UsageError(str(e)) from None

    def _prepare(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        """(negative, positive) embeddings of one image, each (1, 1, ...), by diffusers' pipeline method."""
        with torch.no_grad():
            both = self.pipe.prepare_ip_adapter_image_embeds([image], None, self.device, 1, True)[0]
        return both[:1], both[1:]

    def weights(self, scale: float | dict[str, Any]) -> torch.Tensor:
        """(1, layers) weights of a scale (a float or diffusers' per-block form), resolved by diffusers'
        `set_ip_adapter_scale` exactly as a pipeline would set it; cached per scale."""
        key = scale_key(scale)
        if key not in self._weights:
            self._check_blocks(scale)
            try:
                self.pipe.set_ip_adapter_scale(scale)
            except ValueError as e:
                raise ImagePromptError(f"ip_adapter_scale={scale!r}: {e}") from None
            procs = self.pipe.unet.attn_processors
            self._weights[key] = torch.tensor([[float(procs[f"{n}.processor"].scale[0]) for n in self.layers]],
                                              device=self.device)
        return self._weights[key]

    def _check_blocks(self, scale: Any) -> None:
        """A per-block scale may name only blocks that have attention layers (diffusers would silently
        ignore the others): SD's decoder blocks with attention are up 1-3, SDXL's up 0-1."""
        if not isinstance(scale, dict):
            return
        unet = self.pipe.unet
        for part in ("down", "up"):
            spec = scale.get(part)
            if not isinstance(spec, dict):
                continue
            blocks = getattr(unet, f"{part}_blocks")
            valid = [f"block_{i}" for i, b in enumerate(blocks) if hasattr(b, "attentions")]
            wrong = [b for b in spec if b not in valid]
            if wrong:
                raise ImagePromptError(f"ip_adapter_scale: {part} {', '.join(wrong)} has no attention layers in this "
                                       f"model; {part} blocks with attention: {', '.join(valid)}")

    def embeds(self, row: Row) -> torch.Tensor:
        """The row's image embeddings (1, 1, ...), computed once per distinct image content."""
        data = row.ip_image_bytes
        if data is None:
            try:
                data = open_row_input(row.ip_image, self.policy)
            except FileNotFoundError:
                raise ImagePromptError(f"ip_image not found: {row.ip_image}") from None
            except RowError as e:  # refused by the input policy: its reason as is
                raise ImagePromptError(f"ip_image {row.ip_image}: {e}") from None
            except Exception as e:  # noqa: BLE001 - the row fails with the reason
                raise ImagePromptError(f"ip_image {row.ip_image} unreadable: {type(e).__name__}: {e}") from None
        key = hashlib.sha256(data).hexdigest()
        if key not in self._embeds:
            try:
                image = decode_image(data, self.max_pixels)
            except RowError as e:
                raise ImagePromptError(f"ip_image {row.ip_image or '<ip_image_bytes>'}: {e}") from None
            self._embeds[key] = self._prepare(image)[1]
            self.encoded += 1
        return self._embeds[key]

    def split_unusable(self, rows: list[Row], default_scale: Any,
                       failed: Callable[[Row, str], dict]) -> tuple[list[Row], list[dict]]:
        """The rows whose image prompt can be used (embeddings now in the cache), and failed records of the
        others: an unreadable `ip_image` fails its row only."""
        ok, bad = [], []
        for r in rows:
            try:
                if r.ip_image is not None or r.ip_image_bytes is not None:
                    self.embeds(r)
                    self.weights(r.overrides.get(IP_SCALE, default_scale))
                ok.append(r)
            except ImagePromptError as e:
                if not r.companion:
                    bad.append(failed(r, str(e)))
        return ok, bad

    def text_only(self, cond: TextCond) -> TextCond:
        """Conditioning with the negative embeddings and weight 0: what it computes without an adapter."""
        return cond.with_added(**{IMAGE_EMBEDS: self.negative, IP_WEIGHTS: self._zero_weights})

    def for_rows(self, cond: TextCond, neg: TextCond, rows: list[Row], default_scale: Any) -> tuple[TextCond, TextCond]:
        """The targets' conditional and negative conditioning with their rows' image prompts and weights."""
        embeds, weights = [], []
        for r in rows:
            has_image = r.ip_image is not None or r.ip_image_bytes is not None
            embeds.append(self.embeds(r) if has_image else self.negative)
            weights.append(self.weights(r.overrides.get(IP_SCALE, default_scale)) if has_image else self._zero_weights)
        w = torch.cat(weights)
        return (cond.with_added(**{IMAGE_EMBEDS: torch.cat(embeds), IP_WEIGHTS: w}),
                neg.with_added(**{IMAGE_EMBEDS: self.negative.expand(len(rows), *self.negative.shape[1:]),
                                  IP_WEIGHTS: w}))


def split_unusable(prompts: ImagePrompts | None, rows: list[Row], default_scale: Any,
                   failed: Callable[[Row, str], dict]) -> tuple[list[Row], list[dict]]:
    """ImagePrompts.split_unusable; without an adapter, a row with an image prompt fails (rather than
    being translated as if it had none)."""
    if prompts is not None:
        return prompts.split_unusable(rows, default_scale, failed)
    ok = [r for r in rows if r.ip_image is None and r.ip_image_bytes is None]
    bad = [failed(r, "the row has an ip_image but the pipeline has no ip_adapter (set ip_adapter, "
                     "docs/ip_adapter.md)") for r in rows
           if (r.ip_image is not None or r.ip_image_bytes is not None) and not r.companion]
    return ok, bad
