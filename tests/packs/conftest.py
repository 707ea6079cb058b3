"""Helpers of the packs tests (tests/packs/)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest


def forget_rows(out: Path, ids: set[str]) -> None:
    """As if a run had died before these rows were written: their records, images and masks gone."""
    for shard in (out / "results").glob("*.parquet"):
        t = pq.read_table(shard)
        pq.write_table(t.filter(pc.invert(pc.is_in(t["id"], value_set=pa.array(sorted(ids))))), shard)
    for i in ids:
        (out / "images" / f"{i}.png").unlink()
        (out / "masks" / f"{i}.png").unlink(missing_ok=True)


@pytest.fixture
def forget() -> Callable[[Path, set[str]], None]:
    return forget_rows
