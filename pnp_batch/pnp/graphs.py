"""CUDA graphs for UNet calls (pipeline key `cuda_graphs`): one host launch per call instead of ~1,500.

A batch-1 UNet call of SD 2.1 at 512x512 takes an H100 a few milliseconds, but the host needs
longer than that to walk diffusers' modules and launch their kernels: inversion, 50 batch-1 calls
per source, is bound by the host. A CUDA graph records the kernels of one call once and replays
them with a single launch, reading its inputs from fixed ("static") tensors.

`GraphedUNet` wraps a UNet (it is an nn.Module, so hooks on it see every call) and keeps one graph
per call shape and PnP injection state: the shapes of sample, timestep and text embedding, and the
controller's rows (None, a slice or a cached index tensor whose identity is stable; see
sampler._rows), and the shapes of SDXL's added conditioning (`added_cond_kwargs`: pooled text
embeddings and size ids, copied into static tensors like the text). The injection rows are part of
the recording, so they key the graph. Calls whose result depends on state outside the call (a split
batch recording the source's features for later calls, or reading them) and calls with other arguments run eagerly, as do all calls after a capture
failed (logged once). The replayed kernels are those of an eager call of the same shape, so results
equal the eager ones.

The capture itself is behind a `backend` so the bookkeeping is tested on any device (tests use a
replaying stand-in); `CudaGraphBackend` is the real one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pnp_batch.pnp.conditioning import RowScales
from pnp_batch.pnp.injection import PnPController

log = logging.getLogger(__name__)


class CudaGraphBackend:
    """Records `fn` into a torch.cuda.CUDAGraph, with one memory pool per CUDA stream.

    Graphs replayed on one stream share its pool: their replays never overlap there, and the
    wrapper copies a graph's output out of the pool before the next replay. Graphs on different
    streams (inversions run side by side, pnp.inversion.ddim_invert_many) may run at the same time,
    so each stream's graphs get a pool of their own.
    """

    warmup_calls = 2  # on a side stream, as torch requires before capture (lazy init, cuDNN/cuBLAS choices)

    def __init__(self) -> None:
        self.pools: dict[int, Any] = {}

    def lane(self, sample: torch.Tensor) -> int:
        """The stream this call is queued on: graphs and their pools are kept per stream."""
        return torch.cuda.current_stream(sample.device).cuda_stream

    def capture(self, fn: Callable[[], torch.Tensor], lane: int) -> tuple[Callable[[], None], torch.Tensor]:
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(self.warmup_calls):
                fn()
        current.wait_stream(side)
        if lane not in self.pools:
            self.pools[lane] = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pools[lane]):
            out = fn()
        return graph.replay, out


@dataclass
class _Graph:
    replay: Callable[[], None]
    out: torch.Tensor
    sample: torch.Tensor
    timestep: torch.Tensor
    emb: torch.Tensor
    keep: tuple  # tensors the recording reads by address (the injection rows): kept alive
    added: dict[tuple, torch.Tensor]  # static added-conditioning inputs (SDXL, IP-Adapter; flat_inputs)


@dataclass
class _Output:
    sample: torch.Tensor


def _rows_key(rows: Any) -> Any:
    if rows is None:
        return None
    if isinstance(rows, slice):
        return ("slice", rows.start, rows.stop, rows.step)
    return ("index", id(rows))


class GraphedUNet(torch.nn.Module):
    """A UNet whose calls replay CUDA graphs where that gives the eager result (see the module doc)."""

    def __init__(self, unet: torch.nn.Module, controller: PnPController | None, backend: Any | None = None,
                 max_graphs: int = 32) -> None:
        super().__init__()
        self.module = unet
        self.controller = controller
        self.backend = backend if backend is not None else CudaGraphBackend()
        self.max_graphs = max_graphs
        self._sets: dict[str, dict[tuple, _Graph]] = {"pnp": {}}
        self.graphs: dict[tuple, _Graph] = self._sets["pnp"]
        self.failed: str | None = None
        self.replays = 0
        self.eager_calls = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.module.dtype

    @property
    def recorded(self) -> int:
        """Graphs recorded and kept, over every processor set."""
        return sum(map(len, self._sets.values()))

    def use(self, processors: str, controller: PnPController | None) -> None:
        """Switch to the graphs recorded with the attention processors named `processors` (the UNet's
        processors were just swapped, e.g. to diffusers' stock ones and back), driven by `controller`.
        A set's graphs stay valid while its processors compute the same: a replay reads only tensors
        (weights, index rows, static inputs), never the processor or hook objects themselves."""
        self.graphs = self._sets.setdefault(processors, {})
        self.controller = controller

    def _state(self) -> tuple | None:
        """The injection state as a key, or None when this call must run eagerly."""
        c = self.controller
        if c is None:
            return ()
        idle = c.conv_rows is None and c.attn_rows is None
        if c.record or (not idle and not c.has_source):
            return None  # records the source's features for, or reads them from, another call
        return (_rows_key(c.conv_rows), _rows_key(c.attn_rows), c.has_source and not idle)

    def forward(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor | None = None,
                added_cond_kwargs: dict[str, torch.Tensor] | None = None, **kwargs: Any):
        # an IP-Adapter's inputs (image embeddings, per-element weights) are static tensors like the rest
        added = flat_inputs(added_cond_kwargs, kwargs.get("cross_attention_kwargs"))
        other = {k: v for k, v in kwargs.items() if k != "cross_attention_kwargs"}
        state = self._state() if not other and added is not None and self.failed is None else None
        if state is None or not torch.is_tensor(timestep) or encoder_hidden_states is None:
            self.eager_calls += 1
            return self.module(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                               added_cond_kwargs=added_cond_kwargs, **kwargs)
        lane = self.backend.lane(sample)
        # SDXL's added conditioning (pooled text, size ids) is an input like the text: static tensors,
        # their shapes in the key.
        added_key = tuple((n, tuple(t.shape), t.dtype) for n, t in sorted(added.items(), key=lambda kv: _order(kv[0])))
        key = (tuple(sample.shape), sample.dtype, tuple(timestep.shape), timestep.dtype,
               tuple(encoder_hidden_states.shape), encoder_hidden_states.dtype, added_key, state, lane)
        g = self.graphs.get(key)
        if g is None:
            g = self._capture(key, sample, timestep, encoder_hidden_states, added, lane)
            if g is None:
                self.eager_calls += 1
                return self.module(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                                   added_cond_kwargs=added_cond_kwargs, **kwargs)
        g.sample.copy_(sample)
        g.timestep.copy_(timestep)
        g.emb.copy_(encoder_hidden_states)
        for n, t in added.items():
            g.added[n].copy_(t)
        g.replay()
        self.replays += 1
        return _Output(g.out.clone())  # the pool is reused by the next replay

    def _capture(self, key: tuple, sample: torch.Tensor, timestep: torch.Tensor, emb: torch.Tensor,
                 added: dict[str, torch.Tensor], lane: int) -> _Graph | None:
        if self.recorded >= self.max_graphs:  # drop the oldest, of this set if it has any
            victims = self.graphs or next(g for g in self._sets.values() if g)
            victims.pop(next(iter(victims)))
        s, t, e = sample.clone(), timestep.clone(), emb.clone()
        a = {n: v.clone() for n, v in added.items()}
        c = self.controller
        keep = (c.conv_rows, c.attn_rows) if c is not None else ()

        def call() -> torch.Tensor:
            added_cond, cross = unflat_inputs(a)
            return self.module(s, t, encoder_hidden_states=e, added_cond_kwargs=added_cond,
                               cross_attention_kwargs=cross).sample

        try:
            replay, out = self.backend.capture(call, lane)
        except Exception as exc:  # noqa: BLE001 - graphs are an optimisation: fall back to eager calls
            self.failed = f"{type(exc).__name__}: {exc}"
            log.warning("CUDA graph capture failed (%s); running the UNet eagerly from here on", self.failed)
            return None
        g = _Graph(replay, out, s, t, e, keep, a)
        self.graphs[key] = g
        return g


def flat_inputs(added: dict[str, Any] | None, cross: dict[str, Any] | None) -> dict[tuple, torch.Tensor] | None:
    """The call's added inputs as flat named tensors: `added_cond_kwargs` tensors and lists of tensors (an
    IP-Adapter's `image_embeds`), and `cross_attention_kwargs` RowScales (its per-element weights); None
    when something else is there (that call runs eagerly)."""
    flat: dict[tuple, torch.Tensor] = {}
    for n, v in (added or {}).items():
        if torch.is_tensor(v):
            flat[("added", n)] = v
        elif isinstance(v, list) and all(torch.is_tensor(t) for t in v):
            flat.update({("list", n, i): t for i, t in enumerate(v)})
        else:
            return None
    for n, v in (cross or {}).items():
        if not isinstance(v, RowScales):
            return None
        flat[("rows", n)] = v.weights
    return flat


def _order(key: tuple) -> tuple:
    return (key[0], key[1], key[2] if len(key) > 2 else -1)


def unflat_inputs(flat: dict[tuple, torch.Tensor]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(added_cond_kwargs, cross_attention_kwargs) of flat_inputs' tensors."""
    added: dict[str, Any] = {}
    cross: dict[str, Any] = {}
    for key in sorted(flat, key=_order):
        t = flat[key]
        if key[0] == "added":
            added[key[1]] = t
        elif key[0] == "list":
            added.setdefault(key[1], []).append(t)
        else:
            cross[key[1]] = RowScales(t)
    return added or None, cross or None


def base_unet(unet: torch.nn.Module) -> torch.nn.Module:
    """The UNet itself under a GraphedUNet or torch.compile wrapper."""
    while True:
        inner = getattr(unet, "module", None) if isinstance(unet, GraphedUNet) else getattr(unet, "_orig_mod", None)
        if inner is None:
            return unet
        unet = inner
