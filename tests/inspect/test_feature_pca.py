"""`pnp-batch features`: the joint PCA equals an independent PCA of the saved features (signs fixed,
explained variance descending), capturing changes nothing, and the command runs offline on tiny and
tiny-sdxl."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pnp_batch.cli import main
from pnp_batch.inspect import pca
from pnp_batch.inspect.capture import FeatureCapture, attention_rows, decoder_layers

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "manifests" / "demo" / "manifest.csv"
SMALL = ["--set", "resolution=96", "--set", "steps=10", "--set", "inversion_steps=10"]


def _reference_pca(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An independent PCA: eigenvectors of the covariance matrix (not an SVD), signs fixed the same way."""
    c = np.cov(x, rowvar=False)
    w, v = np.linalg.eigh(c)
    order = np.argsort(w)[::-1][:3]
    comps = v[:, order].T
    idx = np.argmax(np.abs(comps), axis=1)
    comps *= np.sign(comps[np.arange(3), idx])[:, None]
    return comps, w[order] / w.sum()


def test_the_fit_equals_an_independent_pca():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 12)) @ rng.normal(size=(12, 12)) + rng.normal(size=12)
    fit = pca.fit(x)
    comps, ratio = _reference_pca(x)
    np.testing.assert_allclose(fit.components, comps, atol=1e-9)
    np.testing.assert_allclose(fit.explained_variance_ratio, ratio, atol=1e-12)
    assert np.all(np.diff(fit.explained_variance_ratio) <= 0)
    np.testing.assert_allclose(fit.project(x), (x - x.mean(0)) @ comps.T, atol=1e-9)
    # the signs do not depend on the data's order or on a flipped SVD
    np.testing.assert_allclose(pca.fit(x[::-1]).components, fit.components, atol=1e-9)


def test_a_subsampled_fit_states_its_count_and_projects_every_token():
    x = np.random.default_rng(1).normal(size=(1000, 5))
    fit = pca.fit(x, max_fit=100)
    assert len(fit.fit_rows) == 100 and fit.total_rows == 1000
    np.testing.assert_array_equal(pca.fit(x, max_fit=100).fit_rows, fit.fit_rows)  # a fixed seed
    comps, _ = _reference_pca(x[fit.fit_rows])
    np.testing.assert_allclose(fit.components, comps, atol=1e-9)
    assert fit.project(x).shape == (1000, 3)
    rgb = pca.to_rgb([fit.project(x[:400]), fit.project(x[400:])])
    assert rgb[0].dtype == np.uint8 and rgb[0].min() == 0 or rgb[1].min() == 0
    assert max(r.max() for r in rgb) == 255


def test_attention_rows_are_distributions():
    q, k = torch.randn(1, 16, 8), torch.randn(1, 16, 8)
    a = attention_rows(q, k, heads=2)
    assert a.shape == (1, 16, 16)
    torch.testing.assert_close(a.sum(-1), torch.ones(1, 16))
    qh = q.view(1, 16, 2, 4).transpose(1, 2)
    kh = k.view(1, 16, 2, 4).transpose(1, 2)
    ref = torch.softmax(qh @ kh.transpose(-1, -2) / 2.0, -1).mean(1)
    torch.testing.assert_close(a, ref)


@pytest.mark.parametrize("models", ["tiny_models", "tiny_sdxl_models"])
def test_capturing_changes_nothing_and_sees_every_layer(models, request):
    m = request.getfixturevalue(models)
    unet = m.unet
    layers = decoder_layers(unet)
    assert layers == (list(range(12)) if models == "tiny_models" else list(range(9)))
    torch.manual_seed(0)
    x = torch.randn(1, unet.config.in_channels, 8, 8, dtype=unet.dtype)
    kwargs = {"encoder_hidden_states": torch.randn(1, 77, unet.config.cross_attention_dim, dtype=unet.dtype)}
    if models == "tiny_sdxl_models":
        add_dim = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, add_dim, dtype=unet.dtype),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]], dtype=unet.dtype)}
    with torch.no_grad():
        before = unet(x, 500, **kwargs).sample
        cap = FeatureCapture(unet, layers)
        got = cap.record()
        during = unet(x, 500, **kwargs).sample
        cap.remove()
    torch.testing.assert_close(during, before, rtol=0, atol=0)
    assert sorted(got.tensors["features"]) == layers
    assert sorted(got.tensors["queries"]) == sorted(cap.heads)  # the layers that have self-attention
    n = layers[-1]
    h, w = got.sizes[n]
    assert got.tensors["features"][n].shape[:2] == (1, h * w)


def test_the_command_on_a_finished_run_saves_numbers_an_independent_pca_reproduces(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(DEMO), "--out", str(out), "--pipeline", "tiny", *SMALL, "--limit", "2",
                 "--no-report"]) == 0
    fv = tmp_path / "fv"
    ids = "chelsea-fox,chelsea-watercolor"
    assert main(["features", str(out), "--ids", ids, "--out", str(fv), "--save", "--layers", "3-5,9",
                 "--max-fit-tokens", "200", "--max-fit-attention-tokens", "300"]) == 0
    printed = capsys.readouterr().out.split()
    for kind in ("features", "queries", "keys", "attention"):
        assert any(p.endswith(".png") and Path(p).name.startswith(f"{kind}-layers-t") for p in printed), kind
        assert any(Path(p).name.startswith(f"{kind}-timesteps-layer") for p in printed), kind
    summary = pq.read_table(fv / "pca.parquet").to_pylist()
    kinds = {r["kind"] for r in summary}
    assert kinds == {"features", "queries", "keys", "attention"}
    assert {r["layer"] for r in summary} == {3, 4, 5, 9}
    assert len({r["timestep"] for r in summary}) == 5  # the default: 5 spread over the schedule
    for r in summary:
        evr = [r[f"explained_variance_ratio_{c}"] for c in range(3)]
        assert evr == sorted(evr, reverse=True) and 0 < sum(evr) <= 1 + 1e-9
        # two sources' outputs and sources: 4 images in one joint fit
        assert len(r["images"]) == 4 and r["images"][0] == "chelsea-fox (source)"
        saved = np.load(fv / r["file"])
        x = saved["tokens"].astype(np.float64)[saved["fit_rows"]]
        limit = 300 if r["kind"] == "attention" else 200
        assert len(saved["fit_rows"]) == r["fit_tokens"] == min(limit, r["total_tokens"])
        assert saved["tokens"].shape[0] == r["total_tokens"]
        comps, ratio = _reference_pca(x)
        if ratio[2] - 0 > 1e-6 and ratio[1] - ratio[2] > 1e-4 and ratio[0] - ratio[1] > 1e-4:  # distinct eigenvalues
            np.testing.assert_allclose(saved["components"], comps, atol=2e-3)
            np.testing.assert_allclose(saved["explained_variance_ratio"], ratio, rtol=1e-3, atol=1e-6)
        proj = (saved["tokens"].astype(np.float64) - saved["mean"]) @ saved["components"].T
        np.testing.assert_allclose(saved["projection"], proj, atol=1e-3)
    fig = Image.open(next(fv.glob("features-layers-t*.png")))
    assert fig.width > 4 * 160 and fig.height > 4 * 160  # 4 rows of images, image + 4 layer columns


def test_the_command_on_a_manifest_with_tiny_sdxl(tmp_path, capsys):
    fv = tmp_path / "fv"
    assert main(["features", str(DEMO), "--ids", "astronaut-robot,coffee-tea", "--out", str(fv), "--pipeline",
                 "tiny-sdxl", *SMALL, "--timesteps", "901,1"]) == 0
    names = sorted(p.name for p in fv.glob("*.png"))
    assert "features-layers-t0001.png" in names or "features-layers-t0901.png" in names
    assert any(n.startswith("attention-timesteps-layer") for n in names)
    assert (fv / "features").is_dir()  # a manifest's inversions go to --out's own feature store


def test_unknown_layers_and_ids_are_usage_errors(tmp_path, capsys):
    assert main(["features", str(DEMO), "--ids", "nope", "--out", str(tmp_path), "--pipeline", "tiny", *SMALL]) == 2
    assert "no row(s) with id nope" in capsys.readouterr().err
    assert main(["features", str(DEMO), "--ids", "coffee-tea", "--out", str(tmp_path), "--pipeline", "tiny", *SMALL,
                 "--layers", "12"]) == 2
    assert "not in this UNet" in capsys.readouterr().err


def test_a_run_with_a_relative_out_is_read_from_anywhere(tmp_path, monkeypatch, capsys):
    """`run --out out` records its outputs relative to the directory it ran in; `features`, `eval` and the
    report read them from another directory through OUT (io/output_paths.located)."""
    import pyarrow.dataset as ds

    from pnp_batch.io.metrics import ok_scores

    (tmp_path / "job").mkdir()
    monkeypatch.chdir(tmp_path / "job")
    assert main(["run", str(DEMO), "--out", "out", "--pipeline", "tiny", *SMALL, "--limit", "1", "--no-report"]) == 0
    recorded = ds.dataset("out/results", format="parquet").to_table().column("output").to_pylist()
    assert recorded == ["out/images/chelsea-fox.png"]  # relative, as the run was told
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    out = str(tmp_path / "job" / "out")
    capsys.readouterr()
    assert main(["features", out, "--ids", "chelsea-fox", "--out", "fv", "--layers", "4", "--timesteps", "501",
                 "--save"]) == 0
    images = pq.read_table("fv/pca.parquet").column("images").to_pylist()
    assert images[0] == ["chelsea-fox (source)", "chelsea-fox (output)"]  # the output was found
    assert main(["eval", out]) == 0
    scores = ok_scores(out).to_pylist()  # scored: the output was read (else an eval failure, exit 1)
    assert [r["id"] for r in scores] == ["chelsea-fox"] and scores[0]["clip_score"] is not None
