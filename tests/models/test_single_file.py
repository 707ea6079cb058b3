"""Single-file checkpoints load offline and give the same model as the diffusers folder.

The tiny models are written in the original (CompVis/LDM) layout by tests/models/ldm_layout.py:
SD 1.x's CLIP text encoder for `tiny`, SD 2.x's OpenCLIP one for `tiny-v` (v-prediction, as SD 2.1
at 768). `model_config` names the local diffusers folder to read the configuration from; nothing
is fetched. The fingerprint (and so the feature key) is the file's content hash.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from ldm_layout import to_ldm_checkpoint  # tests/models/ldm_layout.py (pytest puts this folder on sys.path)
from PIL import Image
from safetensors.torch import load_file, save_file

from pnp_batch.config import load_config
from pnp_batch.io.features import feature_key
from pnp_batch.models.load import load_models
from pnp_batch.models.single_file import CheckpointError, family_config_dir, inspect_checkpoint

FAST = {"steps": 4, "inversion_steps": 4, "resolution": 64}


def _write(models, path: Path, layout: str) -> Path:
    save_file(to_ldm_checkpoint(models.unet, models.vae, models.text_encoder, layout), str(path))
    return path


@pytest.fixture(scope="module")
def tiny_v_dir():
    from pnp_batch.models.tiny_v import tiny_v_model_dir

    return tiny_v_model_dir()


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory, tiny_models) -> Path:
    return _write(tiny_models, tmp_path_factory.mktemp("ckpt") / "tiny-sd1.safetensors", "clip")


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((64, 64), Image.BICUBIC).save(buf, "PNG")
    return buf.getvalue()


def _image(tmp_path: Path, models, cfg) -> np.ndarray:
    from pnp_batch.io.rows import Row
    from pnp_batch.translate.translator import Translator

    tr = Translator(cfg, str(tmp_path / f"out-{id(models)}"), models=models, worker="t")
    try:
        lat = tr.source_features_many([(_png(0), "")])[0][0]
        images, _ = tr.translate(lat, [Row(0, "r0", None, b"", "", "a photo of a fox")])
    finally:
        tr.injector.remove()
    return images[0]


def _same_weights(a, b) -> None:
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}.{k}"


def test_sd1_checkpoint_loads_offline_to_the_same_model_and_images(tmp_path, tiny_models, tiny_model_dir, sd1_file,
                                                                   monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # any hub request would fail the load
    keys = load_file(str(sd1_file)).keys()
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert not any(k.startswith(("unet.", "down_blocks.")) for k in keys)  # the original layout, not diffusers'
    cfg = load_config("tiny", {"model": str(sd1_file), "model_config": str(tiny_model_dir), **FAST})
    m = load_models(cfg)
    _same_weights(m, tiny_models)
    assert m.scheduler_config["prediction_type"] == "epsilon"
    assert m.fingerprint.startswith("file:sha256:") and "tiny-sd1" not in m.fingerprint
    ours = _image(tmp_path, m, cfg)
    folder = _image(tmp_path, tiny_models, load_config("tiny", {"model": str(tiny_model_dir), **FAST}))
    assert np.array_equal(ours, folder)


def test_ckpt_files_load_too(tmp_path, tiny_models, tiny_model_dir):
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": to_ldm_checkpoint(tiny_models.unet, tiny_models.vae, tiny_models.text_encoder)}, path)
    m = load_models(load_config("tiny", {"model": str(path), "model_config": str(tiny_model_dir)}))
    _same_weights(m, tiny_models)


def test_sd2_openclip_checkpoint_with_v_prediction(tmp_path, tiny_v_dir):
    v = load_models(load_config("tiny", {"model": str(tiny_v_dir)}))
    path = _write(v, tmp_path / "tiny-sd2.safetensors", "open_clip")
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in load_file(str(path))
    # the weights do not say whether an SD 2.x file is 768-v or 512-epsilon: auto asks
    with pytest.raises(CheckpointError, match=r"Stable Diffusion 2.x .*model_config=sd21 .*sd21-base"):
        load_models(load_config("tiny", {"model": str(path)}))
    m = load_models(load_config("tiny", {"model": str(path), "model_config": str(tiny_v_dir)}))
    _same_weights(m, v)
    assert m.prediction_type == "v_prediction"


def test_fingerprint_is_the_content_hash(tmp_path, tiny_model_dir, sd1_file, monkeypatch):
    """Two copies of one checkpoint share features; a changed file does not; the hash is cached."""
    from pnp_batch import filehash

    monkeypatch.setenv("PNP_BATCH_CACHE", str(tmp_path / "cache"))
    filehash._memo.clear()
    copy = tmp_path / "renamed copy.safetensors"
    shutil.copyfile(sd1_file, copy)
    cfg = load_config("tiny", {"model": str(sd1_file), "model_config": str(tiny_model_dir), **FAST})
    a = load_models(cfg).fingerprint
    b = load_models(cfg.replace(model=str(copy))).fingerprint
    assert a == b
    assert feature_key("0" * 64, a, "float32", cfg) == feature_key("0" * 64, b, "float32", cfg.replace(model=str(copy)))
    assert len(list((tmp_path / "cache" / "file-sha256").glob("*.json"))) == 2  # one entry per file

    # cached: a second process (memo cleared) reads the entry instead of the file
    filehash._memo.clear()
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: (reads.append(str(p)), real_open(p, *a, **k))[1])
    assert filehash.file_sha256(copy).startswith(a.split(":")[2])
    monkeypatch.undo()
    assert str(copy.resolve()) not in reads

    # a changed file: another fingerprint, another feature key
    sd = load_file(str(copy))
    key = "model.diffusion_model.out.2.bias"
    sd[key] = sd[key] + 0.01
    save_file(sd, str(copy))
    os.utime(copy, ns=(1, 1))  # even with an old mtime: the size or mtime changed, the hash is recomputed
    filehash._memo.clear()
    c = load_models(cfg.replace(model=str(copy))).fingerprint
    assert c != a
    assert feature_key("0" * 64, c, "float32", cfg) != feature_key("0" * 64, a, "float32", cfg)


def test_family_is_detected_and_the_shipped_configuration_checked(sd1_file):
    """auto: the CLIP text encoder says SD 1.x, so the shipped sd15 configuration; the tiny UNet's
    widths are not SD 1.5's, which is refused before any weight is loaded."""
    with pytest.raises(CheckpointError, match=r"tiny-sd1.safetensors.*UNet width 16, its configuration .*320"):
        inspect_checkpoint(str(sd1_file), "auto")
    with pytest.raises(CheckpointError, match=r"is a sd15 model but model_config='sdxl'"):
        inspect_checkpoint(str(sd1_file), "sdxl")


@pytest.mark.parametrize("family,cross,pred", [("sd15", 768, "epsilon"), ("sd21-base", 1024, "epsilon"),
                                               ("sd21", 1024, "v_prediction"), ("sdxl", 2048, "epsilon")])
def test_shipped_configurations_are_complete_offline_folders(family, cross, pred):
    import json

    from transformers import CLIPTokenizer

    folder = family_config_dir(family)
    assert json.loads((folder / "unet" / "config.json").read_text())["cross_attention_dim"] == cross
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == pred
    tok = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
    # CLIP's own ids for this prompt (start, a, photo, of, a, cat, end)
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408
    size = sum(p.stat().st_size for p in Path(__file__).parents[2].joinpath(
        "pnp_batch", "assets", "model_configs").rglob("*") if p.is_file())
    assert size < 100_000  # configs only


@pytest.mark.parametrize("keys,reason", [
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3),
      "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768)},
     r"inpainting or other image-conditioned model \(its UNet takes 9 input channels"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (384, 4, 3, 3),
      "conditioner.embedders.0.model.token_embedding.weight": (49408, 1280)}, r"SDXL refiner"),
    ({"first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3)}, r"no 'model.diffusion_model.\*' UNet weights"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, r"architecture not recognised"),
])
def test_checkpoints_that_are_not_sd_text_to_image_are_refused(tmp_path, keys, reason):
    path = tmp_path / "odd.safetensors"
    save_file({k: torch.zeros(s) for k, s in keys.items()}, str(path))
    with pytest.raises(CheckpointError, match=rf"odd\.safetensors.*{reason}"):
        inspect_checkpoint(str(path), "auto")


def test_sdxl_layout_is_recognised(tmp_path):
    from pnp_batch.models.single_file import detect_family

    shapes = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
              "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
              "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
              "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280)}
    assert detect_family("x.safetensors", shapes) == "sdxl"


def _tiny_sdxl_folder(out: Path) -> Path:
    """An SDXL-topology pipeline with tiny widths (three down/up blocks, the first without attention,
    two text encoders of different widths, `text_time` conditioning), saved as a diffusers folder."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from pnp_batch.models.tiny import TOKENIZER_ASSETS, sd_vae

    tok = CLIPTokenizer(vocab=str(TOKENIZER_ASSETS / "vocab.json"), merges=str(TOKENIZER_ASSETS / "merges.txt"),
                        model_max_length=77)

    def text(width: int, cls):
        return cls(CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width,
                                  num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                  projection_dim=width, hidden_act="gelu", bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))

    torch.manual_seed(0)
    te1, te2 = text(32, CLIPTextModel), text(64, CLIPTextModelWithProjection)
    unet = UNet2DConditionModel(
        sample_size=32, layers_per_block=2, block_out_channels=(16, 32, 32), norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4), cross_attention_dim=96,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 64)
    pipe = StableDiffusionXLPipeline(
        vae=sd_vae((8, 16, 16, 16), layers_per_block=1, norm_num_groups=4), text_encoder=te1, text_encoder_2=te2,
        tokenizer=tok, tokenizer_2=tok, unet=unet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         steps_offset=1, timestep_spacing="leading"))
    pipe.save_pretrained(out)
    return out


def test_sdxl_checkpoint_loads_offline_to_the_same_pipeline(tmp_path, monkeypatch):
    from diffusers import StableDiffusionXLPipeline

    from pnp_batch.models.single_file import load_single_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = _tiny_sdxl_folder(tmp_path / "tiny-sdxl")
    ref = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    path = tmp_path / "tiny-sdxl.safetensors"
    save_file(to_ldm_checkpoint(ref.unet, ref.vae, ref.text_encoder, "sdxl", ref.text_encoder_2), str(path))
    assert "model.diffusion_model.label_emb.0.0.weight" in load_file(str(path))
    with pytest.raises(CheckpointError, match=r"tiny-sdxl\.safetensors' has UNet width 16, its configuration .*320"):
        inspect_checkpoint(str(path), "auto")  # recognised as SDXL; the shipped full-size config does not fit
    pipe, family, _name, _folder = load_single_file(str(path), str(folder), torch.float32)
    assert family == "sdxl" and isinstance(pipe, StableDiffusionXLPipeline)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(ref, name).state_dict(), getattr(pipe, name).state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
