"""`pnp-batch bench`: build the model, run every path for each K, print the table, write --json."""

from __future__ import annotations

import os
import tempfile
import time

import torch

from pnp_batch.bench.eval_cost import eval_ratio, measure_eval
from pnp_batch.bench.eval_cost import wanted as eval_wanted
from pnp_batch.bench.figures import (
    combine_repeats,
    compute_figures,
    fastest_call_overhead,
    format_table,
    judge,
    sweep_figures,
)
from pnp_batch.bench.measure import PeakMemory, dynamo_stats, graph_use, write_json
from pnp_batch.bench.paths import Bench, fresh_store, run_all


def run_bench(args) -> int:
    """`pnp-batch bench`: run the four paths for each K, print the table, write --json."""
    if getattr(args, "sources_per_batch", None):  # packs of sources side by side (bench/packs.py)
        from pnp_batch.bench.packs import run_pack_bench

        return run_pack_bench(args)
    b = Bench(args)
    s = b.s
    print(f"bench: arch={args.arch} device={b.device} resolution={s['resolution']} steps={s['steps']} "
          f"reference_inversion_steps={s['reference_inversion_steps']} K={s['k']} sources={s['sources']}; "
          f"{b.threads}", flush=True)
    with tempfile.TemporaryDirectory(prefix="pnp-bench-") as tmp:
        b.setup(tmp)
        print(f"bench: model built in {b.build_seconds:.1f} s ({b.models.fingerprint}, {b.models.dtype})", flush=True)
        b.warmup()
        compile_stats = None
        if args.compile:
            print("bench: --compile: one untimed pass of every path first (compilation)", flush=True)
            t0 = time.perf_counter()
            run_all(b, [max(s["k"])], quiet=True)  # one repeat
            b._ref_cache.clear()
            b.tr.features = fresh_store(b, "compile-warmup")
            graphs, breaks = dynamo_stats()
            compile_stats = {"warmup_seconds": time.perf_counter() - t0, "graphs_after_warmup": graphs,
                             "graph_breaks": breaks}
            print(f"bench: --compile: warm-up pass {compile_stats['warmup_seconds']:.0f} s, "
                  f"{compile_stats['graphs_after_warmup']} graphs, {compile_stats['graph_breaks']} graph breaks",
                  flush=True)
        repeats = run_all(b, s["k"], repeats=s["repeats"])
        print("bench: the sweep (3 x 3 x 2 grid over one source) and 18 plain samplings, counted", flush=True)
        sweep = sweep_figures(b.run_sweep())
        eval_cost = None
        if eval_wanted(args, b.device):
            print("bench: eval_vs_translate: scoring outputs with the metric models", flush=True)
            eval_cost = measure_eval(args.arch, b.device, b.models.dtype, max(s["k"]), b.prompts)
        if compile_stats is not None:
            # graphs compiled inside the timed pass (a shape or state the warm-up did not see) count in its times
            compile_stats["graphs_compiled_while_timed"] = dynamo_stats()[0] - compile_stats["graphs_after_warmup"]
        mem_kind = PeakMemory(b.device).kind
    fig, spread = combine_repeats([compute_figures(r, s) for r in repeats])
    if eval_cost is not None:
        fig["ratios"]["eval_vs_translate"], eval_cost["translate_seconds_per_image"] = eval_ratio(fig, eval_cost)
        fig["eval"] = eval_cost
    out = {
        "config": {
            "arch": args.arch,
            "dtype": str(b.models.dtype).removeprefix("torch."),
            "resolution": s["resolution"],
            "steps": s["steps"],
            "repeats": s["repeats"],
            "reference_inversion_steps": s["reference_inversion_steps"],
            "k": s["k"],
            "sources": s["sources"],
            "compile": compile_stats or False,
            "channels_last": b.cfg.channels_last,
            "inversion_batch": b.cfg.inversion_batch,
            "inversion_streams": b.cfg.inversion_streams,
            "cuda_graphs": graph_use(b.unet),
            "cudnn_benchmark": b.cfg.cudnn_benchmark,
            "guidance_scale": b.cfg.guidance_scale,
            "pnp_f_t": b.cfg.pnp_f_t,
            "pnp_attn_t": b.cfg.pnp_attn_t,
            "max_batch": b.tr.max_batch,
            "threads": b.threads,
            "peak_memory_kind": mem_kind,
            "model": b.models.fingerprint,
            "model_build_seconds": b.build_seconds,
            "reference_preprocessing_shared_across_k": True,
            "text_encoding_timed": False,
            "torch": torch.__version__,
        },
        "device": _device_name(b.device),
        **fig,
        "sweep": sweep,
        "spread": spread,
    }
    out["ratios"]["sweep_vs_floor_elements"] = sweep["sweep_vs_floor_elements"]
    # injection_overhead: the median of the paired repeats (judged). CPU (calls timed): also the
    # fastest-of-each-call figure, steadier under load but biased low (docs/bench.md): not judged.
    for k in s["k"]:
        pk = out["ratios"]["per_k"][str(k)]
        pk["injection_overhead_paired"] = pk["injection_overhead"]
        pk["injection_overhead_fastest_calls"] = fastest_call_overhead(repeats, k)
    kmax = out["ratios"]["per_k"][str(max(s["k"]))]
    out["ratios"]["injection_overhead"] = kmax["injection_overhead"]
    out["ratios"]["injection_overhead_paired"] = kmax["injection_overhead_paired"]
    out["ratios"]["injection_overhead_fastest_calls"] = kmax["injection_overhead_fastest_calls"]
    out["targets"] = judge(out, s, args.arch)
    b.counter.remove()
    print(format_table(out), flush=True)
    write_json(args.json, out)
    if getattr(args, "data", False):
        from pnp_batch.bench import data as bench_data

        bench_data.main([])
    return 0



def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    import platform

    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
