"""LoRA adapters (`lora: [PATH_OR_ID[:SCALE], ...]`) on the tiny model.

The adapter is built here: peft LoRA layers with non-zero random weights on the tiny UNet's
attention projections and the text encoder's, saved with StableDiffusionPipeline.save_lora_weights
(diffusers' own file layout), then loaded back through the pipeline key.
"""

from __future__ import annotations

import copy
import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from pnp_batch.cli import main
from pnp_batch.config import load_config
from pnp_batch.io.features import feature_key
from pnp_batch.models.load import load_models
from pnp_batch.models.lora import LoraError, apply_loras, resolve_loras

FAST = {"steps": 4, "inversion_steps": 4, "resolution": 64}
FAST_SET = [a for k, v in FAST.items() for a in ("--set", f"{k}={v}")]


def _make_lora(tiny_model_dir: Path, out: Path, seed: int = 0) -> Path:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    te = CLIPTextModel.from_pretrained(tiny_model_dir, subfolder="text_encoder")
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    te = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
                                            init_lora_weights=False), te)
    StableDiffusionPipeline.save_lora_weights(
        out.parent, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(te)), weight_name=out.name)
    return out


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory, tiny_model_dir) -> Path:
    return _make_lora(tiny_model_dir, tmp_path_factory.mktemp("lora") / "style.safetensors")


def _png(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((64, 64), Image.BICUBIC).save(buf, "PNG")
    return buf.getvalue()


def _image(tmp_path: Path, models, cfg) -> np.ndarray:
    from pnp_batch.io.rows import Row
    from pnp_batch.translate.translator import Translator

    tr = Translator(cfg, str(tmp_path / f"out-{id(models)}"), models=models, worker="t")
    try:
        lat = tr.source_features_many([(_png(), "")])[0][0]
        images, _ = tr.translate(lat, [Row(0, "r0", None, b"", "", "a photo of a fox")])
    finally:
        tr.injector.remove()
    return images[0].astype(np.int16)


def _cfg(tiny_model_dir, lora: list[str] | None = None):
    return load_config("tiny", {"model": str(tiny_model_dir), "lora": lora or [], **FAST})


def test_lora_changes_the_image_and_scale_zero_is_no_lora(tmp_path, tiny_models, tiny_model_dir, lora_file):
    base = _image(tmp_path, tiny_models, _cfg(tiny_model_dir))
    with_lora = load_models(_cfg(tiny_model_dir, [f"{lora_file}:1.0"]))
    # fused: the UNet holds plain layers again, so PnP's processors and hooks see what they expect
    assert type(with_lora.unet.up_blocks[1].attentions[1].transformer_blocks[0].attn1.to_q) is torch.nn.Linear
    img = _image(tmp_path, with_lora, _cfg(tiny_model_dir, [f"{lora_file}:1.0"]))
    assert np.abs(img - base).mean() > 2.0
    zero = load_models(_cfg(tiny_model_dir, [f"{lora_file}:0"]))
    assert np.array_equal(_image(tmp_path, zero, _cfg(tiny_model_dir, [f"{lora_file}:0"])), base)
    for a, b in zip(zero.unet.state_dict().values(), tiny_models.unet.state_dict().values()):
        assert torch.equal(a, b)


def test_fused_equals_unfused_within_rounding(tiny_models, lora_file):
    """Fusing folds scale * B A into W once; unfused adds scale * B (A x) per call. Measured on the
    tiny model (fp32): UNet outputs differ by at most 2e-7 (float rounding); translated 64x64 images
    by at most 1 level (one channel of one pixel in 12,288; mean 0.0003 levels)."""
    specs = resolve_loras([f"{lora_file}:0.8"])
    outs = []
    g = torch.Generator().manual_seed(0)
    x, ids = torch.randn(2, 4, 8, 8, generator=g), torch.arange(12).view(1, 12).repeat(2, 1)
    for fuse in (True, False):
        unet, te = copy.deepcopy(tiny_models.unet), copy.deepcopy(tiny_models.text_encoder)
        apply_loras(unet, {"text_encoder": te}, specs, fuse=fuse)
        with torch.no_grad():
            outs.append(unet(x, 501, encoder_hidden_states=te(ids)[0]).sample)
    with torch.no_grad():
        plain = tiny_models.unet(x, 501, encoder_hidden_states=tiny_models.text_encoder(ids)[0]).sample
    diff = float((outs[0] - outs[1]).abs().max())
    assert diff < 1e-5, diff
    assert float((outs[0] - plain).abs().max()) > 1e-2  # the adapter did change the output


def test_fingerprint_feature_key_and_config_hash_follow_content_and_scale(tmp_path, tiny_model_dir, lora_file):
    copy_path = tmp_path / "copy of style.safetensors"
    shutil.copyfile(lora_file, copy_path)
    fp = {name: load_models(_cfg(tiny_model_dir, [spec])).fingerprint
          for name, spec in [("a", f"{lora_file}:0.8"), ("copy", f"{copy_path}:0.8"), ("scale", f"{lora_file}:0.5")]}
    cfgs = {"a": _cfg(tiny_model_dir, [f"{lora_file}:0.8"]), "copy": _cfg(tiny_model_dir, [f"{copy_path}:0.8"]),
            "scale": _cfg(tiny_model_dir, [f"{lora_file}:0.5"]), "none": _cfg(tiny_model_dir)}
    base_fp = load_models(cfgs["none"]).fingerprint
    assert fp["a"].startswith(base_fp + "+lora:sha256:") and fp["a"].endswith("@0.8")
    assert fp["a"] == fp["copy"] and fp["a"] != fp["scale"]

    def key(name: str) -> str:
        return feature_key("0" * 64, fp.get(name, base_fp), "float32", cfgs[name])

    assert key("a") == key("copy") and len({key("a"), key("scale"), key("none")}) == 3
    assert cfgs["a"].hash() == cfgs["copy"].hash()
    assert len({cfgs["a"].hash(), cfgs["scale"].hash(), cfgs["none"].hash()}) == 3
    # another file content under the same path: another fingerprint and config hash
    sd = load_file(str(copy_path))
    k = next(iter(sd))
    sd[k] = sd[k] * 2
    save_file(sd, str(copy_path))
    changed = _cfg(tiny_model_dir, [f"{copy_path}:0.8"])
    assert load_models(changed).fingerprint != fp["a"] and changed.hash() != cfgs["a"].hash()


def _broken(lora_file: Path, out: Path, how: str) -> Path:
    sd = load_file(str(lora_file))
    if how == "shape":
        k = next(k for k in sd if k.startswith("unet.") and ("lora_A" in k or "lora.down" in k))
        sd[k] = torch.zeros(sd[k].shape[0], sd[k].shape[1] * 2)
    elif how == "layer":
        sd = {k.replace("unet.up_blocks.3.", "unet.up_blocks.7."): v for k, v in sd.items()}
    else:  # not a LoRA at all
        sd = {"some.weight": torch.zeros(2, 2)}
    save_file(sd, str(out))
    return out


@pytest.mark.parametrize("how,reason", [("shape", r"input size 16, the adapter expects 32"),
                                        ("layer", r"layer unet\.up_blocks\.7\..* is not in it"),
                                        ("junk", r"not a LoRA adapter|could not be read as a LoRA")])
def test_a_lora_that_does_not_match_is_refused(tmp_path, tiny_models, lora_file, how, reason):
    bad = _broken(lora_file, tmp_path / f"bad-{how}.safetensors", how)
    unet, te = copy.deepcopy(tiny_models.unet), copy.deepcopy(tiny_models.text_encoder)
    before = [p.clone() for p in unet.parameters()]
    with pytest.raises(LoraError, match=rf"bad-{how}\.safetensors.*({reason})"):
        apply_loras(unet, {"text_encoder": te}, resolve_loras([str(bad)]))
    assert all(torch.equal(a, b) for a, b in zip(before, unet.parameters()))  # nothing was changed


def test_bad_lora_and_unrecognised_checkpoint_exit_2_before_any_work(tmp_path, tiny_model_dir, lora_file, capsys):
    (tmp_path / "src.png").write_bytes(_png())
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,image,target_prompt\nr0,src.png,a fox\n")
    bad_lora = _broken(lora_file, tmp_path / "mismatch.safetensors", "shape")
    odd_ckpt = tmp_path / "mystery.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
               "encoder.layers.0.weight": torch.zeros(2)}, str(odd_ckpt))
    cases = [(["--set", f"model={tiny_model_dir}", "--set", f"lora=[{bad_lora}:0.7]"], r"mismatch\.safetensors.*input size"),
             (["--set", f"model={odd_ckpt}"], r"mystery\.safetensors.*architecture not recognised"),
             (["--set", f"model={tmp_path / 'absent.safetensors'}"], r"absent\.safetensors.*does not exist")]
    for i, (args, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        rc = main(["run", str(manifest), "--out", str(out), "--pipeline", "tiny", "--no-report",
                   *FAST_SET, *args])
        err = capsys.readouterr().err
        assert rc == 2, err
        assert re.search(message, err), err
        assert not (out / "images").exists() and not (out / "results").exists()


def test_a_checkpoint_file_with_a_lora_runs_end_to_end(tmp_path, tiny_models, tiny_model_dir, lora_file):
    """`pnp-batch run` with model = a single-file checkpoint and a LoRA: the records name the model
    by content hash, configuration and adapter; a second run with a copy of the file reuses the features."""
    import pyarrow.dataset as ds
    from ldm_layout import to_ldm_checkpoint

    ckpt = tmp_path / "tiny.safetensors"
    save_file(to_ldm_checkpoint(tiny_models.unet, tiny_models.vae, tiny_models.text_encoder), str(ckpt))
    (tmp_path / "src.png").write_bytes(_png())
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,image,target_prompt\nr0,src.png,a fox\n")
    models = []
    for i, path in enumerate([ckpt, shutil.copyfile(ckpt, tmp_path / "copy.safetensors")]):
        rc = main(["run", str(manifest), "--out", str(tmp_path / f"out{i}"), "--pipeline", "tiny", "--no-report",
                   "--features", str(tmp_path / "features"), *FAST_SET, "--set", f"model={path}",
                   "--set", f"model_config={tiny_model_dir}", "--set", f"lora=[{lora_file}:0.5]"])
        assert rc == 0
        rec = ds.dataset(str(tmp_path / f"out{i}" / "results")).to_table().to_pylist()[0]
        assert rec["status"] == "ok" and rec["model"].startswith("file:sha256:") and "+lora:sha256:" in rec["model"]
        assert rec["feature_cache_hit"] is (i == 1)
        models.append(rec["model"])
    assert models[0] == models[1]


def test_a_hub_lora_that_is_not_available_offline_is_refused(tiny_models, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    specs = resolve_loras(["nobody/no-such-lora:0.5"])
    assert specs[0].identity == "hub:nobody/no-such-lora" and specs[0].scale == 0.5
    with pytest.raises(LoraError, match=r"'nobody/no-such-lora' could not be read as a LoRA adapter"):
        apply_loras(copy.deepcopy(tiny_models.unet), {"text_encoder": tiny_models.text_encoder}, specs)
    with pytest.raises(LoraError, match=r"'/no/such/file.safetensors' does not exist"):
        resolve_loras(["/no/such/file.safetensors:0.5"])


def test_configs_without_the_new_keys_keep_their_hash():
    """model_config and lora count in the config hash only when set: results made before they existed
    are not reported as made with another configuration."""
    import hashlib
    import json

    from pnp_batch.config import (
        EVAL_KEYS,  # the metric models score images, they never change them
        LAYER_KEYS,  # the injection layers count when set (docs/sweeps.md)
        POLICY_KEYS,  # which inputs may be read never changes an image (docs/inputs.md)
    )
    from pnp_batch.ip_keys import IP_KEYS  # count only with an adapter (docs/ip_adapter.md)
    from pnp_batch.mask_keys import MASK_KEYS  # count only with a mask_mode (docs/masks.md)

    for preset in ("tiny", "sd21-base", "sd15"):
        cfg = load_config(preset)
        d = cfg.to_dict()
        for k in ("name", "device", "batch_size", "inversion_batch", "inversion_streams", "compile", "channels_last",
                  "cuda_graphs", "cudnn_benchmark", "max_pixels", "model_config", "lora", *EVAL_KEYS, *LAYER_KEYS,
                  *POLICY_KEYS, *IP_KEYS, *MASK_KEYS, "sources_per_batch"):
            d.pop(k)
        assert cfg.hash() == hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
        assert cfg.replace(model_config="sd15").hash() != cfg.hash()
