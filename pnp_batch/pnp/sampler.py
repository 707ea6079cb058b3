"""The PnP sampling loop (PNP_SPEC.md §3): K target prompts for one source, one shared source branch.

Steps: 1. check inputs; 2. plan every UNet call of every step (batch layout, which rows get
injected, index tensors) before the loop, so the loop itself does no host-device synchronisation;
3. denoise: per step, the source branch (row 0) and the target elements, guidance, DDIM step;
4. return the final latents (decoding is the caller's).

Layout of the target elements: kind-major, [neg_1..neg_K, cond_1..cond_K] (with "blend" negative
prompting: [uncond_1..K, neg_1..K, cond_1..K]), so guidance is one vectorised expression.
Once no target is injected any more at a step (i >= every threshold), the source branch is dropped:
its output is never used, so this changes nothing but the cost.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from pnp_batch.pnp.conditioning import TextCond
from pnp_batch.pnp.injection import PnPInjector
from pnp_batch.pnp.inversion import device_timesteps, make_scheduler


@dataclass(frozen=True)
class Target:
    """One target prompt's conditioning and settings."""

    cond: torch.Tensor | TextCond  # (77, D) embedding of the target prompt, or a TextCond of one element
    negative: torch.Tensor | TextCond  # the same for the negative prompt (fixed string or source prompt)
    guidance_scale: float
    f_steps: int  # feature injection at steps i < f_steps
    attn_steps: int  # q/k injection at steps i < attn_steps
    blend_alphas: tuple[float, ...] | None = None  # per-step alpha for "blend" negative prompting


@dataclass(frozen=True)
class Region:
    """Where each target may change (docs/masks.md): after step i, outside its mask a target's latent
    takes the source's inverted latent of the next timestep, ``x = src + m * (x - src)``, and exactly ``x``
    where m is 1. `per_step[i]` is the (K, 1, h, w) mask tensor to blend with after step i, or None when no
    target blends then (a target whose blending has ended counts as all ones). Made before the loop: the
    loop adds no host-device synchronisation."""

    per_step: tuple[tuple[torch.Tensor, torch.Tensor] | None, ...]  # (mask, where it is 1) per step

    @classmethod
    def of(cls, masks: torch.Tensor, until: list[int], steps: int) -> Region:
        """`masks` (K, 1, h, w) in [0, 1]; target j blends after steps i < until[j] (and never after the
        last step, which has no next source latent)."""
        ones = torch.ones_like(masks[0])
        out: list[torch.Tensor | None] = []
        cache: dict[tuple[bool, ...], torch.Tensor | None] = {}
        for i in range(steps):
            active = tuple(i < u and i + 1 < steps for u in until)
            if active not in cache:
                cache[active] = torch.stack([m if a else ones for m, a in zip(masks, active)]) if any(active) else None
            out.append(cache[active])
        return cls(tuple(None if m is None else (m, m >= 1) for m in out))


@dataclass
class SampleOutput:
    latents: torch.Tensor  # (K, C, h, w), float32
    unet_calls: int
    batch_elements: int
    source_elements: int


@dataclass
class Call:
    """One UNet call of a step (also the pack sampler's, pnp/packs.py)."""

    elements: torch.Tensor  # indices into the element list (device)
    n: int
    sources: slice | torch.Tensor | None  # the source rows this call carries first (of the source latents), or None
    n_sources: int
    record: bool
    conv_rows: Any
    attn_rows: Any
    emb: TextCond  # conditioning for this call, one row per batch element


def blend_alphas(schedule: str, alpha: float, steps: int) -> tuple[float, ...]:
    """The authors' original negative-prompt blend schedule: linear, constant or exp, times alpha."""
    if schedule == "linear":
        a = np.flip(np.linspace(0, 1, steps))
    elif schedule == "constant":
        a = np.ones(steps)
    elif schedule == "exp":
        a = np.exp(-6 * np.linspace(0, 1, steps))
    else:
        raise ValueError(f"unknown negative_prompt_schedule {schedule!r}")
    return tuple(float(v) for v in a * alpha)


# Index tensors of injected rows, shared by every plan: the same rows are the same tensor object, so a
# CUDA graph recorded with one (graphs.GraphedUNet keys on its identity) stays valid for later sources.
_ROW_INDEX: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}


def index_tensor(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The long tensor of `values` on `device`, one per pattern (also the pack sampler's, pnp/packs.py)."""
    key = (str(device), values)
    if key not in _ROW_INDEX:
        if len(_ROW_INDEX) >= 4096:  # row patterns are few; bound it anyway (graphs keep their own alive)
            _ROW_INDEX.clear()
        _ROW_INDEX[key] = torch.tensor(values, device=device, dtype=torch.long)
    return _ROW_INDEX[key]


def _rows(mask: list[bool], offset: int, device: torch.device) -> slice | torch.Tensor | None:
    """Rows (of a call's batch) selected by mask, as a slice when contiguous to the end, else an index."""
    if not any(mask):
        return None
    if all(mask):
        return slice(offset, None)
    return index_tensor(tuple(offset + j for j, m in enumerate(mask) if m), device)


def _plan(
    targets: list[Target], uncond: TextCond, steps: int, max_batch: int, device: torch.device, blend: bool
) -> list[list[Call]]:
    """Every UNet call of every step (one list per step), decided before the loop."""
    k = len(targets)
    kinds = 3 if blend else 2
    # element e -> (kind, target); kind 0 = uncond (blend only), then negative, then cond.
    owner = [e % k for e in range(kinds * k)]
    embs = []
    if blend:
        embs += [uncond.rows(0)] * k
    embs += [t.negative for t in targets] + [t.cond for t in targets]
    all_emb = TextCond.cat(embs)
    emb_cache: dict = {}
    plan: list[list[Call]] = []
    for i in range(steps):
        inject_f = [i < targets[owner[e]].f_steps for e in range(len(owner))]
        inject_a = [i < targets[owner[e]].attn_steps for e in range(len(owner))]
        need_source = any(inject_f) or any(inject_a)
        calls = []
        start = 0
        first = True
        while start < len(owner):
            has_source = need_source and first
            room = max_batch - (1 if has_source else 0)
            stop = min(len(owner), start + max(room, 1))
            sel = list(range(start, stop))
            offset = 1 if has_source else 0
            key = (tuple(sel), has_source)
            if key not in emb_cache:
                index = torch.tensor(sel, device=device, dtype=torch.long)
                rows = all_emb.rows(index)
                emb_cache[key] = (TextCond.cat([uncond, rows]) if has_source else rows, index)
            emb, elements = emb_cache[key]
            calls.append(
                Call(
                    elements=elements,
                    n=len(sel),
                    sources=slice(0, 1) if has_source else None,
                    n_sources=1 if has_source else 0,
                    record=has_source and stop < len(owner),
                    conv_rows=_rows([inject_f[e] for e in sel], offset, device) if need_source else None,
                    attn_rows=_rows([inject_a[e] for e in sel], offset, device) if need_source else None,
                    emb=emb,
                )
            )
            first = False
            start = stop
        plan.append(calls)
    return plan


@torch.no_grad()
def pnp_sample(
    unet,
    injector: PnPInjector | None,
    scheduler_config: dict,
    source_latents: torch.Tensor,
    uncond: torch.Tensor | TextCond,
    targets: list[Target],
    steps: int,
    max_batch: int,
    on_step: Callable[[int], None] | None = None,
    region: Region | None = None,
) -> SampleOutput:
    """Translate one source for K targets.

    source_latents: (steps, 1, C, h, w), the stored inversion latents at the generation timesteps,
    noisiest first; x starts from source_latents[0] for every target. uncond: (1, 77, D) = emb(""), or
    a TextCond of one element (architectures with added conditioning, e.g. SDXL's pooled text and
    size ids): every target's cond and negative then carry the same added inputs, batched alike.
    With `injector=None` nothing is injected and no source branch runs (plain DDIM sampling).
    `region` confines each target's change to its mask (latent blending with the source's trajectory).
    """
    # 1. check inputs
    if not targets:
        raise ValueError("no targets")
    if source_latents.shape[0] != steps:
        raise ValueError(f"expected {steps} source latents, got {source_latents.shape[0]}")
    if max_batch < 2:
        raise ValueError("max_batch must be at least 2")
    device = source_latents.device
    sched = make_scheduler(scheduler_config, steps)
    ts = device_timesteps([int(t) for t in sched.timesteps.tolist()], device)  # ts[i]: no host-device copy per call

    # 2. plan
    targets, g, alphas = target_settings(targets, steps, device, unet.dtype, injector is not None)
    plan = _plan(targets, TextCond.of(uncond).to(unet.dtype), steps, max_batch, device, alphas is not None)
    controller = injector.controller if injector is not None else None
    arm = None if controller is None else (
        lambda c: controller.set_call(c.conv_rows, c.attn_rows, c.n_sources > 0, c.record))
    src = source_latents.float()
    x = src[0].expand(len(targets), *src.shape[2:]).clone()

    # 3. denoise
    x, calls, elements, src_elements = denoise(unet, controller, arm, sched, ts, plan, src, None, x, g, alphas,
                                               3 if alphas is not None else 2, region, on_step)
    # 4. output
    return SampleOutput(x, calls, elements, src_elements)


def target_settings(targets: list[Target], steps: int, device: torch.device, dtype: torch.dtype,
                    inject: bool) -> tuple[list[Target], torch.Tensor, torch.Tensor | None]:
    """The targets' conditioning in the UNet's dtype (thresholds 0 when nothing is injected), their
    guidance scales (T, 1, 1, 1) and, with "blend" negative prompting, the per-step alphas (steps, T, 1, 1, 1)."""
    if any((t.blend_alphas is None) != (targets[0].blend_alphas is None) for t in targets):
        raise ValueError("the targets of one loop must share the negative-prompt mode")
    targets = [replace(t, cond=TextCond.of(t.cond).to(dtype), negative=TextCond.of(t.negative).to(dtype),
                       **({} if inject else {"f_steps": 0, "attn_steps": 0})) for t in targets]
    k = len(targets)
    g = torch.tensor([t.guidance_scale for t in targets], device=device, dtype=torch.float32).view(k, 1, 1, 1)
    alphas = (torch.tensor([t.blend_alphas for t in targets], device=device, dtype=torch.float32).T
              .reshape(steps, k, 1, 1, 1) if targets[0].blend_alphas is not None else None)
    return targets, g, alphas


def denoise(unet, controller, arm: Callable[[Call], None] | None, sched, ts: torch.Tensor, plan: list[list[Call]],
            src: torch.Tensor, owner: torch.Tensor | None, x: torch.Tensor, g: torch.Tensor,
            alphas: torch.Tensor | None, kinds: int, region: Region | None,
            on_step: Callable[[int], None] | None) -> tuple[torch.Tensor, int, int, int]:
    """The denoising loop of one source (pnp_sample) or of a pack of sources (pnp/packs.py): per step, the
    planned calls (each with its source rows first), guidance, the scheduler step and the region blend.
    src: (steps, S, C, h, w) float32 source latents; owner: each target's source (None: the one source);
    x: (T, C, h, w) the targets' latents. Returns (x, UNet calls, batch elements, source elements)."""
    n_t = len(x)
    buffer = torch.empty((kinds * n_t, *x.shape[1:]), device=x.device, dtype=torch.float32)
    calls = elements = src_elements = 0
    timesteps = [int(t) for t in sched.timesteps.tolist()]
    try:
        for i, t in enumerate(timesteps):
            x_elems = x.repeat(kinds, 1, 1, 1)
            out = buffer
            for call in plan[i]:
                xin = x_elems.index_select(0, call.elements) if call.n < len(x_elems) else x_elems
                if call.sources is not None:
                    xin = torch.cat([src[i, call.sources], xin])
                if arm is not None:
                    arm(call)
                pred = unet(xin.to(unet.dtype), ts[i], **call.emb.unet_kwargs()).sample.float()
                if call.n_sources:
                    pred = pred[call.n_sources:]
                    src_elements += call.n_sources
                if call.n < len(x_elems):
                    out.index_copy_(0, call.elements, pred)
                else:
                    out = pred  # one call covered every element: no copy
                calls += 1
                elements += call.n + call.n_sources
            # Guidance is linear, so it applies to the model's raw output (eps or v) and
            # scheduler.step converts by the model's prediction type, as diffusers' pipelines do.
            if alphas is not None:
                e_unc, e_neg, e_cond = out.chunk(3)
                a = alphas[i]
                e_base = a * e_unc + (1 - a) * e_neg
            else:
                e_base, e_cond = out.chunk(2)
            eps = e_base + g * (e_cond - e_base)
            x = sched.step(eps, t, x).prev_sample
            step_region = region.per_step[i] if region is not None else None
            if step_region is not None:  # outside the mask: the source's own latent of the next timestep
                m, inside = step_region
                nxt = src[i + 1] if owner is None else src[i + 1].index_select(0, owner)
                x = torch.where(inside, x, nxt + m * (x - nxt))
            if on_step is not None:
                on_step(i)
    finally:
        if controller is not None:
            controller.disable()
    return x, calls, elements, src_elements
