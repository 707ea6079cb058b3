"""The loops hand the UNet its timestep as a device tensor (no host-device copy per call), same values.

diffusers turns a Python int timestep into a device tensor inside every UNet call: a blocking
host-to-device copy that, on a GPU, stalls the host until the queue drains. The loops build the
timesteps once and pass views; this checks every call of inversion, reconstruction and sampling.
"""

from __future__ import annotations

import torch

from pnp_batch.config import generation_timesteps
from pnp_batch.pnp.injection import PnPInjector
from pnp_batch.pnp.inversion import ddim_invert, ddim_reconstruct
from pnp_batch.pnp.sampler import Target, pnp_sample


class TimestepSpy:
    """Records the timestep argument of every UNet call (type, device, dtype, value)."""

    def __init__(self, unet) -> None:
        self.seen: list[tuple[bool, bool, torch.dtype | None, int]] = []
        self._h = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        is_t = torch.is_tensor(t)
        self.seen.append((is_t, is_t and t.device == sample.device, t.dtype if is_t else None, int(t)))

    def remove(self) -> None:
        self._h.remove()


def test_every_unet_call_gets_a_device_tensor_timestep(tiny_models, embed, source_latents):
    unet, sc = tiny_models.unet, tiny_models.scheduler_config
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    cond = embed([""])
    spy = TimestepSpy(unet)
    injector = PnPInjector(unet)
    try:
        inv = ddim_invert(unet, sc, z0, cond, 10, generation_timesteps(5))
        ddim_reconstruct(unet, sc, inv.latents[0], cond, 5)
        emb = embed(["a cat", "a dog"])
        targets = [Target(emb[j], cond[0], 7.5, 8, 5) for j in range(2)]
        pnp_sample(unet, injector, sc, source_latents, cond, targets, 10, 3)  # split: 2+ calls per step
    finally:
        injector.remove()
        spy.remove()
    # sampling: 4 target elements, batches of 3: [source + 2] + [2] while injecting, then [3] + [1]
    assert len(spy.seen) == 10 + 5 + 10 * 2
    assert all(is_t and on_dev and dt == torch.int64 for is_t, on_dev, dt, _ in spy.seen), spy.seen[:3]
    values = [v for *_, v in spy.seen]
    assert values[:10] == list(range(1, 1000, 100))  # inversion: upward, 1, 101, ..., 901
    assert values[10:15] == generation_timesteps(5)  # reconstruction: downward
    assert sorted(set(values[15:]), reverse=True) == generation_timesteps(10)
