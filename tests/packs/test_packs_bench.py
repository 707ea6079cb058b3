"""`pnp-batch bench --sources-per-batch`: the counted figures side by side in one run (never timed
assertions: the shared CPU's load moves the times)."""

from __future__ import annotations

import json

from pnp_batch.cli import main


def test_bench_counts_calls_and_elements_per_image_at_each_n(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "packs.json"
    assert main(["bench", "--arch", "tiny", "--resolution", "64", "--steps", "4", "--k", "1", "--k", "2",
                 "--sources", "4", "--repeats", "1", "--sources-per-batch", "1", "--sources-per-batch", "2",
                 "--sources-per-batch", "4", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    k1 = d["per_k"]["1"]
    # N = 1: 4 inversion + 4 sampling calls per image; N: a call for N images
    assert [k1[n]["unet_calls_per_image"] for n in ("1", "2", "4")] == [8.0, 4.0, 2.0]
    # elements: 4 inversion; sampling 3 a step while injecting (f_t 0.8: steps 0-2), then 2
    assert {k1[n]["elements_per_image"] for n in ("1", "2", "4")} == {4 + 3 * 3 + 2}
    k2 = d["per_k"]["2"]
    assert [k2[n]["unet_calls_per_image"] for n in ("1", "2", "4")] == [4.0, 2.0, 1.0]
    assert {k2[n]["elements_per_image"] for n in ("1", "2", "4")} == {(4 + 3 * 5 + 4) / 2}
    assert d["targets"]["k1_calls_per_image_n1_over_n4"]["met"] is True
    assert d["targets"]["k1_elements_per_image_unchanged"]["met"] is True
    assert all(f["images_per_minute"] > 0 and f["tflops_per_s"] > 0 for per_n in d["per_k"].values()
               for f in per_n.values())
    assert d["config"]["unet_gflops_per_element"] > 0
    assert "calls/img" in capsys.readouterr().out
