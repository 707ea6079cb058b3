"""`pnp-batch bench --sources-per-batch N` (repeatable): packs of sources side by side in one run.

For each K (target prompts per source) and each N, the same synthetic sources go through the
Translator's own path (Translator.start_many: inversion through a fresh feature store, sampling,
decode, PNG writes) in packs of N sources, as the engines hand them out. Reported per (K, N):
images per minute, UNet calls and batch elements per image (counted by a forward pre-hook, never
estimated), peak memory, and TFLOP/s (the UNet's FLOPs per element, counted once with torch's
FlopCounterMode, times the elements, over the UNet time: per call on a CPU, whose calls are timed,
over the wall time of the run on a GPU). The Ns are interleaved within each repeat, so a slow spell of
a shared machine falls on each alike; figures are medians over repeats.

Targets (issue 25): counted, any device: UNet calls per image at K = 1 fall by at least 3x at N = 4
against N = 1, elements per image unchanged.
"""

from __future__ import annotations

import statistics
import tempfile
from typing import Any

import torch

from pnp_batch.bench.inputs import PROMPTS, bench_dtype, bench_settings, set_threads, synthetic_sources
from pnp_batch.bench.measure import Clock, PeakMemory, UNetCounter, write_json


def unet_flops_per_element(models, resolution: int, cond) -> float:
    """FLOPs of one batch element of one UNet call (counted by torch, on a batch of 1)."""
    from torch.utils.flop_counter import FlopCounterMode

    h = resolution // 8
    x = torch.zeros((1, 4, h, h), dtype=models.dtype, device=models.device)
    t = torch.tensor(1, device=models.device)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        models.unet(x, t, **cond.unet_kwargs())
    return float(fc.get_total_flops())


def _groups(sources: list[bytes], k: int, tag: str):
    from pnp_batch.io.rows import Row

    return [[Row(index=s * k + j, id=f"{tag}-s{s}-k{j}", image=None, image_bytes=data, source_prompt="a photo",
                 target_prompt=PROMPTS[j % len(PROMPTS)] + (f" ({j})" if j >= len(PROMPTS) else ""))
             for j in range(k)] for s, data in enumerate(sources)]


def _one(tr, counter: UNetCounter, clock: Clock, device, sources: list[bytes], k: int, n: int, tag: str
         ) -> dict[str, Any]:
    """Every source once at K prompts in packs of n (a fresh feature store: inversion counted)."""
    from pnp_batch.io import storage
    from pnp_batch.io.features import FeatureStore
    from pnp_batch.io.records import resolve

    tr.cfg = tr.cfg.replace(sources_per_batch=n)
    tr.pack = n  # N = 1: the translator's use_points puts a plain controller back
    tr.features = FeatureStore(storage.join(tr.out, f"features-{tag}"))
    groups = _groups(sources, k, tag)
    mark = counter.mark()
    with PeakMemory(device) as mem:
        t0 = clock()
        failed = 0
        for first in range(0, len(groups), n):
            for records in tr.start_many(groups[first : first + n]):
                failed += sum(r["status"] != "ok" for r in resolve(records))
        seconds = clock() - t0
    if failed:
        raise RuntimeError(f"{failed} rows failed in the packs bench")
    calls, elements = counter.since(mark)
    call_seconds = counter.call_seconds(mark, counter.mark())
    return {"seconds": seconds, "calls": calls, "elements": elements, "peak_memory_bytes": mem.peak,
            "unet_seconds": sum(call_seconds) if call_seconds is not None else None,
            "images": len(sources) * k}


def run_pack_bench(args) -> int:
    from pnp_batch.config import PipelineConfig
    from pnp_batch.models.archs import build_random_models
    from pnp_batch.models.load import resolve_device, resolve_dtype
    from pnp_batch.translate.translator import Translator

    device = resolve_device(args.device)
    threads = set_threads(device)
    s = bench_settings(args, device)
    ns = sorted(set(args.sources_per_batch))
    ks = s["k"]
    n_sources = args.sources or max(ns)
    dtype = resolve_dtype(bench_dtype(args, device), device)
    print(f"bench packs: arch={args.arch} device={device} resolution={s['resolution']} steps={s['steps']} "
          f"K={ks} N={ns} sources={n_sources} repeats={s['repeats']}; {threads}", flush=True)
    models = build_random_models(args.arch, device, dtype, seed=0)
    graphs = getattr(args, "cuda_graphs", None)
    with tempfile.TemporaryDirectory(prefix="pnp-bench-packs-") as tmp:
        cfg = PipelineConfig(
            model=f"random:{args.arch}", device=str(device), dtype=str(dtype).removeprefix("torch."),
            resolution=s["resolution"], steps=s["steps"], inversion_steps=s["steps"],
            # a CPU: every pack in one call per step (as a GPU's auto batch size does at these sizes)
            batch_size=max(3, max(ns) * (2 * max(ks) + 1)) if device.type == "cpu" else "auto",
            cuda_graphs="auto" if graphs is None else graphs, name=f"bench-packs-{args.arch}",
        )
        tr = Translator(cfg, out_uri=tmp, models=models)
        counter = UNetCounter(tr.models.unet, timed=device.type == "cpu")
        clock = Clock(device)
        sources = synthetic_sources(n_sources, s["resolution"])
        flops = unet_flops_per_element(models, s["resolution"], tr.condition([""], (s["resolution"] // 8,) * 2))
        _one(tr, counter, clock, device, sources[:1], min(ks), 1, "warmup")  # first-call costs, untimed
        runs: dict[tuple[int, int], list[dict[str, Any]]] = {}
        for rep in range(s["repeats"]):
            for k in ks:
                for n in ns:
                    r = _one(tr, counter, clock, device, sources, k, n, f"r{rep}-k{k}-n{n}")
                    runs.setdefault((k, n), []).append(r)
                    print(f"bench packs: repeat {rep + 1} K={k} N={n}: {r['seconds']:.2f} s, {r['calls']} calls",
                          flush=True)
        counter.remove()
        tr.close()
    out = {"config": {"arch": args.arch, "dtype": str(dtype).removeprefix("torch."), "resolution": s["resolution"],
                      "steps": s["steps"], "sources": n_sources, "k": ks, "sources_per_batch": ns,
                      "repeats": s["repeats"], "max_batch": tr.max_batch, "threads": threads,
                      "unet_gflops_per_element": flops / 1e9, "peak_memory_kind": PeakMemory(device).kind,
                      "torch": torch.__version__},
           "device": str(device) if device.type == "cpu" else f"cuda: {torch.cuda.get_device_name(device)}",
           "per_k": {str(k): {str(n): _figures(runs[(k, n)], flops) for n in ns} for k in ks}}
    out["targets"] = _judge(out, ns)
    print(format_packs(out), flush=True)
    write_json(args.json, out)
    return 0


def _figures(reps: list[dict[str, Any]], flops: float) -> dict[str, Any]:
    r0 = reps[0]
    images = r0["images"]
    seconds = statistics.median(r["seconds"] for r in reps)
    unet = [r["unet_seconds"] for r in reps if r["unet_seconds"]]
    busy = statistics.median(unet) if unet else seconds
    return {
        "images_per_minute": 60 * images / seconds,
        "seconds_per_image": seconds / images,
        "unet_calls_per_image": r0["calls"] / images,  # counted: the same every repeat
        "elements_per_image": r0["elements"] / images,
        "elements_per_call": r0["elements"] / r0["calls"],
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in reps),
        "tflops_per_s": flops * r0["elements"] / busy / 1e12,
        "tflops_basis": "timed UNet calls" if unet else "wall time of the run",
        "seconds_all_repeats": [r["seconds"] for r in reps],
    }


def _judge(out: dict[str, Any], ns: list[int]) -> dict[str, Any]:
    """The counted targets, where the run has what they compare."""
    t: dict[str, Any] = {}
    k1 = out["per_k"].get("1")
    if k1 is not None and 1 in ns and 4 in ns:
        one, four = k1["1"], k1["4"]
        ratio = one["unet_calls_per_image"] / four["unet_calls_per_image"]
        t["k1_calls_per_image_n1_over_n4"] = {"value": ratio, "target": ">= 3", "met": ratio >= 3}
        same = abs(one["elements_per_image"] - four["elements_per_image"]) < 1e-9
        t["k1_elements_per_image_unchanged"] = {"value": [one["elements_per_image"], four["elements_per_image"]],
                                                "target": "equal", "met": same}
    return t


def format_packs(out: dict[str, Any]) -> str:
    head = (f"{'K':>3} {'N':>3} {'img/min':>9} {'calls/img':>10} {'elem/img':>9} {'elem/call':>9} "
            f"{'peak MiB':>9} {'TFLOP/s':>8}")
    lines = [head]
    for k, per_n in out["per_k"].items():
        for n, f in per_n.items():
            lines.append(f"{k:>3} {n:>3} {f['images_per_minute']:9.2f} {f['unet_calls_per_image']:10.2f} "
                         f"{f['elements_per_image']:9.2f} {f['elements_per_call']:9.2f} "
                         f"{f['peak_memory_bytes'] / 2**20:9.1f} {f['tflops_per_s']:8.4f}")
    for name, v in out["targets"].items():
        lines.append(f"target {name}: {v['value']} ({v['target']}): {'met' if v['met'] else 'NOT met'}")
    return "\n".join(lines)
