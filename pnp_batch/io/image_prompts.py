"""A manifest row's image prompt (IP-Adapter runs, docs/ip_adapter.md): the `ip_image` / `ip_image_bytes`
/ `ip_adapter_scale` columns read into a Row, and the one function that reads an image prompt's URI."""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
from typing import Any

from pnp_batch.io import storage
from pnp_batch.ip_keys import IP_SCALE, IPScaleError, parse_ip_scale, scale_key


def ip_fields(rec: dict[str, Any], base_dir: str) -> tuple[str | None, bytes | None, list[str]]:
    """(ip_image resolved against the manifest's folder, ip_image_bytes, problems) of a manifest record."""
    return file_fields(rec, base_dir, "ip_image")


def file_fields(rec: dict[str, Any], base_dir: str, name: str) -> tuple[str | None, bytes | None, list[str]]:
    """(`name` resolved against the manifest's folder, `name`_bytes, problems) of a manifest record: a
    file a row names besides its source (an image prompt, a mask), as a URI or as bytes (base64 text in
    CSV / JSON Lines)."""
    problems: list[str] = []
    uri = rec.get(name) or None
    raw = rec.get(f"{name}_bytes")
    data: bytes | None = None
    if isinstance(raw, str):
        try:
            data = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            problems.append(f"{name}_bytes is text but not base64")
    elif raw is not None:
        data = bytes(raw)
    if uri is not None and data is not None:
        problems.append(f"{name} and {name}_bytes are both set: give one")
    return (storage.resolve(base_dir, uri) if uri is not None else None), data, problems


def file_id_part(rec: dict[str, Any], name: str) -> str | None:
    """What a file column adds to a derived id: the URI as written or the sha256 of its bytes; None
    when the row has neither (ids of manifests without the column stay as they were)."""
    uri = rec.get(name) or None
    raw = rec.get(f"{name}_bytes")
    if raw is not None:
        return "sha256:" + hashlib.sha256(raw.encode() if isinstance(raw, str) else bytes(raw)).hexdigest()
    return uri


def ip_scale_override(rec: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The row's `ip_adapter_scale` override ({} when absent or NaN), or why it is unusable."""
    v = rec.get(IP_SCALE)
    if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
        return {}, []
    try:
        return {IP_SCALE: parse_ip_scale(v)}, []
    except IPScaleError as e:
        return {}, [str(e)]


def ip_id_part(rec: dict[str, Any], overrides: dict[str, Any]) -> list[Any] | None:
    """What a row's image prompt adds to its derived id: None for a row without one (ids of manifests
    without image prompts stay as they were), else the ip_image as written (or the sha256 of its bytes)
    and the scale override."""
    uri = rec.get("ip_image") or None
    raw = rec.get("ip_image_bytes")
    scale = overrides.get(IP_SCALE)
    written = rec.get(IP_SCALE)  # as written when it is unusable: such a row keeps an id of its own
    if scale is None and isinstance(written, str) and written:
        scale = written
    if uri is None and raw is None and scale is None:
        return None
    ref = uri
    if raw is not None:
        ref = "sha256:" + hashlib.sha256(raw.encode() if isinstance(raw, str) else bytes(raw)).hexdigest()
    return [ref, scale_key(scale) if scale is not None else None]
