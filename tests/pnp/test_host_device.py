"""No host-device traffic inside the loops, checked without a GPU: the loops run on the meta device.

A meta tensor has a shape and no data. Anything that reads a value on the host (`.item()`, `bool()`,
`.tolist()`, `.cpu()`, a data-dependent branch) fails on it, as on a GPU it would stall the host until
the queue drains. A host-to-device copy (a tensor made from host data on the device, `.to(device)`
of a host tensor) succeeds, so a spy counts those: their number must not grow with the step count.
`tests/test_gpu.py` checks the same on a real GPU with torch's sync debug mode.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.overrides import TorchFunctionMode

from pnp_batch.config import generation_timesteps
from pnp_batch.pnp.injection import PnPInjector
from pnp_batch.pnp.inversion import ddim_invert, ddim_reconstruct
from pnp_batch.pnp.sampler import Target, pnp_sample

META = torch.device("meta")


def _device(x) -> torch.device | None:
    if isinstance(x, (str, torch.device)):
        try:
            return torch.device(x)
        except RuntimeError:
            return None
    return None


class HostToDevice(TorchFunctionMode):
    """Counts copies of host data to a non-CPU device (0-dim CPU tensors are scalars: no copy)."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in ("tensor", "as_tensor"):
            dev = _device(kwargs.get("device"))
            if dev is not None and dev.type != "cpu":
                self.copies.append(name)
        elif name in ("to", "cuda", "copy_") and args and isinstance(args[0], torch.Tensor):
            if name == "copy_":
                src, dst_dev = args[1], args[0].device
            else:
                src = args[0]
                dst_dev = next((d for d in map(_device, (*args[1:], kwargs.get("device"))) if d is not None), None)
                if name == "cuda":
                    dst_dev = torch.device("cuda")
            if (isinstance(src, torch.Tensor) and src.device.type == "cpu" and src.dim() > 0
                    and dst_dev is not None and dst_dev.type != "cpu"):
                self.copies.append(name)
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def meta(tiny_models, embed):
    """The tiny UNet's architecture on the meta device, and embeddings there."""
    unet = copy.deepcopy(tiny_models.unet).to(META)
    return unet, tiny_models.scheduler_config, embed([""]).to(META), embed(["a cat", "a dog"]).to(META)


def _loops(meta, steps: int) -> list[str]:
    unet, sc, uncond, emb = meta
    z0 = torch.empty(1, 4, 8, 8, device=META)
    injector = PnPInjector(unet)
    spy = HostToDevice()
    try:
        with spy:
            inv = ddim_invert(unet, sc, z0, uncond, 2 * steps, generation_timesteps(steps))
            ddim_reconstruct(unet, sc, inv.latents[0], uncond, steps)
            targets = [Target(emb[j], uncond[0], 7.5, int(steps * 0.8), int(steps * 0.5)) for j in range(2)]
            pnp_sample(unet, injector, sc, inv.latents, uncond, targets, steps, 3)  # [src + 2] + [2]: split
            pnp_sample(unet, injector, sc, inv.latents, uncond, targets, steps, 5)  # one call per step
    finally:
        injector.remove()
    return spy.copies


def test_loops_read_nothing_back_and_copy_nothing_per_step(meta):
    # no exception: nothing in the loops reads a device value on the host
    at2, at4 = _loops(meta, 2), _loops(meta, 4)
    assert len(at2) == len(at4), (at2, at4)  # the copies made before the loops only, none per step


def test_the_spy_sees_the_copy_an_int_timestep_costs(meta):
    """The check can fail: diffusers turns a Python int timestep into a device tensor in every call."""
    unet, _, uncond, _ = meta
    x = torch.empty(1, 4, 8, 8, device=META)
    spy = HostToDevice()
    with spy:
        unet(x, 5, encoder_hidden_states=uncond)
        unet(x, 7, encoder_hidden_states=uncond)
    assert spy.copies == ["tensor", "tensor"]
    spy = HostToDevice()
    with spy:
        unet(x, torch.tensor(5, device=META), encoder_hidden_states=uncond)
    assert spy.copies == ["tensor"]  # the one made here; the UNet call itself copies nothing
    with pytest.raises((RuntimeError, NotImplementedError)):  # and a host read fails on meta
        bool(x.sum() > 0)
