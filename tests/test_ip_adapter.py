"""IP-Adapter next to PnP (docs/ip_adapter.md), end to end on the tiny models with the offline test adapter
loaded through diffusers' own loader: equality with diffusers' pipeline, scale 0 against no adapter, a
mixed group, both kinds of processor surviving a load, and the bad inputs."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pnp_batch.cli import main
from pnp_batch.config import load_config
from pnp_batch.io.rows import Row
from pnp_batch.models.ip_adapter import TEST_SUBFOLDER, TEST_WEIGHT_NAME, tiny_ip_adapter_dir
from pnp_batch.pnp.injection import PnPAttnProcessor
from pnp_batch.pnp.ip_attention import RowScaledIPAttnProcessor
from pnp_batch.translate.translator import Translator

STEPS = 5
NEGATIVE = "ugly, blurry, black, low res, unrealistic"
FAST = ["--pipeline", "tiny", "--set", "steps=4", "--set", "inversion_steps=4", "--set", "resolution=64",
        "--no-report"]
# diffusers' per-block form, style only: the middle layer of the first decoder block with attention
STYLE_ONLY = {"sd": {"up": {"block_1": [0.0, 1.0, 0.0]}}, "sdxl": {"up": {"block_0": [0.0, 1.0, 0.0]}}}


def _png(seed: int, size=(40, 32)) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize(size, Image.BICUBIC).save(buf, "PNG")
    return buf.getvalue()


def _images(out, ids) -> dict[str, np.ndarray]:
    return {i: np.asarray(Image.open(out / "images" / f"{i}.png")) for i in ids}


def _summary(out) -> dict:
    return json.loads(max((out / "runs").glob("*.json")).read_text())


# --- equality with diffusers' pipeline (injection off, same starting latent) -------------------------


def _theirs(pipe_cls, model_dir, adapter_dir, scale, prompt, ip_png, x, **kw) -> np.ndarray:
    pipe = pipe_cls.from_pretrained(str(model_dir), torch_dtype=torch.float32, **kw)
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_ip_adapter(str(adapter_dir), subfolder=TEST_SUBFOLDER, weight_name=TEST_WEIGHT_NAME,
                         local_files_only=True)
    pipe.set_ip_adapter_scale(scale)
    pipe.set_progress_bar_config(disable=True)
    h, w = x.shape[-2] * 8, x.shape[-1] * 8
    out = pipe(prompt=[prompt], negative_prompt=[NEGATIVE], guidance_scale=7.5, num_inference_steps=STEPS,
               height=h, width=w, latents=x.clone(), ip_adapter_image=Image.open(io.BytesIO(ip_png)),
               output_type="np").images
    return np.round(out * 255).astype(np.uint8)


@pytest.mark.parametrize("arch", ["sd", "sdxl"])
@pytest.mark.parametrize("scale", [0.8, "style"])
def test_image_prompt_equals_diffusers_pipeline_with_the_adapter(arch, scale, tiny_model_dir, tiny_sdxl_dir, tmp_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    scale = STYLE_ONLY[arch] if scale == "style" else scale
    preset, model_dir = ("tiny", tiny_model_dir) if arch == "sd" else ("tiny-sdxl", tiny_sdxl_dir)
    cfg = load_config(preset, {"model": str(model_dir), "device": "cpu", "dtype": "float32", "steps": STEPS,
                               "inversion_steps": STEPS, "pnp_f_t": 0, "pnp_attn_t": 0, "negative_prompt": NEGATIVE,
                               "guidance_scale": 7.5, "ip_adapter": "tiny", "ip_adapter_scale": scale})
    tr = Translator(cfg, str(tmp_path / "out"))
    x = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(3))
    latents = torch.zeros(STEPS, 1, 4, 8, 12)
    latents[0] = x
    ip = _png(7)
    prompt = "a watercolor painting of a cat"
    rows = [Row(0, "r0", None, None, "a photo", prompt, ip_image_bytes=ip)]
    ours, _ = tr.translate(latents, rows)
    adapter = tiny_ip_adapter_dir(tr.models.unet)
    if arch == "sd":
        theirs = _theirs(StableDiffusionPipeline, model_dir, adapter, scale, prompt, ip, x, safety_checker=None,
                         requires_safety_checker=False)
    else:
        theirs = _theirs(StableDiffusionXLPipeline, model_dir, adapter, scale, prompt, ip, x, add_watermarker=False)
    diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    assert diff.max() <= 1, f"max difference {diff.max()} levels"
    assert ours.std() > 10
    # the image prompt changed the image: the same row without it differs
    plain, _ = tr.translate(latents, [Row(0, "r0", None, None, "a photo", prompt)])
    assert np.abs(plain.astype(np.int16) - ours.astype(np.int16)).max() > 2


# --- processors: PnP's on attn1 and the adapter's on attn2 both survive a load -----------------------


def test_pnp_and_adapter_processors_both_survive_a_load(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    cfg = load_config("tiny", {"model": str(tiny_model_dir), "device": "cpu", "ip_adapter": "tiny",
                               "steps": 4, "inversion_steps": 4})
    tr = Translator(cfg, str(tmp_path / "out"))
    unet = tr.models.unet
    weights = load_file(str(tiny_ip_adapter_dir(unet) / TEST_SUBFOLDER / TEST_WEIGHT_NAME))

    def check() -> None:
        procs = unet.attn_processors
        for layer in tr.injector.points.attn_layers:
            assert isinstance(procs[f"{layer}.processor"], PnPAttnProcessor), layer
        ip = [(n, p) for n, p in procs.items() if n.endswith("attn2.processor")]
        assert ip and all(isinstance(p, RowScaledIPAttnProcessor) for _, p in ip)
        for j, (_, p) in enumerate(ip):
            assert torch.equal(p.to_k_ip[0].weight, weights[f"ip_adapter.{2 * j + 1}.to_k_ip.weight"])
            assert torch.equal(p.to_v_ip[0].weight, weights[f"ip_adapter.{2 * j + 1}.to_v_ip.weight"])

    check()
    # a layer-setting change (use_points) takes PnP's processors off and puts new ones on, module by module
    tr.use_points(tr.injection_points(None, ("up_blocks.2.attentions.0",)))
    check()
    tr.use_points(tr.points)
    check()
    # diffusers' loader run again (it resets every attn1 processor): PnP's are put back per module
    tr.injector.restore()
    tr.models.ip_adapter.pipe.load_ip_adapter(str(tiny_ip_adapter_dir(unet)), subfolder=TEST_SUBFOLDER,
                                              weight_name=TEST_WEIGHT_NAME, local_files_only=True)
    assert not any(isinstance(p, PnPAttnProcessor) for p in unet.attn_processors.values())
    tr.injector.reinstall()
    tr.image_prompts.layers = __import__("pnp_batch.pnp.ip_attention", fromlist=["x"]).install_row_scaled(unet)
    check()


# --- end to end through the CLI ---------------------------------------------------------------------


def _manifest(tmp_path, rows, name) -> str:
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / name)
    return str(tmp_path / name)


def test_scale_zero_gives_the_bytes_of_a_run_without_adapter(tmp_path):
    Image.open(io.BytesIO(_png(0, (80, 64)))).save(tmp_path / "s.png")
    (tmp_path / "style.png").write_bytes(_png(5))
    base = [{"id": f"r{j}", "image": "s.png", "source_prompt": "a photo", "target_prompt": p}
            for j, p in enumerate(["a fox", "a cat at night"])]
    plain = _manifest(tmp_path, base, "plain.parquet")
    with_ip = _manifest(tmp_path, [{**r, "ip_image": "style.png"} for r in base], "ip.parquet")
    assert main(["run", plain, "--out", str(tmp_path / "a"), *FAST]) == 0
    assert main(["run", with_ip, "--out", str(tmp_path / "b"), *FAST, "--set", "ip_adapter=tiny",
                 "--set", "ip_adapter_scale=0"]) == 0
    a, b = _images(tmp_path / "a", ["r0", "r1"]), _images(tmp_path / "b", ["r0", "r1"])
    for i in a:
        assert a[i].tobytes() == b[i].tobytes()
    # the inversion is the same whatever the image prompts: one feature key for both runs
    fa = pq.read_table(tmp_path / "a" / "results").column("feature_key").to_pylist()
    fb = pq.read_table(tmp_path / "b" / "results").column("feature_key").to_pylist()
    assert set(fa) == set(fb) and len(set(fa)) == 1


def test_mixed_group_text_only_rows_unchanged_and_embeds_once_per_image(tmp_path):
    Image.open(io.BytesIO(_png(0, (80, 64)))).save(tmp_path / "s.png")
    (tmp_path / "style.png").write_bytes(_png(5))
    prompts = ["a fox", "a cat at night", "a bronze statue", "a fox"]
    rows = [{"id": f"r{j}", "image": "s.png", "source_prompt": "a photo", "target_prompt": p}
            for j, p in enumerate(prompts)]
    mixed = [dict(rows[0]), {**rows[1], "ip_image": "style.png"}, dict(rows[2]),
             {**rows[3], "ip_image": "style.png", "ip_adapter_scale": 0.5}]
    for r in mixed:
        r.setdefault("ip_image", None)
        r.setdefault("ip_adapter_scale", None)
    assert main(["run", _manifest(tmp_path, rows, "plain.parquet"), "--out", str(tmp_path / "a"), *FAST]) == 0
    assert main(["run", _manifest(tmp_path, mixed, "mixed.parquet"), "--out", str(tmp_path / "b"), *FAST,
                 "--set", "ip_adapter=tiny", "--set", "ip_adapter_scale=1.0"]) == 0
    ids = [r["id"] for r in rows]
    a, b = _images(tmp_path / "a", ids), _images(tmp_path / "b", ids)
    assert a["r0"].tobytes() == b["r0"].tobytes()  # text-only rows of a mixed group: as without adapter
    assert a["r2"].tobytes() == b["r2"].tobytes()
    assert np.abs(a["r1"].astype(int) - b["r1"].astype(int)).max() > 2  # the image prompt acts
    assert np.abs(a["r3"].astype(int) - b["r3"].astype(int)).max() > 2
    assert np.abs(b["r3"].astype(int) - b["r0"].astype(int)).max() > 0  # same prompt, scale 0.5: its own image
    s = _summary(tmp_path / "b")
    assert s["counts"]["ok"] == 4
    assert s["stats"]["unet"]["image_encodes"] == 1  # one distinct image, two rows
    assert s["stats"]["unet"]["inversions"] == 1


def test_bad_image_prompt_fails_its_row_only(tmp_path):
    Image.open(io.BytesIO(_png(0, (80, 64)))).save(tmp_path / "s.png")
    (tmp_path / "style.png").write_bytes(_png(5))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    rows = [{"id": "ok", "image": "s.png", "target_prompt": "a fox", "ip_image": "style.png"},
            {"id": "missing", "image": "s.png", "target_prompt": "a cat", "ip_image": "nope.png"},
            {"id": "broken", "image": "s.png", "target_prompt": "a cat", "ip_image": "broken.png"}]
    out = tmp_path / "o"
    assert main(["run", _manifest(tmp_path, rows, "m.parquet"), "--out", str(out), *FAST,
                 "--set", "ip_adapter=tiny"]) == 1
    recs = {r["id"]: r for r in pq.read_table(out / "results").to_pylist()}
    assert recs["ok"]["status"] == "ok"
    assert recs["missing"]["status"] == "failed" and "nope.png" in recs["missing"]["error"]
    assert recs["broken"]["status"] == "failed" and "ip_image" in recs["broken"]["error"]


def test_image_prompts_pass_the_input_policy_and_key_the_work(tmp_path, capsys):
    """An ip_image is read under the run's input policy like the source (a metadata address or a file
    outside the manifest's folder is refused before any read: validate flags it, run fails its row), and
    changing a row's image prompt changes its work key, so resume redoes exactly that row."""
    Image.open(io.BytesIO(_png(0, (80, 64)))).save(tmp_path / "s.png")
    (tmp_path / "style.png").write_bytes(_png(5))
    (tmp_path / "other.png").write_bytes(_png(6))
    outside = tmp_path.parent / f"{tmp_path.name}_outside.png"
    outside.write_bytes(_png(7))
    rows = [{"id": "ok", "image": "s.png", "target_prompt": "a fox", "ip_image": "style.png"},
            {"id": "meta", "image": "s.png", "target_prompt": "a cat", "ip_image": "http://169.254.169.254/x.png"},
            {"id": "abs", "image": "s.png", "target_prompt": "a cat", "ip_image": str(outside)}]
    m = _manifest(tmp_path, rows, "m.parquet")
    assert main(["validate", m]) != 0
    text = capsys.readouterr()
    said = text.out + text.err
    assert "meta" in said and "link-local" in said and "abs" in said
    out = tmp_path / "o"
    assert main(["run", m, "--out", str(out), *FAST, "--set", "ip_adapter=tiny"]) == 1
    recs = {r["id"]: r for r in pq.read_table(out / "results").to_pylist()}
    assert recs["ok"]["status"] == "ok"
    assert recs["meta"]["status"] == "failed" and "not allowed" in recs["meta"]["error"]
    assert recs["abs"]["status"] == "failed" and "not allowed" in recs["abs"]["error"]
    # the same rows with another image prompt for "ok": a new work key, so only that row is redone
    first_key = recs["ok"]["work_key"]
    rows2 = [{**rows[0], "ip_image": "other.png"}]
    m2 = _manifest(tmp_path, rows2, "m2.parquet")
    assert main(["run", m2, "--out", str(out), *FAST, "--set", "ip_adapter=tiny"]) == 0
    latest = [r for r in pq.read_table(out / "results").to_pylist() if r["id"] == "ok"]
    assert len(latest) == 2 and latest[-1]["work_key"] != first_key
    assert _summary(out)["counts"].get("changed") == 1
    # unchanged: nothing to do
    assert main(["run", m2, "--out", str(out), *FAST, "--set", "ip_adapter=tiny"]) == 0
    assert len([r for r in pq.read_table(out / "results").to_pylist() if r["id"] == "ok"]) == 2


def test_make_test_model_writes_an_adapter_the_run_loads(tmp_path, capsys):
    model = tmp_path / "tiny"
    assert main(["make-test-model", str(model), "--ip-adapter"]) == 0
    assert (model / "ip_adapter" / TEST_SUBFOLDER / TEST_WEIGHT_NAME).is_file()
    assert (model / "ip_adapter" / TEST_SUBFOLDER / "image_encoder" / "config.json").is_file()
    Image.open(io.BytesIO(_png(0, (80, 64)))).save(tmp_path / "s.png")
    (tmp_path / "style.png").write_bytes(_png(5))
    m = _manifest(tmp_path, [{"id": "a", "image": "s.png", "target_prompt": "a fox", "ip_image": "style.png"}],
                  "m.parquet")
    assert main(["run", m, "--out", str(tmp_path / "o"), *FAST, "--set", f"model={model}",
                 "--set", f"ip_adapter={model / 'ip_adapter'}"]) == 0


def test_adapter_that_does_not_fit_or_lacks_its_encoder_exits_2(tmp_path, tiny_sdxl_dir, capsys):
    from diffusers import UNet2DConditionModel

    from pnp_batch.models.ip_adapter import make_test_ip_adapter

    sdxl_unet = UNet2DConditionModel.from_pretrained(str(tiny_sdxl_dir), subfolder="unet")
    wrong = make_test_ip_adapter(tmp_path / "sdxl_adapter", sdxl_unet)
    Image.open(io.BytesIO(_png(0, (80, 64)))).save(tmp_path / "s.png")
    m = _manifest(tmp_path, [{"id": "a", "image": "s.png", "target_prompt": "a fox"}], "m.parquet")
    weight = wrong / TEST_SUBFOLDER / TEST_WEIGHT_NAME
    assert main(["run", m, "--out", str(tmp_path / "o1"), *FAST, "--set", f"ip_adapter={weight}",
                 "--set", f"ip_adapter_image_encoder={wrong / TEST_SUBFOLDER / 'image_encoder'}"]) == 2
    assert str(weight) in capsys.readouterr().err
    assert not (tmp_path / "o1" / "results").exists()
    # the right layers but no image encoder where the keys say
    right = tiny_ip_adapter_dir(__import__("pnp_batch.models.load", fromlist=["x"]).load_models(
        load_config("tiny")).unet)
    assert main(["run", m, "--out", str(tmp_path / "o2"), *FAST, "--set", f"ip_adapter={right}",
                 "--set", f"ip_adapter_subfolder={TEST_SUBFOLDER}", "--set", f"ip_adapter_weight_name={TEST_WEIGHT_NAME}",
                 "--set", "ip_adapter_image_encoder=no_encoder_here"]) == 2
    assert "image encoder not found" in capsys.readouterr().err


def test_scale_sweep_with_eval_one_inversion_for_the_grid(tmp_path):
    """`ip_adapter_scale` is sweepable; run --eval scores every setting; one inversion and one image
    encoding serve the whole grid, and the grid's scale-0 point is text-only."""
    Image.open(io.BytesIO(_png(0, (80, 64)))).save(tmp_path / "s.png")
    (tmp_path / "style.png").write_bytes(_png(5))
    m = _manifest(tmp_path, [{"id": "a", "image": "s.png", "target_prompt": "a fox", "ip_image": "style.png"}],
                  "m.parquet")
    out = tmp_path / "o"
    assert main(["run", m, "--out", str(out), *FAST, "--set", "ip_adapter=tiny", "--sweep",
                 "ip_adapter_scale=0,1", "--eval"]) == 0
    recs = pq.read_table(out / "results").to_pylist()
    assert sorted(r["setting"] for r in recs) and all(r["status"] == "ok" for r in recs) and len(recs) == 2
    stats = _summary(out)["stats"]["unet"]
    assert stats["inversions"] == 1 and stats["image_encodes"] == 1
    assert len(list((out / "eval").glob("*.parquet"))) >= 1
    imgs = [np.asarray(Image.open(out / "images" / f"{r['id']}.png")) for r in sorted(recs, key=lambda r: r["id"])]
    assert np.abs(imgs[0].astype(int) - imgs[1].astype(int)).max() > 2


class _Replay:
    """A stand-in for CUDA graph capture (as tests/pnp/test_graphs.py's): a replay reruns the recorded call
    on its static inputs with the injection state frozen at capture."""

    def __init__(self, controller) -> None:
        self.c = controller
        self.captures = 0

    def lane(self, sample) -> int:
        return 0

    def capture(self, fn, lane):
        self.captures += 1
        c = self.c
        out = fn()
        frozen = (c.conv_rows, c.attn_rows, c.has_source, c.record)

        def replay() -> None:
            now = (c.conv_rows, c.attn_rows, c.has_source, c.record)
            c.conv_rows, c.attn_rows, c.has_source, c.record = frozen
            try:
                out.copy_(fn())
            finally:
                c.conv_rows, c.attn_rows, c.has_source, c.record = now

        return replay, out


def test_graphed_unet_replays_image_prompt_calls_with_the_eager_images(tiny_model_dir, tmp_path):
    """CUDA graphs keep working: calls carrying image embeddings and per-element weights are recorded
    (their inputs copied into static tensors) and replayed, with the eager images."""
    from pnp_batch.pnp.graphs import GraphedUNet

    cfg = load_config("tiny", {"model": str(tiny_model_dir), "device": "cpu", "steps": STEPS,
                               "inversion_steps": STEPS, "ip_adapter": "tiny"})
    tr = Translator(cfg, str(tmp_path / "out"))
    latents = torch.randn(STEPS, 1, 4, 8, 10, generator=torch.Generator().manual_seed(1))
    rows = [Row(0, "a", None, None, "a photo", "a fox", ip_image_bytes=_png(3)),
            Row(1, "b", None, None, "a photo", "a cat"),
            Row(2, "c", None, None, "a photo", "a fox", ip_image_bytes=_png(4), overrides={"ip_adapter_scale": 0.4})]
    eager, _ = tr.translate(latents, rows)
    graphed = GraphedUNet(tr.models.unet, tr.injector.controller, _Replay(tr.injector.controller))
    tr.models.unet = graphed
    again, _ = tr.translate(latents, rows)
    assert graphed.replays > 0 and graphed.eager_calls == 0
    assert np.array_equal(eager, again)
    # other rows, same shapes: the recorded graphs serve them with their own image prompts
    swapped = [rows[2], rows[1], rows[0]]
    graphed_out, _ = tr.translate(latents, swapped)
    tr.models.unet = graphed.module
    eager_out, _ = tr.translate(latents, swapped)
    assert np.array_equal(graphed_out, eager_out)
