"""DDIM inversion then DDIM reconstruction (inversion prompt, guidance 1) returns to the source latent.

DDIM inversion is exact only in the limit of small steps: each step evaluates eps at the previous
(lower) noise level, so the round trip has an error of first order in the step size. The tolerance
therefore has two parts, both measured on the tiny model (latents of std ~1, like SD's):
  - 50 steps (the default schedule): relative L2 error 0.12 measured; asserted < 0.2;
  - 200 steps: 0.042 measured; asserted < 0.07, and at least 2.5x smaller than at 50 steps
    (first order predicts 4x), which a wrong alpha or an off-by-one timestep would break:
    those leave an error that does not shrink with the step size.
"""

from __future__ import annotations

import pytest
import torch

from pnp_batch.config import generation_timesteps
from pnp_batch.pnp.inversion import ddim_invert, ddim_reconstruct


def _round_trip(models, z0, cond, steps):
    inv = ddim_invert(models.unet, models.scheduler_config, z0, cond, steps, generation_timesteps(steps))
    assert inv.unet_calls == steps and inv.latents.shape[0] == steps
    rec = ddim_reconstruct(models.unet, models.scheduler_config, inv.latents[0], cond, steps)
    return float((rec - z0).norm() / z0.norm()), inv


@pytest.mark.slow
def test_inversion_round_trip_converges(tiny_models, embed):
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        z0 = tiny_models.vae.encode(img).latent_dist.mean * tiny_models.scaling_factor
    assert 0.5 < float(z0.std()) < 2.0  # SD-like latent scale
    cond = embed([""])
    err50, inv = _round_trip(tiny_models, z0, cond, 50)
    err200, _ = _round_trip(tiny_models, z0, cond, 200)
    assert err50 < 0.2, err50
    assert err200 < 0.07, err200
    assert err200 * 2.5 < err50, (err50, err200)
    # the noisiest kept latent is far from the clean one: the inversion really went somewhere
    assert float((inv.latents[0, 0] - z0).norm() / z0.norm()) > 0.5


def test_inversion_keeps_exactly_the_generation_timesteps(tiny_models, embed):
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = embed([""])
    keep = generation_timesteps(5)  # 801, 601, 401, 201, 1
    coarse = ddim_invert(tiny_models.unet, tiny_models.scheduler_config, z0, cond, 5, keep)
    fine = ddim_invert(tiny_models.unet, tiny_models.scheduler_config, z0, cond, 10, keep)  # 901 ... 1 by 100
    assert coarse.unet_calls == 5 and fine.unet_calls == 10
    assert coarse.latents.shape == fine.latents.shape == (5, 1, 4, 8, 8)
    # the first kept latent (t=1) after one step from the same start is the same in both schedules
    assert torch.allclose(coarse.latents[-1], fine.latents[-1], atol=1e-6)
    assert not torch.allclose(coarse.latents[0], fine.latents[0], atol=1e-3)
    with pytest.raises(ValueError, match="do not contain"):
        ddim_invert(tiny_models.unet, tiny_models.scheduler_config, z0, cond, 3, keep)


def test_v_prediction_models_invert_and_sample(tiny_models, embed):
    """SD 2.x at 768 predicts v: inversion converts it to eps, sampling lets the scheduler convert."""
    from pnp_batch.pnp.injection import PnPInjector
    from pnp_batch.pnp.sampler import Target, pnp_sample

    sched_cfg = dict(tiny_models.scheduler_config, prediction_type="v_prediction")
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        z0 = tiny_models.vae.encode(img).latent_dist.mean * tiny_models.scaling_factor
    cond = embed([""])
    steps = 20
    inv = ddim_invert(tiny_models.unet, sched_cfg, z0, cond, steps, generation_timesteps(steps), "v_prediction")
    rec = ddim_reconstruct(tiny_models.unet, sched_cfg, inv.latents[0], cond, steps, "v_prediction")
    eps_inv = ddim_invert(tiny_models.unet, tiny_models.scheduler_config, z0, cond, steps, generation_timesteps(steps))
    assert not torch.allclose(inv.latents, eps_inv.latents, atol=1e-3)  # the prediction type is honoured
    err = float((rec - z0).norm() / z0.norm())
    assert err < 0.25, err
    injector = PnPInjector(tiny_models.unet)
    e = embed(["a photo of a fox", "ugly"])
    try:
        out = pnp_sample(tiny_models.unet, injector, sched_cfg, inv.latents, cond, [Target(e[0], e[1], 7.5, 16, 10)],
                         steps, 17)
    finally:
        injector.remove()
    assert torch.isfinite(out.latents).all()


def test_interleaved_inversions_equal_each_alone(tiny_models, embed):
    """ddim_invert_many advances several inversions a step at a time in turn (on CUDA each on its own
    stream): each gets the bits it gets alone, whatever its batch size or its neighbours."""
    from pnp_batch.pnp.inversion import ddim_invert_many

    g = torch.Generator().manual_seed(3)
    sc, cond, keep = tiny_models.scheduler_config, embed([""]), generation_timesteps(4)
    latents = [torch.randn(1, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g),
               torch.randn(1, 4, 8, 8, generator=g)]
    calls = []
    hook = tiny_models.unet.register_forward_pre_hook(lambda _m, args, kw: calls.append(kw["encoder_hidden_states"].shape[0]),
                                                      with_kwargs=True)
    try:
        many = ddim_invert_many(tiny_models.unet, sc, latents, cond, 4, keep)
    finally:
        hook.remove()
    assert calls == [1, 2, 1] * 4  # step by step, in turn
    for z, out in zip(latents, many):
        alone = ddim_invert(tiny_models.unet, sc, z, cond, 4, keep)
        assert torch.equal(out.latents, alone.latents)
        assert (out.unet_calls, out.batch_elements) == (4, 4 * z.shape[0])
    with pytest.raises(ValueError, match="3 inversions need as many streams, got 2"):
        ddim_invert_many(tiny_models.unet, sc, latents, cond, 4, keep, streams=[object(), object()])
