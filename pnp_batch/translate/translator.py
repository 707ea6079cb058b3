"""Translator: holds one loaded model; turns a group of rows (one source image) into results."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from pnp_batch.config import PipelineConfig, generation_timesteps
from pnp_batch.errors import UsageError
from pnp_batch.io import storage
from pnp_batch.io.features import FeatureStore
from pnp_batch.io.images import encode_image
from pnp_batch.io.inputs import open_row_input
from pnp_batch.io.policy import InputPolicy
from pnp_batch.io.records import resolve, row_record
from pnp_batch.io.rows import Row
from pnp_batch.masks.group import RegionMasks, RowMask, write_mask
from pnp_batch.models.load import Models, load_models
from pnp_batch.models.tiny import TEST_MODEL_NOTE
from pnp_batch.pnp.conditioning import TextCond
from pnp_batch.pnp.graphs import GraphedUNet, base_unet
from pnp_batch.pnp.injection import PnPController, PnPInjector
from pnp_batch.pnp.layers import InjectionPoints, injection_points
from pnp_batch.pnp.packs import PackController
from pnp_batch.pnp.sampler import Target, blend_alphas, pnp_sample
from pnp_batch.translate.finish import Feats, submit_rows, usable_rows
from pnp_batch.translate.image_prompts import ImagePrompts
from pnp_batch.translate.outputs import row_message, to_uint8
from pnp_batch.translate.pack_plan import pack_size
from pnp_batch.translate.packs import start_pack
from pnp_batch.translate.sizing import auto_batch_size
from pnp_batch.translate.sources import SourceFeatures
from pnp_batch.translate.text import prompt_encoder

log = logging.getLogger(__name__)

VAE_DECODE_PIXEL_BYTES = 2**24  # output pixels x VAE dtype size per decode call (see Translator.decode)

# Targets sampled in one loop with one source branch (a sweep's grid); a bigger group runs in loops of
# this many, each with its own source branch (1 element per step in 2 x 256: nothing), so the latents
# held stay bounded whatever the grid.
MAX_TARGETS_PER_LOOP = 256

@dataclass
class Counters:
    """UNet work done by this translator, counted in calls and batch elements."""

    invert_calls: int = 0
    invert_elements: int = 0
    sample_calls: int = 0
    sample_elements: int = 0
    source_elements: int = 0
    inversions: int = 0
    cache_hits: int = 0
    image_encodes: int = 0  # IP-Adapter image encoder runs: one per distinct image prompt
    mask_calls: int = 0  # mask_mode auto (masks/auto.py): UNet calls and batch elements finding masks
    mask_elements: int = 0
    masks_found: int = 0  # masks computed; mask_cache_hits: read from the feature store instead
    mask_cache_hits: int = 0


class Translator(SourceFeatures):
    """One model on one device; `process(rows)` translates a group sharing one source image."""

    def __init__(
        self,
        cfg: PipelineConfig,
        out_uri: str,
        features_uri: str | None = None,
        worker: str | None = None,
        models: Models | None = None,
        evaluate: bool = False,
        layer_settings: Iterable[tuple[tuple[str, ...] | None, tuple[str, ...] | None]] = (),
        policy: InputPolicy | None = None,
    ) -> None:
        self.cfg = cfg
        # what rows may read (io/policy.py); None only for trusted callers (the bench)
        self.policy = policy
        self.out = out_uri
        self.features = FeatureStore(features_uri or storage.join(out_uri, "features"))
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}"
        self.models = models or load_models(cfg)
        # run --eval: the metric models load once here too, on the same device; each row is scored from
        # its decoded image in memory and its source as preprocessed (see _scores)
        self.scorer = None
        if evaluate:
            from pnp_batch.eval.score import load_scorer

            self.scorer = load_scorer(cfg, device=str(self.models.device))
        # the injection points of the pipeline's layer setting, and of every other one this run will use
        # (a sweep's), checked now: no table for this UNet, or a layer it lacks, stops before any work
        self._points: dict[tuple, InjectionPoints] = {}
        self.points = self.injection_points(cfg.pnp_feature_blocks, cfg.pnp_attn_layers)
        for feature_blocks, attn_layers in layer_settings:
            self.injection_points(feature_blocks, attn_layers)
        self.injector = PnPInjector(self.models.unet, self.points)
        # image prompts (an IP-Adapter loaded with the model): translate/image_prompts.py
        self.image_prompts = ImagePrompts(self.models.ip_adapter, self.models.unet, cfg.max_pixels,
                                          cfg.ip_adapter_scale, self.policy) if self.models.ip_adapter is not None else None
        # region edits (masks/group.py): None with mask_mode none (the whole frame, today's bytes)
        self.masks = RegionMasks(self) if cfg.mask_mode != "none" else None
        self.text = prompt_encoder(self.models)  # the architecture's prompt conditioning (translate/text.py)
        self.counters = Counters()
        self.timesteps = generation_timesteps(cfg.steps)
        self._emb: dict[str, TextCond] = {}
        self._write_pool: ThreadPoolExecutor | None = None
        self._feature_writes: dict[str, tuple[torch.Tensor, Future]] = {}  # key -> (latents, write)
        self._prefetched: dict[str, tuple[torch.Tensor, dict] | None] = {}  # key -> features read ahead (None: corrupt)
        self._digests: dict[int, tuple[bytes, str]] = {}  # id(source bytes) -> (the bytes, sha256), from prefetch
        self.max_batch = self._max_batch()
        self.pack = pack_size(cfg)  # sources per UNet call (sources_per_batch, translate/packs.py)
        # Sources inverted per UNet call. On a GPU one image leaves the UNet call half idle, so 4 cost
        # 1.8 times 1 (H100); calls are padded to that size (source_features_many), but whether a
        # source's bits then stay the same whatever shares its call is verified per device (not on
        # this CPU): 1, the default, keeps outputs byte-reproducible everywhere.
        self.inversion_batch = cfg.inversion_batch
        on_cuda = self.models.device.type == "cuda"
        # inversion_streams: that many inversion calls run side by side, each on its own CUDA stream,
        # to fill what one batch-1 call leaves idle. Unlike a bigger batch this leaves every source's
        # result exactly as when inverted alone (the same kernels on the same inputs). Elsewhere the
        # calls simply take turns.
        self.inversion_streams = cfg.inversion_streams
        self._streams = [torch.cuda.Stream(self.models.device) for _ in range(cfg.inversion_streams)] \
            if on_cuda and cfg.inversion_streams > 1 else None
        if on_cuda:
            # cudnn_benchmark: cuDNN times its convolution algorithms once per shape and keeps the
            # fastest; near-ties can go either way in another process, and the output's last bits
            # with them. Off (the default), its heuristics choose the same algorithms every time, so
            # a resumed run or another worker on the same hardware writes the same bytes (CONTRACT).
            torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
            torch.backends.cudnn.deterministic = not cfg.cudnn_benchmark
            if cfg.channels_last:
                self.models.unet.to(memory_format=torch.channels_last)
        if cfg.compile:
            self.models.unet = torch.compile(self.models.unet)
        # cuda_graphs 'auto' (the default): on for CUDA, unless compile is set. Measured on an H100
        # (docs/bench.md): 1.6x the images per minute of eager calls at K = 4, same images within 1 level.
        if cfg.cuda_graphs is True or (cfg.cuda_graphs == "auto" and on_cuda and not cfg.compile):
            if on_cuda:
                self.models.unet = GraphedUNet(self.models.unet, self.injector.controller)
            else:
                log.info("cuda_graphs applies to CUDA devices only; the UNet on %s runs eagerly", self.models.device)

    # -- injection layers ---------------------------------------------------------------------
    def injection_points(self, feature_blocks: tuple[str, ...] | None,
                         attn_layers: tuple[str, ...] | None) -> InjectionPoints:
        """The injection points for a layer setting (None: the architecture's table), checked against
        this UNet: no table for it, or an unknown name, is a UsageError (exit 2) listing the valid ones."""
        key = (feature_blocks, attn_layers)
        if key not in self._points:
            try:
                self._points[key] = injection_points(base_unet(self.models.unet), feature_blocks, attn_layers)
            except ValueError as e:
                raise UsageError(f"model {self.models.name!r}: {e}") from None
        return self._points[key]

    def row_points(self, row: Row) -> InjectionPoints:
        """The injection points of a row: its own layer setting (a sweep's) or the pipeline's."""
        o = row.overrides
        return self.injection_points(o.get("pnp_feature_blocks", self.cfg.pnp_feature_blocks),
                                     o.get("pnp_attn_layers", self.cfg.pnp_attn_layers))

    def use_points(self, points: InjectionPoints, pack: bool = False) -> PnPController:
        """Install the injector for `points` in place of the current one (a group with another layer
        setting), driven by a plain PnPController, or with `pack` by a PackController (packs of sources,
        translate/packs.py); returns the controller. With CUDA graphs, each layer setting and controller
        kind keeps its own set of graphs (GraphedUNet.use): a graph records the processors and hooks
        installed when it was captured."""
        inj = self.injector
        if points == inj.points and isinstance(inj.controller, PackController) == pack:
            return inj.controller
        inj.remove()
        self.injector = PnPInjector(base_unet(self.models.unet), points, controller=PackController() if pack else None)
        if isinstance(self.models.unet, GraphedUNet):
            name = f"pack:{hash(points)}" if pack else "pnp" if points == self.points else f"pnp:{hash(points)}"
            self.models.unet.use(name, self.injector.controller)
        return self.injector.controller

    @property
    def window(self) -> int:
        """Sources inverted at once (PipelineConfig.window): the engines' window of groups."""
        return self.inversion_batch * self.inversion_streams

    # -- text ------------------------------------------------------------------------------
    def embed(self, prompts: list[str]) -> TextCond:
        """Per-prompt conditioning, one row per prompt (hidden states (len, 77, D) and, for SDXL, the
        pooled embeddings); the text encoders run once per distinct prompt."""
        todo = [p for p in dict.fromkeys(prompts) if p not in self._emb]
        if todo:
            embs = self.text.encode(todo)
            for j, p in enumerate(todo):
                if len(self._emb) > 4096:
                    self._emb.pop(next(iter(self._emb)))
                self._emb[p] = embs.rows(j)
        return TextCond.cat([self._emb[p] for p in prompts])

    def condition(self, prompts: list[str], latent_size: tuple[int, ...]) -> TextCond:
        """The UNet conditioning of `prompts` for latents of spatial size `latent_size` (h, w)."""
        h, w = latent_size[-2:]
        cond = self.text.for_size(self.embed(prompts), h * 8, w * 8)
        return self.image_prompts.text_only(cond) if self.image_prompts is not None else cond

    def prompt_warning(self, prompt: str) -> str | None:
        """A warning when the prompt is longer than the text encoder reads (it is truncated)."""
        tok = self.models.tokenizer
        n = len(tok(prompt, truncation=False).input_ids)
        if n > tok.model_max_length:
            return f"prompt is {n} tokens, truncated to {tok.model_max_length}"
        return None

    # -- memory ----------------------------------------------------------------------------
    def _max_batch(self) -> int:
        """UNet batch elements per call: configured, or chosen from the device's memory."""
        if self.cfg.batch_size != "auto":
            return int(self.cfg.batch_size)
        dev = self.models.device
        if dev.type != "cuda":
            return 17  # the source + 8 targets with guidance; more gains nothing on a CPU
        free, _ = torch.cuda.mem_get_info(dev)
        n, note = auto_batch_size(torch.cuda.get_device_properties(dev).total_memory,
                                  torch.cuda.memory_reserved(dev), free, (self.cfg.resolution // 8) ** 2,
                                  self.models.dtype.itemsize)
        if note:
            log.warning("batch_size auto: %s", note)
        return n

    # -- images and latents -------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, img) -> torch.Tensor:
        arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
        vae = self.models.vae  # in the model's dtype, or float32 where it would overflow (SDXL, models/sdxl.py)
        x = (2 * arr - 1).unsqueeze(0).to(self.models.device, vae.dtype)
        return vae.encode(x).latent_dist.mean.float() * self.models.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """8-bit images from latents, at most VAE_DECODE_PIXEL_BYTES of output pixels per VAE call: 32
        images at 512 px in fp16 (SD: one call for any usual K), 4 at 1024 px in fp32 (SDXL's VAE,
        whose activations at 1024 px would otherwise grow past a GPU's memory with K)."""
        sf = self.models.scaling_factor
        vae = self.models.vae
        per_call = max(1, VAE_DECODE_PIXEL_BYTES // (latents.shape[-2] * latents.shape[-1] * 64 * vae.dtype.itemsize))
        imgs = [vae.decode(((1 / sf) * part).to(vae.dtype)).sample for part in latents.split(per_call)]
        return to_uint8(torch.cat(imgs), self.cfg.quantize)

    # -- the group ---------------------------------------------------------------------------
    def _negative_mode(self, rows: list[Row]) -> str:
        """The group's negative-prompt mode: a sweep's (the same for every row of a group) or the pipeline's."""
        return rows[0].overrides.get("negative_prompt_mode", self.cfg.negative_prompt_mode)

    def _targets(self, rows: list[Row], latent_size: tuple[int, ...]) -> tuple[list[Target], list[str]]:
        cfg = self.cfg
        mode = self._negative_mode(rows)
        negs = []
        for r in rows:
            if mode == "source":
                negs.append(r.overrides.get("negative_prompt", r.source_prompt))
            else:
                negs.append(r.overrides.get("negative_prompt", cfg.negative_prompt))
        cond = self.condition([r.target_prompt for r in rows], latent_size)
        neg = self.condition(negs, latent_size)
        if self.image_prompts is not None:
            cond, neg = self.image_prompts.for_rows(cond, neg, rows, cfg.ip_adapter_scale)
        alphas = (
            blend_alphas(cfg.negative_prompt_schedule, cfg.negative_prompt_alpha, cfg.steps)
            if mode == "blend"
            else None
        )
        targets = []
        for j, r in enumerate(rows):
            o = r.overrides
            targets.append(
                Target(
                    cond=cond[j],
                    negative=neg[j],
                    guidance_scale=float(o.get("guidance_scale", cfg.guidance_scale)),
                    f_steps=int(cfg.steps * float(o.get("pnp_f_t", cfg.pnp_f_t))),
                    attn_steps=int(cfg.steps * float(o.get("pnp_attn_t", cfg.pnp_attn_t))),
                    blend_alphas=alphas,
                )
            )
        return targets, negs

    def translate(self, latents: torch.Tensor, rows: list[Row], masks: dict[str, RowMask] | None = None,
                  source_data: bytes | None = None) -> tuple[np.ndarray, list[str]]:
        """Images (K, H, W, 3) uint8 for rows sharing the source latents. The rows are one group: one
        negative-prompt mode and one layer setting (Row.batch_key). All K targets are sampled in one
        loop with ONE source branch per step: when they need more than `batch_size` elements, the
        sampler splits each step into several UNet calls and the later calls reuse the source features
        the first one recorded (a sweep's whole grid costs one source branch). Decoding goes in chunks.
        `masks` (id -> RowMask) confine each row's edit (docs/masks.md); `source_data` is the source for the
        paste of its pixels."""
        self.use_points(self.row_points(rows[0]))
        uncond = self.condition([""], latents.shape)
        images, negs = [], []
        for first in range(0, len(rows), MAX_TARGETS_PER_LOOP):  # bounds the latents held (huge grids)
            chunk = rows[first : first + MAX_TARGETS_PER_LOOP]
            targets, chunk_negs = self._targets(chunk, latents.shape)
            out = pnp_sample(
                self.models.unet,
                self.injector,
                self.models.scheduler_config,
                latents,
                uncond,
                targets,
                self.cfg.steps,
                self.max_batch,
                region=RegionMasks.region(chunk, masks, self.cfg.steps, latents.device) if masks else None,
            )
            self.count_sampling(out)
            images.append(self.images(out.latents, chunk, masks, source_data))
            negs += chunk_negs
        return np.concatenate(images), negs

    def count_sampling(self, out) -> None:
        """Add a sampling loop's UNet work (pnp_sample's or pnp_sample_pack's) to the counters."""
        self.counters.sample_calls += out.unet_calls
        self.counters.sample_elements += out.batch_elements
        self.counters.source_elements += out.source_elements
        if self.image_prompts is not None:
            self.counters.image_encodes = self.image_prompts.encoded

    def images(self, latents: torch.Tensor, rows: list[Row], masks: dict[str, RowMask] | None,
               source_data: bytes | None) -> np.ndarray:
        """The rows' 8-bit images from their final latents, decoded a call's targets at a time, with the
        source's pixels pasted outside the masks that ask for it."""
        per_target = 3 if self._negative_mode(rows) == "blend" else 2
        k_max = max(1, (self.max_batch - 1) // per_target)
        decoded = np.concatenate([self.decode(latents[s : s + k_max]) for s in range(0, len(rows), k_max)])
        return self.masks.paste(rows, decoded, masks, source_data) if masks else decoded

    def process(self, rows: list[Row], attempt: int = 1) -> list[dict[str, Any]]:
        """Translate every row of a group (rows sharing one source image); one record per row."""
        return self.process_many([rows], attempt)[0]

    def process_many(self, groups: list[list[Row]], attempt: int = 1) -> list[list[dict[str, Any]]]:
        """Translate several groups; their inversions share UNet calls (see source_features_many).

        Images are written before the records are returned (the record that says "done" comes
        last). A failure of a source (unreadable image) fails every row of its group; a failure
        in sampling fails the rows of that group only. Nothing raises except worker loss.
        """
        return [resolve(records) for records in self.start_many(groups, attempt)]

    def start_many(self, groups: list[list[Row]], attempt: int = 1) -> list[list[dict[str, Any] | Future]]:
        """process_many, returning as soon as the GPU work is done: a translated row's record is a
        Future that resolves once its image is written (threads encode and upload it). The caller
        can start the next groups meanwhile, and must `resolve` the records before using them."""
        if self.pack > 1:  # the window is one pack of sources (plan.work_groups): translate/packs.py
            return start_pack(self, groups, attempt)
        prepared: list[tuple[list[dict[str, Any]], list[Row], int | None]] = []
        sources: list[tuple[bytes, str]] = []
        shas: list[str] = []  # each source's sha256: the record names the bytes translated
        for group in groups:
            records = [self._record(r, "failed", error=r.error, attempt=attempt)
                       for r in group if r.error and not r.companion]
            rows = [r for r in group if not r.error]
            if all(r.companion for r in rows):  # nothing of this group left to translate
                prepared.append((records, rows, None))
                continue
            first = rows[0]
            try:
                data = first.image_bytes if first.image_bytes is not None else open_row_input(first.image, self.policy)
            except Exception as e:  # noqa: BLE001 - a bad source is data: every row of the group fails
                records += self._source_failed(rows, e, attempt)
                prepared.append((records, [], None))
                continue
            prepared.append((records, rows, len(sources)))
            sources.append((data, self._inversion_prompt(first)))
            shas.append(hashlib.sha256(data).hexdigest())
        decoded: dict[int, Any] | None = {} if self.scorer is not None else None
        feats = self.source_features_many(sources, decoded) if sources else []
        out = []
        for records, rows, idx in prepared:
            if idx is not None:
                f = feats[idx]
                if isinstance(f, Exception):
                    records += self._source_failed(rows, f, attempt)
                else:
                    source = self._eval_source(decoded, idx, sources[idx][0]) if decoded is not None else None
                    records += self._finish(rows, *f, attempt=attempt, source=source, image_sha256=shas[idx],
                                            source_data=sources[idx][0])
            out.append(records)
        return out

    def _eval_source(self, decoded: dict[int, Any], idx: int, data: bytes) -> Any:
        """The preprocessed source for scoring: as inverted here, or prepared now when its features came
        from the store (an exception, if it cannot be: its rows' scores fail with the reason)."""
        from pnp_batch.eval.score import Preprocessing, prepare_source

        return decoded[idx] if idx in decoded else prepare_source(data, Preprocessing.of(self.cfg))

    def _scores(self, rows: list[Row], images: np.ndarray, source: Any,
                masks: dict[str, RowMask] | None = None) -> list[dict[str, Any] | None]:
        """Score records of the rows to do (None for companions), from the images in memory."""
        from pnp_batch.eval.score import score_decoded

        todo = [(r, img) for r, img in zip(rows, images) if not r.companion]
        scored = iter(score_decoded(self.scorer, [r.id for r, _ in todo], [r.target_prompt for r, _ in todo],
                                    self.cfg.hash(), [img for _, img in todo], source,
                                    [masks[r.id].pixels if masks and r.id in masks else None for r, _ in todo]))
        return [None if r.companion else next(scored) for r in rows]

    def _source_failed(self, rows: list[Row], e: Exception, attempt: int) -> list[dict[str, Any]]:
        msg = row_message(e, rows[0])
        log.warning("source %s failed: %s", rows[0].image or rows[0].id, msg)
        return [self._record(r, "failed", error=msg, attempt=attempt) for r in rows if not r.companion]

    def _finish(self, rows: list[Row], latents: torch.Tensor, key: str, hit: bool, t_inv: float,
                attempt: int, source: Any = None, image_sha256: str | None = None,
                source_data: bytes | None = None) -> list[dict[str, Any]]:
        """Sample and decode the images of one group, write those of the rows to do (not of the
        companions: see Row.companion), and build their records (translate/finish.py)."""
        feats = Feats(latents, key, hit, t_inv)
        rows, unusable, masks = usable_rows(self, rows, feats, source_data, attempt)
        if all(r.companion for r in rows):
            return unusable
        try:
            t0 = time.perf_counter()
            images, negs = self.translate(latents, rows, masks, source_data)
            t_tr = (time.perf_counter() - t0) / len(rows)
        except Exception as e:
            log.exception("translation of %d rows from %s failed", len(rows), rows[0].image or rows[0].id)
            msg = row_message(e, rows[0])
            return unusable + [self._record(r, "failed", error=msg, feature_key=key, cache_hit=hit, attempt=attempt)
                               for r in rows if not r.companion]
        return unusable + submit_rows(self, rows, images, negs, masks, feats, t_tr, attempt, source, image_sha256)

    def _write_image(self, r: Row, uri: str, img: np.ndarray, ok: dict[str, Any],
                     mask: RowMask | None = None) -> dict[str, Any]:
        """Encode and write one image and its mask (in a writer thread); its ok record, or a failed one saying why."""
        try:
            if mask is not None:
                write_mask(ok["mask"], mask)
            data = encode_image(img, self.cfg.output_format)
            storage.write_bytes_atomic(uri, data)
        except Exception as e:  # noqa: BLE001 - this row fails; the others go on
            return self._record(r, "failed", error=row_message(e, r), feature_key=ok["feature_key"],
                                attempt=ok["attempt"])
        return {**ok, "finished_at": datetime.now(timezone.utc), "output_sha256": hashlib.sha256(data).hexdigest()}

    def _writer(self) -> ThreadPoolExecutor:
        if self._write_pool is None:
            # PNG/WebP encoding and uploads release the GIL: a few threads keep up with a GPU
            self._write_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="write")
        return self._write_pool

    def close(self) -> None:
        """Wait for images and features still being written and stop the writer threads."""
        if self._write_pool is not None:
            self._write_pool.shutdown(wait=True)
            self._write_pool = None

    def _record(self, r: Row, status: str, error: str | None = None, output: str | None = None,
                negative: str | None = None, feature_key: str | None = None, cache_hit: bool | None = None,
                width: int | None = None, height: int | None = None, invert_seconds: float | None = None,
                translate_seconds: float | None = None, attempt: int = 1, warning: str | None = None,
                mask: str | None = None) -> dict:
        model = self.models.fingerprint + (f" ({TEST_MODEL_NOTE})" if self.models.is_test_model else "")
        return row_record(
            r, self.cfg, status, model, self.worker, attempt, error=error, warning=warning, output=output,
            negative_prompt=negative, feature_key=feature_key, feature_cache_hit=cache_hit, width=width,
            height=height, invert_seconds=invert_seconds, translate_seconds=translate_seconds, mask=mask,
        )
