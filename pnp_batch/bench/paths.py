"""Side-by-side cost benchmark: pnp-batch's default path against the authors' procedure (PNP_SPEC.md §6).

In one process, on one model and device, for each K (target prompts per source):

- default:   inversion with the generation schedule itself, then the K prompts in one batch sharing
             one source branch (the Translator's own code: source_features + translate).
- reference: the authors' procedure as shipped: `reference_inversion_steps` (999) DDIM inversion plus
             the same-count preview reconstruction (and its decode) once per source, then one
             [src, uncond, cond] batch per prompt (pnp_sample with one target at a time).
- floor:     plain text-to-image DDIM sampling, same steps, guidance and per-step UNet batch sizes
             as the default's sampling, stock attention processors (AttnProcessor2_0), no conv hook,
             no inversion: what the sampling would cost without PnP.
- warm:      the default rows again with the inverted latents already in the feature store.

UNet calls and batch elements are counted by a forward pre-hook on the UNet, never estimated.
Text embeddings are computed once before timing (the same for every path) and are not timed.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import torch

from pnp_batch.bench.inputs import PROMPTS, bench_dtype, bench_settings, set_threads, synthetic_sources
from pnp_batch.bench.measure import Clock, PathStats, PeakMemory, Timed, UNetCounter


@torch.no_grad()
def floor_sample(unet, scheduler_config, sizes: list[int], steps: int, k: int, uncond, neg, cond,
                 guidance: float, shape: tuple[int, ...], device, seed: int = 0) -> torch.Tensor:
    """Plain text-to-image DDIM sampling with classifier-free guidance for K prompts.

    `sizes[i]` is the UNet batch size the default path used at step i: 2K, or 2K + 1 while it carried
    the source branch; here the extra element is one more (discarded) evaluation of x with the empty
    prompt, so every step costs what the default's did, minus the injection itself.
    """
    from pnp_batch.pnp.conditioning import TextCond
    from pnp_batch.pnp.inversion import device_timesteps, make_scheduler

    if len(sizes) != steps:
        raise RuntimeError(f"the default path made {len(sizes)} sampling calls for {steps} steps; expected one per step")
    sched = make_scheduler(scheduler_config, steps)
    dtype = unet.dtype
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn((k, *shape), generator=gen) * sched.init_noise_sigma).to(device)
    emb_plain = TextCond.cat([neg, cond]).to(dtype).unet_kwargs()
    emb_extra = TextCond.cat([uncond, neg, cond]).to(dtype).unet_kwargs()
    timesteps = [int(t) for t in sched.timesteps.tolist()]
    ts = device_timesteps(timesteps, device)  # as the default path does: no host-device copy per call
    for i, t in enumerate(timesteps):
        extra = sizes[i] - 2 * k
        xin = x.repeat(2, 1, 1, 1)
        if extra:
            xin = torch.cat([x[:1], xin])
        pred = unet(xin.to(dtype), ts[i], **(emb_extra if extra else emb_plain)).sample.float()
        e_neg, e_cond = pred[extra:].chunk(2)
        x = sched.step(e_neg + guidance * (e_cond - e_neg), t, x).prev_sample
    return x


class Bench:
    def __init__(self, args) -> None:
        from pnp_batch.models.load import resolve_device

        self.args = args
        self.device = resolve_device(args.device)
        self.threads = set_threads(self.device)
        self.s = bench_settings(args, self.device)
        self.clock = Clock(self.device)
        from pnp_batch.config import PipelineConfig

        PipelineConfig(  # the reference's step counts must be valid too (timesteps contain the generation's)
            model="x", resolution=self.s["resolution"], steps=self.s["steps"],
            inversion_steps=self.s["reference_inversion_steps"],
        )

    # -- setup ---------------------------------------------------------------------------------
    def setup(self, tmp: str) -> None:
        from pnp_batch.config import PipelineConfig
        from pnp_batch.models.archs import build_random_models
        from pnp_batch.models.load import resolve_dtype
        from pnp_batch.pnp.graphs import base_unet
        from pnp_batch.translate.translator import Translator

        s = self.s
        dtype = resolve_dtype(bench_dtype(self.args, self.device), self.device)
        t0 = time.perf_counter()
        self.models = build_random_models(self.args.arch, self.device, dtype, seed=0)
        self.build_seconds = time.perf_counter() - t0
        dname = str(dtype).removeprefix("torch.")
        graphs = getattr(self.args, "cuda_graphs", None)
        # One UNet call per step for every K run here (the Translator's auto batch size does the same
        # on any GPU; a fixed value keeps the floor's replay of batch sizes exact).
        self.cfg = PipelineConfig(
            model=f"random:{self.args.arch}", device=str(self.device), dtype=dname, resolution=s["resolution"],
            steps=s["steps"], inversion_steps=s["steps"], batch_size=max(3, 2 * max(s["k"]) + 1),
            compile=bool(self.args.compile), channels_last=bool(getattr(self.args, "channels_last", False)),
            inversion_batch=int(getattr(self.args, "inversion_batch", None) or 1),
            inversion_streams=int(getattr(self.args, "inversion_streams", None) or 1),
            cuda_graphs="auto" if graphs is None else graphs,  # auto: on for CUDA unless --compile
            cudnn_benchmark=bool(getattr(self.args, "cudnn_benchmark", False)),
            name=f"bench-{self.args.arch}",
        )
        self.tmp = tmp
        self.tr = Translator(self.cfg, out_uri=tmp, models=self.models)
        self.unet = self.models.unet  # compiled when --compile, a GraphedUNet with --cuda-graphs (on CUDA)
        self.base_unet = base_unet(self.unet)
        self.counter = UNetCounter(self.unet, timed=self.device.type == "cpu")
        self.encode = Timed(self.tr.encode, self.clock)
        self.decode = Timed(self.tr.decode, self.clock)
        self.tr.encode, self.tr.decode = self.encode, self.decode  # instance attributes: timed
        self.sources = synthetic_sources(s["sources"], s["resolution"])
        self.prompts = [PROMPTS[j % len(PROMPTS)] + (f" ({j})" if j >= len(PROMPTS) else "") for j in range(max(s["k"]))]
        self.tr.embed(["", self.cfg.negative_prompt, *self.prompts])  # not timed: same for every path
        self._ref_cache: dict[int, dict[str, Any]] = {}

    def warmup(self) -> None:
        """Untimed: one pass of the default path and the floor at the smallest K (first-call costs: lazy
        imports, allocator, CUDA/cuDNN setup), or on a CPU with a full-size UNet, where that would take
        a minute and one-off costs are negligible against seconds per call, one batch-1 UNet call."""
        if self.device.type == "cpu" and self.args.arch != "tiny":
            h = self.s["resolution"] // 8
            emb = self.tr.condition([""], (h, h))
            with torch.no_grad():
                self.unet(torch.zeros((1, 4, h, h), dtype=self.models.dtype), 1, **emb.unet_kwargs())
        else:
            store = self.tr.features
            for k in self.s["k"]:  # every batch shape once: cuDNN/cuBLAS pick their kernels per shape
                self.tr.features = fresh_store(self, f"warmup-{k}")
                _, sizes = self.run_default(k, warm=False)
                self.run_floor(k, sizes)
            self.tr.features = store
        self.counter.sizes.clear()

    def rows(self, k: int, src: int):
        from pnp_batch.io.rows import Row

        return [
            Row(index=j, id=f"s{src}-p{j}", image=None, image_bytes=None, source_prompt="a photo",
                target_prompt=self.prompts[j])
            for j in range(k)
        ]

    # -- (a) and (d) ---------------------------------------------------------------------------
    def run_default(self, k: int, warm: bool) -> tuple[PathStats, list[list[int]]]:
        """The Translator's path: source_features_many (inversions of same-size sources share UNet
        calls on a GPU, or feature-store hits), then translate each source's K prompts."""
        st = PathStats()
        sizes_per_source = []
        self.encode.take()
        with PeakMemory(self.device) as mem:
            t0 = self.clock()
            m0 = self.counter.mark()
            feats = self.tr.source_features_many([(png, "") for png in self.sources])
            t1 = self.clock()
            m1 = self.counter.mark()
        for f in feats:
            if isinstance(f, Exception):
                raise f
            if f[2] != warm:
                raise RuntimeError(f"feature store {'miss' if warm else 'hit'} where none was expected")
        enc = self.encode.take()
        st.add_inversion((m1 - m0, sum(self.counter.sizes[m0:m1])))
        st.inversion_seconds += (t1 - t0) - enc
        st.other_seconds += enc
        st.seconds += t1 - t0
        st.peak_memory_bytes = mem.peak
        for i, (latents, _key, _hit, _) in enumerate(feats):
            rows = self.rows(k, i)
            self.decode.take()
            with PeakMemory(self.device) as mem:
                t1 = self.clock()
                m1 = self.counter.mark()
                self.tr.translate(latents, rows)
                t2 = self.clock()
                m2 = self.counter.mark()
            dec = self.decode.take()
            st.add_sampling((m2 - m1, sum(self.counter.sizes[m1:m2])))
            st.sampling_call_seconds += self.counter.call_seconds(m1, m2) or []
            sizes_per_source.append(self.counter.sizes[m1:m2])
            st.sampling_seconds += (t2 - t1) - dec
            st.other_seconds += dec
            st.seconds += t2 - t1
            st.images += k
            st.peak_memory_bytes = max(st.peak_memory_bytes, mem.peak)
        t3 = self.clock()
        self.tr.flush()  # feature writes still running behind the sampling are the cold path's cost
        st.seconds += self.clock() - t3
        return st, sizes_per_source

    # -- (c) -----------------------------------------------------------------------------------
    def run_floor(self, k: int, sizes_per_source: list[list[int]]) -> PathStats:
        from diffusers.models.attention_processor import AttnProcessor2_0

        from pnp_batch.pnp.graphs import GraphedUNet
        from pnp_batch.pnp.injection import PnPInjector

        st = PathStats()
        self.tr.injector.remove()  # the PnP processors and the conv hook off
        self.base_unet.set_attn_processor(AttnProcessor2_0())
        graphed = isinstance(self.unet, GraphedUNet)
        if graphed:  # the graphs recorded with the PnP processors do not serve the stock ones
            self.unet.use("stock", None)
        try:
            h = self.s["resolution"] // 8
            uncond = self.tr.condition([""], (h, h))
            neg = self.tr.condition([self.cfg.negative_prompt] * k, (h, h))
            cond = self.tr.condition(self.prompts[:k], (h, h))
            for i, sizes in enumerate(sizes_per_source):
                self.decode.take()
                with PeakMemory(self.device) as mem:
                    t0 = self.clock()
                    m0 = self.counter.mark()
                    x = floor_sample(self.unet, self.models.scheduler_config, sizes, self.s["steps"], k, uncond, neg,
                                     cond, self.cfg.guidance_scale, (4, h, h), self.device, seed=i)
                    t1 = self.clock()
                    m1 = self.counter.mark()
                    self.tr.decode(x)
                    t2 = self.clock()
                st.add_sampling((m1 - m0, sum(self.counter.sizes[m0:m1])))
                st.sampling_call_seconds += self.counter.call_seconds(m0, m1) or []
                st.sampling_seconds += t1 - t0
                st.other_seconds += self.decode.take()
                st.seconds += t2 - t0
                st.images += k
                st.peak_memory_bytes = max(st.peak_memory_bytes, mem.peak)
        finally:
            # Back to PnP: a fresh injector (processors + hook).
            self.tr.injector = PnPInjector(self.base_unet)
            if graphed:  # the same PnP computation again: its graphs serve, driven by the new controller
                self.unet.use("pnp", self.tr.injector.controller)
        return st

    # -- (b) -----------------------------------------------------------------------------------
    def _reference_source(self, i: int) -> dict[str, Any]:
        """The authors' per-source preprocessing: R-step inversion, R-step preview reconstruction and
        its decode. Run once per source; every K reuses it (it does not depend on the prompts)."""
        if i in self._ref_cache:
            return self._ref_cache[i]
        from pnp_batch.config import inversion_timesteps
        from pnp_batch.io.images import decode_image, resize_source
        from pnp_batch.pnp.inversion import ddim_invert, ddim_reconstruct

        r = self.s["reference_inversion_steps"]
        gen = list(self.tr.timesteps)
        top = inversion_timesteps(r)[0]
        keep = gen + ([top] if top not in gen else [])
        pred = self.models.prediction_type
        self.encode.take()
        self.decode.take()
        with PeakMemory(self.device) as mem:
            t0 = self.clock()
            img = resize_source(decode_image(self.sources[i], self.cfg.max_pixels), self.cfg.resolution,
                                self.cfg.resize_mode)
            z0 = self.tr.encode(img)
            cond = self.tr.condition([""], z0.shape)
            t1 = self.clock()
            m0 = self.counter.mark()
            inv = ddim_invert(self.unet, self.models.scheduler_config, z0, cond, r, keep, pred)
            rec = ddim_reconstruct(self.unet, self.models.scheduler_config, inv.latents[keep.index(top)], cond, r, pred)
            t2 = self.clock()
            m1 = self.counter.mark()
            self.tr.decode(rec)  # the preview image the authors' preprocessing saves
            t3 = self.clock()
        out = {
            "latents": inv.latents[: len(gen)],
            "calls": (m1 - m0, sum(self.counter.sizes[m0:m1])),
            "inversion_seconds": t2 - t1,
            "other_seconds": (t1 - t0) + (t3 - t2),
            "peak": mem.peak,
        }
        self._ref_cache[i] = out
        return out

    def run_reference(self, k: int) -> PathStats:
        from pnp_batch.pnp.sampler import pnp_sample

        st = PathStats()
        for i in range(len(self.sources)):
            pre = self._reference_source(i)
            uncond = self.tr.condition([""], pre["latents"].shape)
            st.add_inversion(pre["calls"])
            st.inversion_seconds += pre["inversion_seconds"]
            st.other_seconds += pre["other_seconds"]
            st.seconds += pre["inversion_seconds"] + pre["other_seconds"]
            st.peak_memory_bytes = max(st.peak_memory_bytes, pre["peak"])
            for row in self.rows(k, i):
                targets, _ = self.tr._targets([row], pre["latents"].shape)
                self.decode.take()
                with PeakMemory(self.device) as mem:
                    t0 = self.clock()
                    m0 = self.counter.mark()
                    out = pnp_sample(self.unet, self.tr.injector, self.models.scheduler_config, pre["latents"], uncond,
                                     targets, self.cfg.steps, 3)
                    t1 = self.clock()
                    m1 = self.counter.mark()
                    self.tr.decode(out.latents)
                    t2 = self.clock()
                st.add_sampling((m1 - m0, sum(self.counter.sizes[m0:m1])))
                st.sampling_seconds += t1 - t0
                st.other_seconds += self.decode.take()
                st.seconds += t2 - t0
                st.images += 1
                st.peak_memory_bytes = max(st.peak_memory_bytes, mem.peak)
        return st



    # -- the sweep ---------------------------------------------------------------------------------
    def run_sweep(self) -> dict[str, Any]:
        """The issue's 3 x 3 x 2 grid (SWEEP_GRID, 18 settings) over one source, as `run --sweep` runs
        it: one group, one inversion, one source branch per step (Translator.translate), against 18
        plain text-to-image samplings with the same steps (floor_sample, K = 18, stock processors).
        Both counted by the UNet counter, at `sweep_resolution` (element counts do not depend on it)."""
        from pnp_batch.io.rows import Row

        res = self.s["sweep_resolution"]
        grid = [dict(zip(SWEEP_GRID, combo)) for combo in itertools.product(*SWEEP_GRID.values())]
        rows = [Row(index=j, id=f"sweep-{j}", image=None, image_bytes=None, source_prompt="a photo",
                    target_prompt=self.prompts[0], overrides=ov) for j, ov in enumerate(grid)]
        cfg, store = self.tr.cfg, self.tr.features
        self.tr.cfg = cfg.replace(resolution=res)
        self.tr.features = fresh_store(self, "sweep")
        try:
            t0 = self.clock()
            m0 = self.counter.mark()
            feats = self.tr.source_features_many([(synthetic_sources(1, res, seed=99)[0], "")])
            if isinstance(feats[0], Exception):
                raise feats[0]
            m1 = self.counter.mark()
            self.tr.translate(feats[0][0], rows)
            t1 = self.clock()
            m2 = self.counter.mark()
            self.tr.flush()
        finally:
            self.tr.cfg, self.tr.features = cfg, store
        steps, n = self.s["steps"], len(rows)
        floor = self._stock(lambda: self._floor_grid(n, res, steps))
        return {
            "settings": n, "grid": {k: list(v) for k, v in SWEEP_GRID.items()}, "resolution": res,
            "inversion_unet_calls": m1 - m0, "inversion_batch_elements": sum(self.counter.sizes[m0:m1]),
            "sampling_unet_calls": m2 - m1, "sampling_batch_elements": sum(self.counter.sizes[m1:m2]),
            "unet_calls": m2 - m0, "batch_elements": sum(self.counter.sizes[m0:m2]),
            "seconds": t1 - t0,
            **floor,
        }

    def _floor_grid(self, n: int, res: int, steps: int) -> dict[str, Any]:
        """n plain samplings with guidance (2 elements per step each), in calls of at most batch_size."""
        h = res // 8
        uncond = self.tr.condition([""], (h, h))
        neg = self.tr.condition([self.cfg.negative_prompt] * n, (h, h))
        cond = self.tr.condition([self.prompts[0]] * n, (h, h))
        per_call = max(1, (self.tr.max_batch) // 2)
        t0 = self.clock()
        m0 = self.counter.mark()
        for start in range(0, n, per_call):
            k = min(per_call, n - start)
            floor_sample(self.unet, self.models.scheduler_config, [2 * k] * steps, steps, k, uncond,
                         neg[:k], cond[:k], self.cfg.guidance_scale, (4, res // 8, res // 8), self.device, seed=start)
        t1 = self.clock()
        m1 = self.counter.mark()
        return {"floor_unet_calls": m1 - m0, "floor_batch_elements": sum(self.counter.sizes[m0:m1]),
                "floor_seconds": t1 - t0}

    def _stock(self, fn):
        """Run fn with the stock attention processors and no conv hook (the floor), then PnP again."""
        from diffusers.models.attention_processor import AttnProcessor2_0

        from pnp_batch.pnp.graphs import GraphedUNet
        from pnp_batch.pnp.injection import PnPInjector

        self.tr.injector.remove()
        self.base_unet.set_attn_processor(AttnProcessor2_0())
        graphed = isinstance(self.unet, GraphedUNet)
        if graphed:
            self.unet.use("stock", None)
        try:
            return fn()
        finally:
            self.tr.injector = PnPInjector(self.base_unet, self.tr.points)
            if graphed:
                self.unet.use("pnp", self.tr.injector.controller)


SWEEP_GRID = {"pnp_f_t": (0.4, 0.6, 0.8), "guidance_scale": (5.0, 7.5, 10.0), "pnp_attn_t": (0.25, 0.5)}


def fresh_store(b: Bench, name: str):
    from pnp_batch.io import storage
    from pnp_batch.io.features import FeatureStore

    return FeatureStore(storage.join(b.tmp, f"features-{name}"))


def run_all(b: Bench, ks: list[int], quiet: bool = False, repeats: int = 1) -> list[dict[int, dict[str, PathStats]]]:
    """Every path at every K, `repeats` times, interleaved (repeat 1 of every path, then repeat 2, ...),
    so a slow spell of a shared machine falls on every path alike; one result dict per repeat. The
    reference's per-source inversion is measured once (its first repeat) and reused."""
    out: list[dict[int, dict[str, PathStats]]] = []
    for r in range(repeats):
        results: dict[int, dict[str, PathStats]] = {}
        for k in ks:
            t0 = time.perf_counter()
            b.tr.features = fresh_store(b, f"k{k}-r{r}{'-q' if quiet else ''}")
            default, sizes = b.run_default(k, warm=False)
            floor = b.run_floor(k, sizes)  # next to the default: the injection overhead pairs them
            warm, _ = b.run_default(k, warm=True)
            reference = b.run_reference(k)
            results[k] = {"default": default, "reference": reference, "floor": floor, "warm": warm}
            if not quiet:
                print(f"bench: repeat {r + 1}/{repeats} K={k} done in {time.perf_counter() - t0:.1f} s", flush=True)
        out.append(results)
    return out
