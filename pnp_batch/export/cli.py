"""The `pnp-batch export` options and their call (light at import: `pnp-batch --help` loads no table library)."""

from __future__ import annotations

import argparse
from typing import Any

from pnp_batch.errors import UsageError


def _size(text: str) -> int:
    """A byte count: 500000000, 500MB, 2GiB, 64k."""
    t = text.strip().lower().replace(" ", "")
    units = {"k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20, "g": 10**9, "gb": 10**9,
             "gib": 2**30, "b": 1, "": 1}
    num = t.rstrip("kmgib")
    try:
        return int(float(num) * units[t[len(num):]])
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r} (e.g. 500MB, 2GiB)") from None


def add_export_args(x: argparse.ArgumentParser) -> None:
    x.add_argument("out", help="an output of pnp-batch run (folder or object-store prefix)")
    x.add_argument("dest", help="where the data set goes: a local folder or an object-store prefix")
    x.add_argument("--where", default=None, metavar="EXPR",
                   help="SQL boolean expression over the latest record per id joined with its latest score, e.g. "
                   "\"status = 'ok' AND structure_dist < 0.05 AND clip_gain > 2\" (default: every row)")
    x.add_argument("--format", choices=("webdataset", "parquet", "imagefolder"), default="webdataset")
    x.add_argument("--shard-size", type=int, default=10_000, help="rows per shard (default 10,000)")
    x.add_argument("--shard-bytes", type=_size, default=None, metavar="SIZE",
                   help="close a shard once its images reach SIZE (e.g. 500MB); --shard-size still caps its rows")
    x.add_argument("--split", default="train", help="imagefolder: the split folder (default train)")
    x.add_argument("--dry-run", action="store_true", help="print the counts and a few matching rows; write nothing")
    x.add_argument("--overwrite", action="store_true", help="replace another export found in DEST")
    x.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local (this process) or ray (shards written in parallel by Ray Data tasks)")
    x.add_argument("--ray-address", default=None, help="Ray cluster to join ('auto' = running cluster)")
    x.add_argument("--workers", type=int, default=None, help="Ray: shards written at once (default: one per CPU)")
    x.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")


def run_export(a: argparse.Namespace, storage_options: dict[str, Any]) -> int:
    from pnp_batch.export.driver import export
    from pnp_batch.export.run import ExportRequest

    if a.workers is not None and a.workers < 1:
        raise UsageError("--workers must be >= 1")
    return export(ExportRequest(
        out=a.out, dest=a.dest, where=a.where, format=a.format, shard_size=a.shard_size, shard_bytes=a.shard_bytes,
        split=a.split, dry_run=a.dry_run, overwrite=a.overwrite, engine=a.engine, ray_address=a.ray_address,
        workers=a.workers, storage_options=storage_options,
    ))
