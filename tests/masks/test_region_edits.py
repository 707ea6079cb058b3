"""Region edits (docs/masks.md) end to end on the tiny model: masks from the manifest (blend, paste, bad
input), masks found from the prompts (a synthetic case for DiffEdit's map, the feature store on a second
run), sweeps of mask keys, the background metrics, PIE-Bench's format and the contact sheet."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pnp_batch.cli import main
from pnp_batch.io.images import decode_image, resize_source
from pnp_batch.masks.auto import diffedit_maps, threshold
from pnp_batch.masks.pie_bench import decode_rle
from pnp_batch.pnp.conditioning import TextCond

RES = 64
FAST = ["--pipeline", "tiny", "--set", "steps=4", "--set", "inversion_steps=4", "--set", f"resolution={RES}",
        "--no-report"]
MANIFEST_MASKS = [*FAST, "--set", "mask_mode=manifest"]
W, H = 80, 64  # source size: 64 px short side keeps it, latents 8 x 10


def _write(path, arr) -> None:
    Image.fromarray(arr).save(path)


@pytest.fixture()
def folder(tmp_path):
    rng = np.random.default_rng(0)
    src = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((W, H), Image.BICUBIC)
    src.save(tmp_path / "s.png")
    half = np.zeros((H, W), np.uint8)
    half[:, : W // 2] = 255
    _write(tmp_path / "half.png", half)
    _write(tmp_path / "white.png", np.full((H, W), 255, np.uint8))
    _write(tmp_path / "black.png", np.zeros((H, W), np.uint8))
    _write(tmp_path / "tall.png", np.full((W, H), 255, np.uint8))  # another aspect ratio
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    return tmp_path


def _manifest(folder, rows, name="m.parquet") -> str:
    base = {"image": "s.png", "source_prompt": "a photo"}
    pq.write_table(pa.Table.from_pylist([{**base, **r} for r in rows]), folder / name)
    return str(folder / name)


def _img(out, rid) -> np.ndarray:
    return np.asarray(Image.open(out / "images" / f"{rid}.png")).astype(int)


def _records(out) -> dict:
    return {r["id"]: r for r in pq.read_table(out / "results").to_pylist()}


def _summary(out) -> dict:
    return json.loads(max((out / "runs").glob("*.json")).read_text())


def _prepared(folder) -> np.ndarray:
    data = (folder / "s.png").read_bytes()
    return np.asarray(resize_source(decode_image(data, 10**8), RES, "short_side").convert("RGB")).astype(int)


PROMPTS = {"half": "a fox", "white": "a cat", "black": "a dog"}


def test_white_mask_is_the_unmasked_run_and_paste_keeps_the_source_exactly(folder):
    rows = [{"id": k, "target_prompt": p, "mask": f"{k}.png"} for k, p in PROMPTS.items()]
    plain = _manifest(folder, [{"id": k, "target_prompt": p} for k, p in PROMPTS.items()], "plain.parquet")
    m = _manifest(folder, rows)
    assert main(["run", plain, "--out", str(folder / "plain"), *FAST]) == 0
    assert main(["run", m, "--out", str(folder / "blend"), *MANIFEST_MASKS]) == 0
    assert main(["run", m, "--out", str(folder / "paste"), *MANIFEST_MASKS, "--set", "mask_paste=true"]) == 0
    src = _prepared(folder)
    for mode in ("blend", "paste"):
        # an all-white mask edits everything: the bytes of the run without masks
        assert (folder / mode / "images" / "white.png").read_bytes() == (folder / "plain" / "images" / "white.png").read_bytes()
    paste, blend, plain_img = (_img(folder / d, "half") for d in ("paste", "blend", "plain"))
    # paste: the kept half (mask 0, past the one latent cell the bilinear edge reaches) is the source's bytes
    assert np.array_equal(paste[:, W // 2 + 8 :], src[:, W // 2 + 8 :])
    assert np.abs(paste[:, : W // 2 - 8] - src[:, : W // 2 - 8]).mean() > 5  # the edited half changed
    assert np.array_equal(_img(folder / "paste", "black"), src)  # nothing to edit: the prepared source
    # blend: the kept half follows the source's trajectory (the black row's output), much closer than the
    # unmasked edit is (the tiny VAE mixes pixels over its receptive field, so not exactly)
    keep_black = _img(folder / "blend", "black")[:, W // 2 + 16 :]
    d_blend = np.abs(blend[:, W // 2 + 16 :] - keep_black).mean()
    d_plain = np.abs(plain_img[:, W // 2 + 16 :] - keep_black).mean()
    assert d_blend < 0.7 * d_plain
    recs = _records(folder / "paste")
    assert "mask is empty" in recs["black"]["warning"]
    stored = np.asarray(Image.open(recs["half"]["mask"]))
    assert stored.shape == (H, W) and stored[:, :32].min() == 255 and stored[:, 48:].max() == 0


def test_bad_masks_fail_their_row_only_and_a_missing_column_exits_2(folder, tmp_path_factory, capsys):
    outside = tmp_path_factory.mktemp("elsewhere") / "m.png"
    _write(outside, np.full((H, W), 255, np.uint8))
    rows = [{"id": "ok", "target_prompt": "a fox", "mask": "half.png"},
            {"id": "broken", "target_prompt": "a cat", "mask": "broken.png"},
            {"id": "missing", "target_prompt": "a cat", "mask": "nope.png"},
            {"id": "tall", "target_prompt": "a cat", "mask": "tall.png"},
            {"id": "outside", "target_prompt": "a cat", "mask": str(outside)},
            {"id": "bytes", "target_prompt": "a cow", "mask_bytes": (folder / "half.png").read_bytes()}]
    out = folder / "o"
    assert main(["run", _manifest(folder, rows), "--out", str(out), *MANIFEST_MASKS]) == 1
    recs = _records(out)
    assert recs["ok"]["status"] == "ok" and recs["bytes"]["status"] == "ok"
    assert "mask unreadable" in recs["broken"]["error"]
    assert "mask not found" in recs["missing"]["error"]
    assert "aspect ratio" in recs["tall"]["error"]
    assert "not allowed" in recs["outside"]["error"]
    assert main(["validate", str(folder / "m.parquet")]) != 0
    assert "outside" in capsys.readouterr().out
    no_col = _manifest(folder, [{"id": "a", "target_prompt": "a fox"}], "nocol.parquet")
    assert main(["run", no_col, "--out", str(folder / "o2"), *MANIFEST_MASKS]) == 2
    assert "mask_mode: manifest needs a 'mask'" in capsys.readouterr().err
    # a CSV manifest: the mask as a path and as base64 bytes
    b64 = base64.b64encode((folder / "half.png").read_bytes()).decode()
    (folder / "m.csv").write_text(f"id,image,target_prompt,mask,mask_bytes\nc1,s.png,a fox,half.png,\n"
                                  f"c2,s.png,a fox,,{b64}\n")
    assert main(["run", str(folder / "m.csv"), "--out", str(folder / "o3"), *MANIFEST_MASKS]) == 0
    csv = _records(folder / "o3")  # the same mask, whichever way it came
    assert Path(csv["c1"]["mask"]).read_bytes() == Path(csv["c2"]["mask"]).read_bytes()


class _StubUNet:
    """A UNet whose noise prediction differs between two prompts only inside `region`: the prompt's mean
    embedding scales a bump there; the rest of the prediction depends on the latent alone."""

    dtype = torch.float32

    def __init__(self, region: torch.Tensor) -> None:
        self.region = region
        self.calls = 0

    def __call__(self, x, t, encoder_hidden_states=None, **kw):
        self.calls += 1
        level = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return SimpleNamespace(sample=0.3 * x + torch.sin(x) + level * self.region)


def test_found_mask_covers_the_region_where_the_prompts_disagree():
    h, w = 16, 20
    region = torch.zeros(1, 1, h, w)
    region[..., 4:11, 6:15] = 1
    unet = _StubUNet(region)
    z0 = torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(3))
    src = TextCond.of(torch.zeros(1, 7, 8))
    tgt = TextCond.of(torch.stack([torch.full((7, 8), 1.0), torch.full((7, 8), -2.0)]))
    sched = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False}
    maps, calls, elements = diffedit_maps(unet, sched, z0, src, tgt, 0.5, 5, seed=11, max_batch=4)
    assert elements == (2 + 1) * 5 and calls == unet.calls == 4  # source draws shared by both targets
    masks = threshold(maps, 0.5)
    truth = region[0, 0] > 0
    for j in range(2):
        found = masks[j, 0] > 0
        iou = float((found & truth).sum() / (found | truth).sum())
        assert iou >= 0.95, iou  # measured: 1.0 (docs/masks.md)


def test_auto_masks_are_found_once_then_read_from_the_store_and_sweep(folder):
    rows = [{"id": "a", "target_prompt": "a fox"}, {"id": "b", "target_prompt": "a cat at night"}]
    m = _manifest(folder, rows)
    out = folder / "auto"
    auto = [*FAST, "--set", "mask_mode=auto", "--set", "mask_samples=3"]
    assert main(["run", m, "--out", str(out), *auto]) == 0
    u = _summary(out)["stats"]["unet"]
    assert u["mask_elements"] == (2 + 1) * 3 and u["masks_found"] == 2 and u["mask_cache_hits"] == 0
    first = {k: (out / "images" / f"{k}.png").read_bytes() for k in ("a", "b")}
    # other apply settings, same finding settings: the masks come from the feature store
    assert main(["run", m, "--out", str(out), *auto, "--set", "mask_dilate=1", "--overwrite"]) == 0
    u = _summary(out)["stats"]["unet"]
    assert u["mask_calls"] == 0 and u["mask_elements"] == 0 and u["mask_cache_hits"] == 2
    # a sweep of mask keys: its grid shares one inversion and the found masks
    out2 = folder / "sweep"
    assert main(["run", m, "--out", str(out2), *auto, "--sweep", "mask_feather=0,2"]) == 0
    recs = _records(out2)
    assert sorted(recs) == ["a.mfea0", "a.mfea2", "b.mfea0", "b.mfea2"]
    assert all(r["status"] == "ok" for r in recs.values())
    assert (out2 / "images" / "a.mfea0.png").read_bytes() == first["a"]  # same settings, same bytes
    assert (out2 / "images" / "a.mfea2.png").read_bytes() != first["a"]
    assert _summary(out2)["stats"]["unet"]["inversions"] == 1


def test_background_metrics_and_the_contact_sheet(folder, capsys):
    rows = [{"id": "half", "target_prompt": "a fox", "mask": "half.png"},
            {"id": "black", "target_prompt": "a dog", "mask": "black.png"}]
    out = folder / "ev"
    args = ["run", _manifest(folder, rows), "--out", str(out), *MANIFEST_MASKS, "--set", "mask_paste=true", "--eval"]
    assert main([a for a in args if a != "--no-report"]) == 0
    scores = {r["id"]: r for r in pq.read_table(out / "eval").to_pylist()}
    assert scores["black"]["bg_mse"] == 0 and scores["black"]["bg_psnr"] == float("inf")
    assert scores["black"]["bg_ssim"] == pytest.approx(1.0)
    assert scores["half"]["bg_mse"] < 1e-9 and 0.9 < scores["half"]["bg_ssim"] <= 1.0  # window crosses the edge
    assert scores["half"]["clip_score_edited"] is not None
    # eval computes the same from the stored masks
    assert main(["eval", str(out), "--overwrite"]) == 0
    again = {r["id"]: r for r in pq.read_table(out / "eval").to_pylist() if r["scored_at"] != scores["half"]["scored_at"]}
    assert again["half"]["bg_ssim"] == pytest.approx(scores["half"]["bg_ssim"], abs=1e-6)
    assert main(["status", str(out)]) == 0
    assert "bg_psnr" in capsys.readouterr().out
    # an export carries each row's mask as applied (docs/export.md)
    dest = folder / "wds"
    assert main(["export", str(out), str(dest), "--format", "webdataset"]) == 0
    import tarfile

    with tarfile.open(dest / "00000.tar") as tar:
        names = tar.getnames()
        got = np.asarray(Image.open(tar.extractfile("half.mask.png")))
    assert "black.mask.png" in names
    assert np.array_equal(got, np.asarray(Image.open(folder / "ev" / "masks" / "half.png")))
    # the contact sheet outlines the masks on the source
    sheet = next((out / "report").glob("*-source-000.jpg"))
    arr = np.asarray(Image.open(sheet).convert("RGB")).astype(int)
    magenta = (arr[..., 0] > 180) & (arr[..., 1] < 90) & (arr[..., 2] > 180)
    assert magenta.sum() > 10


def test_pie_bench_file_becomes_a_manifest_with_masks(tmp_path, capsys):
    images = tmp_path / "pie" / "annotation_images" / "0_random_140"
    images.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for k in ("000000000000", "000000000001"):
        Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(images / f"{k}.jpg")
    runs = [512 * 100 + 50, 60, 512 * 101 + 50, 60]  # rows 100 and 101, columns 50..109
    mapping = {
        "000000000000": {"image_path": "0_random_140/000000000000.jpg", "original_prompt": "a [cat] on a sofa",
                         "editing_prompt": "a [dog] on a sofa", "editing_instruction": "make the cat a dog",
                         "editing_type_id": "1", "blended_word": "cat dog", "mask": runs},
        "000000000001": {"image_path": "0_random_140/000000000001.jpg", "original_prompt": "a house",
                         "editing_prompt": "a house [at night]", "editing_instruction": "night",
                         "editing_type_id": "9", "blended_word": "", "mask": [0, 10]},
        "000000000002": {"image_path": "x.jpg", "original_prompt": "a", "editing_prompt": "b", "mask": [1, 2, 3]},
    }
    (tmp_path / "pie" / "mapping_file.json").write_text(json.dumps(mapping))
    man = tmp_path / "pie" / "manifest.parquet"
    assert main(["manifest", "from-pie-bench", str(tmp_path / "pie" / "mapping_file.json"), "--images",
                 str(tmp_path / "pie" / "annotation_images"), "--out", str(man)]) == 0
    assert "skipped entry 000000000002" in capsys.readouterr().out
    t = pq.read_table(man).to_pylist()
    assert [r["id"] for r in t] == ["pie-000000000000", "pie-000000000001"]
    assert t[0]["source_prompt"] == "a cat on a sofa" and t[0]["target_prompt"] == "a dog on a sofa"
    assert t[0]["editing_type_id"] == "1" and t[0]["image"] == "annotation_images/0_random_140/000000000000.jpg"
    mask = np.asarray(Image.open(io.BytesIO(t[0]["mask_bytes"]))) > 0
    want = decode_rle(runs)
    assert np.array_equal(mask, want)
    assert mask[100, 50:110].all() and mask[101, 50:110].all() and not mask[102, 50:110].any()
    assert mask[0].all() and mask[:, -1].all()  # the frame, as PIE-Bench's own decoder marks it
    out = tmp_path / "o"
    assert main(["run", str(man), "--out", str(out), *MANIFEST_MASKS, "--set", "mask_paste=true"]) == 0
    recs = _records(out)
    assert all(r["status"] == "ok" and r["mask"] for r in recs.values())


def test_sdxl_takes_masks_too(tiny_sdxl_dir, folder):
    rows = [{"id": "half", "target_prompt": "a fox", "mask": "half.png"}]
    out = folder / "xl"
    assert main(["run", _manifest(folder, rows), "--out", str(out), "--pipeline", "tiny-sdxl", "--set", "steps=3",
                 "--set", "inversion_steps=3", "--set", f"resolution={RES}", "--no-report", "--set", "mask_mode=manifest",
                 "--set", "mask_paste=true"]) == 0
    src = _prepared(folder)
    assert np.array_equal(_img(out, "half")[:, W // 2 + 8 :], src[:, W // 2 + 8 :])
