"""The region-edit pipeline keys (docs/masks.md): their values, checked once at the edge.

`mask_mode` says where a row's mask comes from (`none`: no mask, today's bytes; `manifest`: the row's
`mask` / `mask_bytes` column; `auto`: found from the prompts, DiffEdit's recipe). The others say how it
is found (`mask_threshold`, `mask_strength`, `mask_samples`) and applied (`mask_blend_until`,
`mask_dilate`, `mask_feather` in latent pixels, `mask_paste`). All but `mask_mode` may be swept or set per
row by a sweep; none of them counts in the config hash while `mask_mode` is `none`.
"""

from __future__ import annotations

import math
from typing import Any

MASK_MODES = ("none", "manifest", "auto")
MASK_KEYS = ("mask_mode", "mask_threshold", "mask_strength", "mask_samples", "mask_blend_until", "mask_dilate",
             "mask_feather", "mask_paste")
# Keys a sweep may set per row (the mask's source, mask_mode, is the run's).
MASK_SWEEP_KEYS = MASK_KEYS[1:]
# Keys that decide an automatic mask (its cache key hashes them with the source's feature key and prompts).
AUTO_KEYS = ("mask_threshold", "mask_strength", "mask_samples")
MASK_SLUGS = {"mask_threshold": "mthr", "mask_strength": "mstr", "mask_samples": "msamp",
              "mask_blend_until": "muntil", "mask_dilate": "mdil", "mask_feather": "mfea", "mask_paste": "mpaste"}
_FRACTIONS = ("mask_threshold", "mask_strength", "mask_blend_until")
_COUNTS = {"mask_samples": 1, "mask_dilate": 0, "mask_feather": 0}  # key -> smallest value


class MaskKeyError(ValueError):
    """A mask key with a value it cannot take."""


def parse_mask_value(key: str, value: Any) -> Any:
    """One mask key's value as its type (text from --set / --sweep parsed), range-checked."""
    if key == "mask_mode":
        if value not in MASK_MODES:
            raise MaskKeyError(f"mask_mode={value!r} is not one of {', '.join(MASK_MODES)}")
        return value
    if key == "mask_paste":
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise MaskKeyError(f"mask_paste={value!r} must be true or false")
        return value
    if isinstance(value, str):
        try:
            value = float(value) if key in _FRACTIONS else int(value)
        except ValueError:
            raise MaskKeyError(f"{key}={value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MaskKeyError(f"{key}={value!r} must be a number")
    if key in _FRACTIONS:
        value = float(value)
        low_open = key == "mask_strength"  # the noise level: a timestep above 0
        if not math.isfinite(value) or value > 1 or value < 0 or (low_open and value == 0):
            raise MaskKeyError(f"{key}={value!r} must be in {'(0, 1]' if low_open else '[0, 1]'}")
        return value
    if key in _COUNTS:
        if float(value) != int(value) or int(value) < _COUNTS[key]:
            raise MaskKeyError(f"{key}={value!r} must be a whole number >= {_COUNTS[key]}")
        return int(value)
    raise MaskKeyError(f"unknown mask key {key!r}")


def check_mask_keys(values: dict[str, Any]) -> str | None:
    """Why the mask keys of a config cannot be used, or None."""
    for key in MASK_KEYS:
        try:
            parse_mask_value(key, values[key])
        except MaskKeyError as e:
            return str(e)
    return None


def mask_hash_part(values: dict[str, Any]) -> dict[str, Any]:
    """What the mask keys add to the config hash: nothing with `mask_mode: none` (hashes of configs without
    masks stay as they were), else every key."""
    if values.get("mask_mode", "none") == "none":
        return {}
    return {k: values[k] for k in MASK_KEYS}
