"""Where a row's translated image is written (OUT/images/{id}.{ext}) and where a record's output is found
again when OUT is read later, from another directory (features, eval, the report). No torch here."""

from __future__ import annotations

import os

from pnp_batch.io import storage

EXTENSIONS = {"png": "png", "jpg": "jpg", "webp": "webp"}


def output_uri(out: str, row_id: str, fmt: str) -> str:
    return storage.join(out, "images", f"{row_id}.{EXTENSIONS[fmt]}")


def located(out: str, recorded: str | None, folder: str = "images") -> str | None:
    """Where a record's output image is now. A run given a relative ``--out`` records relative paths,
    relative to the directory it ran in; read later from anywhere else (``features``, ``eval``,
    ``report`` on OUT), such a path is taken as OUT/<folder>/<its name> (``images``; ``masks`` for a
    region edit's mask). URIs and absolute paths are kept as recorded."""
    if not recorded or storage.is_remote(recorded) or os.path.isabs(os.path.expanduser(recorded)):
        return recorded
    return storage.join(out, folder, storage.basename(recorded))


# The record columns that name a file under OUT, and the folder each lies in.
FILE_COLUMNS = (("output", "images"), ("mask", "masks"))


def locate_files(out: str, table):
    """`table` (result records) with its `output` and `mask` columns as :func:`located` finds them now."""
    import pyarrow as pa

    for col, folder in FILE_COLUMNS:
        if col in table.column_names:
            now = [located(out, u, folder) for u in table.column(col).to_pylist()]
            table = table.set_column(table.column_names.index(col), col, pa.array(now, pa.string()))
    return table
