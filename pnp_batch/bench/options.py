"""`pnp-batch bench`'s options and which family of benchmarks runs (light at import: argparse only)."""

from __future__ import annotations

import argparse


def add_bench_args(sub) -> None:
    b = sub.add_parser("bench", help="side-by-side cost benchmark (see README)")
    b.add_argument("--arch", default="tiny", help="tiny, sd21-base (random weights, full size), sd15 or sdxl")
    b.add_argument("--device", default="auto")
    b.add_argument("--dtype", default="auto")
    b.add_argument("--resolution", type=int, default=None)
    b.add_argument("--steps", type=int, default=None)
    b.add_argument("--reference-inversion-steps", type=int, default=None,
                   help="the authors' inversion step count (999); lower it for a quick CPU run")
    b.add_argument("--k", type=int, action="append", default=None, help="prompts per source (repeatable)")
    b.add_argument("--sources", type=int, default=None)
    b.add_argument("--compile", action="store_true", help="torch.compile the UNet (measured)")
    b.add_argument("--channels-last", action="store_true", help="UNet in channels-last memory format (CUDA)")
    b.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="replay UNet calls as CUDA graphs (pipeline key cuda_graphs; default: on for CUDA)")
    b.add_argument("--cudnn-benchmark", action="store_true",
                   help="let cuDNN time its algorithms per shape (pipeline key cudnn_benchmark; CUDA)")
    b.add_argument("--inversion-batch", type=int, default=1, help="sources inverted per UNet call (pipeline key)")
    b.add_argument("--inversion-streams", type=int, default=1,
                   help="inversion calls run side by side on CUDA streams (pipeline key inversion_streams)")
    b.add_argument("--sources-per-batch", type=int, action="append", default=None,
                   help="packs of N sources per UNet call, side by side (repeatable; bench/packs.py)")
    b.add_argument("--json", default=None, help="write the figures as JSON here")
    b.add_argument("--repeats", type=int, default=None,
                   help="time every path this many times, interleaved; report medians and [min..max] (default 3)")
    b.add_argument("--sweep-resolution", type=int, default=None,
                   help="resolution of the sweep_vs_floor_elements count (default: the bench's; 64 for a "
                   "full-size UNet on a CPU)")
    b.add_argument("--data", action="store_true", help="also run the data-plane benchmarks")
    b.add_argument("--ip-adapter", action="store_true",
                   help="only the IP-Adapter family: sampling with an adapter against without (docs/ip_adapter.md)")
    b.add_argument("--export", action="store_true",
                   help="only the export: rows/s of `pnp-batch export` per format on tiny-model outputs (docs/export.md)")
    b.add_argument("--export-rows", type=int, default=5000, help="rows of the --export bench (default 5,000)")
    b.add_argument("--masks", action="store_true",
                   help="only region edits: sampling with a mask against without, and mask_mode auto's UNet cost "
                   "(docs/masks.md)")
    b.add_argument("--eval", action="store_true",
                   help="also time scoring an output (eval_vs_translate; always on for full-size archs on a GPU; "
                   "about two minutes on a CPU with full-size metric models)")


def run_bench_family(a: argparse.Namespace) -> int:
    """The benchmark family the options ask for: --export, --masks, --ip-adapter, else the main bench."""
    if a.export:
        from pnp_batch.bench.export import run_export_bench

        return run_export_bench(a)
    if a.masks:
        from pnp_batch.bench.masks import run_masks_bench

        return run_masks_bench(a)
    if a.ip_adapter:
        from pnp_batch.bench.ip_adapter import run_ip_bench

        return run_ip_bench(a)
    from pnp_batch.bench.run import run_bench

    return run_bench(a)
