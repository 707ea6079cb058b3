"""The IP-Adapter keys and manifest columns, without a model: values, hashes, ids, family defaults."""

from __future__ import annotations

from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pnp_batch.config import ConfigError, load_config
from pnp_batch.io.manifest import derive_id, open_manifest
from pnp_batch.io.sweep import parse_sweeps
from pnp_batch.models.ip_adapter import IPAdapterError, locate


def test_scale_takes_a_float_or_the_per_block_form():
    assert load_config("tiny", ["ip_adapter=tiny", "ip_adapter_scale=0.6"]).ip_adapter_scale == 0.6
    cfg = load_config("tiny", ['ip_adapter_scale={"up": {"block_1": [0, 1, 0]}}', "ip_adapter=tiny"])
    assert cfg.ip_adapter_scale == {"up": {"block_1": [0.0, 1.0, 0.0]}}
    for bad in ("high", '{"left": 1}', '{"up": {"b1": 1}}', '{"up": {"block_1": ["x"]}}', "nan"):
        with pytest.raises(ConfigError, match="ip_adapter_scale"):
            load_config("tiny", ["ip_adapter=tiny", f"ip_adapter_scale={bad}"])
    with pytest.raises(ConfigError, match="ip_adapter_weight_name is set but ip_adapter is not"):
        load_config("tiny", ["ip_adapter_weight_name=x.safetensors"])


def test_keys_enter_the_hash_only_with_an_adapter():
    plain = load_config("tiny")
    assert load_config("tiny", ["ip_adapter_scale=0.3"]).hash() == plain.hash()  # no adapter: unchanged
    with_ip = load_config("tiny", ["ip_adapter=tiny"])
    assert with_ip.hash() != plain.hash()
    assert load_config("tiny", ["ip_adapter=tiny", "ip_adapter_scale=0.5"]).hash() != with_ip.hash()


def test_manifest_columns_and_ids(tmp_path):
    rows = [{"image": "a.png", "target_prompt": "a fox"},
            {"image": "a.png", "target_prompt": "a fox", "ip_image": "look.png"},
            {"image": "a.png", "target_prompt": "a fox", "ip_image": "look.png", "ip_adapter_scale": 0.5},
            {"image": "a.png", "target_prompt": "a fox", "ip_image_bytes": b"\x89PNG..."},
            {"image": "a.png", "target_prompt": "a fox", "ip_image": "look.png", "ip_adapter_scale": "up"}]
    schema = pa.schema([("image", pa.string()), ("target_prompt", pa.string()), ("ip_image", pa.string()),
                        ("ip_image_bytes", pa.binary()), ("ip_adapter_scale", pa.string())])
    for r in rows:
        if "ip_adapter_scale" in r:
            r["ip_adapter_scale"] = str(r["ip_adapter_scale"])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "m.parquet")
    m = open_manifest(str(tmp_path / "m.parquet"))
    got = list(m.iter_rows())
    assert got[0].id == derive_id("a.png", "", "a fox", {})  # rows without an image prompt keep their ids
    assert len({r.id for r in got}) == 5
    assert got[0].ip_image is None and got[0].ip_image_bytes is None and not m.extra_columns
    assert got[1].ip_image == str(tmp_path / "look.png")
    assert got[2].overrides["ip_adapter_scale"] == 0.5
    assert got[3].ip_image_bytes == b"\x89PNG..."
    assert got[4].error and "ip_adapter_scale" in got[4].error


def test_scale_is_sweepable():
    sweep = parse_sweeps(["ip_adapter_scale=0,0.5,1"], load_config("tiny", ["ip_adapter=tiny"]))
    assert [o["ip_adapter_scale"] for _, o in sweep.points()] == [0.0, 0.5, 1.0]


def _unet(cross_dim: int):
    return SimpleNamespace(config=SimpleNamespace(cross_attention_dim=cross_dim))


def test_hub_id_picks_the_family_adapter_or_names_the_available_ones():
    cfg = load_config("tiny", ["ip_adapter=h94/IP-Adapter"])
    assert locate(cfg, _unet(768)).weight_name == "ip-adapter_sd15.safetensors"
    loc = locate(cfg, _unet(2048))
    assert (loc.subfolder, loc.weight_name, loc.local) == ("sdxl_models", "ip-adapter_sdxl.safetensors", False)
    with pytest.raises(IPAdapterError, match="SD 2.x.*SD 1.5.*SDXL"):
        locate(cfg, _unet(1024))
    with pytest.raises(IPAdapterError, match="does not exist"):
        locate(load_config("tiny", ["ip_adapter=/nowhere/adapter.safetensors"]), _unet(768))
