"""The demo set in manifests/demo: images open, both manifest files agree, ids and targets are sane."""

from __future__ import annotations

import csv
import re
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

DEMO = Path(__file__).resolve().parents[1] / "manifests" / "demo"
COLUMNS = ["id", "image", "source_prompt", "target_prompt"]
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def csv_rows() -> list[dict[str, str]]:
    with (DEMO / "manifest.csv").open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def parquet_rows() -> list[dict[str, str]]:
    return pq.read_table(DEMO / "manifest.parquet").to_pylist()


def image_files() -> list[Path]:
    return sorted((DEMO / "images").glob("*.jpg"))


def test_columns_are_the_contract_columns() -> None:
    with (DEMO / "manifest.csv").open(newline="", encoding="utf-8") as f:
        assert next(csv.reader(f)) == COLUMNS
    assert pq.read_schema(DEMO / "manifest.parquet").names == COLUMNS


def test_csv_and_parquet_have_identical_rows() -> None:
    rows = csv_rows()
    assert 10 <= len(rows) <= 13
    assert parquet_rows() == rows


def test_files_match_the_generating_script() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_manifest", DEMO / "make_manifest.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.rows() == csv_rows()


def test_ids_are_unique_and_safe() -> None:
    ids = [r["id"] for r in csv_rows()]
    assert len(set(ids)) == len(ids)
    for i in ids:
        assert SAFE_ID.fullmatch(i), i


def test_prompts_are_present() -> None:
    for r in csv_rows():
        assert r["target_prompt"].strip(), r["id"]
        assert r["source_prompt"].strip(), r["id"]
        assert r["target_prompt"] != r["source_prompt"], r["id"]


def test_every_source_has_two_or_three_targets() -> None:
    counts = Counter(r["image"] for r in csv_rows())
    assert len(counts) >= 4
    for image, n in counts.items():
        assert 2 <= n <= 3, (image, n)


def test_rows_of_one_source_share_its_prompt() -> None:
    by_image: dict[str, set[str]] = {}
    for r in csv_rows():
        by_image.setdefault(r["image"], set()).add(r["source_prompt"])
    assert all(len(p) == 1 for p in by_image.values())


def test_image_paths_are_relative_and_exist() -> None:
    referenced = {r["image"] for r in csv_rows()}
    for rel in referenced:
        assert not rel.startswith("/") and "://" not in rel, rel
        assert (DEMO / rel).is_file(), rel
    assert {f"images/{p.name}" for p in image_files()} == referenced


@pytest.mark.parametrize("path", image_files(), ids=lambda p: p.name)
def test_image_opens_and_fits(path: Path) -> None:
    with Image.open(path) as im:
        assert im.format == "JPEG"
        im.load()
        assert min(im.size) <= 512
        assert im.mode in ("RGB", "L")


def test_images_are_small_and_varied() -> None:
    files = image_files()
    assert 4 <= len(files) <= 5
    assert sum(p.stat().st_size for p in files) < 1_000_000
    sizes = [Image.open(p).size for p in files]
    assert any(w != h for w, h in sizes), "the demo set should include non-square images"


def test_sources_md_lists_every_image() -> None:
    text = (DEMO / "SOURCES.md").read_text(encoding="utf-8")
    for p in image_files():
        assert f"images/{p.name}" in text
        assert f"skimage.data.{p.stem}" in text
    assert "CC0" in text and "public domain" in text
