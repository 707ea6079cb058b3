"""FeatureKey and FeatureStore: inverted latents as safetensors objects in any storage.

A feature key hashes exactly what changes the stored inversion, so any later run with the same
source and settings reuses it, whatever its target prompts, guidance or PnP thresholds:

* ``image_sha256`` — sha256 of the source image's encoded bytes;
* ``model`` — the model fingerprint (weights identity and revision, from the model loader);
* ``dtype`` — the compute dtype the inversion ran in;
* ``inversion`` — the values of :data:`pnp_batch.config.INVERSION_KEYS`
  (resolution, resize_mode, inversion_steps, inversion_prompt, steps);
* ``generation_timesteps`` — :func:`pnp_batch.config.generation_timesteps` of ``steps``.

Objects live at ``{root}/{key[:2]}/{key}.safetensors`` (tensor ``latents`` plus metadata with the
key and the sha256 of the tensor bytes, checked on every read) and ``{key}.json`` next to it, a
small human-readable record of what produced it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
import struct
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pnp_batch import __version__
from pnp_batch.config import INVERSION_KEYS, PipelineConfig, generation_timesteps
from pnp_batch.io import storage

logger = logging.getLogger(__name__)

FORMAT = "pnp-batch-features/1"
TENSOR_NAME = "latents"
_KEY_RE = re.compile(r"[0-9a-f]{32}")
MISSING = "missing"  # FeatureStore.lookup: no object under the key
CORRUPT = "corrupt"  # FeatureStore.lookup: an object that fails its checks (to recompute)


def key_fields(image_sha256: str, model_fingerprint: str, dtype: str, cfg: PipelineConfig) -> dict[str, Any]:
    """The fields a feature key hashes (see the module docstring)."""
    return {
        "format": FORMAT,
        "image_sha256": image_sha256,
        "model": model_fingerprint,
        "dtype": str(dtype).replace("torch.", ""),
        "inversion": {k: getattr(cfg, k) for k in INVERSION_KEYS},
        "generation_timesteps": list(generation_timesteps(cfg.steps)),
    }


def feature_key(image_sha256: str, model_fingerprint: str, dtype: str, cfg: PipelineConfig) -> str:
    """First 32 hex chars of sha256 over the canonical JSON of :func:`key_fields`."""
    blob = json.dumps(
        key_fields(image_sha256, model_fingerprint, dtype, cfg), sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def _tensor_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


class FeatureStore:
    """Inverted latents keyed by :func:`feature_key`, under ``root_uri`` (local folder or prefix)."""

    def __init__(self, root_uri: str) -> None:
        self.root_uri = root_uri

    def __repr__(self) -> str:
        return f"FeatureStore({storage.redact(self.root_uri)!r})"

    def uri(self, key: str) -> str:
        _check_key(key)
        return storage.join(self.root_uri, key[:2], f"{key}.safetensors")

    def record_uri(self, key: str) -> str:
        _check_key(key)
        return storage.join(self.root_uri, key[:2], f"{key}.json")

    def get(self, key: str) -> tuple[torch.Tensor, dict[str, Any]] | None:
        """The stored latents and their metadata, or None when absent or corrupt (see :meth:`lookup`)."""
        found = self.lookup(key)
        return found if isinstance(found, tuple) else None

    def lookup(self, key: str) -> tuple[torch.Tensor, dict[str, Any]] | str:
        """The stored latents and their metadata, or :data:`MISSING`, or :data:`CORRUPT` (a truncated or
        damaged object: warned here, once per read, so a caller that read it ahead must not read it again).

        Storage errors other than "not found" propagate (after the storage layer's retries).
        """
        uri = self.uri(key)
        try:
            data = storage.read_bytes(uri)
        except FileNotFoundError:
            return MISSING
        try:
            return _decode(data, key)
        except Exception as e:  # noqa: BLE001 - any parse or check failure means a corrupt object
            logger.warning("corrupt feature object %s (%s), recomputing", storage.redact(uri), e)
            return CORRUPT

    def put(self, key: str, latents: torch.Tensor, meta: dict[str, Any] | None = None) -> str:
        """Store ``latents`` (on CPU, dtype kept) with one atomic write, then the JSON record."""
        meta = dict(meta or {})
        t = latents.detach().to("cpu").contiguous()
        digest = hashlib.sha256(_tensor_bytes(t)).hexdigest()
        st_meta = {
            "format": FORMAT,
            "key": key,
            "sha256": digest,
            "meta": json.dumps(meta, sort_keys=True, default=str),
        }
        data = st_save({TENSOR_NAME: t}, metadata=st_meta)
        uri = self.uri(key)
        storage.write_bytes_atomic(uri, data, wait=False)  # a refused feature write only warns: no pause
        record = {
            "key": key,
            **meta,
            "shape": list(t.shape),
            "dtype": str(t.dtype).replace("torch.", ""),
            "sha256": digest,
            "bytes": len(data),
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
            "pnp_batch_version": __version__,
        }
        storage.write_text_atomic(
            self.record_uri(key), json.dumps(record, indent=2, sort_keys=True, default=str) + "\n", wait=False
        )
        return uri

    def exists(self, key: str) -> bool:
        return storage.exists(self.uri(key))


def _check_key(key: str) -> None:
    if not _KEY_RE.fullmatch(key):
        raise ValueError(f"feature key {key!r} is not 32 lowercase hex chars")


def _header(data: bytes) -> dict[str, Any]:
    if len(data) < 8:
        raise ValueError(f"truncated ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError("truncated header")
    return json.loads(data[8:8 + n])


def _decode(data: bytes, key: str) -> tuple[torch.Tensor, dict[str, Any]]:
    header = _header(data)
    meta = header.get("__metadata__") or {}
    if meta.get("key") != key:
        raise ValueError(f"object holds key {meta.get('key')!r}, not {key!r}")
    if TENSOR_NAME not in header:
        raise ValueError(f"no tensor named {TENSOR_NAME!r}")
    start, end = header[TENSOR_NAME]["data_offsets"]
    base = 8 + struct.unpack("<Q", data[:8])[0]
    if base + end > len(data):
        raise ValueError("truncated data")
    if hashlib.sha256(data[base + start:base + end]).hexdigest() != meta.get("sha256"):
        raise ValueError("sha256 of the tensor bytes does not match")
    tensors = st_load(data)
    t = tensors[TENSOR_NAME]
    extra = json.loads(meta.get("meta") or "{}")
    return t, extra
