"""tiny-sdxl: SDXL base's topology, built deterministically, loaded through the same code as a real SDXL
folder; SDXL refiner and inpainting folders are refused before any work, naming the model and why."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from pnp_batch.config import load_config
from pnp_batch.models.load import ModelLoadError, load_models
from pnp_batch.models.tiny_sdxl import make_tiny_sdxl


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_tiny_sdxl_has_sdxl_topology_and_is_deterministic(tiny_sdxl_dir, tmp_path):
    again = make_tiny_sdxl(tmp_path / "again")
    assert _digest(again) == _digest(tiny_sdxl_dir)  # same seed, same bytes
    index = json.loads((tiny_sdxl_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder"][1] == "CLIPTextModel" and index["text_encoder_2"][1] == "CLIPTextModelWithProjection"
    unet = json.loads((tiny_sdxl_dir / "unet" / "config.json").read_text())
    assert unet["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert unet["up_block_types"] == ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    assert unet["transformer_layers_per_block"] == [1, 2, 10] and unet["layers_per_block"] == 2
    assert unet["addition_embed_type"] == "text_time"
    te2 = json.loads((tiny_sdxl_dir / "text_encoder_2" / "config.json").read_text())
    te1 = json.loads((tiny_sdxl_dir / "text_encoder" / "config.json").read_text())
    # 6 time ids x addition_time_embed_dim + the pooled embedding; text widths concatenated
    assert unet["projection_class_embeddings_input_dim"] == 6 * unet["addition_time_embed_dim"] + te2["projection_dim"]
    assert unet["cross_attention_dim"] == te1["hidden_size"] + te2["hidden_size"]
    assert json.loads((tiny_sdxl_dir / "vae" / "config.json").read_text())["scaling_factor"] == 0.13025
    sched = json.loads((tiny_sdxl_dir / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["timestep_spacing"], sched["steps_offset"], sched["set_alpha_to_one"]) == ("leading", 1, False)


def test_name_and_folder_load_alike(tiny_sdxl_dir, tiny_sdxl_models):
    by_name = load_models(load_config("tiny-sdxl", {"device": "cpu"}))
    for m in (by_name, tiny_sdxl_models):
        assert m.architecture == "sdxl" and m.is_test_model
        assert type(m.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
        assert m.tokenizer_2.pad_token == "!" and m.tokenizer.pad_token == "<|endoftext|>"
        assert m.fingerprint.startswith("sdxl|")  # the architecture is part of the feature key
    assert torch.equal(by_name.unet.conv_out.weight, tiny_sdxl_models.unet.conv_out.weight)


def test_vae_stays_float32_when_the_model_runs_in_float16(tiny_sdxl_dir, tiny_model_dir):
    m = load_models(load_config("tiny-sdxl", {"model": str(tiny_sdxl_dir), "device": "cpu", "dtype": "float16"}))
    assert m.unet.dtype == torch.float16 and m.text_encoder_2.dtype == torch.float16
    assert m.vae.dtype == torch.float32  # force_upcast: SDXL's VAE overflows in fp16
    sd = load_models(load_config("tiny", {"model": str(tiny_model_dir), "device": "cpu", "dtype": "float16"}))
    assert sd.vae.dtype == torch.float16  # SD's VAE is left as it was


def _variant(tiny_sdxl_dir: Path, tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    shutil.copytree(tiny_sdxl_dir, folder)
    return folder


def _edit_index(folder: Path, **changes) -> None:
    path = folder / "model_index.json"
    index = json.loads(path.read_text())
    index.update(changes)
    path.write_text(json.dumps(index))


def test_refiner_folder_is_refused_naming_it(tiny_sdxl_dir, tmp_path):
    refiner = _variant(tiny_sdxl_dir, tmp_path, "refiner")
    # what the refiner's model_index.json says: no first text encoder, an aesthetic-score condition
    _edit_index(refiner, _class_name="StableDiffusionXLImg2ImgPipeline", text_encoder=[None, None],
                tokenizer=[None, None], requires_aesthetics_score=True)
    shutil.rmtree(refiner / "text_encoder")
    with pytest.raises(ModelLoadError, match=r"refiner.*requires_aesthetics_score") as e:
        load_models(load_config("tiny-sdxl", {"model": str(refiner), "device": "cpu"}))
    assert str(refiner) in str(e.value)


def test_inpainting_folders_are_refused_naming_them(tiny_sdxl_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    named = _variant(tiny_sdxl_dir, tmp_path, "inpaint-named")
    _edit_index(named, _class_name="StableDiffusionXLInpaintPipeline")
    with pytest.raises(ModelLoadError, match=r"inpainting pipeline \(StableDiffusionXLInpaintPipeline\)"):
        load_models(load_config("tiny-sdxl", {"model": str(named), "device": "cpu"}))
    # a folder that does not say so, but whose UNet takes latents + mask + masked image
    nine = _variant(tiny_sdxl_dir, tmp_path, "inpaint-unet")
    cfg = UNet2DConditionModel.load_config(str(nine / "unet"))
    cfg["in_channels"] = 9
    shutil.rmtree(nine / "unet")
    UNet2DConditionModel.from_config(cfg).save_pretrained(nine / "unet")
    with pytest.raises(ModelLoadError, match=r"inpaint-unet.*9 input channels: an inpainting UNet"):
        load_models(load_config("tiny-sdxl", {"model": str(nine), "device": "cpu"}))


def test_bench_sdxl_configs_are_sdxl_base_at_full_size():
    """`bench --arch sdxl` builds SDXL base from its configs written in code (models/archs.py): on the
    meta device (no memory), the parameter counts are the published model's, exactly."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from pnp_batch.models.archs import SDXL_CONFIG
    from pnp_batch.models.tiny_sdxl import sdxl_unet

    with torch.device("meta"):
        unet = sdxl_unet(**SDXL_CONFIG["unet"])
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **SDXL_CONFIG["text"]))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77,
                                                            **SDXL_CONFIG["text_2"]))
    count = {name: sum(p.numel() for p in m.parameters()) for name, m in
             (("unet", unet), ("text", text), ("text_2", text_2))}
    assert count == {"unet": 2_567_463_684, "text": 123_060_480, "text_2": 694_659_840}
    assert unet.config.projection_class_embeddings_input_dim == 2816  # 6 x 256 + 1280
    assert [len(a.transformer_blocks) for a in unet.up_blocks[0].attentions] == [10, 10, 10]
