"""Region edits (masks) and image prompts (IP-Adapter) in packs of sources, end to end on the tiny model:
packed outputs match the unpacked ones (exact where the mask keeps the source), a row whose mask or image
prompt cannot be used fails alone and leaves its neighbours' bytes as they are when it can, and a run
resumed mid-pack writes the bytes of an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import output_images, run_summaries
from PIL import Image

from pnp_batch.cli import main
from pnp_batch.io.images import decode_image, resize_source

RES = 64
FAST = ["--pipeline", "tiny", "--set", "steps=4", "--set", "inversion_steps=4", "--set", f"resolution={RES}",
        "--no-report"]
N_SOURCES = 5  # packs of 4: [4, 1]


def _folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    for i in range(N_SOURCES):
        small = rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)
        Image.fromarray(small).resize((RES, RES), Image.BICUBIC).save(root / f"s{i}.png")
    left = np.zeros((RES, RES), np.uint8)
    left[:, : RES // 2] = 255
    Image.fromarray(left).save(root / "left.png")
    Image.fromarray(np.full((RES, RES), 255, np.uint8)).save(root / "white.png")
    style = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(style).resize((40, 32), Image.BICUBIC).save(root / "style.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    return root


def _manifest(folder: Path, name: str, extra: dict[int, dict] | None = None, prompts=("a fox", "a cat")) -> str:
    rows = []
    for i in range(N_SOURCES):
        for j, p in enumerate(prompts):
            row = {"id": f"s{i}-{j}", "image": f"s{i}.png", "source_prompt": "a photo", "target_prompt": p}
            rows.append({**row, **(extra or {}).get(i, {})})
    keys = sorted({k for r in rows for k in r})
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), folder / name)
    return str(folder / name)


def _run(manifest: str, out: Path, n: int, *extra: str) -> int:
    return main(["run", manifest, "--out", str(out), *FAST, "--set", f"sources_per_batch={n}", *extra])


def _pixels(out: Path, rid: str) -> np.ndarray:
    return np.asarray(Image.open(out / "images" / f"{rid}.png")).astype(int)


def _records(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in pq.read_table(out / "results").to_pylist()}


def _unet(out: Path) -> tuple[int, int, int]:
    u = run_summaries(out)[-1]["stats"]["unet"]
    return u["sample_calls"], u["sample_elements"], u["source_elements"]


MASKED = {i: {"mask": "left.png"} for i in range(N_SOURCES)}
PASTE = ["--set", "mask_mode=manifest", "--set", "mask_paste=true"]


def _unpacked_and_packed(folder: Path, rows: dict[int, dict], *args: str) -> tuple[Path, str]:
    """The manifest run with N = 1 (folder/n1) and N = 4 (folder/n4)."""
    manifest = _manifest(folder, "m.parquet", rows)
    assert _run(manifest, folder / "n1", 1, *args) == 0
    assert _run(manifest, folder / "n4", 4, *args) == 0
    return folder, manifest


@pytest.fixture(scope="module")
def masked(tmp_path_factory, tiny_model_dir):
    return _unpacked_and_packed(_folder(tmp_path_factory.mktemp("packmasks")), MASKED, *PASTE)


def test_masks_ride_in_packs_the_kept_half_exactly_the_source(masked):
    folder, _ = masked
    n1, n4 = folder / "n1", folder / "n4"
    assert output_images(n1).keys() == output_images(n4).keys() and len(output_images(n4)) == 2 * N_SOURCES
    u1, u4 = (run_summaries(folder / n)[-1]["stats"]["unet"] for n in ("n1", "n4"))
    assert u4["sample_calls"] < u1["sample_calls"] and u4["sample_elements"] == u1["sample_elements"]
    for i in range(N_SOURCES):
        src = np.asarray(resize_source(decode_image((folder / f"s{i}.png").read_bytes(), 10**8), RES,
                                       "short_side").convert("RGB")).astype(int)
        for j in range(2):
            rid = f"s{i}-{j}"
            a, b = _pixels(n1, rid), _pixels(n4, rid)
            assert (b[:, RES // 2 + 8 :] == src[:, RES // 2 + 8 :]).all(), rid  # kept (past the edge cell): the source
            assert np.abs(a - b).max() <= 2, rid  # edited half: the unpacked translation, up to the last bits
            assert np.abs(b[:, : RES // 2] - src[:, : RES // 2]).mean() > 1, rid  # and it is edited
    recs = _records(n4)
    assert all(r["status"] == "ok" and r["mask"].endswith(f"masks/{r['id']}.png") for r in recs.values())
    assert len(list((n4 / "masks").glob("*.png"))) == 2 * N_SOURCES


def test_an_unusable_mask_fails_its_row_and_leaves_the_pack_as_it_was(masked, tmp_path):
    folder, _ = masked
    bad = _manifest(folder, "bad.parquet", {**MASKED, 1: {"mask": "broken.png"}, 2: {"mask": "nope.png"}})
    out = tmp_path / "o"
    assert _run(bad, out, 4, *PASTE) == 1
    recs = _records(out)
    for rid in ("s1-0", "s1-1", "s2-0", "s2-1"):
        assert recs[rid]["status"] == "failed" and "mask" in recs[rid]["error"], rid
    got, ref = output_images(out), output_images(folder / "n4")
    assert set(got) == {k for k in ref if not k.startswith(("s1-", "s2-"))}
    assert got == {k: ref[k] for k in got}  # its neighbours' bytes: as when every mask could be used
    # the failed rows stayed in their pack as fillers: the very calls of the run where they could be used
    # (what keeps a GPU's bits, whose kernels may depend on the batch shape; this CPU's do not)
    assert _unet(out) == _unet(folder / "n4")


def test_a_masked_run_resumed_mid_pack_writes_the_uninterrupted_bytes(masked, tmp_path, forget):
    folder, manifest = masked
    out = tmp_path / "o"
    assert _run(manifest, out, 4, *PASTE) == 0
    forget(out, {"s1-1", "s3-0", "s4-1"})
    assert _run(manifest, out, 4, *PASTE) == 0
    assert output_images(out) == output_images(folder / "n4")
    assert run_summaries(out)[-1]["counts"]["ok"] == 3


def test_found_masks_in_packs_and_a_resumed_run_keeps_their_bytes(tmp_path, tiny_model_dir, forget):
    """mask_mode auto in packs: each source's DiffEdit pass runs before its pack is sampled, as many UNet
    elements as unpacked (its draws are seeded by the feature key, which carries N: packed masks are not
    the unpacked ones bit for bit); a run resumed mid-pack reads the masks back and writes the same bytes."""
    auto = ["--set", "mask_mode=auto", "--set", "mask_samples=2"]
    _, manifest = _unpacked_and_packed(_folder(tmp_path), {}, *auto)
    u1, u4 = (run_summaries(tmp_path / n)[-1]["stats"]["unet"] for n in ("n1", "n4"))
    assert u4["masks_found"] == u1["masks_found"] == 2 * N_SOURCES
    assert u4["mask_elements"] == u1["mask_elements"]
    assert u4["sample_calls"] < u1["sample_calls"]
    assert len(list((tmp_path / "n4" / "masks").glob("*.png"))) == 2 * N_SOURCES
    ref = output_images(tmp_path / "n4")
    forget(tmp_path / "n4", {"s0-1", "s4-0"})
    assert _run(manifest, tmp_path / "n4", 4, *auto) == 0
    assert output_images(tmp_path / "n4") == ref
    last = run_summaries(tmp_path / "n4")[-1]["stats"]["unet"]
    assert last["masks_found"] == 0 and last["mask_calls"] == 0 and last["mask_cache_hits"] == 10  # both packs, companions too


IP = ["--set", "ip_adapter=tiny"]


@pytest.fixture(scope="module")
def prompted(tmp_path_factory, tiny_model_dir):
    rows = {0: {"ip_image": "style.png"}, 2: {"ip_image": "style.png"}, 3: {"ip_image": "style.png"}}
    return _unpacked_and_packed(_folder(tmp_path_factory.mktemp("packip")), rows, *IP)


def test_image_prompts_ride_in_packs(prompted):
    folder, _ = prompted
    a, b = output_images(folder / "n1"), output_images(folder / "n4")
    assert a.keys() == b.keys() and len(b) == 2 * N_SOURCES
    for name in a:
        rid = name.removesuffix(".png")
        assert np.abs(_pixels(folder / "n1", rid) - _pixels(folder / "n4", rid)).max() <= 2, rid
    u1, u4 = (run_summaries(folder / n)[-1]["stats"]["unet"] for n in ("n1", "n4"))
    assert u4["image_encodes"] == u1["image_encodes"] == 1
    assert u4["sample_calls"] < u1["sample_calls"] and u4["sample_elements"] == u1["sample_elements"]


def test_an_unusable_image_prompt_fails_its_row_and_leaves_the_pack_as_it_was(prompted, tmp_path):
    folder, _ = prompted
    bad = _manifest(folder, "bad.parquet", {0: {"ip_image": "style.png"}, 2: {"ip_image": "broken.png"},
                                            3: {"ip_image": "style.png"}})
    out = tmp_path / "o"
    assert _run(bad, out, 4, *IP) == 1
    recs = _records(out)
    assert {recs[r]["status"] for r in ("s2-0", "s2-1")} == {"failed"}
    got, ref = output_images(out), output_images(folder / "n4")
    assert set(got) == {k for k in ref if not k.startswith("s2-")}
    assert got == {k: ref[k] for k in got}
    assert _unet(out) == _unet(folder / "n4")  # the failed rows sampled as fillers: the same calls


def test_an_image_prompt_run_resumed_mid_pack_writes_the_uninterrupted_bytes(prompted, tmp_path, forget):
    folder, manifest = prompted
    out = tmp_path / "o"
    assert _run(manifest, out, 4, *IP) == 0
    forget(out, {"s0-1", "s2-0"})
    assert _run(manifest, out, 4, *IP) == 0
    assert output_images(out) == output_images(folder / "n4")
