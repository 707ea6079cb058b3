"""The bad-input corpus through a whole `pnp-batch run` (CONTRACT "Bad input"): every bad row is
recorded as failed with its cause and the run goes on; every image that can be converted to RGB is
translated; a duplicate id rejects the manifest before any work."""

from __future__ import annotations

import io
import logging
import struct
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pnp_batch.cli import main
from pnp_batch.io import retry
from pnp_batch.io.results import latest_results

FAST = ["--pipeline", "tiny", "--set", "steps=4", "--set", "inversion_steps=4", "--set", "resolution=64",
        "--no-report", "--set", "max_pixels=5000"]


def _rgb(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _save(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_claiming(w: int, h: int) -> bytes:
    """A well-formed PNG header declaring w x h pixels, with almost no data behind it (a bomb)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _chunk(b"IEND", b""))


def _palette_with_transparency() -> bytes:
    img = _rgb(40, 30, 5).quantize(colors=16)
    return _save(img, transparency=0)


def _corpus(folder) -> dict[str, bytes]:
    good = _save(_rgb(48, 40, 1))
    sixteen = Image.fromarray((np.arange(40 * 48, dtype=np.uint16).reshape(40, 48) * 31).astype(np.uint16))
    assert sixteen.mode.startswith("I;16")
    files = {
        "good.png": good,
        "text.png": b"this is a text file, not an image\n" * 4,
        "truncated.png": good[: len(good) // 2],
        "zero.png": b"",
        "big.png": _save(_rgb(100, 100, 2)),  # 10 000 pixels > max_pixels=5000
        "bomb.png": _png_claiming(100_000, 100_000),
        "cmyk.jpg": _save(_rgb(48, 40, 3).convert("CMYK"), "JPEG", quality=90),
        "sixteen.png": _save(sixteen),
        "palette.png": _palette_with_transparency(),
        "rgba.png": _save(_rgb(40, 48, 4).convert("RGBA")),
        "gray.png": _save(_rgb(48, 40, 6).convert("L")),
        "tiny.png": _save(_rgb(2, 3, 7)),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


OK_ROWS = {"good", "cmyk", "sixteen", "palette", "rgba", "gray", "tiny", "long-prompt"}
FAILED_ROWS = {
    "missing": "not found",
    "text": "not an image",
    "truncated": "truncated",
    "zero": "empty file",
    "big": "over the limit",
    "bomb": "over the limit",
    "empty-prompt": "empty target_prompt",
    "../etc": "unsafe id",
    "unreachable": "127.0.0.1:9",  # allowed by --allow-uri below, then retried and given up on
    "metadata": "uri not allowed: link-local address 169.254.169.254",  # refused before any connection
    "outside": "uri not allowed: local file",  # a local file outside the manifest's folder
}


def _manifest(tmp_path) -> str:
    _corpus(tmp_path)
    long_prompt = " ".join(["photo"] * 300)
    rows = [
        {"id": "good", "image": "good.png", "target_prompt": "a fox"},
        {"id": "missing", "image": "no-such-file.png", "target_prompt": "a fox"},
        {"id": "text", "image": "text.png", "target_prompt": "a fox"},
        {"id": "truncated", "image": "truncated.png", "target_prompt": "a fox"},
        {"id": "zero", "image": "zero.png", "target_prompt": "a fox"},
        {"id": "big", "image": "big.png", "target_prompt": "a fox"},
        {"id": "bomb", "image": "bomb.png", "target_prompt": "a fox"},
        {"id": "cmyk", "image": "cmyk.jpg", "target_prompt": "a fox"},
        {"id": "sixteen", "image": "sixteen.png", "target_prompt": "a fox"},
        {"id": "palette", "image": "palette.png", "target_prompt": "a fox"},
        {"id": "rgba", "image": "rgba.png", "target_prompt": "a fox"},
        {"id": "gray", "image": "gray.png", "target_prompt": "a fox"},
        {"id": "tiny", "image": "tiny.png", "target_prompt": "a fox"},
        {"id": "empty-prompt", "image": "good.png", "target_prompt": ""},
        {"id": "long-prompt", "image": "good.png", "target_prompt": long_prompt},
        {"id": "../etc", "image": "good.png", "target_prompt": "a fox"},
        {"id": "unreachable", "image": "http://127.0.0.1:9/x.png", "target_prompt": "a fox"},
        {"id": "metadata", "image": "http://169.254.169.254/latest/meta-data/x.png", "target_prompt": "a fox"},
        {"id": "outside", "image": "../outside.png", "target_prompt": "a fox"},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "manifest.parquet")
    return str(tmp_path / "manifest.parquet")


@pytest.fixture
def no_backoff(monkeypatch):
    """Retries of the unreachable URL happen without the real backoff sleeps."""
    monkeypatch.setattr(retry, "_sleep", lambda s: None)


def test_bad_input_corpus_through_a_run(tmp_path, tiny_model_dir, no_backoff, caplog):
    inputs = tmp_path / "in"
    inputs.mkdir()
    m = _manifest(inputs)
    out = tmp_path / "out"
    caplog.set_level(logging.INFO)
    (tmp_path / "outside.png").write_bytes((inputs / "good.png").read_bytes())
    assert main(["run", m, "--out", str(out), *FAST, "--allow-uri", "http://127.0.0.1:9/"]) == 1

    res = {r["id"]: r for r in latest_results(str(out)).to_pylist()}
    assert set(res) == OK_ROWS | set(FAILED_ROWS)
    for rid in sorted(OK_ROWS):
        assert res[rid]["status"] == "ok", (rid, res[rid]["error"])
        assert res[rid]["error"] is None
        with Image.open(out / "images" / f"{rid}.png") as im:
            assert im.mode == "RGB" and min(im.size) == 64
    for rid, cause in FAILED_ROWS.items():
        assert res[rid]["status"] == "failed", rid
        assert cause in res[rid]["error"], (rid, res[rid]["error"])
        assert res[rid]["output"] is None
    assert "100000 x 100000" in res["bomb"]["error"]
    # the over-long prompt is translated (truncated as diffusers does) with a warning recorded
    assert "truncated" in res["long-prompt"]["warning"]
    assert all(res[rid]["warning"] is None for rid in OK_ROWS - {"long-prompt"})
    # only the ok rows have images; the unsafe id wrote nothing anywhere
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(f"{rid}.png" for rid in OK_ROWS)
    assert not (tmp_path / "etc.png").exists() and not (out / "etc.png").exists()
    # each failure is logged naming the row and the reason
    logged = [r.getMessage() for r in caplog.records]
    for rid, cause in FAILED_ROWS.items():
        assert any(f"row {rid} failed" in m and cause in m for m in logged), rid


def test_duplicate_id_rejects_the_manifest_before_any_work(tmp_path, make_png):
    (tmp_path / "a.png").write_bytes(make_png(16, 16))
    rows = [{"id": "a", "image": "a.png", "target_prompt": "x"}, {"id": "b", "image": "a.png", "target_prompt": "y"},
            {"id": "a", "image": "a.png", "target_prompt": "z"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "dup.parquet")
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "dup.parquet"), "--out", str(out), *FAST]) == 2
    assert not out.exists()
