"""`pnp-batch bench --masks`: what region edits cost, side by side in one run (docs/masks.md).

One model (the arch's random weights, full size for sd15/sd21-base/sdxl). Timed: the same K targets of one
source sampled without a region and with one (half of each frame kept: the blend after every step),
alternating, `repeats` times; `blend_overhead` is the ratio of the medians (target: below 1.02). Counted:
the UNet batch elements `mask_mode: auto` spends finding the masks of one source's K targets (target:
(K + 1) x mask_samples, at most 2 x mask_samples per row), and that a second pass reads them from the
feature store (0 more UNet calls).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any

import torch

from pnp_batch.bench.measure import write_json
from pnp_batch.io.rows import Row

BLEND_TARGET = 1.02


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(arch: str, device: str, dtype: str, resolution: int, steps: int, k: int, repeats: int,
            samples: int = 10) -> dict[str, Any]:
    from pnp_batch.config import PipelineConfig
    from pnp_batch.models.archs import build_random_models
    from pnp_batch.pnp.sampler import Region, pnp_sample
    from pnp_batch.translate.translator import Translator

    models = build_random_models(arch, device, dtype, seed=0)
    with tempfile.TemporaryDirectory(prefix="pnp-bench-masks-") as tmp:
        cfg = PipelineConfig(model=f"random:{arch}", device=str(models.device),
                             dtype=str(models.dtype).removeprefix("torch."), resolution=resolution, steps=steps,
                             inversion_steps=steps, batch_size=2 * k + 1, cuda_graphs=False, mask_mode="auto",
                             mask_samples=samples, name=f"bench-masks-{arch}")
        tr = Translator(cfg, out_uri=tmp, models=models)
        h = resolution // 8
        latents = torch.randn(steps, 1, 4, h, h, generator=torch.Generator().manual_seed(0)).to(models.device)
        rows = [Row(j, f"r{j}", None, None, "a photo", f"a painting, style {j}") for j in range(k)]
        # counted: finding the masks, then finding them again (the feature store answers)
        before = tr.counters.mask_elements
        tr.masks.prepare(rows, latents, "bench-feature-key", None, lambda r, m: {})
        found = tr.counters.mask_elements - before
        calls_before = tr.counters.mask_calls
        tr.masks.prepare(rows, latents, "bench-feature-key", None, lambda r, m: {})
        again = tr.counters.mask_calls - calls_before
        # timed: sampling with and without the blend
        half = torch.zeros(k, 1, h, h, device=models.device)
        half[..., : h // 2] = 1
        region = Region.of(half, [steps] * k, steps)

        def sample(with_region: bool) -> float:
            targets, _ = tr._targets(rows, latents.shape)
            uncond = tr.condition([""], latents.shape)
            _sync(models.device)
            t0 = time.perf_counter()
            pnp_sample(tr.models.unet, tr.injector, models.scheduler_config, latents, uncond, targets, steps,
                       tr.max_batch, region=region if with_region else None)
            _sync(models.device)
            return time.perf_counter() - t0

        sample(False)  # untimed: first-call costs
        sample(True)
        on, off = [], []
        for _ in range(repeats):
            off.append(sample(False))
            on.append(sample(True))
    ratio = statistics.median(on) / statistics.median(off)
    budget = (k + 1) * samples
    return {"arch": arch, "device": str(models.device), "dtype": str(models.dtype).removeprefix("torch."),
            "resolution": resolution, "steps": steps, "k": k, "repeats": repeats, "mask_samples": samples,
            "seconds_without_region": statistics.median(off), "seconds_with_region": statistics.median(on),
            "seconds_without_region_range": [min(off), max(off)], "seconds_with_region_range": [min(on), max(on)],
            "blend_overhead": ratio, "auto_mask_elements_per_source": found, "auto_mask_calls_second_pass": again,
            "targets": {"blend_overhead": {"target": f"< {BLEND_TARGET}", "met": ratio < BLEND_TARGET},
                        "auto_mask_elements_per_source": {"target": f"<= (K + 1) x mask_samples = {budget}",
                                                          "met": found <= budget},
                        "auto_mask_calls_second_pass": {"target": "0 (read from the feature store)",
                                                        "met": again == 0}}}


def run_masks_bench(args) -> int:
    """The region-edit family of `pnp-batch bench` (its own table and --json)."""
    full = args.arch != "tiny"
    out = measure(args.arch, args.device, args.dtype, args.resolution or (512 if full else 64),
                  args.steps or (50 if full else 10), max(args.k or [4]), args.repeats or 5)
    print(f"bench masks: {out['arch']} on {out['device']} ({out['dtype']}), {out['resolution']} px, "
          f"{out['steps']} steps, K={out['k']}, median of {out['repeats']}")
    lo, hi = out["seconds_without_region_range"]
    lo2, hi2 = out["seconds_with_region_range"]
    print(f"  sampling without a region {out['seconds_without_region']:.3f} s [{lo:.3f}..{hi:.3f}], with "
          f"{out['seconds_with_region']:.3f} s [{lo2:.3f}..{hi2:.3f}]: blend_overhead {out['blend_overhead']:.4f} "
          f"(target < {BLEND_TARGET})")
    print(f"  mask_mode auto: {out['auto_mask_elements_per_source']} UNet elements for one source's {out['k']} "
          f"targets at mask_samples={out['mask_samples']} (target <= {(out['k'] + 1) * out['mask_samples']}); "
          f"a second pass: {out['auto_mask_calls_second_pass']} UNet calls (counted)")
    write_json(args.json, out)
    return 0
