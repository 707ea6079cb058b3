"""Parameter sweeps (`pnp-batch run --sweep KEY=V1,V2,...`): every manifest row expanded into the grid.

Each grid point of a row becomes a row of its own with an id derived from the point's values
(`{id}.{slug}`, e.g. `row7.gs5_attn0.25_ft0.4`; see `slug` and `derived_id`), so growing or
shrinking a grid keeps every point's id, the original id in the pass-through column `source_id`,
the grid point in the pass-through column `setting` (`guidance_scale=5,pnp_attn_t=0.25,pnp_f_t=0.4`:
swept keys sorted, values in canonical form) and
the swept values as the row's overrides. All grid points of a source go in one group (one inversion,
one shared source branch), except where a swept key changes the batch itself (config.GROUP_KEYS):
those form separate groups of the same source, which still share its inversion (feature store).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pnp_batch.config import GROUP_KEYS, LAYER_KEYS, ROW_OVERRIDES, ConfigError, PipelineConfig, parse_layers
from pnp_batch.errors import UsageError
from pnp_batch.io.manifest import BATCH_ROWS, Manifest, ManifestError, RowStream
from pnp_batch.io.rows import Row
from pnp_batch.ip_keys import parse_ip_scale
from pnp_batch.mask_keys import MASK_SLUGS, MASK_SWEEP_KEYS, MaskKeyError, parse_mask_value

SWEEP_KEYS = (*ROW_OVERRIDES, *GROUP_KEYS, *MASK_SWEEP_KEYS)
SWEEP_COLUMNS = ("source_id", "setting")
MAX_GRID = 10_000  # settings per row above which --yes is required
MAX_ID = 128
_FLOAT_KEYS = ("guidance_scale", "pnp_f_t", "pnp_attn_t")
# short names of the swept keys in derived ids (`row7.gs5_attn0.25_ft0.4`)
SLUG_NAMES = {"guidance_scale": "gs", "pnp_f_t": "ft", "pnp_attn_t": "attn", "seed": "seed", "negative_prompt": "neg",
              "negative_prompt_mode": "negmode", "pnp_feature_blocks": "fblocks", "pnp_attn_layers": "alayers",
              **MASK_SLUGS}
_RAW_SLUG = re.compile(r"[A-Za-z0-9-]{1,24}")


def canonical_text(text: str, value: Any) -> str:
    """A swept value as text, the same however a number was written (`5`, `5.0` -> `5`; `0.40` -> `0.4`);
    other values as given."""
    if isinstance(value, float):
        return repr(value).removesuffix(".0")
    if isinstance(value, int):
        return str(value)
    return text


def slug_value(text: str) -> str:
    """A value (canonical text) as it appears in a derived id: a number or a short plain word as is, else
    `h` and 8 hex chars of its sha256 (a prompt, a layer list with commas)."""
    if _RAW_SLUG.fullmatch(text) or re.fullmatch(r"[0-9][0-9.e+-]{0,23}", text):
        return text
    return "h" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


class SweepError(UsageError):
    """The --sweep request cannot be used (exit status 2, before any work)."""


@dataclass(frozen=True)
class Sweep:
    """The grid: swept keys (sorted) and, per key, its values as (text as given, parsed value)."""

    keys: tuple[str, ...]
    values: tuple[tuple[tuple[str, Any], ...], ...]

    @property
    def size(self) -> int:
        return math.prod(len(v) for v in self.values)

    def points(self) -> list[tuple[str, dict[str, Any]]]:
        """(setting label, overrides) for every grid point, in a fixed order (the last key varies fastest).
        The label is made from the values (canonical text), never from the point's position."""
        out = []
        for combo in itertools.product(*self.values):
            label = ",".join(f"{k}={canonical_text(text, value)}" for k, (text, value) in zip(self.keys, combo))
            out.append((label, {k: value for k, (_, value) in zip(self.keys, combo)}))
        return out

    def slugs(self) -> list[str]:
        """Each grid point's id suffix, from its values: `gs5_attn0.25_ft0.4` (keys sorted)."""
        return ["_".join(f"{SLUG_NAMES.get(k, k)}{slug_value(canonical_text(text, value))}"
                         for k, (text, value) in zip(self.keys, combo))
                for combo in itertools.product(*self.values)]

    def layer_settings(self, cfg: PipelineConfig) -> tuple[tuple[tuple[str, ...] | None, tuple[str, ...] | None], ...]:
        """The (pnp_feature_blocks, pnp_attn_layers) pairs of the grid's points, where it sweeps either."""
        if not set(self.keys) & set(LAYER_KEYS):
            return ()
        pairs = {(o.get("pnp_feature_blocks", cfg.pnp_feature_blocks), o.get("pnp_attn_layers", cfg.pnp_attn_layers))
                 for _, o in self.points()}
        return tuple(sorted(pairs, key=repr))

    def describe(self) -> str:
        parts = " x ".join(f"{k} ({len(v)})" for k, v in zip(self.keys, self.values))
        return f"{self.size:,} settings per row: {parts}"

    def to_items(self) -> list[str]:
        """The sweep as --sweep arguments (for the run summary; parse_sweeps reads them back)."""
        return [f"{k}={','.join(text for text, _ in v)}" for k, v in zip(self.keys, self.values)]


def _parse_value(key: str, text: str, cfg: PipelineConfig) -> Any:
    """One swept value, checked as config.validate checks the key (ranges, choices, layer names)."""
    if key in LAYER_KEYS:
        value = parse_layers(key, text)
        cfg.replace(**{key: value})
        return value
    if key in _FLOAT_KEYS:
        try:
            value: Any = float(text)
        except ValueError:
            raise SweepError(f"--sweep {key}: {text!r} is not a number") from None
        if not math.isfinite(value):
            raise SweepError(f"--sweep {key}: {text!r} is not a finite number")
    elif key in MASK_SWEEP_KEYS:  # region edits (mask_keys.py)
        try:
            value = parse_mask_value(key, text)
        except MaskKeyError as e:
            raise SweepError(f"--sweep {key}: {e}") from None
    elif key == "ip_adapter_scale":  # a number or diffusers' per-block form (ip_keys.py)
        try:
            value = parse_ip_scale(text)
        except ValueError as e:
            raise SweepError(f"--sweep {key}: {e}") from None
    elif key == "seed":
        try:
            value = int(text)
        except ValueError:
            raise SweepError(f"--sweep seed: {text!r} is not a whole number") from None
        if value < 0:
            raise SweepError(f"--sweep seed: {value} must be >= 0")
    else:  # negative_prompt, negative_prompt_mode: strings
        value = text
    cfg.replace(**{key: value})
    return value


def parse_sweeps(items: list[str], cfg: PipelineConfig, yes: bool = False) -> Sweep | None:
    """`--sweep KEY=V1,V2,...` arguments as a Sweep (None when there are none); a SweepError (exit 2)
    names the argument and the reason: unknown key, key given twice, empty or unparsable value list,
    a value out of range, a value given twice, or a grid over MAX_GRID settings per row without --yes."""
    if not items:
        return None
    parsed: dict[str, tuple[tuple[str, Any], ...]] = {}
    for item in items:
        key, sep, rest = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SweepError(f"--sweep {item!r} must be KEY=VALUE1,VALUE2,...")
        if key not in SWEEP_KEYS:
            raise SweepError(f"--sweep: unknown key {key!r}; sweepable keys: {', '.join(SWEEP_KEYS)}")
        if key in parsed:
            raise SweepError(f"--sweep {key} is given twice; list all its values in one --sweep")
        if key in MASK_SWEEP_KEYS and cfg.mask_mode == "none":
            raise SweepError(f"--sweep {key}: masks are off (mask_mode: none); set mask_mode to manifest or auto")
        texts = [t.strip() for t in rest.split(",")]
        if not rest.strip() or any(not t for t in texts):
            raise SweepError(f"--sweep {item!r}: empty value list or empty value (values are comma-separated)")
        values = []
        for text in texts:
            try:
                values.append((text, _parse_value(key, text, cfg)))
            except ConfigError as e:
                raise SweepError(f"--sweep {key}: {e}") from None
        canon = [repr(v) for _, v in values]
        dups = sorted({t for (t, _), c in zip(values, canon) if canon.count(c) > 1})
        if dups:
            raise SweepError(f"--sweep {key}: the same value is given twice ({', '.join(dups)})")
        parsed[key] = tuple(values)
    keys = tuple(sorted(parsed))
    sweep = Sweep(keys, tuple(parsed[k] for k in keys))
    if sweep.size > MAX_GRID and not yes:
        raise SweepError(f"--sweep: {sweep.describe()}, over {MAX_GRID:,} per row; add --yes to run it anyway")
    return sweep


def derived_id(source_id: str, slug: str) -> str:
    """The id of a row's grid point: `{id}.{slug}` (the slug made from the point's values, Sweep.slugs),
    always within the id pattern's 128 characters: a longer one keeps the id's start and 10 hex chars
    of its sha256, `{start}-{hash}.{slug}` (a slug over 64 characters is itself shortened to 16 hex
    chars of its sha256). Deterministic, unique per (id, setting), readable."""
    if len(slug) > 64:
        slug = "h" + hashlib.sha256(slug.encode("utf-8")).hexdigest()[:16]
    suffix = "." + slug
    if len(source_id) + len(suffix) <= MAX_ID:
        return source_id + suffix
    digest = hashlib.sha256(source_id.encode("utf-8")).hexdigest()[:10]
    return f"{source_id[: MAX_ID - len(suffix) - 11]}-{digest}{suffix}"


class GridBatch:
    """Rows of a swept manifest: a batch of the manifest itself, each row standing for its `size` grid
    points (nothing is copied: the engines only ask for `num_rows` and hand it back to the manifest)."""

    __slots__ = ("base", "base_start", "num_rows")

    def __init__(self, base: pa.RecordBatch, base_start: int, num_rows: int) -> None:
        self.base = base
        self.base_start = base_start
        self.num_rows = num_rows


class SweptManifest(RowStream):
    """A manifest whose every row is expanded into the sweep's grid; reads like a Manifest (the batch
    interface the planner streams: iter_batches, batch_ids, rows_of, iter_id_batches, check_ids).

    Row indexes and `limit` count expanded rows: manifest row i, grid point g is row i * size + g.
    A batch of the manifest is expanded lazily and in slices of at most BATCH_ROWS expanded rows, so
    memory stays that of a plain run's batch whatever the grid.
    """

    def __init__(self, manifest: Manifest, sweep: Sweep) -> None:
        clash = [c for c in SWEEP_COLUMNS if c in manifest.columns]
        if clash:
            raise ManifestError(f"{manifest.uri}: column(s) {', '.join(clash)} are written by --sweep; rename them "
                                f"in the manifest")
        self.manifest = manifest
        self.sweep = sweep
        self.size = sweep.size
        self._points = sweep.points()
        self.slugs = sweep.slugs()
        if len(set(self.slugs)) != len(self.slugs):
            raise SweepError("--sweep: two grid points have the same id suffix; give values that differ in text")
        self._suffixes = [derived_id("", s) for s in self.slugs]
        self._per_slice = max(1, BATCH_ROWS // self.size)  # manifest rows expanded at once

    def __getattr__(self, name: str) -> Any:  # uri, files, kind, schema, base_dir, columns, fingerprint
        return getattr(self.manifest, name)

    def __repr__(self) -> str:
        return f"SweptManifest({self.manifest!r}, {self.sweep.describe()})"

    @property
    def extra_columns(self) -> list[str]:
        return [*self.manifest.extra_columns, *SWEEP_COLUMNS]

    @property
    def extra_schema(self) -> pa.Schema:
        schema = self.manifest.extra_schema
        for c in SWEEP_COLUMNS:
            schema = schema.append(pa.field(c, pa.string()))
        return schema

    def _sources(self, limit: int | None) -> int | None:
        """Manifest rows holding the first `limit` expanded rows."""
        return None if limit is None else -(-limit // self.size)

    def expand(self, row: Row, points: range | None = None) -> Iterator[Row]:
        """The grid points of one manifest row (all, or those in `points`). Swept values replace the
        row's own overrides."""
        for g in points if points is not None else range(self.size):
            label, overrides = self._points[g]
            yield replace(row, index=row.index * self.size + g, id=derived_id(row.id, self.slugs[g]),
                          overrides={**row.overrides, **overrides},
                          extra={**row.extra, "source_id": row.id, "setting": label})

    def _derive(self, ids: pa.Array, count: int) -> pa.Array:
        """The first `count` expanded ids of the manifest ids `ids` (each id's grid points in turn):
        `{id}.sNN` vectorised, the rare over-long id through derived_id."""
        rep = pc.take(ids, pa.array(np.repeat(np.arange(len(ids)), self.size)[:count]))
        suffix = pa.array((self._suffixes * len(ids))[:count], pa.large_string())
        out = pc.binary_join_element_wise(rep.cast(pa.large_string()), suffix, pa.scalar("", pa.large_string()))
        if count and pc.max(pc.utf8_length(out)).as_py() > MAX_ID:
            out = pa.array([derived_id(rid, self.slugs[k % self.size]) for k, rid in enumerate(rep.to_pylist())],
                           pa.large_string())
        return out

    def iter_batches(self, limit: int | None = None, batch_rows: int | None = None,
                     columns: list[str] | None = None) -> Iterator[tuple[int, GridBatch]]:
        """(index of its first expanded row, GridBatch) over the first ``limit`` expanded rows."""
        for start, batch in self.manifest.iter_batches(self._sources(limit), batch_rows, columns):
            for k in range(0, batch.num_rows, self._per_slice):
                part = batch.slice(k, self._per_slice)
                first = (start + k) * self.size
                n = part.num_rows * self.size if limit is None else min(part.num_rows * self.size, limit - first)
                if n <= 0:
                    return
                yield first, GridBatch(part, start + k, n)

    def batch_ids(self, batch: GridBatch, start: int) -> pa.Array:
        return self._derive(self.manifest.batch_ids(batch.base, batch.base_start), batch.num_rows)

    def rows_of(self, batch: GridBatch, start: int, begin: int = 0, end: int | None = None) -> list[Row]:
        """Rows ``begin:end`` of a GridBatch whose first expanded row has index ``start``."""
        end = batch.num_rows if end is None else end
        if end <= begin:
            return []
        b0, b1 = begin // self.size, (end - 1) // self.size + 1
        rows = []
        for k, row in enumerate(self.manifest.rows_of(batch.base, batch.base_start, b0, b1)):
            lo = max(begin - (b0 + k) * self.size, 0)
            hi = min(end - (b0 + k) * self.size, self.size)
            rows.extend(self.expand(row, range(lo, hi)))
        return rows

    def iter_id_batches(self, limit: int | None = None) -> Iterator[tuple[int, pa.Array]]:
        """(index of the first expanded row, expanded ids as ``large_string``) slice by slice."""
        for start, ids in self.manifest.iter_id_batches(self._sources(limit)):
            for k in range(0, len(ids), self._per_slice):
                part = ids.slice(k, self._per_slice)
                first = (start + k) * self.size
                n = len(part) * self.size if limit is None else min(len(part) * self.size, limit - first)
                if n <= 0:
                    return
                yield first, self._derive(part, n)

    def check_ids(self) -> int:
        """Expanded row count; duplicate manifest ids are a ManifestError. Derived ids of distinct ids
        differ: every suffix is `.` plus a slug of the same keys, and a shortened id carries 10 hex chars of the
        whole id's sha256 (only a manifest id spelled exactly like another's shortened form could meet it)."""
        return self.manifest.check_ids() * self.size
