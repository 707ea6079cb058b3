"""Injection points are data (pnp/layers.py): SD's table is PNP_SPEC.md §4 exactly, overrides are
checked against the UNet's own layers, and the injector hooks exactly the layers it is given."""

from __future__ import annotations

import pytest

from pnp_batch.pnp.injection import PnPAttnProcessor, PnPInjector
from pnp_batch.pnp.layers import SD, architecture, attn_layer_names, feature_block_names, injection_points


def test_sd_table_is_the_spec():
    assert SD.feature_blocks == ("up_blocks.1.resnets.1",)
    spec = [(1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (3, 2)]
    assert SD.attn_layers == tuple(f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn1" for b, a in spec)


def test_tiny_unet_is_sd_and_has_every_point(tiny_models):
    unet = tiny_models.unet
    assert architecture(unet) == "sd"
    assert set(SD.attn_layers) <= set(attn_layer_names(unet))
    assert set(SD.feature_blocks) <= set(feature_block_names(unet))
    assert len(feature_block_names(unet)) == 12  # 4 up blocks x 3 resnets
    assert len(attn_layer_names(unet)) == 9  # 3 cross-attention up blocks x 3 attentions


def test_unknown_layer_names_list_the_valid_ones(tiny_models):
    with pytest.raises(ValueError, match=r"unknown feature-injection block.*up_blocks\.9\.resnets\.0.*valid: up_blocks"):
        injection_points(tiny_models.unet, feature_blocks=("up_blocks.9.resnets.0",))
    with pytest.raises(ValueError, match=r"unknown self-attention layer.*valid: the attention modules "
                       r"up_blocks\.1\.attentions\.0"):
        injection_points(tiny_models.unet, attn_layers=("down_blocks.0.attentions.0.transformer_blocks.0.attn1",))


def test_an_attention_module_stands_for_the_attn1_of_its_transformer_blocks(tiny_models):
    unet = tiny_models.unet
    got = injection_points(unet, attn_layers=("up_blocks.2.attentions.1", "up_blocks.3.attentions.0",
                                              "up_blocks.2.attentions.1.transformer_blocks.0.attn1"))
    assert got.attn_layers == ("up_blocks.2.attentions.1.transformer_blocks.0.attn1",
                               "up_blocks.3.attentions.0.transformer_blocks.0.attn1")


def test_injector_hooks_exactly_the_given_points(tiny_models):
    unet = tiny_models.unet
    points = injection_points(unet, feature_blocks=("up_blocks.2.resnets.0", "up_blocks.1.resnets.1"),
                              attn_layers=("up_blocks.3.attentions.2.transformer_blocks.0.attn1",))
    inj = PnPInjector(unet, points)
    try:
        pnp = sorted(k for k, p in unet.attn_processors.items() if isinstance(p, PnPAttnProcessor))
        assert pnp == ["up_blocks.3.attentions.2.transformer_blocks.0.attn1.processor"]
        hooked = sorted(n for n, m in unet.named_modules() if n.endswith("conv2") and m._forward_hooks)
        assert hooked == ["up_blocks.1.resnets.1.conv2", "up_blocks.2.resnets.0.conv2"]
    finally:
        inj.remove()
    assert not any(isinstance(p, PnPAttnProcessor) for p in unet.attn_processors.values())
    assert not any(m._forward_hooks for n, m in unet.named_modules() if n.endswith("conv2"))
