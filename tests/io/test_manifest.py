"""manifest.py: formats, resolution, ids, row problems, streaming, validation, grouping."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pnp_batch.io import storage
from pnp_batch.io.manifest import ManifestError, Row, derive_id, group_rows, open_manifest
from pnp_batch.io.policy import InputPolicy
from pnp_batch.io.validate import estimate_tokens, validate_manifest

BASIC = {
    "id": ["a1", "b2", "c3"],
    "image": ["img/cat.png", "/abs/dog.png", "s3://bk/horse.png"],
    "source_prompt": ["a cat", None, "a horse"],
    "target_prompt": ["a tiger", "a wolf", "a zebra"],
}


def write_parquet(path, data: dict, **kw) -> str:
    pq.write_table(pa.table(data), str(path), **kw)
    return str(path)


def test_parquet_rows_and_relative_resolution(tmp_path) -> None:
    uri = write_parquet(tmp_path / "m.parquet", {**BASIC, "style": [1, 2, 3]})
    m = open_manifest(uri)
    assert m.columns == ["id", "image", "source_prompt", "target_prompt", "style"]
    assert m.extra_columns == ["style"]
    rows = list(m.iter_rows())
    assert [r.index for r in rows] == [0, 1, 2]
    assert rows[0].image == str(tmp_path / "img" / "cat.png")
    assert rows[1].image == "/abs/dog.png" and rows[2].image == "s3://bk/horse.png"
    assert rows[1].source_prompt == "" and rows[0].source_prompt == "a cat"
    assert rows[2].extra == {"style": 3} and rows[0].overrides == {}
    assert all(r.error is None for r in rows)
    assert m.check_ids() == 3
    assert [r.id for r in m.iter_rows(limit=2)] == ["a1", "b2"]


def test_csv_keeps_ids_as_strings_and_types_overrides(tmp_path) -> None:
    p = tmp_path / "m.csv"
    p.write_text(
        "id,image,target_prompt,seed,pnp_f_t,note\n"
        "001,x.png,a dog,7,0.5,hello\n"
        '002,y.png,"a cat, sitting",,,\n'
    )
    rows = list(open_manifest(str(p)).iter_rows())
    assert [r.id for r in rows] == ["001", "002"]
    assert rows[0].overrides == {"seed": 7, "pnp_f_t": 0.5}
    assert rows[1].overrides == {} and rows[1].target_prompt == "a cat, sitting"
    assert rows[0].extra == {"note": "hello"}
    assert rows[0].image == str(tmp_path / "x.png")


def test_jsonl(tmp_path) -> None:
    p = tmp_path / "m.jsonl"
    lines = [
        {"id": "j1", "image": "a.png", "target_prompt": "t1", "guidance_scale": 5},
        {"id": "j2", "image": "b.png", "target_prompt": "t2", "negative_prompt": "blurry", "tags": ["x"]},
    ]
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    rows = list(open_manifest(str(p)).iter_rows())
    assert rows[0].overrides == {"guidance_scale": 5.0}
    assert rows[1].overrides == {"negative_prompt": "blurry"}
    assert rows[1].extra == {"tags": ["x"]}


def test_folder_of_parquet_is_one_manifest(tmp_path) -> None:
    d = tmp_path / "man"
    d.mkdir()
    write_parquet(d / "part-1.parquet", {"id": ["c"], "image": ["c.png"], "target_prompt": ["t"]})
    write_parquet(d / "part-0.parquet", {"id": ["a", "b"], "image": ["a.png", "b.png"], "target_prompt": ["t", "t"]})
    (d / "_SUCCESS").write_text("")
    m = open_manifest(str(d))
    rows = list(m.iter_rows())
    assert [(r.index, r.id) for r in rows] == [(0, "a"), (1, "b"), (2, "c")]
    assert rows[0].image == str(d / "a.png")


def test_s3_manifest(s3_bucket: str) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(BASIC), sink)
    storage.write_bytes_atomic(f"{s3_bucket}/data/m.parquet", sink.getvalue().to_pybytes())
    m = open_manifest(f"{s3_bucket}/data/m.parquet")
    rows = list(m.iter_rows())
    assert rows[0].image == f"{s3_bucket}/data/img/cat.png"
    assert m.check_ids() == 3
    report = validate_manifest(f"{s3_bucket}/data/m.parquet")  # a remote manifest may not name worker files
    assert [(p[0], "local file /abs/dog.png" in p[2]) for p in report.row_problems] == [("b2", True)]
    trusted = InputPolicy.for_manifest(f"{s3_bucket}/data/m.parquet", allow_uri=("/abs/",))
    assert validate_manifest(f"{s3_bucket}/data/m.parquet", policy=trusted).ok
    folder = open_manifest(f"{s3_bucket}/data")
    assert [r.id for r in folder.iter_rows()] == ["a1", "b2", "c3"]


def test_derived_ids_are_deterministic(tmp_path) -> None:
    data = {"image": ["a.png", "a.png", "b.png"], "target_prompt": ["x", "y", "x"], "seed": [1, 1, None]}
    uri = write_parquet(tmp_path / "m.parquet", data)
    ids1 = [r.id for r in open_manifest(uri).iter_rows()]
    ids2 = [r.id for r in open_manifest(uri).iter_rows()]
    assert ids1 == ids2 and len(set(ids1)) == 3
    assert all(i.startswith("r") and len(i) == 17 for i in ids1)
    assert ids1[0] == derive_id("a.png", "", "x", {"seed": 1})
    assert open_manifest(uri).check_ids() == 3


def test_partly_missing_ids_are_derived(tmp_path) -> None:
    uri = write_parquet(tmp_path / "m.parquet", {"id": ["k", None], "image": ["a", "b"], "target_prompt": ["t", "t"]})
    m = open_manifest(uri)
    assert [i for _, i in m.iter_ids()] == ["k", derive_id("b", "", "t", {})]


def test_duplicate_ids_rejected_naming_them(tmp_path) -> None:
    ids = ["a", "dup", "b", "dup", "c", "x7", "x7"]
    uri = write_parquet(
        tmp_path / "m.parquet", {"id": ids, "image": ["i"] * 7, "target_prompt": ["t"] * 7}, row_group_size=2
    )
    with pytest.raises(ManifestError) as ei:
        open_manifest(uri).check_ids()
    msg = str(ei.value)
    assert "2 duplicate ids" in msg and "'dup' (rows 1, 3)" in msg and "'x7' (rows 5, 6)" in msg
    report = validate_manifest(uri)
    assert not report.ok and "duplicate" in report.errors[0]


def test_missing_columns(tmp_path) -> None:
    uri = write_parquet(tmp_path / "m.parquet", {"id": ["a"], "image": ["x"]})
    with pytest.raises(ManifestError, match="missing required column 'target_prompt'"):
        open_manifest(uri)
    uri2 = write_parquet(tmp_path / "m2.parquet", {"id": ["a"], "target_prompt": ["x"]})
    with pytest.raises(ManifestError, match="'image' or 'image_bytes'"):
        open_manifest(uri2)


def test_wrong_types_and_unreadable(tmp_path) -> None:
    uri = write_parquet(tmp_path / "m.parquet", {"image": ["x"], "target_prompt": [3]})
    with pytest.raises(ManifestError, match="'target_prompt' is int64, expected string"):
        open_manifest(uri)
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(ManifestError, match="cannot read manifest"):
        open_manifest(str(bad))
    with pytest.raises(ManifestError, match="not found"):
        open_manifest(str(tmp_path / "none.parquet"))
    report = validate_manifest(str(tmp_path / "none.parquet"))
    assert not report.ok and "not found" in report.format()


def test_row_errors(tmp_path) -> None:
    data = {
        "id": ["ok1", "../x", "e1", "e2", "e3", "e4", "e5"],
        "image": ["a", "a", "a", None, "a", "a", "a"],
        "target_prompt": ["t", "t", "   ", "t", "t", "t", "t"],
        "pnp_f_t": [0.5, None, None, None, 1.5, None, float("nan")],
        "guidance_scale": [None, None, None, None, None, -1.0, None],
    }
    rows = list(open_manifest(write_parquet(tmp_path / "m.parquet", data)).iter_rows())
    assert rows[0].error is None and rows[0].overrides == {"pnp_f_t": 0.5}
    assert rows[1].error.startswith("unsafe id '../x': must match")
    assert rows[2].error == "empty target_prompt"
    assert rows[3].error == "no image"
    assert "pnp_f_t=1.5 must be a number from 0 to 1" in rows[4].error
    assert "guidance_scale=-1.0 must be a number >= 0" in rows[5].error
    assert rows[6].error is None and rows[6].overrides == {}  # NaN (pandas' missing) is absent
    report = validate_manifest(str(tmp_path / "m.parquet"))
    assert not report.ok and report.row_problem_count == 5 and report.rows == 7
    assert (rows[1].id, 1, rows[1].error) in report.row_problems
    assert "row 2 (id e1): empty target_prompt" in report.format()


def test_image_bytes_rows_share_a_source_key(tmp_path, make_png) -> None:
    png = make_png(4, 4)
    data = {"image_bytes": [png, png, make_png(4, 4, seed=1)], "target_prompt": ["a", "b", "c"]}
    rows = list(open_manifest(write_parquet(tmp_path / "m.parquet", data)).iter_rows())
    assert rows[0].image is None and rows[0].image_bytes == png
    assert rows[0].source_key == rows[1].source_key != rows[2].source_key
    assert rows[0].source_key.startswith("bytes:")


def test_validate_with_check_images(tmp_path, make_png) -> None:
    (tmp_path / "good.png").write_bytes(make_png(8, 8))
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    data = {
        "id": ["g", "e", "t", "m"],
        "image": ["good.png", "empty.png", "text.png", "missing.png"],
        "target_prompt": ["x"] * 4,
    }
    report = validate_manifest(write_parquet(tmp_path / "m.parquet", data), check_images=True)
    problems = {rid: msg for rid, _, msg in report.row_problems}
    assert report.images_checked == 4 and not report.ok
    assert set(problems) == {"e", "t", "m"}
    assert problems["e"] == "empty file (0 bytes)"
    assert problems["t"] == "not an image (cannot identify format)"
    assert problems["m"].startswith("image not found:")
    small = validate_manifest(str(tmp_path / "m.parquet"), check_images=True, max_pixels=10)
    assert "over the limit of 10" in {r: m for r, _, m in small.row_problems}["g"]


def test_long_prompt_warning(tmp_path) -> None:
    long = " ".join(["word"] * 90)
    assert estimate_tokens(long) == 90
    assert estimate_tokens("a photo of 2 cats, sitting.") == 8
    report = validate_manifest(write_parquet(tmp_path / "m.parquet", {"image": ["a"], "target_prompt": [long]}))
    assert report.ok and report.warning_count == 1
    assert "about 90 tokens" in report.warnings[0] and "truncated" in report.warnings[0]


@pytest.mark.slow
def test_iter_rows_streams_in_batches(tmp_path) -> None:
    n = 200_000
    data = {
        "id": [f"id{i:07d}" for i in range(n)],
        "image": [f"images/{i:07d}.png" for i in range(n)],
        "target_prompt": [f"a photo of thing number {i} in the style of something long" for i in range(n)],
    }
    uri = write_parquet(tmp_path / "big.parquet", data, row_group_size=10_000)
    del data
    assert isinstance(open_manifest(uri).iter_rows(batch_rows=1000), types.GeneratorType)
    # Measured in a fresh interpreter: tracemalloc counts every thread's allocations, and threads that
    # earlier tests left running (Ray's, a server's) would be counted in this process.
    probe = (
        "import sys, tracemalloc\n"
        "from pnp_batch.io.manifest import open_manifest\n"
        "it = open_manifest(sys.argv[1]).iter_rows(batch_rows=1000)\n"
        "tracemalloc.start()\n"
        "count = 0\n"
        "for row in it:\n"
        "    count += 1\n"
        "print(count, row.index, tracemalloc.get_traced_memory()[1])\n"
    )
    res = subprocess.run([sys.executable, "-c", probe, uri], check=False, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    count, last, peak = map(int, res.stdout.split())
    assert count == n and last == n - 1
    table_bytes = pq.read_table(uri).nbytes
    assert peak < table_bytes / 4, (peak, table_bytes)


def test_iter_rows_is_lazy(tmp_path) -> None:
    uri = write_parquet(tmp_path / "m.parquet", {"image": ["a"] * 50, "target_prompt": ["t"] * 50}, row_group_size=10)
    m = open_manifest(uri)
    pulled: list[int] = []
    real = m.batches

    def spy(*a, **kw):
        for b in real(*a, **kw):
            pulled.append(b.num_rows)
            yield b

    m.batches = spy  # type: ignore[method-assign]
    first = next(m.iter_rows(batch_rows=10))
    assert first.index == 0 and pulled == [10]


def _row(index: int, key: str, error: str | None = None) -> Row:
    return Row(index=index, id=f"i{index}", image=key, image_bytes=None, source_prompt="", target_prompt="t",
               error=error)


def test_group_rows_keeps_sources_together() -> None:
    rows = [_row(0, "a"), _row(1, "b"), _row(2, "a"), _row(3, "c", error="empty target_prompt"), _row(4, "b"),
            _row(5, "a")]
    groups = [[r.index for r in g] for g in group_rows(rows)]
    assert groups == [[0, 2, 5], [1, 4], [3]]
    windowed = [[r.index for r in g] for g in group_rows(rows, window=3)]
    assert windowed == [[0, 2], [1], [3, ], [4], [5]]
    # errored rows never join a group, even when they share the source
    assert [[r.index for r in g] for g in group_rows([_row(0, "a", "x"), _row(1, "a"), _row(2, "a")])] == [
        [0], [1, 2],
    ]


def test_no_torch_import() -> None:
    import subprocess

    code = "import sys, pnp_batch.io.manifest, pnp_batch.io.results, pnp_batch.io.storage, pnp_batch.io.images; " \
           "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
