"""The bench's metric cost (eval_vs_translate): the full-size metric architectures, and the figure in the
JSON and the table."""

from __future__ import annotations

import json

import torch

from pnp_batch.bench.eval_cost import full_clip, full_dino
from pnp_batch.bench.figures import judge
from pnp_batch.cli import main


def test_the_full_size_metric_models_have_the_published_architectures():
    with torch.device("meta"):  # no memory, no time: shapes only
        clip, dino = full_clip(), full_dino()
    assert sum(p.numel() for p in clip.parameters()) == 427_616_513  # CLIP ViT-L/14
    assert clip.config.vision_config.patch_size == 14 and clip.config.vision_config.num_hidden_layers == 24
    assert sum(p.numel() for p in dino.parameters()) == 85_807_872  # ViT-B/8 without the pooler
    assert dino.config.patch_size == 8 and dino.config.hidden_size == 768


def test_bench_eval_reports_eval_vs_translate(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--arch", "tiny", "--device", "cpu", "--resolution", "64", "--steps", "4",
            "--reference-inversion-steps", "20", "--sources", "1", "--k", "2", "--eval", "--json", str(out)]
    assert main(argv) == 0
    f = json.loads(out.read_text())
    ev = f["eval"]
    assert (ev["clip_model"], ev["dino_model"]) == ("tiny-clip", "tiny-dino")
    assert ev["outputs_per_call"] == 2 and ev["output_size"] == [512, 512] and ev["seconds_per_output"] > 0
    translate = f["k"]["2"]["default"]["seconds_per_image_at_spec"]
    assert ev["translate_seconds_per_image"] == translate
    assert f["ratios"]["eval_vs_translate"] == ev["seconds_per_output"] / translate
    text = capsys.readouterr().out
    assert "eval vs translate:" in text and "(informational) eval_vs_translate" in text  # 64 px: not judged

    at_512 = {**f, "ratios": {**f["ratios"], "eval_vs_translate": 0.04}}
    settings = {"steps": 4, "reference_inversion_steps": 20, "resolution": 512}
    assert any(line.startswith("  PASS eval_vs_translate = 4.0%") for line in judge(at_512, settings, "sd21-base"))
    at_512["ratios"]["eval_vs_translate"] = 0.06
    assert any(line.startswith("  FAIL eval_vs_translate = 6.0%") for line in judge(at_512, settings, "sd21-base"))
