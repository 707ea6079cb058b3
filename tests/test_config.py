"""Config: presets, overrides, and every bad value is an error with a message."""

from __future__ import annotations

import pytest

from pnp_batch.config import ConfigError, PipelineConfig, generation_timesteps, load_config, preset_names


def test_presets_load_and_reference_defaults():
    assert {"sd21-base", "sd21-base-reference", "sd15", "sd15-reference", "tiny"} <= set(preset_names())
    ref = load_config("sd21-base-reference")
    assert (ref.inversion_steps, ref.steps, ref.guidance_scale, ref.pnp_f_t, ref.pnp_attn_t) == (999, 50, 7.5, 0.8, 0.5)
    assert ref.inversion_prompt == "" and ref.negative_prompt == "ugly, blurry, black, low res, unrealistic"
    assert ref.resize_mode == "short_side" and ref.resolution == 512 and ref.quantize == "floor"
    assert ref.model == "stabilityai/stable-diffusion-2-1-base"
    assert load_config("sd21-base").inversion_steps == 50
    assert load_config("sd15-reference").model.endswith("stable-diffusion-v1-5")


def test_overrides_are_typed():
    cfg = load_config("tiny", ["steps=10", "inversion_steps=999", "pnp_f_t=0.5", "negative_prompt=", "batch_size=9"])
    assert (cfg.steps, cfg.inversion_steps, cfg.pnp_f_t, cfg.negative_prompt, cfg.batch_size) == (10, 999, 0.5, "", 9)
    assert load_config("tiny", {"guidance_scale": 5}).guidance_scale == 5.0


def test_generation_timesteps_match_sd():
    assert generation_timesteps(50)[:3] == [981, 961, 941] and generation_timesteps(50)[-1] == 1
    assert len(generation_timesteps(999)) == 999 and generation_timesteps(999)[0] == 999


@pytest.mark.parametrize(
    "override, message",
    [
        ("colour=red", "unknown pipeline key 'colour'"),
        ("inversion_steps=30", "do not contain the generation timesteps"),
        ("pnp_f_t=1.5", "pnp_f_t=1.5 must be a number from 0 to 1"),
        ("pnp_attn_t=-0.1", "pnp_attn_t=-0.1 must be a number from 0 to 1"),
        ("steps=0", "steps=0 must be a whole number from 1 to 1000"),
        ("resize_mode=crop", "resize_mode='crop' is not one of"),
        ("negative_prompt_mode=paper", "negative_prompt_mode='paper' is not one of"),
        ("resolution=100", "multiple of 8"),
        ("dtype=float8", "dtype='float8' is not one of"),
        ("guidance_scale=abc", "must be a number"),
        ("steps", "must be KEY=VALUE"),
        ("inversion_batch=0", "inversion_batch=0 must be a whole number from 1 to 64"),
        ("inversion_streams=0", "inversion_streams=0 must be a whole number from 1 to 16"),
    ],
)
def test_bad_config_is_an_error_with_a_message(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("tiny", [override])


def test_impossible_schedule_names_both():
    with pytest.raises(ConfigError) as e:
        load_config("sd21-base", ["steps=50", "inversion_steps=30"])
    assert "inversion_steps=30" in str(e.value) and "steps=50" in str(e.value)


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown pipeline 'nope'"):
        load_config("nope")
    bad = tmp_path / "p.yaml"
    bad.write_text("model: tiny\nsteps: 10\ninversion_steps: 10\nfoo: 1\n")
    with pytest.raises(ConfigError, match="unknown pipeline key 'foo'"):
        load_config(str(bad))


def test_config_hash_ignores_runtime_keys():
    a = load_config("tiny")
    assert a.hash() == a.replace(device="cpu", batch_size=5, inversion_streams=4).hash()
    assert a.hash() != a.replace(pnp_f_t=0.5).hash()
    assert isinstance(a, PipelineConfig)


@pytest.mark.parametrize("preset", preset_names())
def test_a_run_summarys_config_reads_back_as_the_same_config(preset):
    """`pnp-batch eval` rebuilds the run's config from OUT/runs/*.json: every key survives JSON (a LoRA
    list included) and the config hash is the same."""
    import json

    from pnp_batch.config import config_from_dict

    cfg = load_config(preset, ["lora=[style.safetensors:0.5]", "eval_clip_model=tiny-clip"])
    back = config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.hash() == cfg.hash()
