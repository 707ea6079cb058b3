"""features.py: keys, safetensors round trips (local and S3), corruption, concurrent writers."""

from __future__ import annotations

import json
import logging
import threading

import pytest
import torch

from pnp_batch.config import PipelineConfig
from pnp_batch.io import storage
from pnp_batch.io.features import FeatureStore, feature_key, key_fields

SHA = "ab" * 32


def key(**changes) -> str:
    return feature_key(SHA, "model-fp-1", "float32", PipelineConfig(**changes))


def test_feature_key_depends_on_inversion_settings_only() -> None:
    base = key()
    assert len(base) == 32 and base == key()
    for change in ({"resolution": 768}, {"resize_mode": "center_crop"}, {"inversion_steps": 999},
                   {"inversion_prompt": "a photo"}, {"steps": 25, "inversion_steps": 25}):
        assert key(**change) != base, change
    for change in ({"guidance_scale": 12.0}, {"pnp_f_t": 0.3}, {"pnp_attn_t": 0.9}, {"negative_prompt": "x"},
                   {"seed": 7}, {"output_format": "jpg"}, {"batch_size": 6}):
        assert key(**change) == base, change
    cfg = PipelineConfig()
    assert feature_key("cd" * 32, "model-fp-1", "float32", cfg) != base
    assert feature_key(SHA, "model-fp-2", "float32", cfg) != base
    assert feature_key(SHA, "model-fp-1", "float16", cfg) != base
    assert feature_key(SHA, "model-fp-1", torch.float32, cfg) == base  # type: ignore[arg-type]
    fields = key_fields(SHA, "model-fp-1", "float32", cfg)
    assert fields["generation_timesteps"][:2] == [981, 961]
    assert set(fields["inversion"]) == {"resolution", "resize_mode", "inversion_steps", "inversion_prompt", "steps"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_local(tmp_path, dtype: torch.dtype) -> None:
    store = FeatureStore(str(tmp_path / "features"))
    k = key()
    assert store.get(k) is None
    lat = torch.randn(51, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    uri = store.put(k, lat, {"image_sha256": SHA, "model": "model-fp-1"})
    assert uri == str(tmp_path / "features" / k[:2] / f"{k}.safetensors")
    got = store.get(k)
    assert got is not None
    t, meta = got
    assert t.dtype == dtype and t.shape == lat.shape and torch.equal(t, lat)
    assert meta == {"image_sha256": SHA, "model": "model-fp-1"}
    record = json.loads((tmp_path / "features" / k[:2] / f"{k}.json").read_text())
    assert record["shape"] == [51, 4, 8, 8] and record["dtype"] == str(dtype).replace("torch.", "")
    assert record["key"] == k and "created_at" in record and "pnp_batch_version" in record


def test_round_trip_s3(s3_bucket: str) -> None:
    store = FeatureStore(f"{s3_bucket}/feat")
    k = key(resolution=256)
    lat = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    assert store.put(k, lat, {}) == f"{s3_bucket}/feat/{k[:2]}/{k}.safetensors"
    t, _ = store.get(k)
    assert torch.equal(t, lat)
    assert storage.exists(f"{s3_bucket}/feat/{k[:2]}/{k}.json")


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "empty"])
def test_corrupt_object_is_a_miss_with_warning(tmp_path, caplog, damage: str) -> None:
    store = FeatureStore(str(tmp_path))
    k = key()
    store.put(k, torch.ones(4, 4, 8, 8), {})
    path = tmp_path / k[:2] / f"{k}.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-10] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) - 100]
    elif damage == "garbage":
        data = bytearray(b"\x00" * 64)
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="pnp_batch.io.features"):
        assert store.get(k) is None
    assert any("corrupt feature object" in r.getMessage() and "recomputing" in r.getMessage() for r in caplog.records)


def test_object_under_the_wrong_key_is_rejected(tmp_path) -> None:
    store = FeatureStore(str(tmp_path))
    k1, k2 = key(), key(resolution=256)
    store.put(k1, torch.zeros(2, 2), {})
    (tmp_path / k2[:2]).mkdir(exist_ok=True)
    (tmp_path / k2[:2] / f"{k2}.safetensors").write_bytes((tmp_path / k1[:2] / f"{k1}.safetensors").read_bytes())
    assert store.get(k2) is None


def test_concurrent_puts_leave_one_complete_object(tmp_path) -> None:
    store = FeatureStore(str(tmp_path))
    k = key()
    tensors = [torch.full((8, 4, 16, 16), float(i)) for i in range(2)]
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            barrier.wait()
            for _ in range(10):
                store.put(k, tensors[i], {"writer": i})
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    t, meta = store.get(k)
    assert torch.equal(t, tensors[meta["writer"]])
    assert [p.name for p in (tmp_path / k[:2]).iterdir() if p.name.startswith(".")] == []


def test_bad_key_rejected(tmp_path) -> None:
    with pytest.raises(ValueError, match="32 lowercase hex"):
        FeatureStore(str(tmp_path)).get("../../etc/passwd")
