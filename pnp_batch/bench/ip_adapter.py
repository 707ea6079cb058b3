"""`pnp-batch bench --ip-adapter`: what an IP-Adapter adds to sampling, side by side in one run.

One model (the arch's random weights, full size for sd15/sd21-base/sdxl) with a random-weight adapter
for it (models/ip_adapter.make_test_ip_adapter, loaded through diffusers' loader): the same K targets of
one source are sampled with the adapter off (diffusers' plain cross-attention processors, no image
projection: a run without adapter) and on (every target with an image prompt), alternating, `repeats`
times; the ratio of the medians is `ip_adapter_overhead` (target: at most 1.10). Counted: image encoder
runs for K rows sharing 2 distinct images (target: 2, once per distinct image).
"""

from __future__ import annotations

import io
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from pnp_batch.bench.measure import write_json
from pnp_batch.io.rows import Row

OVERHEAD_TARGET = 1.10


@contextmanager
def adapter_off(tr) -> Iterator[None]:
    """The Translator's UNet as without an adapter (diffusers' plain processors on the adapter's layers, no
    image projection, no image prompts), then as it was."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from pnp_batch.pnp.graphs import base_unet

    unet = base_unet(tr.models.unet)
    prompts = tr.image_prompts
    saved = {layer: unet.get_submodule(layer).processor for layer in prompts.layers}
    proj, kind = unet.encoder_hid_proj, unet.config.encoder_hid_dim_type
    for layer in saved:
        unet.get_submodule(layer).set_processor(AttnProcessor2_0())
    unet.encoder_hid_proj = None
    unet.register_to_config(encoder_hid_dim_type=None)
    tr.image_prompts = None
    try:
        yield
    finally:
        for layer, proc in saved.items():
            unet.get_submodule(layer).set_processor(proc)
        unet.encoder_hid_proj = proj
        unet.register_to_config(encoder_hid_dim_type=kind)
        tr.image_prompts = prompts


def _png(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(arch: str, device: str, dtype: str, resolution: int, steps: int, k: int, repeats: int) -> dict[str, Any]:
    from pnp_batch.config import PipelineConfig
    from pnp_batch.models.archs import build_random_models
    from pnp_batch.models.ip_adapter import load_ip_adapter, make_test_ip_adapter
    from pnp_batch.pnp.sampler import pnp_sample
    from pnp_batch.translate.translator import Translator

    models = build_random_models(arch, device, dtype, seed=0)
    with tempfile.TemporaryDirectory(prefix="pnp-bench-ip-") as tmp:
        adapter = make_test_ip_adapter(f"{tmp}/adapter", models.unet)
        cfg = PipelineConfig(model=f"random:{arch}", device=str(models.device),
                             dtype=str(models.dtype).removeprefix("torch."), resolution=resolution, steps=steps,
                             inversion_steps=steps, batch_size=2 * k + 1, cuda_graphs=False, ip_adapter=str(adapter),
                             name=f"bench-ip-{arch}")
        models.ip_adapter = load_ip_adapter(cfg, models)
        tr = Translator(cfg, out_uri=tmp, models=models)
        h = resolution // 8
        latents = torch.randn(steps, 1, 4, h, h, generator=torch.Generator().manual_seed(0)).to(models.device)
        images = [_png(1), _png(2)]
        rows = [Row(j, f"r{j}", None, None, "a photo", f"a painting, style {j}", ip_image_bytes=images[j % 2])
                for j in range(k)]

        def sample() -> float:
            targets, _ = tr._targets(rows, latents.shape)
            uncond = tr.condition([""], latents.shape)
            _sync(models.device)
            t0 = time.perf_counter()
            pnp_sample(tr.models.unet, tr.injector, models.scheduler_config, latents, uncond, targets, steps,
                       tr.max_batch)
            _sync(models.device)
            return time.perf_counter() - t0

        sample()  # untimed: first-call costs, and the image embeddings (cached from here on)
        with adapter_off(tr):
            sample()
        on, off = [], []
        for _ in range(repeats):
            with adapter_off(tr):
                off.append(sample())
            on.append(sample())
    ratio = statistics.median(on) / statistics.median(off)
    return {"arch": arch, "device": str(models.device), "dtype": str(models.dtype).removeprefix("torch."),
            "resolution": resolution, "steps": steps, "k": k, "repeats": repeats,
            "seconds_without_adapter": statistics.median(off), "seconds_with_adapter": statistics.median(on),
            "ip_adapter_overhead": ratio, "image_encodes": tr.image_prompts.encoded, "distinct_images": 2,
            "targets": {"ip_adapter_overhead": {"target": f"<= {OVERHEAD_TARGET}", "met": ratio <= OVERHEAD_TARGET},
                        "image_encodes": {"target": "== distinct images (2)", "met": tr.image_prompts.encoded == 2}}}


def run_ip_bench(args) -> int:
    """The IP-Adapter family of `pnp-batch bench` (its own table and --json)."""
    full = args.arch != "tiny"
    out = measure(args.arch, args.device, args.dtype, args.resolution or (512 if full else 64),
                  args.steps or (50 if full else 10), max(args.k or [4]), args.repeats or 5)
    print(f"bench ip-adapter: {out['arch']} on {out['device']} ({out['dtype']}), {out['resolution']} px, "
          f"{out['steps']} steps, K={out['k']}, median of {out['repeats']}")
    print(f"  sampling without adapter {out['seconds_without_adapter']:.3f} s, with {out['seconds_with_adapter']:.3f} s: "
          f"ip_adapter_overhead {out['ip_adapter_overhead']:.3f} (target <= {OVERHEAD_TARGET})")
    print(f"  image encoder runs: {out['image_encodes']} for {out['distinct_images']} distinct images (counted)")
    write_json(args.json, out)
    return 0
