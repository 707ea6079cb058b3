"""The IP-Adapter pipeline keys (docs/ip_adapter.md): their values, checked once at the edge.

`ip_adapter` names the adapter ("" = none; `tiny` = the offline test adapter of `tiny`/`tiny-sdxl`; a hub
id, a local folder or a weight file), `ip_adapter_weight_name` / `ip_adapter_subfolder` /
`ip_adapter_image_encoder` say where in it diffusers' `load_ip_adapter` finds the weights and the image
encoder, and `ip_adapter_scale` is a float or diffusers' per-block form (`{"up": {"block_0": [0.0, 1.0,
0.0]}}`), which a manifest row or a sweep may override for its row.
"""

from __future__ import annotations

import json
import math
from typing import Any

import yaml

IP_KEYS = ("ip_adapter", "ip_adapter_weight_name", "ip_adapter_subfolder", "ip_adapter_image_encoder",
           "ip_adapter_scale")
# Keys whose --set values are taken as written (paths and names, not YAML).
IP_LITERAL_KEYS = IP_KEYS[:4]
IP_SCALE = "ip_adapter_scale"
_BLOCK_PARTS = ("down", "mid", "up")


class IPScaleError(ValueError):
    """An `ip_adapter_scale` value of the wrong form."""


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise IPScaleError(f"{where}={value!r} must be a finite number")
    return float(value)


def parse_ip_scale(value: Any) -> float | dict[str, Any]:
    """A scale as a float or diffusers' per-block dict (numbers made floats); YAML/JSON text is parsed.
    Only the form is checked here; which blocks exist is checked against the loaded UNet."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise IPScaleError(f"ip_adapter_scale={value!r} is neither a number nor a mapping: {e}") from None
    if not isinstance(value, dict):
        return _number(value, "ip_adapter_scale")
    out: dict[str, Any] = {}
    for part, spec in value.items():
        if part not in _BLOCK_PARTS:
            raise IPScaleError(f"ip_adapter_scale: unknown part {part!r}; parts are {', '.join(_BLOCK_PARTS)}")
        if part == "mid" or not isinstance(spec, dict):
            out[part] = _number(spec, f"ip_adapter_scale.{part}")
            continue
        blocks: dict[str, Any] = {}
        for block, layers in spec.items():
            where = f"ip_adapter_scale.{part}.{block}"
            if not (isinstance(block, str) and block.startswith("block_") and block[6:].isdigit()):
                raise IPScaleError(f"{where}: blocks are named block_0, block_1, ...")
            blocks[block] = [_number(v, where) for v in layers] if isinstance(layers, list) else _number(layers, where)
        out[part] = blocks
    return out


def scale_key(scale: float | dict[str, Any]) -> str:
    """A canonical text of a scale (cache keys, hashes)."""
    return json.dumps(scale, sort_keys=True)


def check_ip_keys(values: dict[str, Any]) -> str | None:
    """Why the IP-Adapter keys of a config cannot be used, or None."""
    for key in IP_LITERAL_KEYS:
        if not isinstance(values[key], str):
            return f"{key}={values[key]!r} must be a string"
    try:
        parse_ip_scale(values[IP_SCALE])
    except IPScaleError as e:
        return str(e)
    if values["ip_adapter_weight_name"] and not values["ip_adapter"]:
        return "ip_adapter_weight_name is set but ip_adapter is not: name the adapter (hub id, folder or file)"
    return None


def ip_hash_part(values: dict[str, Any]) -> dict[str, Any]:
    """What the IP-Adapter keys add to the config hash: nothing when no adapter is set (hashes of configs
    without one stay as they were), else every key (the scale canonical)."""
    if not values.get("ip_adapter"):
        return {}
    return {k: (scale_key(values[k]) if k == IP_SCALE else values[k]) for k in IP_KEYS}
