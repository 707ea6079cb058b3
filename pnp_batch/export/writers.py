"""The three export formats: each turns one shard's samples into files (relative path -> bytes), built in
memory (memory is bounded by one shard) and byte-for-byte the same for the same samples.

- ``webdataset``: ``{shard}.tar`` (img2dataset's layout: each sample's files side by side, keyed by the row
  id) and ``{shard}.parquet``, its index (one row per sample: key, id and the metadata).
- ``parquet``: ``{shard}.parquet`` with image bytes in Hugging Face ``datasets``' ``Image`` layout
  (``{bytes, path}``), in the columns diffusers' InstructPix2Pix training script reads by default
  (``input_image``, ``edit_prompt``, ``edited_image``), its features in the file's ``huggingface`` metadata.
- ``imagefolder``: ``{split}/{shard}/`` with the images and a ``metadata.jsonl`` (``*_file_name`` columns),
  as ``datasets``' imagefolder loader reads them.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pnp_batch.export.samples import Sample

FORMATS = ("webdataset", "parquet", "imagefolder")
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
ROW_GROUP_ROWS = 100  # small row groups: readers stream image rows without holding a whole shard


def sample_key(rid: str) -> str:
    """The WebDataset key of a row: its id, with '.' written '%2E' (WebDataset splits a file's key from its
    extension at the first dot; ids never contain '%', so the id reads back unambiguously)."""
    return rid.replace(".", "%2E")


def _json(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # fixed metadata: the same samples give the same bytes
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _meta_table(metas: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Metadata rows typed by the view's schema (timestamps as ISO strings, as in the JSON), plus `lora`."""
    cols = {}
    for f in schema:
        typ = pa.string() if pa.types.is_timestamp(f.type) or pa.types.is_date(f.type) else f.type
        cols[f.name] = pa.array([m.get(f.name) for m in metas], type=typ)
    cols["lora"] = pa.array([m.get("lora") or [] for m in metas], type=pa.list_(pa.string()))
    return pa.table(cols)


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=ROW_GROUP_ROWS, compression="zstd", store_schema=True)
    return buf.getvalue()


def webdataset_files(shard: str, samples: Sequence[Sample], schema: pa.Schema) -> dict[str, bytes]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT if _short(samples) else tarfile.PAX_FORMAT) as tar:
        for s in samples:
            key = sample_key(s.id)
            _tar_add(tar, f"{key}.src.png", s.source_png)
            _tar_add(tar, f"{key}.edit.{s.edit_ext}", s.edit)
            if s.mask_png is not None:
                _tar_add(tar, f"{key}.mask.png", s.mask_png)
            _tar_add(tar, f"{key}.txt", str(s.meta.get("target_prompt") or "").encode("utf-8"))
            _tar_add(tar, f"{key}.json", _json(s.meta))
    index = _meta_table([s.meta for s in samples], schema)
    index = index.add_column(0, "key", pa.array([sample_key(s.id) for s in samples], pa.string()))
    return {f"{shard}.tar": buf.getvalue(), f"{shard}.parquet": _parquet_bytes(index)}


def _short(samples: Sequence[Sample]) -> bool:
    return all(len(sample_key(s.id)) + 9 <= 100 for s in samples)  # ustar names up to 100 bytes


def _hf_value(typ: pa.DataType) -> dict[str, Any]:
    if pa.types.is_list(typ):
        return {"feature": _hf_value(typ.value_type), "_type": "List"}
    name = {pa.float64(): "float64", pa.float32(): "float32", pa.int64(): "int64", pa.int32(): "int32",
            pa.bool_(): "bool", pa.string(): "string", pa.large_string(): "large_string", pa.null(): "null"}
    return {"dtype": name.get(typ, "string"), "_type": "Value"}


def _with_hf_features(table: pa.Table, images: Sequence[str]) -> pa.Table:
    """The table with `datasets`' features in its schema metadata (the image columns as its Image feature)."""
    feats = {f.name: ({"_type": "Image"} if f.name in images else _hf_value(f.type)) for f in table.schema}
    meta = {b"huggingface": json.dumps({"info": {"features": feats}}).encode("utf-8")}
    return table.replace_schema_metadata(meta)


def _plain(schema: pa.Schema) -> pa.Schema:
    """The metadata columns that hold plain values (`datasets` Value types); others are left out."""
    ok = (pa.types.is_string, pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean, pa.types.is_timestamp)
    return pa.schema([f for f in schema if any(t(f.type) for t in ok)])


def parquet_files(shard: str, samples: Sequence[Sample], schema: pa.Schema) -> dict[str, bytes]:
    def image(data: bytes | None, name: str) -> dict[str, Any] | None:
        return None if data is None else {"bytes": data, "path": name}

    cols: dict[str, pa.Array] = {
        "input_image": pa.array([image(s.source_png, f"{s.id}.src.png") for s in samples], IMAGE_TYPE),
        "edit_prompt": pa.array([s.meta.get("target_prompt") for s in samples], pa.string()),
        "edited_image": pa.array([image(s.edit, f"{s.id}.edit.{s.edit_ext}") for s in samples], IMAGE_TYPE),
        "original_prompt": pa.array([s.meta.get("source_prompt") for s in samples], pa.string()),
        "edited_prompt": pa.array([s.meta.get("target_prompt") for s in samples], pa.string()),
    }
    images = ["input_image", "edited_image"]
    if any(s.mask_png is not None for s in samples) or "mask" in schema.names:
        cols["mask_image"] = pa.array([image(s.mask_png, f"{s.id}.mask.png") for s in samples], IMAGE_TYPE)
        images.append("mask_image")
    meta = _meta_table([s.meta for s in samples], _plain(schema))
    for name in meta.column_names:
        if name not in cols:
            cols[name] = meta.column(name)
    table = _with_hf_features(pa.table(cols), images)
    return {f"{shard}.parquet": _parquet_bytes(table)}


def imagefolder_files(shard: str, samples: Sequence[Sample], schema: pa.Schema, split: str = "train") -> dict[str, bytes]:
    folder = f"{split}/{shard}"
    files: dict[str, bytes] = {}
    lines = []
    for s in samples:
        entry = {"edited_image_file_name": f"{s.id}.edit.{s.edit_ext}", "input_image_file_name": f"{s.id}.src.png"}
        files[f"{folder}/{s.id}.src.png"] = s.source_png
        files[f"{folder}/{s.id}.edit.{s.edit_ext}"] = s.edit
        if s.mask_png is not None:
            entry["mask_image_file_name"] = f"{s.id}.mask.png"
            files[f"{folder}/{s.id}.mask.png"] = s.mask_png
        entry.update(edit_prompt=s.meta.get("target_prompt"), original_prompt=s.meta.get("source_prompt"),
                     edited_prompt=s.meta.get("target_prompt"))
        entry.update({k: v for k, v in s.meta.items() if k not in entry and not k.endswith("_file_name")})
        lines.append(_json(entry).decode("utf-8"))
    files[f"{folder}/metadata.jsonl"] = ("\n".join(lines) + "\n").encode("utf-8") if lines else b""
    return files


def shard_files(fmt: str, shard: str, samples: Sequence[Sample], schema: pa.Schema, split: str = "train") -> dict[str, bytes]:
    """One shard's files (relative path under DEST -> bytes); the data files first, in a fixed order."""
    if fmt == "webdataset":
        return webdataset_files(shard, samples, schema)
    if fmt == "parquet":
        return parquet_files(shard, samples, schema)
    if fmt == "imagefolder":
        return imagefolder_files(shard, samples, schema, split)
    raise ValueError(f"unknown export format {fmt!r}; one of {', '.join(FORMATS)}")
