"""The metric model keys: defaults, the tiny preset's offline models, --set, and not in the config hash."""

from __future__ import annotations

import pytest

from pnp_batch.config import ConfigError, config_from_dict, load_config, with_overrides
from pnp_batch.engines.evaluate import EVAL_SET_KEYS


def test_presets_keep_the_paper_models_and_tiny_scores_offline():
    for preset in ("sd21-base", "sd15", "sd21-base-reference"):
        cfg = load_config(preset)
        assert (cfg.eval_clip_model, cfg.eval_dino_model) == ("openai/clip-vit-large-patch14", "facebook/dino-vitb8")
        assert (cfg.eval_clip_revision, cfg.eval_dino_revision) == ("", "")
    tiny = load_config("tiny")
    assert (tiny.eval_clip_model, tiny.eval_dino_model) == ("tiny-clip", "tiny-dino")


def test_metric_keys_are_overridable_and_do_not_change_the_config_hash():
    base = load_config("sd21-base")
    other = load_config("sd21-base", ["eval_clip_model=/models/clip", "eval_dino_revision=0123abc",
                                      "eval_dino_model=facebook/dino-vits8"])
    assert other.eval_clip_model == "/models/clip" and other.eval_dino_revision == "0123abc"
    assert other.hash() == base.hash()
    assert load_config("sd21-base", ["eval_clip_revision=1e5"]).eval_clip_revision == "1e5"  # taken as written
    with pytest.raises(ConfigError, match="eval_clip_model"):
        load_config("sd21-base", ["eval_clip_model="])


def test_eval_set_takes_only_the_metric_keys_device_and_dtype():
    cfg = config_from_dict({**load_config("tiny").to_dict(), "a_key_from_a_newer_version": 1})
    assert with_overrides(cfg, ["eval_clip_model=x", "device=cpu"], EVAL_SET_KEYS).eval_clip_model == "x"
    with pytest.raises(ConfigError, match="only eval_clip_model"):
        with_overrides(cfg, ["pnp_f_t=0.5"], EVAL_SET_KEYS)
    with pytest.raises(ConfigError, match="unknown pipeline key"):
        with_overrides(cfg, ["eval_clip=x"], EVAL_SET_KEYS)
