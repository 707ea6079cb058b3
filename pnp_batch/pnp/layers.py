"""Where PnP injects, as data: one table of injection points per UNet architecture (PNP_SPEC.md §4).

Feature injection replaces the output of `conv2` in the named resnets; self-attention injection
replaces the queries and keys of the named `attn1` layers. The injector reads these tables and knows
nothing of architectures; a new backbone adds a table here (and its recognition in backbones.py).
SD's table is PNP_SPEC.md §4; SDXL's is chosen and stated in docs/backbones.md. Names are module paths in diffusers' UNet (`unet.get_submodule(name)`).
"""

from __future__ import annotations

from dataclasses import dataclass

from pnp_batch.backbones import SD as SD_ARCH
from pnp_batch.backbones import SDXL as SDXL_ARCH
from pnp_batch.backbones import recognise


@dataclass(frozen=True)
class InjectionPoints:
    """The resnets whose conv2 features and the self-attention layers whose q/k come from the source."""

    feature_blocks: tuple[str, ...]
    attn_layers: tuple[str, ...]


def _attn(block: int, attentions: tuple[int, ...], transformer_blocks: int = 1) -> tuple[str, ...]:
    return tuple(
        f"up_blocks.{block}.attentions.{a}.transformer_blocks.{t}.attn1"
        for a in attentions
        for t in range(transformer_blocks)
    )


def _attn_all(unet, block: int, attentions: tuple[int, ...]) -> tuple[str, ...]:
    """attn1 of every transformer block of the named attentions (SDXL stacks 10 or 2 per attention)."""
    ups = unet.up_blocks[block]
    return sum((_attn(block, (a,), len(ups.attentions[a].transformer_blocks)) for a in attentions), ())


# SD 1.x/2.x: the 4th decoder layer's features (16x16 at 512 px) and decoder self-attention layers 4-11.
SD = InjectionPoints(
    feature_blocks=("up_blocks.1.resnets.1",),
    attn_layers=_attn(1, (1, 2)) + _attn(2, (0, 1, 2)) + _attn(3, (0, 1, 2)),
)


def sdxl_points(unet) -> InjectionPoints:
    """SDXL base (docs/backbones.md): the decoder's first block is at SD's 16x16 relative resolution
    (1/32 of the image: 32x32 at 1024 px), so SD's layer 4 (up_blocks[1].resnets[1], the second layer
    at that resolution) maps to up_blocks[0].resnets[1]; self-attention from that layer to the finest
    decoder resolution that has attention: up_blocks[0].attentions[1..2] (10 transformer blocks each
    in the real model) and up_blocks[1].attentions[0..2] (2 each), attn1 of every transformer block.
    SDXL's finest decoder block (up_blocks[2], 1/8) has no attention. The count of transformer
    blocks is read from the UNet, so the table holds for any width of the same topology."""
    return InjectionPoints(
        feature_blocks=("up_blocks.0.resnets.1",),
        attn_layers=_attn_all(unet, 0, (1, 2)) + _attn_all(unet, 1, (0, 1, 2)),
    )


# Per architecture (backbones.recognise): the table itself, or a function of the UNet for tables whose
# layer names depend on its transformer depth.
INJECTION_POINTS = {SD_ARCH: SD, SDXL_ARCH: sdxl_points}


def architecture(unet) -> str:
    """The architecture whose injection table fits this UNet (backbones.recognise; a ValueError
    saying what the UNet is when PnP has no table for it)."""
    return recognise(unet)


def default_points(unet) -> InjectionPoints:
    """The architecture's own injection points for this UNet."""
    table = INJECTION_POINTS[architecture(unet)]
    return table if isinstance(table, InjectionPoints) else table(unet)


def feature_block_names(unet) -> list[str]:
    """Every decoder resnet of this UNet: the valid values for feature injection."""
    return [n for n, _ in unet.named_modules() if n.startswith("up_blocks.") and ".resnets." in n
            and n.count(".") == 3]


def attn_layer_names(unet) -> list[str]:
    """Every decoder self-attention layer of this UNet: the valid values for attention injection."""
    return [n for n, _ in unet.named_modules() if n.startswith("up_blocks.") and n.endswith(".attn1")]


def attention_module_names(unet) -> list[str]:
    """Every decoder attention module that has self-attention layers (an item of `pnp_attn_layers`
    may name one: all its transformer blocks' attn1)."""
    return list(dict.fromkeys(n.split(".transformer_blocks.")[0] for n in attn_layer_names(unet)))


def _expand_attn(names: tuple[str, ...], valid: list[str]) -> tuple[str, ...]:
    """Attention modules as the attn1 layers under them (in the UNet's order); attn1 names as given."""
    out: list[str] = []
    for name in names:
        under = [v for v in valid if v.startswith(name + ".")] if not name.endswith(".attn1") else [name]
        out.extend(v for v in (under or [name]) if v not in out)
    return tuple(out)


def injection_points(unet, feature_blocks: tuple[str, ...] | None = None,
                     attn_layers: tuple[str, ...] | None = None) -> InjectionPoints:
    """The architecture's table, with either list replaced when given (an attention module stands for
    the attn1 of each of its transformer blocks); unknown names are a ValueError that lists the valid
    ones."""
    default = default_points(unet)
    valid_attn = attn_layer_names(unet)
    points = InjectionPoints(
        feature_blocks=default.feature_blocks if feature_blocks is None else tuple(feature_blocks),
        attn_layers=default.attn_layers if attn_layers is None else _expand_attn(tuple(attn_layers), valid_attn),
    )
    unknown = [n for n in points.feature_blocks if n not in feature_block_names(unet)]
    if unknown:
        raise ValueError(f"unknown feature-injection block(s) {unknown} for this UNet; valid: "
                         f"{', '.join(feature_block_names(unet))} (decoder layers {_numbers(feature_block_names(unet))})")
    unknown = [n for n in points.attn_layers if n not in valid_attn]
    if unknown:
        modules = attention_module_names(unet)
        raise ValueError(f"unknown self-attention layer(s) {unknown} for this UNet; valid: the attention modules "
                         f"{', '.join(modules)} (decoder layers {_numbers(modules)}; each: all its transformer "
                         f"blocks' attn1), or one attn1 of them such as {valid_attn[0]}")
    return points


def _numbers(paths: list[str]) -> str:
    """Module paths `up_blocks.B.<kind>.L` as the paper's decoder layer numbers 3B + L, e.g. '3-11'."""
    nums = sorted({3 * int(p.split(".")[1]) + int(p.split(".")[3]) for p in paths})
    runs: list[list[int]] = []
    for n in nums:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
