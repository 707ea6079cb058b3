"""The PnP sampling loop for a pack of sources (pipeline key `sources_per_batch`, translate/packs.py).

pnp/sampler.py samples the K targets of ONE source with one source branch per step. Here the
targets of S sources share every UNet call: the batch is [src_1..src_S, neg..., cond...], the
target elements kind-major over every target of every source ([neg of all T targets, cond of all
T targets]; with "blend" negative prompting [uncond, neg, cond]), so guidance is still one
vectorised expression with a per-target guidance scale. Each target row receives the features of
its own source: the `PackController` maps every injected row to its source's row in the call.

At step i a source's branch runs while any of its targets is injected (i < that target's f_steps or
attn_steps): a pack of sources with different thresholds drops each branch when it is no longer
used, so the elements per image equal an unpacked run's. When the elements pass `max_batch`, a step
is split into several calls: the first carries the sources and records their features, the later
ones inject the recorded ones (as pnp/sampler.py does for one source).

The layout of every call is a function of the pack's targets and settings alone (planned before the
loop), never of what else is pending: the same pack gives the same calls, and so the same bytes.
Targets must share the negative-prompt mode (the number of element kinds), the layer setting (the
injector installed) and the latent size; the caller splits a pack where they differ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pnp_batch.pnp.conditioning import TextCond
from pnp_batch.pnp.injection import PnPController
from pnp_batch.pnp.inversion import device_timesteps, make_scheduler
from pnp_batch.pnp.sampler import Call, Region, Target, denoise, index_tensor, target_settings


@dataclass(frozen=True, eq=False)
class PackRows:
    """Rows of a call that receive a source's features (`rows`), and for each the row of its source
    among the call's source rows (`src`). Cached per pattern (see _pack_rows): a stable identity keys
    the CUDA graphs recorded with it (pnp/graphs.py)."""

    rows: torch.Tensor
    src: torch.Tensor


_PACK_ROWS: dict[tuple[str, tuple[int, ...], tuple[int, ...], int], PackRows] = {}


def _pack_rows(rows: list[int], src: list[int], n_sources: int, device: torch.device) -> PackRows | None:
    if not rows:
        return None
    key = (str(device), tuple(rows), tuple(src), n_sources)  # n_sources: a graph records the source rows too
    if key not in _PACK_ROWS:
        if len(_PACK_ROWS) >= 4096:  # patterns are few; bound it anyway (graphs keep theirs alive)
            _PACK_ROWS.clear()
        _PACK_ROWS[key] = PackRows(index_tensor(tuple(rows), device), index_tensor(tuple(src), device))
    return _PACK_ROWS[key]


@dataclass
class PackController(PnPController):
    """A PnPController whose call carries `n_sources` source rows (rows 0..n-1) and whose injected rows
    each take their own source's values (PackRows)."""

    n_sources: int = 1

    def set_pack_call(self, conv_rows: PackRows | None, attn_rows: PackRows | None, n_sources: int,
                      record: bool) -> None:
        self.n_sources = n_sources
        self.set_call(conv_rows, attn_rows, n_sources > 0, record)

    def _source(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if self.has_source:
            src = t[: self.n_sources]
            if self.record:
                self.recorded[name] = src.clone()
            return src
        return self.recorded[name]

    def inject(self, name: str, t: torch.Tensor, rows) -> torch.Tensor:
        if rows is None:
            if self.record and self.has_source:
                self._source(name, t)
            return t
        src = self._source(name, t)
        t.index_copy_(0, rows.rows, src.index_select(0, rows.src))
        return t


@dataclass
class PackOutput:
    latents: list[torch.Tensor]  # per source, (K_s, C, h, w), float32
    unet_calls: int
    batch_elements: int
    source_elements: int


def _rows_of(mask: list[bool], sel: list[int], off: int, owner: list[int], n_t: int, pos: dict[int, int],
             device: torch.device) -> PackRows | None:
    """The injected rows among the call's elements `sel` (after `off` source rows), each with the row of
    its source (pos: source -> its row among the call's sources; empty when no source runs)."""
    if not pos:
        return None
    chosen = [(off + j, pos[owner[e % n_t]]) for j, e in enumerate(sel) if mask[e]]
    return _pack_rows([r for r, _ in chosen], [s for _, s in chosen], off, device)


def _source_rows(srcs: tuple[int, ...], device: torch.device) -> slice | torch.Tensor | None:
    """The source latents a call carries: a slice when they are the first ones, else their index."""
    if not srcs:
        return None
    return slice(0, len(srcs)) if srcs == tuple(range(len(srcs))) else index_tensor(srcs, device)


def _plan(owner: list[int], targets: list[Target], n_sources: int, uncond: TextCond, steps: int, max_batch: int,
          device: torch.device, kinds: int) -> list[list[Call]]:
    """Every call of every step. owner[t] = the source of target t; element e is target e % T."""
    n_t = len(targets)
    n_el = kinds * n_t
    embs = [uncond.rows(0)] * n_t if kinds == 3 else []
    embs += [t.negative for t in targets] + [t.cond for t in targets]
    all_emb = TextCond.cat(embs)
    cache: dict = {}
    plan = []
    for i in range(steps):
        inj_f = [i < targets[e % n_t].f_steps for e in range(n_el)]
        inj_a = [i < targets[e % n_t].attn_steps for e in range(n_el)]
        needed = tuple(s for s in range(n_sources)
                       if any((inj_f[e] or inj_a[e]) and owner[e % n_t] == s for e in range(n_el)))
        pos = {s: p for p, s in enumerate(needed)}
        calls = []
        start = 0
        while start < n_el:
            srcs = needed if start == 0 else ()
            room = max(max_batch - len(srcs), 1)
            stop = min(n_el, start + room)
            sel = list(range(start, stop))
            off = len(srcs)

            key = (tuple(sel), len(srcs))
            if key not in cache:
                index = torch.tensor(sel, device=device, dtype=torch.long)
                rows = all_emb.rows(index)
                cache[key] = (TextCond.cat([uncond.expand(len(srcs)), rows]) if srcs else rows, index)
            emb, index = cache[key]
            calls.append(Call(index, len(sel), _source_rows(srcs, device), len(srcs),
                               bool(srcs) and stop < n_el, _rows_of(inj_f, sel, off, owner, n_t, pos, device),
                               _rows_of(inj_a, sel, off, owner, n_t, pos, device), emb))
            start = stop
        plan.append(calls)
    return plan


@torch.no_grad()
def pnp_sample_pack(
    unet,
    controller: PackController | None,
    scheduler_config: dict,
    source_latents: list[torch.Tensor],
    uncond: torch.Tensor | TextCond,
    targets: list[list[Target]],
    steps: int,
    max_batch: int,
    on_step: Callable[[int], None] | None = None,
    region: Region | None = None,
) -> PackOutput:
    """Translate S sources for their targets in shared UNet calls.

    source_latents[s]: (steps, 1, C, h, w), source s's stored inversion latents (noisiest first);
    targets[s]: its targets (any number, at least one per pack). uncond: emb("") for one element.
    `controller` is the PackController of the injector installed on `unet` (None: no injection).
    `region` (over the targets of every source, in order) confines each target's change to its mask.
    Returns the latents per source and the pack's counts.
    """
    if not source_latents or len(source_latents) != len(targets):
        raise ValueError("one list of targets per source latents")
    if not any(targets):
        raise ValueError("no targets")
    if any(z.shape[0] != steps for z in source_latents):
        raise ValueError(f"expected {steps} source latents per source")
    if max_batch < 2:
        raise ValueError("max_batch must be at least 2")
    shape = source_latents[0].shape[2:]
    if any(z.shape[2:] != shape for z in source_latents):
        raise ValueError("the sources of a pack must share one latent size")
    device = source_latents[0].device
    flat, g, alphas = target_settings([t for ts_ in targets for t in ts_], steps, device, unet.dtype,
                                      controller is not None)
    owner = [s for s, ts_ in enumerate(targets) for _ in ts_]
    sched = make_scheduler(scheduler_config, steps)
    ts = device_timesteps([int(t) for t in sched.timesteps.tolist()], device)
    plan = _plan(owner, flat, len(source_latents), TextCond.of(uncond).to(unet.dtype), steps, max_batch, device,
                 3 if alphas is not None else 2)
    arm = None if controller is None else (
        lambda c: controller.set_pack_call(c.conv_rows, c.attn_rows, c.n_sources, c.record))
    src = torch.cat([z.float() for z in source_latents], dim=1)  # (steps, S, C, h, w)
    owner_t = torch.tensor(owner, device=device)
    x = src[0].index_select(0, owner_t).clone()
    x, calls, elements, src_elements = denoise(unet, controller, arm, sched, ts, plan, src, owner_t, x, g, alphas,
                                               3 if alphas is not None else 2, region, on_step)
    return PackOutput(list(x.split([len(ts_) for ts_ in targets])), calls, elements, src_elements)
