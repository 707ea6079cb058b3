"""PnP on SDXL's topology (tiny-sdxl): the injection table and its recognition, DDIM inversion with the
added conditioning (round trip), and CUDA-graph bookkeeping with `added_cond_kwargs` as inputs."""

from __future__ import annotations

import pytest
import torch

from pnp_batch.backbones import UnsupportedArchitecture, recognise
from pnp_batch.config import generation_timesteps
from pnp_batch.pnp.conditioning import TextCond
from pnp_batch.pnp.graphs import GraphedUNet
from pnp_batch.pnp.injection import PnPAttnProcessor, PnPInjector
from pnp_batch.pnp.inversion import ddim_invert, ddim_reconstruct
from pnp_batch.pnp.layers import (
    architecture,
    attn_layer_names,
    default_points,
    feature_block_names,
    injection_points,
)
from pnp_batch.pnp.sampler import Target, pnp_sample
from pnp_batch.translate.text import prompt_encoder


def _cond(models, prompts: list[str], size: int) -> TextCond:
    enc = prompt_encoder(models)
    return enc.for_size(enc.encode(prompts), size, size)


def test_sdxl_is_recognised_and_its_table_is_the_stated_one(tiny_sdxl_models):
    unet = tiny_sdxl_models.unet
    assert architecture(unet) == "sdxl" == tiny_sdxl_models.architecture
    points = default_points(unet)
    assert points.feature_blocks == ("up_blocks.0.resnets.1",)
    # up_blocks[0].attentions[1..2] (10 transformer blocks each, as SDXL base) and up_blocks[1].attentions[0..2] (2 each)
    want = [f"up_blocks.0.attentions.{a}.transformer_blocks.{t}.attn1" for a in (1, 2) for t in range(10)]
    want += [f"up_blocks.1.attentions.{a}.transformer_blocks.{t}.attn1" for a in (0, 1, 2) for t in range(2)]
    assert list(points.attn_layers) == want
    assert set(want) <= set(attn_layer_names(unet))
    assert len(feature_block_names(unet)) == 9  # 3 up blocks x 3 resnets
    assert not hasattr(unet.up_blocks[2], "attentions")  # the finest block has none: nothing to inject there
    inj = PnPInjector(unet)
    try:
        assert sum(isinstance(p, PnPAttnProcessor) for p in unet.attn_processors.values()) == 26
    finally:
        inj.remove()


def test_a_layer_sdxl_lacks_is_refused_by_name(tiny_sdxl_models):
    with pytest.raises(ValueError, match=r"unknown feature-injection block.*up_blocks\.3\.resnets\.1.*valid: up_blocks"):
        injection_points(tiny_sdxl_models.unet, feature_blocks=("up_blocks.3.resnets.1",))  # SD's 4th decoder block
    with pytest.raises(ValueError, match=r"unknown self-attention layer"):
        injection_points(tiny_sdxl_models.unet, attn_layers=("up_blocks.2.attentions.0.transformer_blocks.0.attn1",))


def test_layer_settings_by_number_follow_sdxl_decoder(tiny_sdxl_models):
    """The layer keys' decoder numbers name SDXL's own layers (up_blocks[n // 3], n % 3; all transformer
    blocks of an attention module), so its layer ablation is written as SD's is."""
    from pnp_batch.config import parse_layers

    unet = tiny_sdxl_models.unet
    pts = injection_points(unet, parse_layers("pnp_feature_blocks", "1"), parse_layers("pnp_attn_layers", "1-5"))
    assert pts == default_points(unet)  # SDXL's table, spelled as decoder layers
    pts = injection_points(unet, None, parse_layers("pnp_attn_layers", "3"))
    assert pts.attn_layers == ("up_blocks.1.attentions.0.transformer_blocks.0.attn1",
                               "up_blocks.1.attentions.0.transformer_blocks.1.attn1")
    with pytest.raises(ValueError, match=r"unknown self-attention layer.*up_blocks\.2\.attentions\.0.*valid: "
                       r"the attention modules up_blocks\.0\.attentions\.0"):
        injection_points(unet, None, parse_layers("pnp_attn_layers", "6"))  # the finest block has no attention


def test_refiner_and_inpainting_unets_are_not_recognised():
    from diffusers import UNet2DConditionModel

    common = {"block_out_channels": (8, 8, 16, 16), "norm_num_groups": 4, "cross_attention_dim": 8,
              "layers_per_block": 1, "attention_head_dim": 2, "sample_size": 8}
    refiner = UNet2DConditionModel(  # the refiner's layout: 4 blocks, text_time with 5 ids (aesthetic score)
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=5 * 4 + 8,
        **common)
    with pytest.raises(UnsupportedArchitecture, match="SDXL refiner"):
        recognise(refiner)
    inpaint = UNet2DConditionModel(in_channels=9, **common)
    with pytest.raises(UnsupportedArchitecture, match="9 input channels: an inpainting UNet"):
        recognise(inpaint)


def _round_trip(models, z0, cond, steps):
    inv = ddim_invert(models.unet, models.scheduler_config, z0, cond, steps, generation_timesteps(steps))
    rec = ddim_reconstruct(models.unet, models.scheduler_config, inv.latents[0], cond, steps)
    return float((rec - z0).norm() / z0.norm()), inv


@pytest.mark.slow
def test_sdxl_inversion_round_trip_converges(tiny_sdxl_models):
    """As tests/pnp/test_inversion.py for SD: first-order error in the step size, so 4x the steps must
    shrink it well (a wrong alpha or timestep, or added inputs differing between the two directions,
    leave an error that does not shrink). Measured on tiny-sdxl: 0.096 at 50 steps, 0.028 at 200."""
    m = tiny_sdxl_models
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        z0 = m.vae.encode(img).latent_dist.mean * m.scaling_factor
    assert 0.5 < float(z0.std()) < 2.0  # latents of a trained VAE's scale after SDXL's 0.13025
    cond = _cond(m, [""], 64)
    err50, inv = _round_trip(m, z0, cond, 50)
    err200, _ = _round_trip(m, z0, cond, 200)
    assert err50 < 0.15, err50
    assert err200 < 0.045, err200
    assert err200 * 2.5 < err50, (err50, err200)
    assert float((inv.latents[0, 0] - z0).norm() / z0.norm()) > 0.5  # it really went somewhere
    # the size conditioning is an input that matters: other time ids, another trajectory
    other = _cond(m, [""], 1024)
    moved = ddim_invert(m.unet, m.scheduler_config, z0, other, 50, generation_timesteps(50)).latents
    assert float((moved - inv.latents).abs().max()) > 1e-3


class _Replay:
    """Stand-in for CUDA graph capture (as in tests/pnp/test_graphs.py): a replay re-runs the recorded
    call on its static inputs with the controller as it was when recorded."""

    def __init__(self, controller) -> None:
        self.controller = controller

    def lane(self, sample) -> int:
        return 0

    def capture(self, fn, lane):
        c = self.controller
        out = fn()
        frozen = (c.conv_rows, c.attn_rows, c.has_source, c.record)

        def replay() -> None:
            now = (c.conv_rows, c.attn_rows, c.has_source, c.record)
            c.conv_rows, c.attn_rows, c.has_source, c.record = frozen
            try:
                out.copy_(fn())
            finally:
                c.conv_rows, c.attn_rows, c.has_source, c.record = now

        return replay, out


def test_graphed_unet_replays_sdxl_calls_with_their_added_inputs(tiny_sdxl_models):
    """Two sources of different sizes' time ids but the same shapes share graphs: a replay must read
    this call's pooled embeddings and time ids, not the recorded ones."""
    m = tiny_sdxl_models
    unet = m.unet
    injector = PnPInjector(unet)
    try:
        steps = 4
        g = torch.Generator().manual_seed(1)
        z0 = torch.randn(1, 4, 8, 8, generator=g)
        results = {}
        for name, model in (("eager", unet), ("graphed", GraphedUNet(unet, injector.controller))):
            if isinstance(model, GraphedUNet):
                model.backend = _Replay(injector.controller)
            runs = []
            for size in (64, 96):  # the same latent shape, other time ids
                uncond = _cond(m, [""], size)
                c, n = _cond(m, ["a cat", "a dog"], size), _cond(m, ["ugly"], size)
                inv = ddim_invert(model, m.scheduler_config, z0, uncond, steps, generation_timesteps(steps))
                targets = [Target(c[j], n[0], 7.5, 3, 2) for j in range(2)]
                out = pnp_sample(model, injector, m.scheduler_config, inv.latents, uncond, targets, steps, 5)
                runs.append((inv.latents, out.latents))
            results[name] = runs
            if isinstance(model, GraphedUNet):
                assert model.replays > 0 and model.recorded <= 4  # shared across the two sizes
        for (ie, se), (ig, sg) in zip(results["eager"], results["graphed"]):
            assert torch.equal(ie, ig) and torch.equal(se, sg)
        assert not torch.equal(results["eager"][0][1], results["eager"][1][1])
    finally:
        injector.remove()
