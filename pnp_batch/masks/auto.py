"""Masks found from the prompts (`mask_mode: auto`), DiffEdit's recipe (Couairon et al. 2022; docs/masks.md).

The source latent is noised to the timestep `mask_strength` of the way into the diffusion, `mask_samples`
times with seeded noise; the UNet predicts the noise of each draw under the target prompt and under the
source prompt; where the two predictions differ is where the prompts disagree about the image. The
absolute difference, averaged over channels and draws, is scaled to [0, 1] per row and thresholded at
`mask_threshold`. The draws are seeded by the source, its prompt and the settings, so the source prompt's
predictions are shared by every target of a source: a source with K targets costs (K + 1) x mask_samples
UNet batch elements, 2 x mask_samples at K = 1 and fewer per row above.
"""

from __future__ import annotations

import hashlib

import torch

from pnp_batch.pnp.conditioning import TextCond
from pnp_batch.pnp.inversion import eps_from_output, make_scheduler


def noise_seed(key: str) -> int:
    """A draw's seed from the mask's cache key: the same mask wherever and whenever it is computed."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:15], 16)


def mask_timestep(scheduler_config: dict, strength: float) -> int:
    """The training timestep `strength` of the way into the diffusion (0.5 -> 499 of 1000)."""
    n = int(scheduler_config.get("num_train_timesteps", 1000))
    return min(n - 1, max(0, round(strength * n) - 1))


@torch.no_grad()
def diffedit_maps(unet, scheduler_config: dict, z0: torch.Tensor, source: TextCond, targets: TextCond,
                  strength: float, samples: int, seed: int, max_batch: int,
                  prediction_type: str = "epsilon") -> tuple[torch.Tensor, int, int]:
    """Per target, the difference map (K, h, w) in [0, 1], and the UNet calls and batch elements spent.

    z0: (1, C, h, w), the source's clean latent; source: its prompt's conditioning (one element);
    targets: one element per target. The `samples` noisy latents (seeded by `seed`: the source, its
    prompt and the settings, not the target, so every target of a source sees the same draws) go through
    the source prompt once and through each target prompt."""
    k = targets.hidden.shape[0]
    t = mask_timestep(scheduler_config, strength)
    a = make_scheduler(scheduler_config, 1).alphas_cumprod[t].to(z0.device, torch.float32)
    dtype = unet.dtype
    g = torch.Generator().manual_seed(seed)  # noise drawn on the CPU: the same on every device
    noise = torch.randn((samples, *z0.shape[1:]), generator=g).to(z0.device)
    x = a.sqrt() * z0.float() + (1 - a).sqrt() * noise  # (samples, C, h, w)
    conds = TextCond.cat([TextCond.of(source).expand(samples),
                          targets.rows(torch.arange(k, device=z0.device).repeat_interleave(samples))]).to(dtype)
    xs = x.repeat(k + 1, 1, 1, 1)  # [source: draws 1..S, target 1: draws 1..S, ...]
    ts = torch.full((1,), t, dtype=torch.int64, device=z0.device)
    preds = []
    calls = 0
    for start in range(0, xs.shape[0], max(1, max_batch)):
        idx = torch.arange(start, min(start + max(1, max_batch), xs.shape[0]), device=z0.device)
        out = unet(xs[idx].to(dtype), ts, **conds.rows(idx).unet_kwargs()).sample.float()
        preds.append(eps_from_output(out, xs[idx], a, prediction_type))
        calls += 1
    eps = torch.cat(preds).reshape(k + 1, samples, *z0.shape[1:])
    diff = (eps[1:] - eps[:1]).abs().mean(dim=2).mean(dim=1)  # (K, h, w)
    lo = diff.flatten(1).min(dim=1).values.view(k, 1, 1)
    hi = diff.flatten(1).max(dim=1).values.view(k, 1, 1)
    maps = (diff - lo) / (hi - lo).clamp_min(1e-12)
    return maps, calls, xs.shape[0]


def threshold(maps: torch.Tensor, level: float) -> torch.Tensor:
    """Binary masks (K, 1, h, w) float: 1 where the map is above `level`."""
    return (maps > level).float().unsqueeze(1)
