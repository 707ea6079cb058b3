"""Prompts to UNet conditioning, per architecture: the one place that knows how each backbone reads text.

The Translator asks a `PromptEncoder` for two things: `encode(prompts)`, the per-prompt conditioning
(cached by the Translator), and `for_size(cond, height, width)`, that conditioning completed for an
image of that size. Stable Diffusion 1.x/2.x: the text encoder's last hidden states, nothing
size-dependent. SDXL, exactly as diffusers' StableDiffusionXLPipeline builds it: the penultimate
hidden states of both text encoders concatenated, the pooled (projected) embedding of the second as
`text_embeds`, and `time_ids` = (original height, width, crop top, left, target height, width) =
(H, W, 0, 0, H, W), where H x W is the image the latents encode (latent size x 8, as diffusers' SDXL
img2img pipeline derives it): the source as fed is the target's size, with no crop. A negative prompt
is encoded the same way (the pipeline's path for a given negative prompt) and gets the same time ids.
"""

from __future__ import annotations

from typing import Protocol

import torch

from pnp_batch.backbones import SD, SDXL
from pnp_batch.models.load import Models
from pnp_batch.pnp.conditioning import TextCond


class PromptEncoder(Protocol):
    def encode(self, prompts: list[str]) -> TextCond:
        """One row per prompt; only what does not depend on the image size."""

    def for_size(self, cond: TextCond, height: int, width: int) -> TextCond:
        """The conditioning of `cond`'s rows for an image of height x width pixels."""


def _ids(tokenizer, prompts: list[str], device: torch.device) -> torch.Tensor:
    out = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt")
    return out.input_ids.to(device)


class SDPrompts:
    """Stable Diffusion 1.x/2.x: one CLIP text encoder's last hidden states."""

    def __init__(self, models: Models) -> None:
        self.models = models

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TextCond:
        m = self.models
        return TextCond(m.text_encoder(_ids(m.tokenizer, prompts, m.device))[0])

    def for_size(self, cond: TextCond, height: int, width: int) -> TextCond:
        return cond


class SDXLPrompts:
    """SDXL: both text encoders (penultimate hidden states, concatenated), the second's pooled
    embedding, and the size/crop time ids (see the module doc)."""

    def __init__(self, models: Models) -> None:
        self.models = models

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TextCond:
        m = self.models
        hidden = []
        out = None
        for tokenizer, encoder in ((m.tokenizer, m.text_encoder), (m.tokenizer_2, m.text_encoder_2)):
            out = encoder(_ids(tokenizer, prompts, m.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        return TextCond(torch.cat(hidden, dim=-1), {"text_embeds": out[0]})  # out[0]: text_encoder_2's projection

    def for_size(self, cond: TextCond, height: int, width: int) -> TextCond:
        ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=cond.hidden.dtype, device=cond.hidden.device)
        return cond.with_added(time_ids=ids)


PROMPT_ENCODERS = {SD: SDPrompts, SDXL: SDXLPrompts}


def prompt_encoder(models: Models) -> PromptEncoder:
    """The prompt encoder of the model's architecture (models.architecture)."""
    return PROMPT_ENCODERS[models.architecture](models)
