"""The masks of one group of rows (one source), for the translator (docs/masks.md).

`RegionMasks.prepare` gives each row its mask: from the manifest (`mask` / `mask_bytes`, read under the
run's input policy, framed as the source), or found from the prompts (`mask_mode: auto`, cached in the
feature store), then dilated and feathered on the latent grid. A row whose mask cannot be used fails
alone; an empty mask (nothing to edit) warns. The sampler blends with `Region` (pnp/sampler.py), the
decoded images get the source's pixels pasted where asked, and OUT/masks/{id}.png keeps each mask as
applied (eval's background metrics and the reports read it).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from pnp_batch.errors import RowError
from pnp_batch.io import storage
from pnp_batch.io.images import decode_image, resize_source
from pnp_batch.io.inputs import open_row_input
from pnp_batch.io.rows import Row
from pnp_batch.mask_keys import AUTO_KEYS, MASK_SWEEP_KEYS
from pnp_batch.masks import frame
from pnp_batch.masks.auto import diffedit_maps, noise_seed, threshold
from pnp_batch.pnp.sampler import Region

MASKS_FOLDER = "masks"


@dataclass
class RowMask:
    """A row's mask as applied: on the latent grid (1, h, w) after dilation and feathering, and at output
    size; `full` when it edits everything (nothing to blend or paste: the unmasked run's bytes)."""

    latent: torch.Tensor
    pixels: np.ndarray
    blend_steps: int
    paste: bool
    full: bool
    warning: str | None = None


def setting(row: Row, cfg: Any, key: str) -> Any:
    """A mask key's value for a row: its sweep setting, else the pipeline's."""
    return row.overrides.get(key, getattr(cfg, key)) if key in MASK_SWEEP_KEYS else getattr(cfg, key)


def mask_uri(out: str, row_id: str) -> str:
    return storage.join(out, MASKS_FOLDER, f"{row_id}.png")


def write_mask(uri: str, mask: RowMask) -> None:
    """OUT/masks/{id}.png: the mask as applied, at output size (8-bit, 0 = kept)."""
    storage.write_bytes_atomic(uri, frame.mask_png(mask.pixels))


class RegionMasks:
    """Masks for a translator; `tr` gives the model, the conditioning, the feature store and counters."""

    def __init__(self, tr: Any) -> None:
        self.tr = tr
        self.cfg = tr.cfg

    def prepare(self, rows: list[Row], latents: torch.Tensor, feature_key: str, source_data: bytes | None,
                failed: Callable[[Row, str], dict]) -> tuple[list[Row], list[dict], dict[str, RowMask]]:
        """(rows still to translate, failed records of rows whose mask cannot be used, id -> mask)."""
        h, w = latents.shape[-2:]
        masks: dict[str, RowMask] = {}
        bad: list[dict] = []
        keep: list[Row] = []
        found = self._auto(rows, latents, feature_key) if self.cfg.mask_mode == "auto" else {}
        size = _image_size(source_data) if self.cfg.mask_mode == "manifest" else None
        for r in rows:
            try:
                if self.cfg.mask_mode == "manifest":
                    base, warning = self._given(r, size, h, w)
                else:
                    base, warning = found[r.id], None
            except RowError as e:
                if not r.companion:
                    bad.append(failed(r, str(e)))
                continue
            keep.append(r)
            shaped = frame.shape(base, int(setting(r, self.cfg, "mask_dilate")),
                                 int(setting(r, self.cfg, "mask_feather")))
            if warning is None and not bool(base.any()):
                warning = "mask is empty: nothing to edit (the source is kept)"
            full = bool((shaped >= 1).all())
            until = float(setting(r, self.cfg, "mask_blend_until"))
            masks[r.id] = RowMask(shaped, frame.to_pixels(shaped, 8 * h, 8 * w), round(until * self.cfg.steps),
                                  bool(setting(r, self.cfg, "mask_paste")), full, warning)
        return keep, bad, masks

    def _given(self, r: Row, source_size: tuple[int, int] | None, h: int, w: int) -> tuple[torch.Tensor, str | None]:
        if r.mask is None and r.mask_bytes is None:
            return torch.ones(1, h, w), "no mask given: the whole frame is edited"
        try:
            data = r.mask_bytes if r.mask_bytes is not None else open_row_input(r.mask, self.tr.policy)
        except FileNotFoundError:
            raise frame.MaskError(f"mask not found: {r.mask}") from None
        except RowError as e:
            raise frame.MaskError(f"mask {r.mask}: {e}") from None
        except Exception as e:  # noqa: BLE001 - the row fails with the reason
            raise frame.MaskError(f"mask {r.mask} unreadable: {type(e).__name__}: {e}") from None
        img = frame.read_mask(data, self.cfg.max_pixels)
        if source_size is None:
            raise frame.MaskError("the source's size is unknown: cannot frame its mask")
        pixels = frame.frame_mask(img, source_size, self.cfg.resolution, self.cfg.resize_mode)
        return frame.to_latent(pixels, h, w), None

    # -- automatic masks ---------------------------------------------------------------------
    def _auto_key(self, r: Row, feature_key: str) -> tuple[str, str]:
        """(cache key of the row's mask, seed key of its source's draws)."""
        settings = {k: setting(r, self.cfg, k) for k in AUTO_KEYS}
        seed_blob = json.dumps([feature_key, r.source_prompt, settings], sort_keys=True)
        blob = json.dumps(["diffedit-mask-v1", seed_blob, r.target_prompt], sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32], seed_blob

    def _auto(self, rows: list[Row], latents: torch.Tensor, feature_key: str) -> dict[str, torch.Tensor]:
        """Each row's found mask (1, h, w): from the feature store, else DiffEdit over the rows left, the
        rows of one source prompt and settings in one pass (their draws are shared)."""
        tr = self.tr
        out: dict[str, torch.Tensor] = {}
        todo: dict[str, list[tuple[Row, str]]] = {}
        for r in rows:
            key, seed_key = self._auto_key(r, feature_key)
            hit = tr.features.get(key)
            if hit is not None:
                out[r.id] = hit[0].float().reshape(1, *latents.shape[-2:])
                tr.counters.mask_cache_hits += 1
                continue
            todo.setdefault(seed_key, []).append((r, key))
        z0 = latents[-1].float()  # the stored latent of the last generation timestep: the clean source, nearly
        for seed_key, items in todo.items():
            first = items[0][0]
            src = tr.condition([first.source_prompt], latents.shape)
            tgt = tr.condition([r.target_prompt for r, _ in items], latents.shape)
            if tr.injector is not None:
                tr.injector.controller.disable()  # plain UNet calls: nothing injected
            maps, calls, elements = diffedit_maps(
                tr.models.unet, tr.models.scheduler_config, z0, src, tgt, float(setting(first, self.cfg, "mask_strength")),
                int(setting(first, self.cfg, "mask_samples")), noise_seed(seed_key), tr.max_batch,
                tr.models.prediction_type)
            tr.counters.mask_calls += calls
            tr.counters.mask_elements += elements
            for j, (r, key) in enumerate(items):
                m = threshold(maps[j : j + 1], float(setting(r, self.cfg, "mask_threshold")))[0].cpu()
                tr.counters.masks_found += 1
                tr.features.put(key, m.to(torch.uint8), {"kind": "diffedit-mask", "feature_key": feature_key})
                out[r.id] = m
        return out

    # -- after sampling ------------------------------------------------------------------------
    @staticmethod
    def region(rows: list[Row], masks: dict[str, RowMask], steps: int, device: torch.device) -> Region | None:
        """The sampler's blending for these rows (a group's, or a pack's rows of several sources), or None when
        no row blends. A row without a mask (a pack's filler) blends nowhere, as a full mask."""
        use = [masks.get(r.id) for r in rows]
        if all(m is None or m.full or m.blend_steps == 0 for m in use):
            return None
        ones = torch.ones_like(next(m.latent for m in use if m is not None))
        lat = torch.stack([ones if m is None else m.latent for m in use]).to(device)  # (K, 1, h, w)
        until = [0 if m is None or m.full else m.blend_steps for m in use]
        return Region.of(lat, until, steps)

    def paste(self, rows: list[Row], images: np.ndarray, masks: dict[str, RowMask], source_data: bytes | None) -> np.ndarray:
        """The images with the prepared source's pixels outside the masks of rows with `mask_paste`."""
        want = [j for j, r in enumerate(rows) if masks.get(r.id) is not None and masks[r.id].paste and not masks[r.id].full]
        if not want:
            return images
        if source_data is None:
            raise frame.MaskError("mask_paste needs the source's pixels")
        prepared = np.asarray(resize_source(decode_image(source_data, self.cfg.max_pixels), self.cfg.resolution,
                                            self.cfg.resize_mode).convert("RGB"))
        images = images.copy()
        for j in want:
            images[j] = frame.paste(images[j], prepared, masks[rows[j].id].pixels)
        return images



def _image_size(data: bytes | None) -> tuple[int, int] | None:
    """(width, height) of the source from its header, or None."""
    if data is None:
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception:  # noqa: BLE001 - an unreadable source already failed its rows
        return None
