"""The pack sampler (pnp/packs.py): several sources' targets in one UNet call per step, each target
injected with its own source's features."""

from __future__ import annotations

import torch

from pnp_batch.pnp.injection import PnPInjector
from pnp_batch.pnp.packs import PackController, pnp_sample_pack
from pnp_batch.pnp.sampler import Target, pnp_sample

STEPS = 10


def _second_source(source_latents: torch.Tensor) -> torch.Tensor:
    """Another source's trajectory: the first one mirrored (a different image, the same statistics)."""
    return source_latents.flip(-1).contiguous()


def _run_pack(unet, cfg, sources, uncond, targets, max_batch=64):
    ctl = PackController()
    inj = PnPInjector(unet, controller=ctl)
    try:
        return pnp_sample_pack(unet, ctl, cfg, sources, uncond, targets, STEPS, max_batch)
    finally:
        inj.remove()


def _run_one(unet, cfg, source, uncond, targets, max_batch=64):
    inj = PnPInjector(unet)
    try:
        return pnp_sample(unet, inj, cfg, source, uncond, targets, STEPS, max_batch)
    finally:
        inj.remove()


def test_a_pack_of_one_source_is_the_unpacked_loop_bit_for_bit(tiny_models, source_latents, embed):
    e = embed(["", "a fox", "a dog", "ugly"])
    targets = [Target(e[1], e[3], 7.5, 8, 5), Target(e[2], e[3], 5.0, 4, 2)]
    cfg = tiny_models.scheduler_config
    one = _run_one(tiny_models.unet, cfg, source_latents, e[:1], targets)
    pack = _run_pack(tiny_models.unet, cfg, [source_latents], e[:1], [targets])
    assert torch.equal(pack.latents[0], one.latents)
    assert (pack.unet_calls, pack.batch_elements, pack.source_elements) == (
        one.unet_calls, one.batch_elements, one.source_elements)


def test_each_target_gets_its_own_source_and_the_counts_fall_as_promised(tiny_models, source_latents, embed):
    """Two sources, K = 1 and K = 2, different thresholds and guidance: each source's images equal its
    unpacked run's (to float rounding of a bigger batch), in fewer calls and the same elements."""
    e = embed(["", "a fox", "a dog", "a cat", "ugly"])
    cfg = tiny_models.scheduler_config
    src_b = _second_source(source_latents)
    ta = [Target(e[1], e[4], 7.5, 8, 5)]
    tb = [Target(e[2], e[4], 5.0, 4, 2), Target(e[3], e[4], 9.0, 6, 6)]
    a = _run_one(tiny_models.unet, cfg, source_latents, e[:1], ta)
    b = _run_one(tiny_models.unet, cfg, src_b, e[:1], tb)
    pack = _run_pack(tiny_models.unet, cfg, [source_latents, src_b], e[:1], [ta, tb])
    assert (pack.latents[0] - a.latents).abs().max() < 1e-4
    assert (pack.latents[1] - b.latents).abs().max() < 1e-4
    # a swapped source would be far off: the injection really maps each target to its own source
    assert (pack.latents[0] - b.latents[:1]).abs().max() > 1e-2
    assert pack.unet_calls == STEPS < a.unet_calls + b.unet_calls
    assert pack.batch_elements == a.batch_elements + b.batch_elements
    assert pack.source_elements == a.source_elements + b.source_elements


def test_a_split_pack_records_every_source_for_the_later_calls(tiny_models, source_latents, embed):
    e = embed(["", "a fox", "a dog", "a cat", "ugly"])
    cfg = tiny_models.scheduler_config
    src_b = _second_source(source_latents)
    targets = [[Target(e[1], e[4], 7.5, 8, 5), Target(e[2], e[4], 7.5, 8, 5)], [Target(e[3], e[4], 5.0, 8, 5)]]
    whole = _run_pack(tiny_models.unet, cfg, [source_latents, src_b], e[:1], targets)
    split = _run_pack(tiny_models.unet, cfg, [source_latents, src_b], e[:1], targets, max_batch=4)
    assert split.unet_calls > whole.unet_calls
    assert split.source_elements == whole.source_elements
    for x, y in zip(whole.latents, split.latents):
        assert (x - y).abs().max() < 1e-4


def test_the_same_pack_gives_the_same_bytes_whatever_its_neighbour_holds(tiny_models, source_latents, embed):
    """What the bytes contract rests on: a source's result depends on its slot and the call's shape,
    not on the values of the other rows (no kernel mixes rows)."""
    e = embed(["", "a fox", "a dog", "ugly"])
    cfg = tiny_models.scheduler_config
    ta, tb = [Target(e[1], e[3], 7.5, 8, 5)], [Target(e[2], e[3], 7.5, 8, 5)]
    one = _run_pack(tiny_models.unet, cfg, [source_latents, _second_source(source_latents)], e[:1], [ta, tb])
    other = _run_pack(tiny_models.unet, cfg, [source_latents, torch.zeros_like(source_latents)], e[:1], [ta, tb])
    assert torch.equal(one.latents[0], other.latents[0])
