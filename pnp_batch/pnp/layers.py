"""Where PnP injects, as data: one table of injection points per UNet architecture (PNP_SPEC.md §4).

Feature injection replaces the output of `conv2` in the named resnets; self-attention injection
replaces the queries and keys of the named `attn1` layers. The injector reads these tables and knows
nothing of architectures; a new backbone adds a table here (and a way to recognise its UNet).
Names are module paths in diffusers' UNet (`unet.get_submodule(name)`).
"""

from __future__ import annotations

from dataclasses import dataclass


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


# SD 1.x/2.x: the 4th decoder layer's features (16x16 at 512 px) and decoder self-attention layers 4-11.
SD = InjectionPoints(
    feature_blocks=("up_blocks.1.resnets.1",),
    attn_layers=_attn(1, (1, 2)) + _attn(2, (0, 1, 2)) + _attn(3, (0, 1, 2)),
)

INJECTION_POINTS: dict[str, InjectionPoints] = {"sd": SD}


def architecture(unet) -> str:
    """The injection table that fits this UNet, recognised by its decoder's layout."""
    ups = getattr(unet, "up_blocks", None)
    if ups is not None and len(ups) == 4 and len(ups[1].resnets) > 1:
        return "sd"
    raise ValueError(
        f"no PnP injection points are known for a UNet with {len(ups) if ups is not None else 'no'} decoder "
        f"blocks; known architectures: {', '.join(INJECTION_POINTS)} (PNP_SPEC.md section 7)"
    )


def feature_block_names(unet) -> list[str]:
    """Every decoder resnet of this UNet: the valid values for feature injection."""
    return [n for n, _ in unet.named_modules() if n.startswith("up_blocks.") and ".resnets." in n
            and n.count(".") == 3]


def attn_layer_names(unet) -> list[str]:
    """Every decoder self-attention layer of this UNet: the valid values for attention injection."""
    return [n for n, _ in unet.named_modules() if n.startswith("up_blocks.") and n.endswith(".attn1")]


def injection_points(unet, feature_blocks: tuple[str, ...] | None = None,
                     attn_layers: tuple[str, ...] | None = None) -> InjectionPoints:
    """The architecture's table, with either list replaced when given; unknown names are a ValueError
    that lists the valid ones."""
    default = INJECTION_POINTS[architecture(unet)]
    points = InjectionPoints(
        feature_blocks=default.feature_blocks if feature_blocks is None else tuple(feature_blocks),
        attn_layers=default.attn_layers if attn_layers is None else tuple(attn_layers),
    )
    for given, valid, what in ((points.feature_blocks, feature_block_names(unet), "feature-injection block"),
                               (points.attn_layers, attn_layer_names(unet), "self-attention layer")):
        unknown = [n for n in given if n not in valid]
        if unknown:
            raise ValueError(f"unknown {what}(s) {unknown} for this UNet; valid: {', '.join(valid)}")
    return points
