"""`pnp-batch features MANIFEST|OUT --ids ... --out DIR`: the source branch of chosen rows, run from the
stored inversion, with the decoder's features, queries, keys and self-attention recorded at chosen
timesteps and reduced by a joint PCA per layer and timestep (docs/features.md).

One timestep at a time: every image's tensors of that timestep are held, reduced and dropped before the
next, and attention rows (tokens x tokens) are made one layer at a time, so memory stays bounded."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from pnp_batch.config import PipelineConfig, config_from_dict, load_config
from pnp_batch.errors import UsageError
from pnp_batch.inspect import pca
from pnp_batch.inspect.capture import FeatureCapture, attention_rows, decoder_layers
from pnp_batch.inspect.figures import grid, view_image
from pnp_batch.io import storage
from pnp_batch.io.images import decode_image, resize_source
from pnp_batch.io.inputs import open_row_input
from pnp_batch.io.output_paths import located
from pnp_batch.io.policy import InputPolicy
from pnp_batch.io.results import latest_results, read_run_summaries, result_files

log = logging.getLogger(__name__)
DEFAULT_TIMESTEPS = 5


@dataclass
class FeaturesRequest:
    source: str  # a manifest, or an OUT of `pnp-batch run`
    ids: list[str]
    out: str  # DIR for the figures (and --save's numbers)
    layers: list[int] | None = None  # decoder layer numbers; None: all
    timesteps: list[int] | None = None  # None: DEFAULT_TIMESTEPS spread over the schedule
    save: bool = False
    pipeline: str | None = None  # None: OUT's latest run's config, else sd21-base
    overrides: list[str] = field(default_factory=list)
    fallback_pipeline: str | None = None
    features: str | None = None  # the feature store (default OUT/features, or DIR/features for a manifest)
    max_fit: int = 20_000  # tokens the PCA is fit on, per layer and timestep (all are projected)
    max_fit_attention: int = 1_024  # the same for attention rows (one column per token: an SVD costs more)
    allow_uri: tuple[str, ...] = ()
    allow_private_network: bool = False


@dataclass
class _Item:
    label: str
    data: bytes
    prompt: str
    image: Image.Image | None = None
    latents: torch.Tensor | None = None  # (K, 1, C, h, w), noisiest first


def _is_output(uri: str) -> bool:
    return bool(result_files(uri))


def _run_config(out: str) -> dict[str, Any] | None:
    summaries = read_run_summaries(out)
    return summaries[-1].get("config") if summaries else None


def _config(req: FeaturesRequest, from_out: dict[str, Any] | None) -> PipelineConfig:
    if req.pipeline is None and from_out is not None:
        cfg = config_from_dict(from_out)
        if req.overrides:
            from pnp_batch.config import with_overrides

            cfg = with_overrides(cfg, req.overrides)
    else:
        cfg = load_config(req.pipeline or "sd21-base", req.overrides)
    if req.fallback_pipeline:
        from pnp_batch.models.load import model_available

        why = model_available(cfg)
        if why is not None:
            log.warning("the weights of %r are not available here (%s); using pipeline %r", cfg.model, why,
                        req.fallback_pipeline)
            cfg = load_config(req.fallback_pipeline, req.overrides)
    return cfg


def _items_from_out(req: FeaturesRequest, policy: InputPolicy) -> list[_Item]:
    table = latest_results(req.source, ["image", "source_prompt", "output", "status"])
    rows = {r["id"]: r for r in table.to_pylist() if r["id"] in set(req.ids)}
    missing = [i for i in req.ids if i not in rows]
    if missing:
        raise UsageError(f"{storage.redact(req.source)} has no results for id(s) {', '.join(missing)}")
    items: list[_Item] = []
    for rid in req.ids:
        r = rows[rid]
        if not r["image"] or r["image"] == "<image_bytes>":
            raise UsageError(f"row {rid}'s source was given as image_bytes and is not in OUT; use the manifest")
        items.append(_Item(f"{rid} (source)", open_row_input(r["image"], policy), r["source_prompt"] or ""))
        output = located(req.source, r["output"]) if r["status"] == "ok" else None
        if output:
            try:
                items.append(_Item(f"{rid} (output)", storage.read_bytes(output), r["source_prompt"] or ""))
            except FileNotFoundError:
                log.warning("row %s's output %s is gone: only its source is shown", rid, storage.redact(output))
    return items


def _items_from_manifest(req: FeaturesRequest, policy: InputPolicy) -> list[_Item]:
    from pnp_batch.io.manifest import open_manifest

    m = open_manifest(req.source)
    wanted, found = set(req.ids), {}
    for start, batch in m.iter_batches():
        ids = batch.column("id").to_pylist() if "id" in batch.schema.names else []
        if ids and not wanted.intersection(ids):
            continue
        for row in m.rows_of(batch, start):
            if row.id in wanted and row.id not in found:
                found[row.id] = row
        if len(found) == len(wanted):
            break
    missing = [i for i in req.ids if i not in found]
    if missing:
        raise UsageError(f"the manifest has no row(s) with id {', '.join(missing)}")
    items = []
    for rid in req.ids:
        row = found[rid]
        data = row.image_bytes if row.image_bytes is not None else open_row_input(row.image, policy)
        items.append(_Item(f"{rid} (source)", data, row.source_prompt or ""))
    return items


def _inversion_prompt(cfg: PipelineConfig, source_prompt: str) -> str:
    """The prompt the source was inverted with, which the source branch uses (PNP_SPEC.md)."""
    return cfg.inversion_prompt.replace("{source_prompt}", source_prompt)


def _chosen(schedule: list[int], wanted: list[int] | None) -> list[int]:
    """Indices into the schedule (noisiest first): the wanted timesteps (the nearest of the schedule), or
    DEFAULT_TIMESTEPS spread evenly over it."""
    if not wanted:
        k = len(schedule)
        return sorted(set(np.linspace(0, k - 1, min(DEFAULT_TIMESTEPS, k)).round().astype(int).tolist()))
    out = []
    for t in wanted:
        i = int(np.argmin([abs(s - t) for s in schedule]))
        if schedule[i] != t:
            log.info("timestep %d is not in the schedule; using the nearest, %d", t, schedule[i])
        if i not in out:
            out.append(i)
    return sorted(out)


def run_features(req: FeaturesRequest) -> list[str]:
    """Write the figures (and with ``save`` the numbers) into ``req.out``; the files written."""
    from pnp_batch.translate.translator import Translator

    if not req.ids:
        raise UsageError("--ids names no row")
    from_out = _is_output(req.source)
    cfg = _config(req, _run_config(req.source) if from_out else None)
    if from_out:
        from pnp_batch.io.inputs import output_policy

        base = output_policy(req.source)
        policy = InputPolicy(base.local_root, (*base.allow_uri, *req.allow_uri),
                             base.allow_private_network or req.allow_private_network)
        items = _items_from_out(req, policy)
        features = req.features or storage.join(req.source, "features")
    else:
        policy = InputPolicy.for_manifest(req.source, (*cfg.allow_uri, *req.allow_uri),
                                          cfg.allow_private_network or req.allow_private_network)
        items = _items_from_manifest(req, policy)
        features = req.features or storage.join(req.out, "features")
    tr = Translator(cfg, req.out, features, worker="features", policy=policy)
    unet = tr.models.unet
    valid = decoder_layers(unet)
    layers = valid if req.layers is None else req.layers
    bad = [n for n in layers if n not in valid]
    if bad:
        raise UsageError(f"decoder layer(s) {bad} not in this UNet; valid: {valid[0]}-{valid[-1]}")
    for it in items:
        it.image = resize_source(decode_image(it.data, cfg.max_pixels), cfg.resolution, cfg.resize_mode)
    got = tr.source_features_many([(it.data, _inversion_prompt(cfg, it.prompt)) for it in items])
    for it, g in zip(items, got):
        if isinstance(g, Exception):
            raise UsageError(f"{it.label}: {g}")
        it.latents = g[0]
    tr.flush()
    chosen = _chosen(tr.timesteps, req.timesteps)
    ts = [tr.timesteps[i] for i in chosen]
    fig_t = ts[len(ts) // 2]
    inject = tr.points.feature_blocks[0] if tr.points.feature_blocks else "up_blocks.1.resnets.1"
    fig_layer = 3 * int(inject.split(".")[1]) + int(inject.split(".")[3])
    fig_layer = fig_layer if fig_layer in layers else layers[len(layers) // 2]
    capture = FeatureCapture(unet, layers)
    views: dict[tuple[str, int, int], list[Image.Image | None]] = {}
    table: list[dict[str, Any]] = []
    try:
        for i, t in zip(chosen, ts):
            per_image = []
            for it in items:
                lat = it.latents[i].to(tr.models.device)
                cond = tr.condition([_inversion_prompt(cfg, it.prompt)], lat.shape)
                got_t = capture.record()
                with torch.no_grad():
                    unet(lat.to(unet.dtype), torch.tensor(t, device=lat.device), **cond.unet_kwargs())
                capture.stop()
                per_image.append(got_t)
            _reduce_timestep(req, items, layers, t, per_image, capture.heads, views, table,
                             keep_layers=(t == fig_t), keep_layer=fig_layer)
    finally:
        capture.remove()
    written = _write_figures(req.out, items, layers, ts, fig_t, fig_layer, views)
    if req.save:
        uri = storage.join(req.out, "pca.parquet")
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(table), sink)
        storage.write_bytes_atomic(uri, sink.getvalue().to_pybytes())
        written.append(uri)
    tr.close()
    return written


def _reduce_timestep(req, items, layers, t, per_image, heads, views, table, keep_layers: bool, keep_layer: int) -> None:
    """The joint PCA of every kind and layer at timestep ``t``; views kept for the figures. Without
    ``--save`` only what a figure shows is reduced: every layer at the figures' timestep, the figures'
    layer at the others (the rest would be computed and thrown away)."""
    for n in layers:
        if not (req.save or keep_layers or n == keep_layer):
            continue
        for kind in ("features", "queries", "keys", "attention"):
            if kind == "attention":
                if n not in heads:
                    continue
                mats = [attention_rows(g.tensors["queries"][n], g.tensors["keys"][n], heads[n])[0].numpy()
                        for g in per_image]
            else:
                if n not in per_image[0].tensors[kind]:
                    continue
                mats = [g.tensors[kind][n][0].numpy() for g in per_image]
            token_hw = [g.sizes[n] for g in per_image]
            groups: dict[int, list[int]] = {}  # attention rows have one column per token: fit per size
            for j, m in enumerate(mats):
                groups.setdefault(m.shape[1], []).append(j)
            rgb: list[np.ndarray | None] = [None] * len(mats)
            for g, members in enumerate(groups.values()):
                stacked = np.concatenate([mats[j] for j in members])
                fit = pca.fit(stacked, req.max_fit_attention if kind == "attention" else req.max_fit)
                proj = [fit.project(mats[j]) for j in members]
                for j, p in zip(members, pca.to_rgb(proj)):
                    rgb[j] = p
                row = {"kind": kind, "layer": n, "timestep": t, "group": g, "images": [items[j].label for j in members],
                       "fit_tokens": len(fit.fit_rows), "total_tokens": fit.total_rows,
                       **{f"explained_variance_ratio_{c}": float(fit.explained_variance_ratio[c]) for c in range(3)}}
                if req.save:
                    name = f"pca/{kind}-layer{n:02d}-t{t:04d}" + (f"-g{g}" if len(groups) > 1 else "") + ".npz"
                    _save_npz(storage.join(req.out, name), stacked, fit, proj, [len(mats[j]) for j in members])
                    row["file"] = name
                table.append(row)
            if keep_layers or n == keep_layer:
                cells = [view_image(rgb[j], token_hw[j], items[j].image.size) for j in range(len(items))]
                if keep_layers:
                    views[(kind, n, -1)] = cells
                if n == keep_layer:
                    views[(kind, -1, t)] = cells


def _save_npz(uri: str, tokens: np.ndarray, fit: pca.JointPCA, proj: list[np.ndarray], counts: list[int]) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, tokens=tokens.astype(np.float32), image_token_counts=np.array(counts), mean=fit.mean,
             components=fit.components, explained_variance_ratio=fit.explained_variance_ratio,
             fit_rows=fit.fit_rows, projection=np.concatenate(proj))
    storage.write_bytes_atomic(uri, buf.getvalue())


def _write_figures(out, items, layers, ts, fig_t, fig_layer, views) -> list[str]:
    written = []
    images = [it.image for it in items]
    names = [it.label for it in items]
    for kind in ("features", "queries", "keys", "attention"):
        cols = [n for n in layers if (kind, n, -1) in views]
        if cols:
            cells = [[views[(kind, n, -1)][i] for n in cols] for i in range(len(items))]
            fig = grid(images, names, [f"layer {n}" for n in cols], cells,
                       f"{kind}: joint PCA per layer at timestep {fig_t}")
            written.append(_save_png(out, f"{kind}-layers-t{fig_t:04d}.png", fig))
        tcols = [t for t in ts if (kind, -1, t) in views]
        if tcols:
            cells = [[views[(kind, -1, t)][i] for t in tcols] for i in range(len(items))]
            fig = grid(images, names, [f"t={t}" for t in tcols], cells,
                       f"{kind}: joint PCA per timestep at decoder layer {fig_layer}")
            written.append(_save_png(out, f"{kind}-timesteps-layer{fig_layer:02d}.png", fig))
    return written


def _save_png(out: str, name: str, fig: Image.Image) -> str:
    import io

    buf = io.BytesIO()
    fig.save(buf, "PNG")
    uri = storage.join(out, name)
    storage.write_bytes_atomic(uri, buf.getvalue())
    return uri
