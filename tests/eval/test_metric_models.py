"""Loading the metric models: the tiny random-weight builds, local folders, and clear errors."""

from __future__ import annotations

import pytest
import torch

from pnp_batch.errors import UsageError
from pnp_batch.eval import models as eval_models
from pnp_batch.eval.models import load_metric_models
from pnp_batch.eval.tiny import TINY_CLIP, TINY_DINO, build_tiny, tiny_build_name, tiny_dir


def test_tiny_models_load_on_cpu_in_fp32_for_inference(metric_models):
    m = metric_models
    assert m.device == torch.device("cpu") and m.dtype == torch.float32
    assert (m.clip_model, m.dino_model) == (TINY_CLIP, TINY_DINO)
    assert m.clip_revision == tiny_build_name(TINY_CLIP) and m.dino_revision == tiny_build_name(TINY_DINO)
    for model in (m.clip, m.dino):
        assert not model.training
        assert all(not p.requires_grad for p in model.parameters())
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert m.dino.config.patch_size == 8 and m.dino.config.image_size == 224
    assert m.dino.pooler is None
    assert m.clip_processor.tokenizer.model_max_length == 77
    assert m.clip_processor.image_processor.crop_size == {"height": 224, "width": 224}


@pytest.mark.parametrize("name", [TINY_CLIP, TINY_DINO])
def test_tiny_builds_are_deterministic(tmp_path, name):
    """The same seed gives the same weights, build after build (and the cached build matches)."""
    from safetensors.torch import load_file

    first = load_file(build_tiny(name, tmp_path / "a") / "model.safetensors")
    second = load_file(build_tiny(name, tmp_path / "b") / "model.safetensors")
    cached = load_file(tiny_dir(name) / "model.safetensors")
    assert first.keys() == second.keys() == cached.keys()
    for key in first:
        assert torch.equal(first[key], second[key]) and torch.equal(first[key], cached[key]), key


def test_a_local_folder_loads_like_the_tiny_id(metric_models):
    from_folders = load_metric_models(str(tiny_dir(TINY_CLIP)), str(tiny_dir(TINY_DINO)), device="cpu")
    assert from_folders.clip_revision is None and from_folders.dino_revision is None
    for a, b in ((from_folders.clip, metric_models.clip), (from_folders.dino, metric_models.dino)):
        for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(p, q), name


@pytest.mark.parametrize("which", ["clip", "dino"])
def test_a_missing_path_is_a_usage_error_naming_it(tmp_path, which):
    missing = str(tmp_path / "no-such-model")
    ids = {"clip_id": TINY_CLIP, "dino_id": TINY_DINO, f"{which}_id": missing}
    with pytest.raises(UsageError) as err:
        load_metric_models(device="cpu", **ids)
    assert missing in str(err.value)
    assert which.upper() in str(err.value)


def test_a_folder_without_a_model_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="does not hold one") as err:
        load_metric_models(str(tmp_path), TINY_DINO, device="cpu")
    assert str(tmp_path) in str(err.value)


def test_an_unreachable_hub_id_is_a_usage_error_saying_what_to_do(monkeypatch):
    """Not in the local cache and the hub unreachable (simulated: no request is made)."""
    monkeypatch.setattr(eval_models, "hub_problem", lambda model, revision: ConnectionError("no network"))
    model_id = "nobody-here/not-a-cached-dino"
    with pytest.raises(UsageError) as err:
        load_metric_models(TINY_CLIP, model_id, device="cpu")
    message = str(err.value)
    assert model_id in message and "huggingface-cli download" in message and "tiny-dino" in message


def test_an_unknown_dtype_is_a_usage_error():
    with pytest.raises(UsageError, match="float64"):
        load_metric_models(TINY_CLIP, TINY_DINO, device="cpu", dtype="float64")
