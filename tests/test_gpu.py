"""GPU checks (skipped without CUDA): the translator on cuda in fp16 and fp32, against the CPU."""

from __future__ import annotations

import io
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.gpu
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _row(data: bytes, prompt: str, i: int):
    from pnp_batch.io.rows import Row

    return Row(index=i, id=f"r{i}", image=None, image_bytes=data, source_prompt="a photo", target_prompt=prompt)


def _translate(tmp_path, tiny_model_dir, device: str, dtype: str) -> list[np.ndarray]:
    from pnp_batch.config import load_config
    from pnp_batch.translate.translator import Translator

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (8, 12, 3), dtype=np.uint8)).resize((192, 128), Image.BICUBIC).save(buf, "PNG")
    cfg = load_config("tiny", {"model": str(tiny_model_dir), "device": device, "dtype": dtype, "steps": 10,
                               "inversion_steps": 10, "resolution": 128})
    out = tmp_path / f"{device}-{dtype}"
    tr = Translator(cfg, str(out), worker="test")
    rows = [_row(buf.getvalue(), p, i) for i, p in enumerate(["a photo of a fox", "a watercolor painting"])]
    recs = tr.process(rows)
    assert [r["status"] for r in recs] == ["ok", "ok"], recs
    assert tr.counters.invert_calls == 10 and tr.counters.source_elements == 8
    return [np.asarray(Image.open(out / "images" / f"r{i}.png")).astype(int) for i in range(2)]


@cuda
def test_cuda_fp32_matches_cpu_and_fp16_runs(tmp_path, tiny_model_dir):
    cpu = _translate(tmp_path, tiny_model_dir, "cpu", "float32")
    gpu = _translate(tmp_path, tiny_model_dir, "cuda", "float32")
    half = _translate(tmp_path, tiny_model_dir, "cuda", "float16")
    for a, b, h in zip(cpu, gpu, half):
        assert a.shape == b.shape == h.shape == (128, 192, 3)
        assert np.abs(a - b).mean() < 2.0  # cuDNN may use TF32 convolutions: small rounding only
        assert np.abs(a - h).mean() < 8.0  # fp16 through 10 steps of a random model


def _sync_warnings(fn) -> int:
    """How many host-device synchronisations fn makes (torch's sync debug mode, one warning each)."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@cuda
def test_no_host_device_sync_per_step(tiny_model_dir):
    """The number of synchronisations of inversion and sampling does not grow with the step count:
    set-up may copy to the device once, the loop never waits for it."""
    from pnp_batch.config import generation_timesteps, load_config
    from pnp_batch.models.load import load_models
    from pnp_batch.pnp.injection import PnPInjector
    from pnp_batch.pnp.inversion import ddim_invert
    from pnp_batch.pnp.sampler import Target, pnp_sample

    m = load_models(load_config("tiny", {"model": str(tiny_model_dir), "device": "cuda", "dtype": "float16"}))
    tok = m.tokenizer
    ids = tok(["", "a fox", "a cat"], padding="max_length", max_length=tok.model_max_length, return_tensors="pt")
    with torch.no_grad():
        emb = m.text_encoder(ids.input_ids.to("cuda"))[0]
    z0 = torch.randn(1, 4, 16, 16, device="cuda")
    injector = PnPInjector(m.unet)
    counts = {}
    for steps in (5, 20):
        keep = generation_timesteps(steps)
        inv = ddim_invert(m.unet, m.scheduler_config, z0, emb[:1], steps, keep)  # warm (first-call set-up)
        targets = [Target(emb[j], emb[0], 7.5, int(0.8 * steps), int(0.5 * steps)) for j in (1, 2)]
        pnp_sample(m.unet, injector, m.scheduler_config, inv.latents, emb[:1], targets, steps, 3)
        counts[steps] = (
            _sync_warnings(partial(ddim_invert, m.unet, m.scheduler_config, z0, emb[:1], steps, keep)),
            _sync_warnings(partial(pnp_sample, m.unet, injector, m.scheduler_config, inv.latents, emb[:1], targets,
                                   steps, 3)),
        )
    injector.remove()
    # A synchronisation per step would add 15 between 5 and 20 steps. The counts themselves can move by
    # one between runs (a one-off lazy set-up of torch's fell into the first timed call on the H100:
    # {5: (2, 10), 20: (1, 10)}), so allow that and no more.
    for phase, (at5, at20) in zip(("inversion", "sampling"), zip(counts[5], counts[20])):
        assert abs(at20 - at5) <= 1, (phase, counts)


@cuda
def test_cuda_graphs_replay_the_eager_result(tmp_path, tiny_model_dir):
    """cuda_graphs: the UNet calls are recorded once per shape and replayed; the images are the eager ones."""
    from pnp_batch.config import load_config
    from pnp_batch.pnp.graphs import GraphedUNet
    from pnp_batch.translate.translator import Translator

    rng = np.random.default_rng(1)
    pngs = []
    for _ in range(2):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(buf, "PNG")
        pngs.append(buf.getvalue())
    prompts = ["a photo of a fox", "a watercolor painting", "a pencil sketch"]
    images = {}
    for graphs in (False, True):
        cfg = load_config("tiny", {"model": str(tiny_model_dir), "device": "cuda", "dtype": "float16", "steps": 10,
                                   "inversion_steps": 10, "resolution": 128, "cuda_graphs": graphs})
        out = tmp_path / f"graphs-{graphs}"
        tr = Translator(cfg, str(out), worker="test")
        for src in range(2):  # a second source replays the first one's graphs
            rows = [_row(pngs[src], p, 10 * src + i) for i, p in enumerate(prompts)]
            assert [r["status"] for r in tr.process(rows)] == ["ok"] * 3
        if graphs:
            unet = tr.models.unet
            assert isinstance(unet, GraphedUNet) and unet.failed is None, getattr(unet, "failed", None)
            assert unet.eager_calls == 0 and unet.replays == 2 * (10 + 10) and len(unet.graphs) == 4
        images[graphs] = [np.asarray(Image.open(out / "images" / f"r{10 * s + i}.png")).astype(int)
                          for s in range(2) for i in range(3)]
    for a, b in zip(images[False], images[True]):
        assert np.abs(a - b).max() <= 1, np.abs(a - b).max()


@cuda
def test_two_processes_write_the_same_bytes(tmp_path, tiny_model_dir):
    """CONTRACT: the same row, config and hardware give the same output bytes, also from another
    process (a resumed run, another worker): cuDNN's algorithm choice must not vary between them."""
    import subprocess
    import sys
    import textwrap

    rng = np.random.default_rng(3)
    src = tmp_path / "src.png"
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(src)
    script = textwrap.dedent(f"""
        import sys
        from pnp_batch.config import load_config
        from pnp_batch.io.rows import Row
        from pnp_batch.translate.translator import Translator
        cfg = load_config("tiny", {{"model": {str(tiny_model_dir)!r}, "device": "cuda", "dtype": "float16",
                                   "steps": 10, "inversion_steps": 10, "resolution": 128}})
        tr = Translator(cfg, sys.argv[1], worker="p")
        rows = [Row(index=i, id=f"r{{i}}", image={str(src)!r}, image_bytes=None, source_prompt="a photo",
                    target_prompt=p) for i, p in enumerate(["a fox", "a watercolor painting"])]
        assert [r["status"] for r in tr.process(rows)] == ["ok", "ok"]
        tr.close()
    """)
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        subprocess.run([sys.executable, "-c", script, str(out)], check=True, timeout=300)
    for i in range(2):
        assert (outs[0] / "images" / f"r{i}.png").read_bytes() == (outs[1] / "images" / f"r{i}.png").read_bytes()


def _square_pngs(n: int, size: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((size, size)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def _inverter(tr, tmp_path, srcs: list[bytes]):
    """invert(order) -> {source index: its latents}, inverted afresh each time (the store is emptied)."""
    import shutil

    def invert(order: list[int]) -> dict[int, torch.Tensor]:
        got = tr.source_features_many([(srcs[i], "") for i in order])
        tr.flush()
        shutil.rmtree(tmp_path / "features", ignore_errors=True)  # the next call inverts again
        assert not any(g[2] for g in got)
        return {i: g[0].clone() for i, g in zip(order, got)}

    return invert


def _padded_inversion_is_invariant(tmp_path, cfg, models=None) -> None:
    """Invert 4 sources in several orders and subsets, each call padded to inversion_batch rows: every
    source must get the same bits wherever it sits and whatever shares its call."""
    from pnp_batch.translate.translator import Translator

    tr = Translator(cfg, str(tmp_path), worker="test", models=models)
    invert = _inverter(tr, tmp_path, _square_pngs(4, cfg.resolution, seed=4))
    base = invert([0, 1, 2, 3])
    for order in ([3, 2, 1, 0], [2, 0], [1], [0, 3, 1]):
        for i, lat in invert(order).items():
            assert torch.equal(lat, base[i]), (order, i, (lat.float() - base[i].float()).abs().max().item())
    tr.injector.remove()


@cuda
@pytest.mark.parametrize("resolution", [64, 128])
def test_padded_inversion_calls_are_invariant_tiny(tmp_path, tiny_model_dir, resolution):
    """inversion_batch > 1 keeps CONTRACT's same bytes only if a padded call's rows do not depend on
    their position or neighbours (the 2-core CPU fails this at 8x8 latents). If this and the
    full-size test below pass on a GPU kind, inversion_batch 4 can be its default (docs/bench.md)."""
    from pnp_batch.config import load_config

    cfg = load_config("tiny", {"model": str(tiny_model_dir), "device": "cuda", "dtype": "float16", "steps": 10,
                               "inversion_steps": 10, "resolution": resolution, "inversion_batch": 4})
    _padded_inversion_is_invariant(tmp_path, cfg)


@cuda
def test_padded_inversion_calls_are_invariant_sd21_base_512(tmp_path):
    from pnp_batch.config import PipelineConfig
    from pnp_batch.models.archs import build_random_models

    models = build_random_models("sd21-base", "cuda", torch.float16, seed=0)
    cfg = PipelineConfig(model="random:sd21-base", device="cuda", dtype="float16", resolution=512, steps=2,
                         inversion_steps=2, inversion_batch=4)
    _padded_inversion_is_invariant(tmp_path, cfg, models)


def _streams_invert_as_alone(tmp_path, cfg, models=None) -> None:
    """inversion_streams 4: 4 sources inverted side by side on CUDA streams must get exactly the bits
    each gets inverted alone on the current stream (the same kernels; a missing wait between streams,
    or two streams sharing a graph's memory, shows here as different bits)."""
    from pnp_batch.translate.translator import Translator

    tr = Translator(cfg.replace(inversion_streams=4), str(tmp_path), worker="test", models=models)
    assert tr._streams is not None and len(tr._streams) == 4
    invert = _inverter(tr, tmp_path, _square_pngs(4, cfg.resolution, seed=5))
    streams = tr._streams
    tr._streams, tr.inversion_streams = None, 1
    alone = {i: invert([i])[i] for i in range(4)}
    tr._streams, tr.inversion_streams = streams, 4
    for order in ([0, 1, 2, 3], [3, 1, 0, 2], [2, 0, 1, 3]):  # the second and later replay recorded graphs
        for i, lat in invert(order).items():
            assert torch.equal(lat, alone[i]), (order, i, (lat.float() - alone[i].float()).abs().max().item())
    tr.injector.remove()


@cuda
@pytest.mark.parametrize("graphs", [True, False])
def test_inversion_streams_give_each_source_its_result_alone_tiny(tmp_path, tiny_model_dir, graphs):
    from pnp_batch.config import load_config

    cfg = load_config("tiny", {"model": str(tiny_model_dir), "device": "cuda", "dtype": "float16", "steps": 10,
                               "inversion_steps": 10, "resolution": 128, "cuda_graphs": graphs})
    _streams_invert_as_alone(tmp_path, cfg)


@cuda
def test_inversion_streams_give_each_source_its_result_alone_sd21_base_512(tmp_path):
    from pnp_batch.config import PipelineConfig
    from pnp_batch.models.archs import build_random_models

    models = build_random_models("sd21-base", "cuda", torch.float16, seed=0)
    cfg = PipelineConfig(model="random:sd21-base", device="cuda", dtype="float16", resolution=512, steps=5,
                         inversion_steps=5)
    _streams_invert_as_alone(tmp_path, cfg, models)
