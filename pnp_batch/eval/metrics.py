"""The two scores of the PnP paper, on already-loaded models (no file I/O), batched.

- CLIP score: how well an output matches its prompt, 100 * max(cos(image, text), 0) on CLIP's
  L2-normalised projected embeddings (torchmetrics' CLIPScore; higher is better).
- Structure distance: how far an output's structure moved from its source (Splice, Tumanyan et al.
  2022): the mean squared difference of the cosine self-similarity matrices of DINO ViT's last-layer
  self-attention keys (heads concatenated, CLS token included). Lower is better; 0 for equal images.

Each call does one model forward per batch (per image size for the structure distance), under
`torch.inference_mode()`; a source shared by several rows is embedded once per call.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from PIL.Image import Image

    from pnp_batch.eval.models import MetricModels

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STRUCTURE_SHORT_SIDE = 224
STRUCTURE_MAX_SIDE = 480
CLIP_BATCH = 32
DINO_BATCH = 16

Size = tuple[int, int]  # (height, width)


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _check_pairs(what: str, left: Sequence[Any], right: Sequence[Any]) -> None:
    if len(left) != len(right):
        raise ValueError(f"{what}: {len(left)} and {len(right)} items; they must pair up one to one")


# ---------------------------------------------------------------------------------------------
# CLIP score


def _embedding(output: Any) -> torch.Tensor:
    """The projected embedding from get_image_features/get_text_features: a tensor in transformers 4,
    an output object whose pooler_output holds it in transformers 5."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"CLIP features came back as {type(output).__name__} without an embedding tensor")


def text_max_length(models: MetricModels) -> int:
    """Prompts are cut to this many tokens (77 for CLIP): the tokenizer's and the text tower's limit."""
    tokenizer = models.clip_processor.tokenizer
    return min(int(tokenizer.model_max_length), int(models.clip.config.text_config.max_position_embeddings))


def _text_embeddings(models: MetricModels, prompts: Sequence[str]) -> torch.Tensor:
    """[n, d] unit-length text embeddings, prompts truncated to text_max_length."""
    enc = models.clip_processor.tokenizer(
        list(prompts), padding=True, truncation=True, max_length=text_max_length(models), return_tensors="pt"
    )
    out = models.clip.get_text_features(
        input_ids=enc["input_ids"].to(models.device), attention_mask=enc["attention_mask"].to(models.device)
    )
    return F.normalize(_embedding(out).float(), dim=-1)


def _image_embeddings(models: MetricModels, images: Sequence[Image]) -> torch.Tensor:
    """[n, d] unit-length image embeddings after CLIP's own preprocessing (its image processor)."""
    pixels = models.clip_processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
    out = models.clip.get_image_features(pixel_values=pixels.to(models.device, models.dtype))
    return F.normalize(_embedding(out).float(), dim=-1)


def clip_score(
    models: MetricModels, images: Sequence[Image], prompts: Sequence[str], batch_size: int = CLIP_BATCH
) -> list[float]:
    """100 * max(cos(image, prompt), 0) for each (image, prompt) pair, in [0, 100]; higher is better."""
    _check_pairs("clip_score images and prompts", images, prompts)
    scores: list[float] = []
    with torch.inference_mode():
        for batch in _chunks(list(zip(images, prompts)), batch_size):
            row_of = {prompt: i for i, prompt in enumerate(dict.fromkeys(p for _, p in batch))}
            text = _text_embeddings(models, list(row_of))  # each distinct prompt once: rows often share one
            rows = torch.tensor([row_of[prompt] for _, prompt in batch], device=text.device)
            image = _image_embeddings(models, [img for img, _ in batch])
            cos = (image * text[rows]).sum(dim=-1)
            scores.extend((100.0 * cos.clamp(min=0)).tolist())
    return scores


# ---------------------------------------------------------------------------------------------
# Structure distance (Splice's self-similarity distance of DINO ViT keys)


def structure_size(width: int, height: int) -> Size:
    """(height, width) an image is resized to for DINO: short side 224, long side at most 480
    (then long side 480 and the short side scaled alike), the rule of torchvision's
    Resize(224, max_size=480) that Splice uses."""
    short, long = min(width, height), max(width, height)
    new_short, new_long = STRUCTURE_SHORT_SIDE, int(STRUCTURE_SHORT_SIDE * long / short)
    if new_long > STRUCTURE_MAX_SIDE:
        new_short, new_long = int(STRUCTURE_MAX_SIDE * new_short / new_long), STRUCTURE_MAX_SIDE
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _dino_input(image: Image, size: Size, device: torch.device) -> torch.Tensor:
    """[3, h, w]: RGB in [0, 1], resized (antialiased bilinear) to `size`, ImageNet-normalised, fp32."""
    rgb = torch.from_numpy(np.array(image.convert("RGB"))).to(device)
    x = rgb.permute(2, 0, 1).unsqueeze(0).float() / 255.0
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return ((x - mean) / std)[0]


def last_key_projection(dino: Any) -> torch.nn.Module:
    """The key projection of the ViT's last self-attention: `layers[-1].attention.k_proj` in
    transformers 5, `encoder.layer[-1].attention.attention.key` in transformers 4."""
    layers = getattr(dino, "layers", None)
    if layers is not None:
        return layers[-1].attention.k_proj
    encoder = getattr(dino, "encoder", None)
    if encoder is not None:
        return encoder.layer[-1].attention.attention.key
    raise TypeError(f"{type(dino).__name__} is not a transformers ViTModel (no layers / encoder.layer)")


def _last_layer_keys(dino: Any, pixels: torch.Tensor) -> torch.Tensor:
    """[batch, tokens, hidden]: the last layer's attention keys, heads side by side, CLS token first."""
    captured: list[torch.Tensor] = []
    handle = last_key_projection(dino).register_forward_hook(lambda _mod, _inp, out: captured.append(out))
    try:
        dino(pixel_values=pixels, interpolate_pos_encoding=True)
    finally:
        handle.remove()
    return captured[0]


def keys_self_similarity(unit_keys: torch.Tensor) -> torch.Tensor:
    """[..., tokens, tokens]: cosine similarity of every token's keys with every other's (unit-length keys)."""
    return unit_keys @ unit_keys.transpose(-1, -2)


def _unit_keys(
    models: MetricModels, images: Sequence[Image], sizes: Sequence[Size], batch_size: int
) -> list[torch.Tensor]:
    """Unit-length last-layer keys per image, one DINO forward per batch of images of one size."""
    keys: list[torch.Tensor] = [torch.empty(0)] * len(images)
    by_size: dict[Size, list[int]] = {}
    for i, size in enumerate(sizes):
        by_size.setdefault(size, []).append(i)
    log.debug("structure_dist: %d distinct images in %d sizes", len(images), len(by_size))
    for size, indices in by_size.items():
        for chunk in _chunks(indices, batch_size):
            pixels = torch.stack([_dino_input(images[i], size, models.device) for i in chunk]).to(models.dtype)
            for i, k in zip(chunk, _last_layer_keys(models.dino, pixels)):
                keys[i] = F.normalize(k.float(), dim=-1)
    return keys


def structure_dist(
    models: MetricModels, sources: Sequence[Image], outputs: Sequence[Image], batch_size: int = DINO_BATCH
) -> list[float]:
    """Splice's self-similarity distance between each source and its output; lower is better.

    Both images of a pair are resized to structure_size(output) so their token grids match (an
    output may differ from its source by a pixel or two).
    """
    _check_pairs("structure_dist sources and outputs", sources, outputs)
    images: list[Image] = []
    sizes: list[Size] = []
    slots: dict[tuple[int, Size], int] = {}

    def slot(image: Image, size: Size) -> int:
        key = (id(image), size)  # the same source object in several rows is embedded once
        if key not in slots:
            slots[key] = len(images)
            images.append(image)
            sizes.append(size)
        return slots[key]

    pairs = []
    for source, output in zip(sources, outputs):
        size = structure_size(*output.size)
        pairs.append((slot(source, size), slot(output, size)))
    with torch.inference_mode():
        keys = _unit_keys(models, images, sizes, batch_size)
        return [
            float((keys_self_similarity(keys[a]) - keys_self_similarity(keys[b])).square().mean())
            for a, b in pairs
        ]
