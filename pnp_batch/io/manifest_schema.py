"""A manifest's columns and files: the known columns and their types, which format a file is
(Parquet, CSV, JSON Lines), its schema and the check of it. io/manifest.py reads the rows."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pnp_batch.errors import UsageError
from pnp_batch.io import storage

OVERRIDE_COLUMNS = ("negative_prompt", "seed", "guidance_scale", "pnp_f_t", "pnp_attn_t")
STRING_COLUMNS = ("id", "image", "source_prompt", "target_prompt", "negative_prompt")
FLOAT_COLUMNS = ("guidance_scale", "pnp_f_t", "pnp_attn_t")
# Image prompts of an IP-Adapter run (docs/ip_adapter.md): a URI or the bytes, and a per-row scale (a
# number, or diffusers' per-block form as JSON text).
IP_COLUMNS = ("ip_image", "ip_image_bytes", "ip_adapter_scale")
# A row's edit mask (docs/masks.md): a URI of an image (white or non-zero = edit here) or its bytes.
MASK_COLUMNS = ("mask", "mask_bytes")
KNOWN_COLUMNS = ("id", "image", "image_bytes", "source_prompt", "target_prompt", *OVERRIDE_COLUMNS, *IP_COLUMNS,
                 *MASK_COLUMNS)

PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
CSV_SUFFIXES = (".csv", ".tsv")
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")


class ManifestError(UsageError):
    """The manifest cannot be used at all (exit status 2)."""


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t) or (
        pa.types.is_binary_view(t)
    )


def check_schema(schema: pa.Schema, where: str) -> None:
    names = set(schema.names)
    missing = []
    if "target_prompt" not in names:
        missing.append("'target_prompt'")
    if "image" not in names and "image_bytes" not in names:
        missing.append("'image' or 'image_bytes'")
    if missing:
        raise ManifestError(
            f"{where}: missing required column {' and '.join(missing)}; columns are: {', '.join(schema.names)}"
        )
    wrong = []
    for f in schema:
        t = f.type
        if pa.types.is_null(t) or f.name not in KNOWN_COLUMNS:
            continue
        if f.name == "id":
            ok = _is_string(t) or pa.types.is_integer(t)
        elif f.name in ("image_bytes", "ip_image_bytes", "mask_bytes"):
            ok = _is_binary(t) or _is_string(t)
        elif f.name in ("ip_image", "mask"):
            ok = _is_string(t)
        elif f.name == "ip_adapter_scale":
            ok = pa.types.is_integer(t) or pa.types.is_floating(t) or _is_string(t)
        elif f.name in STRING_COLUMNS:
            ok = _is_string(t) or pa.types.is_dictionary(t) and _is_string(t.value_type)
        elif f.name == "seed":
            ok = pa.types.is_integer(t) or pa.types.is_floating(t)
        else:
            ok = pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
        if not ok:
            want = {
                "id": "string", "image_bytes": "binary", "seed": "integer", "ip_image": "string",
                "ip_image_bytes": "binary", "ip_adapter_scale": "number or JSON text", "mask": "string",
                "mask_bytes": "binary",
            }.get(f.name, "string" if f.name in STRING_COLUMNS else "number")
            wrong.append(f"'{f.name}' is {t}, expected {want}")
    if wrong:
        raise ManifestError(f"{where}: wrong column type: {'; '.join(wrong)}")


def kind_of(uri: str) -> str:
    low = uri.lower().rstrip("/")
    if low.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if low.endswith(CSV_SUFFIXES):
        return "csv"
    if low.endswith(JSON_SUFFIXES):
        return "jsonl"
    return "unknown"


def csv_parse_options(uri: str) -> pacsv.ParseOptions:
    return pacsv.ParseOptions(delimiter="\t" if uri.lower().endswith(".tsv") else ",", newlines_in_values=True)


# CSV cells read as text (ids, prompts and pass-through columns pass through unchanged: "NA", "null",
# "02134" stay text); only the known numeric columns are numbers, where these tokens mean "no value".
CSV_NULL_TOKENS = ("", "NA", "N/A", "NaN", "nan", "null", "NULL", "None", "none")
CSV_NUMERIC = {"seed": pa.int64(), **{c: pa.float64() for c in FLOAT_COLUMNS}}


def csv_convert_options(cols: list[str] | None = None, names: list[str] | None = None) -> pacsv.ConvertOptions:
    """Every column as text (an empty cell is null); the numeric columns are typed by :func:`csv_typed`."""
    text = (*STRING_COLUMNS, "image_bytes", "ip_image", "ip_image_bytes", "mask", "mask_bytes")
    types: dict[str, pa.DataType] = {c: pa.string() for c in (*text, *CSV_NUMERIC)}
    types.update({c: pa.string() for c in names or ()})
    return pacsv.ConvertOptions(
        column_types=types,
        strings_can_be_null=True,
        null_values=[""],
        quoted_strings_can_be_null=False,
        include_columns=cols,
    )


def csv_typed(batch: pa.RecordBatch, where: str) -> pa.RecordBatch:
    """A CSV batch read as text with its numeric columns (seed, float overrides) as numbers; a cell that
    is no number is a ManifestError naming the column."""
    arrays = []
    for name, col in zip(batch.schema.names, batch.columns):
        typ = CSV_NUMERIC.get(name)
        if typ is not None:
            col = pc.if_else(pc.is_in(col, value_set=pa.array(CSV_NULL_TOKENS)), pa.nulls(len(col), pa.string()), col)
            try:
                col = pc.cast(pc.utf8_trim_whitespace(col), typ)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise ManifestError(f"{where}: column {name!r} holds a value that is not a number: {e}") from None
        arrays.append(col)
    return pa.RecordBatch.from_arrays(arrays, names=batch.schema.names)


def _csv_schema(names: list[str]) -> pa.Schema:
    return pa.schema([pa.field(n, CSV_NUMERIC.get(n, pa.string())) for n in names])


def read_schema(uri: str, kind: str) -> pa.Schema:
    try:
        with storage.open_input(uri) as fh:
            if kind == "parquet":
                return pq.ParquetFile(fh).schema_arrow
            if kind == "csv":
                reader = pacsv.open_csv(
                    fh,
                    read_options=pacsv.ReadOptions(block_size=1 << 20),
                    parse_options=csv_parse_options(uri),
                    convert_options=csv_convert_options(),
                )
                return _csv_schema(reader.schema.names)
            return _json_schema(fh)
    except FileNotFoundError:
        raise ManifestError(storage.redact(f"manifest not found: {uri}")) from None
    except (OSError, pa.ArrowException, ValueError) as e:
        raise ManifestError(storage.redact(f"cannot read manifest {uri}: {e}")) from None


def _json_schema(fh: Any, sample_lines: int = 10_000) -> pa.Schema:
    """Columns of a JSON Lines file: the union of keys over the first lines, with known types."""
    names: dict[str, None] = {}
    inferred: dict[str, pa.DataType] = {}
    for n, line in enumerate(fh):
        if n >= sample_lines:
            break
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise ManifestError(f"line {n + 1} is not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise ManifestError(
                f"line {n + 1} is not a JSON object (JSON manifests are JSON Lines: one object per line)"
            )
        for k, v in obj.items():
            names.setdefault(k)
            if v is not None and k not in inferred:
                try:
                    inferred[k] = pa.array([v]).type
                except (pa.ArrowException, ValueError, TypeError):
                    inferred[k] = pa.string()
    fields = []
    for k in names:
        if k in STRING_COLUMNS or k in ("image_bytes", "ip_image", "ip_image_bytes", "mask", "mask_bytes"):
            t = inferred.get(k, pa.string())
            if not (_is_string(t) or pa.types.is_integer(t)):
                fields.append(pa.field(k, t))
                continue
            fields.append(pa.field(k, pa.string() if k != "id" or _is_string(t) else pa.int64()))
        elif k == "seed":
            fields.append(pa.field(k, inferred.get(k, pa.int64())))
        elif k in FLOAT_COLUMNS:
            t = inferred.get(k, pa.float64())
            fields.append(pa.field(k, pa.float64() if pa.types.is_integer(t) else t))
        else:
            fields.append(pa.field(k, inferred.get(k, pa.string())))
    return pa.schema(fields)
