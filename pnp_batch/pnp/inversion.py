"""DDIM inversion (PNP_SPEC.md §2): tensors in, the latent trajectory at the kept timesteps out."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from pnp_batch.config import ConfigError
from pnp_batch.pnp.conditioning import TextCond


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
    cond: torch.Tensor | TextCond,
    inversion_steps: int,
    keep: list[int],
    prediction_type: str = "epsilon",
) -> InversionOutput:
    """Walk the inversion timesteps upward from the clean latent, keeping x at every `keep` timestep.

    One UNet evaluation per step (guidance 1). With a_t = alphas_cumprod[t] and a_prev at the
    previous (lower) timestep, or final_alpha_cumprod first:
    x0 = (x - sqrt(1-a_prev) eps) / sqrt(a_prev); x = sqrt(a_t) x0 + sqrt(1-a_t) eps.
    The arithmetic follows the authors' code operation for operation (fp32 scalars from the
    scheduler's own alphas), so fp32 results match theirs.
    """
    return ddim_invert_many(unet, scheduler_config, [latent], cond, inversion_steps, keep, prediction_type)[0]


@torch.no_grad()
def ddim_invert_many(
    unet,
    scheduler_config: dict,
    latents: list[torch.Tensor],
    cond: torch.Tensor | TextCond,
    inversion_steps: int,
    keep: list[int],
    prediction_type: str = "epsilon",
    streams: list | None = None,
) -> list[InversionOutput]:
    """Several independent inversions (as :func:`ddim_invert`), advanced a step at a time in turn.

    With `streams` (CUDA streams, one per latent) each inversion runs on its own stream, so the GPU
    works on them side by side, filling what one small call leaves idle. Each gets exactly the result
    it would get alone: the same kernels on the same inputs, only their order across streams differs.
    The streams start after the work already queued on the current stream, which waits for them at
    the end; the outputs are marked as used by it (the caching allocator must not hand their memory
    back to a stream while the current one still reads it).
    """
    sched = make_scheduler(scheduler_config, inversion_steps)
    ascending = [int(t) for t in reversed(sched.timesteps.tolist())]
    missing = [t for t in keep if t not in set(ascending)]
    if missing:
        raise ConfigError(
            f"inversion timesteps ({inversion_steps} steps) do not contain the generation timesteps {missing[:5]}..."
        )
    if streams is not None and len(streams) < len(latents):
        raise ValueError(f"{len(latents)} inversions need as many streams, got {len(streams)}")
    ts = device_timesteps(ascending, latents[0].device)
    current = torch.cuda.current_stream(latents[0].device) if streams else None

    def lane(j: int):
        return torch.cuda.stream(streams[j]) if streams else nullcontext()

    for s in streams[: len(latents)] if streams else ():
        s.wait_stream(current)
    walks = []
    for j, z in enumerate(latents):
        with lane(j):
            walks.append(_Walk(z, cond, keep))
    model_dtype = unet.dtype
    for i, t in enumerate(ascending):
        a_t = sched.alphas_cumprod[t]
        a_prev = sched.alphas_cumprod[ascending[i - 1]] if i > 0 else sched.final_alpha_cumprod
        coeffs = (a_t, a_t**0.5, a_prev**0.5, (1 - a_t) ** 0.5, (1 - a_prev) ** 0.5)  # the same for every walk
        for j, w in enumerate(walks):
            with lane(j):
                out = unet(w.x.to(model_dtype), ts[i], **w.cond).sample.float()
                w.step(out, t, coeffs, prediction_type)
    outs = []
    for j, w in enumerate(walks):
        with lane(j):
            stacked = torch.stack([w.kept[t] for t in keep])
        if streams:
            current.wait_stream(streams[j])
            stacked.record_stream(current)
        outs.append(InversionOutput(stacked, list(keep), len(ascending), len(ascending) * w.x.shape[0]))
    return outs


class _Walk:
    """One inversion in progress: x so far and the latents kept at the `keep` timesteps."""

    def __init__(self, latent: torch.Tensor, cond: torch.Tensor | TextCond, keep: list[int]) -> None:
        self.x = latent.float()
        self.cond = TextCond.of(cond).expand(self.x.shape[0]).unet_kwargs()  # the UNet's keyword arguments
        self.keep = set(keep)
        self.kept: dict[int, torch.Tensor] = {}

    def step(self, out: torch.Tensor, t: int, coeffs: tuple, prediction_type: str) -> None:
        """x at t from x at the previous timestep and the model's output there; coeffs =
        (a_t, mu, mu_prev, sigma, sigma_prev) with mu = sqrt(a), sigma = sqrt(1 - a)."""
        x = self.x
        a_t, mu, mu_prev, sigma, sigma_prev = coeffs
        eps = eps_from_output(out, x, a_t, prediction_type)
        pred_x0 = (x - sigma_prev * eps) / mu_prev
        self.x = mu * pred_x0 + sigma * eps
        if t in self.keep:
            self.kept[t] = self.x


@torch.no_grad()
def ddim_reconstruct(
    unet, scheduler_config: dict, x: torch.Tensor, cond: torch.Tensor | TextCond, steps: int,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """Plain DDIM sampling (eta 0, guidance 1) from the noisiest kept latent back to a clean latent."""
    sched = make_scheduler(scheduler_config, steps)
    x = x.float()
    kwargs = TextCond.of(cond).expand(x.shape[0]).unet_kwargs()
    timesteps = [int(t) for t in sched.timesteps.tolist()]
    ts = device_timesteps(timesteps, x.device)
    for i, t in enumerate(timesteps):
        out = unet(x.to(unet.dtype), ts[i], **kwargs).sample.float()
        x = sched.step(out, t, x).prev_sample
    return x
