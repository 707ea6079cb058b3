"""`pnp-batch validate`: schema, ids, prompts and overrides of a manifest (and, optionally, that every
image decodes), reported row by row without loading a model."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pnp_batch.io import storage
from pnp_batch.io.inputs import check_row_input, open_row_input
from pnp_batch.io.manifest import FLOAT_COLUMNS, ID_PATTERN, Manifest, ManifestError, Row, open_manifest
from pnp_batch.io.policy import InputPolicy

_TOKEN_RE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+", re.IGNORECASE)


def estimate_tokens(text: str) -> int:
    """A lower-bound estimate of CLIP tokens (CLIP's pre-tokenizer split; BPE may split further)."""
    return len(_TOKEN_RE.findall(text))


@dataclass
class ValidationReport:
    """What ``pnp-batch validate`` prints; ``ok`` decides exit 0 or 2."""

    uri: str
    rows: int = 0
    errors: list[str] = field(default_factory=list)
    row_problems: list[tuple[str, int, str]] = field(default_factory=list)
    row_problem_count: int = 0
    warnings: list[str] = field(default_factory=list)
    warning_count: int = 0
    images_checked: int = 0
    columns: list[str] = field(default_factory=list)
    max_listed: int = 50

    @property
    def ok(self) -> bool:
        return not self.errors and self.row_problem_count == 0

    def add_problem(self, rid: str, index: int, message: str) -> None:
        self.row_problem_count += 1
        if len(self.row_problems) < self.max_listed:
            self.row_problems.append((rid, index, message))

    def add_warning(self, message: str) -> None:
        self.warning_count += 1
        if len(self.warnings) < self.max_listed:
            self.warnings.append(message)

    def format(self) -> str:
        lines = [f"manifest: {storage.redact(self.uri)}"]
        if self.columns:
            lines.append(f"columns: {', '.join(self.columns)}")
        lines.append(f"rows: {self.rows}")
        if self.images_checked:
            lines.append(f"images checked: {self.images_checked}")
        for e in self.errors:
            lines.append(f"ERROR: {e}")
        if self.row_problem_count:
            lines.append(f"rows with problems: {self.row_problem_count}")
            for rid, index, msg in self.row_problems:
                lines.append(f"  row {index} (id {rid}): {msg}")
            if self.row_problem_count > len(self.row_problems):
                lines.append(f"  ... and {self.row_problem_count - len(self.row_problems)} more")
        if self.warning_count:
            lines.append(f"warnings: {self.warning_count}")
            for w in self.warnings:
                lines.append(f"  {w}")
            if self.warning_count > len(self.warnings):
                lines.append(f"  ... and {self.warning_count - len(self.warnings)} more")
        lines.append("OK" if self.ok else "NOT OK")
        return "\n".join(lines)


def _check_image(row: Row, max_pixels: int, policy: InputPolicy) -> str | None:
    from pnp_batch.io.images import ImageError, decode_image

    try:
        data = row.image_bytes if row.image_bytes is not None else open_row_input(row.image or "", policy)
        decode_image(data, max_pixels)
    except FileNotFoundError:
        return f"image not found: {storage.redact(row.image or '')}"
    except ImageError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - validate reports every failure as a row problem
        return storage.redact(f"cannot read image {row.image}: {e}")
    return None


def _rows_at(m: Manifest, batch: pa.RecordBatch, start: int, positions: np.ndarray) -> list[Row]:
    """Row objects for some positions of a batch, in order (runs of neighbours made together)."""
    rows: list[Row] = []
    if not len(positions):
        return rows
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    for run in np.split(positions, breaks):
        rows.extend(m.rows_of(batch, start, int(run[0]), int(run[-1]) + 1))
    return rows


def _refused_input(row: Row, policy: InputPolicy) -> str | None:
    """Why the policy refuses a URI the row names (its source, image prompt or mask; bytes are not read), or None."""
    for name, uri, data in (("", row.image, row.image_bytes), ("ip_image: ", row.ip_image, row.ip_image_bytes),
                            ("mask: ", row.mask, row.mask_bytes)):
        refused = check_row_input(uri, policy) if uri and data is None else None
        if refused:
            return name + refused
    return None


def _maybe_problem(batch: pa.RecordBatch, max_prompt_tokens: int) -> np.ndarray:
    """Rows that may have a problem or a warning, computed on whole columns: a superset of what
    io/manifest (Row.error) and the prompt-length warning find, never fewer rows."""
    n = batch.num_rows
    names = set(batch.schema.names)
    suspect = np.zeros(n, dtype=bool)

    def flag(mask: pa.Array | pa.ChunkedArray) -> None:
        nonlocal suspect
        suspect |= pc.fill_null(mask, True).to_numpy(zero_copy_only=False)

    if "id" in names:
        ids = batch.column("id").cast(pa.string())
        given = pc.and_kleene(pc.is_valid(ids), pc.not_equal(pc.utf8_length(ids), 0))
        flag(pc.and_kleene(given, pc.invert(pc.match_substring_regex(ids, f"^{ID_PATTERN}$"))))
    image = batch.column("image") if "image" in names else pa.nulls(n, pa.string())
    has_image = pc.fill_null(pc.not_equal(pc.utf8_length(image.cast(pa.string())), 0), False)
    if "image_bytes" in names:
        raw = batch.column("image_bytes")
        if pa.types.is_string(raw.type) or pa.types.is_large_string(raw.type):
            flag(pc.is_valid(raw))  # base64 text: checked row by row
        has_image = pc.or_(has_image, pc.is_valid(raw))
    flag(pc.invert(has_image))
    # the input policy (io/policy.py) looks at every URI but a plain relative path inside the manifest's
    # folder or an s3:// object: absolute paths, file://, http(s), '..' and other schemes row by row
    for uri_col in ("image", "ip_image", "mask"):
        if uri_col not in names:
            continue
        text = batch.column(uri_col).cast(pa.string())
        flag(pc.match_substring_regex(text, r"^(?:/|~)|(?:^|[/\\])\.\.(?:[/\\]|$)"))
        flag(pc.and_kleene(pc.match_substring_regex(text, r"^[A-Za-z][A-Za-z0-9+.-]*:"),
                           pc.invert(pc.match_substring_regex(text, r"^s3a?://[^/]"))))
    for name in ("ip_image_bytes", "ip_adapter_scale", "mask_bytes"):  # rare columns: their rows are looked at one by one
        if name in names:
            flag(pc.is_valid(batch.column(name)))
    target = batch.column("target_prompt").cast(pa.string()) if "target_prompt" in names else pa.nulls(n, pa.string())
    # a letter or digit means not blank; anything else (blank or not) is looked at row by row
    flag(pc.invert(pc.match_substring_regex(target, r"[\p{L}\p{N}]")))
    for name in ("target_prompt", "source_prompt", "negative_prompt"):
        if name in names:
            text = batch.column(name).cast(pa.string())
            flag(pc.fill_null(pc.greater(pc.utf8_length(text), max_prompt_tokens), False))
    for name in ("seed", *FLOAT_COLUMNS):
        if name not in names:
            continue
        v = batch.column(name)
        if pa.types.is_decimal(v.type) or pa.types.is_integer(v.type) or pa.types.is_floating(v.type):
            v = v.cast(pa.float64())
        else:
            flag(pc.is_valid(v))
            continue
        if name == "seed":
            bad = pc.invert(pc.and_(pc.and_(pc.is_finite(v), pc.greater_equal(v, 0)), pc.equal(v, pc.floor(v))))
        elif name == "guidance_scale":
            bad = pc.invert(pc.and_(pc.greater_equal(v, 0), pc.less(v, float("inf"))))
        else:
            bad = pc.invert(pc.and_(pc.greater_equal(v, 0), pc.less_equal(v, 1)))
        flag(pc.and_kleene(pc.is_valid(v), pc.fill_null(bad, True)))  # NaN compares false: looked at
    return suspect


def validate_manifest(
    uri: str,
    check_images: bool = False,
    max_pixels: int = 64_000_000,
    max_prompt_tokens: int = 75,
    image_threads: int = 8,
    policy: InputPolicy | None = None,
) -> ValidationReport:
    """Check schema, ids, prompts, overrides and the input policy (nothing is read for it), and with
    ``check_images``, that images decode. ``policy``: the run's; by default the manifest's own."""
    report = ValidationReport(uri=uri)
    policy = policy or InputPolicy.for_manifest(uri)
    try:
        m = open_manifest(uri)
    except ManifestError as e:
        report.errors.append(str(e))
        return report
    report.columns = m.columns
    try:
        m.check_ids()
    except ManifestError as e:
        report.errors.append(str(e))

    pool = ThreadPoolExecutor(image_threads) if check_images else None
    pending: list[tuple[Row, Any]] = []

    def drain(keep: int) -> None:
        while len(pending) > keep:
            row, fut = pending.pop(0)
            report.images_checked += 1
            msg = fut.result()
            if msg:
                report.add_problem(row.id, row.index, msg)

    try:
        count = 0
        for start, batch in m.iter_batches():
            count += batch.num_rows
            # Without image checks only rows that may have a problem become Row objects (ten million
            # rows validate in seconds); the same checks as before then decide on those rows.
            picked = None if pool is not None else np.flatnonzero(_maybe_problem(batch, max_prompt_tokens))
            rows = m.rows_of(batch, start) if picked is None else _rows_at(m, batch, start, picked)
            for row in rows:
                if row.error:
                    report.add_problem(row.id, row.index, row.error)
                    continue
                refused = _refused_input(row, policy)
                if refused:
                    report.add_problem(row.id, row.index, refused)
                    continue
                for name, text in (
                    ("target_prompt", row.target_prompt),
                    ("source_prompt", row.source_prompt),
                    ("negative_prompt", row.overrides.get("negative_prompt", "")),
                ):
                    if text and len(text) > max_prompt_tokens:  # cheap pre-check before the regex
                        n = estimate_tokens(text)
                        if n > max_prompt_tokens:
                            report.add_warning(
                                f"row {row.index} (id {row.id}): {name} is about {n} tokens; "
                                f"CLIP reads {max_prompt_tokens}, the rest will be truncated"
                            )
                if pool is not None:
                    pending.append((row, pool.submit(_check_image, row, max_pixels, policy)))
                    drain(image_threads * 4)
        drain(0)
        report.rows = count
    except ManifestError as e:
        report.errors.append(str(e))
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return report
