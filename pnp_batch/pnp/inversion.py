"""DDIM inversion (PNP_SPEC.md §2): tensors in, the latent trajectory at the kept timesteps out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pnp_batch.config import ConfigError


@dataclass
class InversionOutput:
    latents: torch.Tensor  # (len(keep), B, C, h, w), ordered like `keep` (noisiest first), float32
    timesteps: list[int]  # = keep
    unet_calls: int
    batch_elements: int


def make_scheduler(scheduler_config: dict, steps: int):
    """A DDIMScheduler from the model's own scheduler config, set to `steps` timesteps."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(scheduler_config)
    sched.set_timesteps(steps)
    return sched


def device_timesteps(timesteps: list[int], device: torch.device) -> torch.Tensor:
    """The timesteps as one int64 tensor on the model's device, made once before a loop.

    diffusers' UNet turns a Python int timestep into a device tensor on every call, a blocking
    host-to-device copy that stalls the host until the GPU has drained its queue. Passing `ts[i]`
    (a view, no copy) lets the host queue the next call's kernels while the GPU runs this one.
    int64 is the dtype diffusers itself would make, so results are unchanged.
    """
    return torch.tensor(timesteps, dtype=torch.int64, device=device)


def eps_from_output(out: torch.Tensor, x: torch.Tensor, alpha_t: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The model's noise estimate, whatever it predicts (epsilon or v)."""
    if prediction_type == "epsilon":
        return out
    if prediction_type == "v_prediction":
        return alpha_t**0.5 * out + (1 - alpha_t) ** 0.5 * x
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


@torch.no_grad()
def ddim_invert(
    unet,
    scheduler_config: dict,
    latent: torch.Tensor,
    cond: torch.Tensor,
    inversion_steps: int,
    keep: list[int],
    prediction_type: str = "epsilon",
    on_step: Callable[[int], None] | None = None,
) -> InversionOutput:
    """Walk the inversion timesteps upward from the clean latent, keeping x at every `keep` timestep.

    One UNet evaluation per step (guidance 1). With a_t = alphas_cumprod[t] and a_prev at the
    previous (lower) timestep, or final_alpha_cumprod first:
    x0 = (x - sqrt(1-a_prev) eps) / sqrt(a_prev); x = sqrt(a_t) x0 + sqrt(1-a_t) eps.
    The arithmetic follows the authors' code operation for operation (fp32 scalars from the
    scheduler's own alphas), so fp32 results match theirs.
    """
    sched = make_scheduler(scheduler_config, inversion_steps)
    ascending = [int(t) for t in reversed(sched.timesteps.tolist())]
    missing = [t for t in keep if t not in set(ascending)]
    if missing:
        raise ConfigError(
            f"inversion timesteps ({inversion_steps} steps) do not contain the generation timesteps {missing[:5]}..."
        )
    alphas = sched.alphas_cumprod
    keep_set = set(keep)
    kept: dict[int, torch.Tensor] = {}
    x = latent.float()
    batch = x.shape[0]
    cond = cond.expand(batch, *cond.shape[1:]) if cond.shape[0] == 1 else cond
    model_dtype = unet.dtype
    ts = device_timesteps(ascending, x.device)
    for i, t in enumerate(ascending):
        a_t = alphas[t]
        a_prev = alphas[ascending[i - 1]] if i > 0 else sched.final_alpha_cumprod
        mu, mu_prev = a_t**0.5, a_prev**0.5
        sigma, sigma_prev = (1 - a_t) ** 0.5, (1 - a_prev) ** 0.5
        out = unet(x.to(model_dtype), ts[i], encoder_hidden_states=cond).sample.float()
        eps = eps_from_output(out, x, a_t, prediction_type)
        pred_x0 = (x - sigma_prev * eps) / mu_prev
        x = mu * pred_x0 + sigma * eps
        if t in keep_set:
            kept[t] = x
        if on_step is not None:
            on_step(i)
    stacked = torch.stack([kept[t] for t in keep])
    return InversionOutput(stacked, list(keep), len(ascending), len(ascending) * batch)


@torch.no_grad()
def ddim_reconstruct(
    unet, scheduler_config: dict, x: torch.Tensor, cond: torch.Tensor, steps: int, prediction_type: str = "epsilon"
) -> torch.Tensor:
    """Plain DDIM sampling (eta 0, guidance 1) from the noisiest kept latent back to a clean latent."""
    sched = make_scheduler(scheduler_config, steps)
    x = x.float()
    cond = cond.expand(x.shape[0], *cond.shape[1:]) if cond.shape[0] == 1 else cond
    timesteps = [int(t) for t in sched.timesteps.tolist()]
    ts = device_timesteps(timesteps, x.device)
    for i, t in enumerate(timesteps):
        out = unet(x.to(unet.dtype), ts[i], encoder_hidden_states=cond).sample.float()
        x = sched.step(out, t, x).prev_sample
    return x
