"""Per-target thresholds (a sweep's grid) over a batch split into several UNet calls: the later calls
inject what the first one recorded even when none of the first call's own targets is injected."""

from __future__ import annotations

from pnp_batch.pnp.injection import PnPInjector
from pnp_batch.pnp.sampler import Target, pnp_sample

STEPS = 10


def test_later_calls_get_the_source_when_the_first_call_injects_nothing(tiny_models, source_latents, embed):
    unet = tiny_models.unet
    injector = PnPInjector(unet)
    e = embed(["", "a fox", "a dog", "a cat", "a cow", "ugly"])
    # the first call (source + 2 elements: the negatives of targets 0 and 1) stops injecting at step 2
    # while targets 2 and 3, in later calls, inject until steps 8 and 5
    targets = [Target(e[1], e[5], 7.5, 2, 1), Target(e[2], e[5], 5.0, 2, 1),
               Target(e[3], e[5], 7.5, 8, 5), Target(e[4], e[5], 10.0, 8, 5)]
    try:
        one = pnp_sample(unet, injector, tiny_models.scheduler_config, source_latents, e[:1], targets, STEPS, 17)
        split = pnp_sample(unet, injector, tiny_models.scheduler_config, source_latents, e[:1], targets, STEPS, 3)
    finally:
        injector.remove()
    assert split.unet_calls == 3 * STEPS  # 8 target elements: [source + 2, 3, 3] or [3, 3, 2] per step
    assert split.source_elements == one.source_elements == 8
    assert (one.latents - split.latents).abs().max() < 1e-4
