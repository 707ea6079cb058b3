"""Sweeps and injection layers on the tiny model: a grid point's image equals a plain run of its row,
the whole grid costs one inversion and one source branch, layer settings change the image (the
default equals the explicit spec list bit for bit), groups with other layers keep their own CUDA graphs."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from pnp_batch.config import ConfigError, load_config
from pnp_batch.errors import UsageError
from pnp_batch.io.manifest import group_rows, open_manifest
from pnp_batch.io.rows import Row
from pnp_batch.io.sweep import SweptManifest, parse_sweeps
from pnp_batch.pnp.graphs import GraphedUNet
from pnp_batch.pnp.layers import SD
from pnp_batch.translate.translator import Translator

STEPS = 10  # thresholds 0.4/0.6/0.8 and 0.25/0.5 give distinct step counts (4/6/8, 2/5)
GRID = ["pnp_f_t=0.4,0.6,0.8", "pnp_attn_t=0.25,0.5", "guidance_scale=5,7.5,10"]


def _cfg(**extra):
    return load_config("tiny", {"steps": STEPS, "inversion_steps": STEPS, "resolution": 64, **extra})


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((64, 64), Image.BICUBIC).save(buf, "PNG")
    return buf.getvalue()


def _pixels(uri: str) -> np.ndarray:
    return np.asarray(Image.open(uri).convert("RGB")).astype(np.int16)


@pytest.fixture
def translator(tmp_path, tiny_models):
    made: list[Translator] = []

    def make(name: str, **extra) -> Translator:
        tr = Translator(_cfg(**extra), str(tmp_path / name), models=tiny_models, worker=name)
        made.append(tr)
        return tr

    yield make
    for tr in reversed(made):  # last installed, first removed: each gives back what it found
        tr.close()
        tr.injector.remove()


def test_a_grid_point_equals_a_plain_run_of_its_row_and_the_grid_costs_one_inversion(tmp_path, translator):
    (tmp_path / "src.png").write_bytes(_png(3))
    (tmp_path / "m.csv").write_text("id,image,source_prompt,target_prompt\nrow,src.png,a photo,a bronze statue\n")
    sweep = parse_sweeps(GRID, _cfg())
    groups = list(group_rows(SweptManifest(open_manifest(str(tmp_path / "m.csv")), sweep).iter_rows()))
    assert [len(g) for g in groups] == [18]
    tr = translator("sweep")
    records = tr.process(groups[0])
    assert [r["status"] for r in records] == ["ok"] * 18
    # one inversion for the whole grid, and one source branch per injected step (the 18 targets need
    # 36 elements per step: three UNet calls at batch_size 17, the later two reuse the recorded source)
    c = tr.counters
    assert (c.inversions, c.invert_calls, c.invert_elements) == (1, STEPS, STEPS)
    assert c.source_elements == 8  # steps with any injection: max(pnp_f_t) * STEPS
    assert c.sample_elements == STEPS * 36 + 8
    by_setting = {r["setting"]: r for r in records}
    assert records[0]["source_id"] == "row" and records[0]["id"] == "row.gs5_attn0.25_ft0.4"

    # a plain run of the row with one grid point's values as per-row overrides, alone in its batch
    points = ["guidance_scale=5,pnp_attn_t=0.25,pnp_f_t=0.4", "guidance_scale=7.5,pnp_attn_t=0.5,pnp_f_t=0.6",
              "guidance_scale=10,pnp_attn_t=0.5,pnp_f_t=0.8"]
    plain = translator("plain")
    images = {}
    for n, label in enumerate(points):
        o = dict(kv.split("=") for kv in label.split(","))
        row = Row(index=0, id=f"plain{n}", image=str(tmp_path / "src.png"), image_bytes=None, source_prompt="a photo",
                  target_prompt="a bronze statue", overrides={k: float(v) for k, v in o.items()})
        [rec] = plain.process([row])
        a, b = _pixels(rec["output"]), _pixels(by_setting[label]["output"])
        diff = np.abs(a - b)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (label, diff.max(), (diff > 0).mean())
        images[label] = b
    # and the settings matter: grid points differ far beyond rounding
    assert np.abs(images[points[0]] - images[points[2]]).mean() > 5


def test_layer_settings_change_the_image_and_the_default_equals_the_spec_list_bit_for_bit(translator, source_latents):
    tr = translator("layers")
    latents = source_latents
    base = {"index": 0, "id": "r", "image": None, "image_bytes": None, "source_prompt": "a photo",
            "target_prompt": "a cat"}

    def image(**overrides) -> np.ndarray:
        images, _ = tr.translate(latents, [Row(**base, overrides=overrides)])
        return images[0].astype(np.int16)

    default = image()
    explicit = image(pnp_feature_blocks=SD.feature_blocks, pnp_attn_layers=SD.attn_layers)
    assert np.array_equal(default, explicit)
    no_attn = image(pnp_attn_layers=())
    deeper = image(pnp_feature_blocks=("up_blocks.1.resnets.2",))
    assert np.abs(no_attn - default).mean() > 1 and np.abs(deeper - default).mean() > 1
    assert np.array_equal(image(), default)  # switching back restores the default injection exactly
    assert tr.injector.points == SD


def test_layer_keys_in_the_pipeline(translator):
    cfg = _cfg(pnp_attn_layers="4-11", pnp_feature_blocks="4")
    assert cfg.pnp_feature_blocks == SD.feature_blocks
    assert cfg.pnp_attn_layers == tuple(f"up_blocks.{n // 3}.attentions.{n % 3}" for n in range(4, 12))
    assert cfg.hash() != _cfg().hash()  # part of the hash when set ...
    assert _cfg(pnp_attn_layers="default").hash() == _cfg().hash()  # ... and not when left to the default
    # decoder layers 4-11 are PNP_SPEC.md section 4 exactly on the loaded SD UNet
    assert translator("spec", pnp_attn_layers="4-11").injector.points == SD
    assert translator("spec3", pnp_attn_layers="9-11").injector.points.attn_layers == tuple(
        f"up_blocks.3.attentions.{i}.transformer_blocks.0.attn1" for i in range(3))
    with pytest.raises(ConfigError, match="unknown layer 'up_blocks.0.attn1'.*an attention module"):
        _cfg(pnp_attn_layers="up_blocks.0.attn1")  # the form is checked with the config
    # whether the UNet has the layer is checked against the loaded model, naming the valid ones
    with pytest.raises(UsageError, match=r"unknown self-attention layer.*up_blocks\.0\.attentions\.0.*valid: "
                       r"the attention modules up_blocks\.1\.attentions\.0"):
        translator("absent", pnp_attn_layers="up_blocks.0.attentions.0.transformer_blocks.0.attn1")
    tr = translator("names")
    with pytest.raises(UsageError, match="unknown feature-injection block.*valid: up_blocks.0.resnets.0"):
        tr.injection_points(("down_blocks.0.resnets.0",), None)


class _CountingBackend:
    """A stand-in for CUDA graph capture: counts captures; a 'replay' reruns the call eagerly."""

    def __init__(self) -> None:
        self.captures = 0

    def lane(self, sample) -> int:
        return 0

    def capture(self, fn, lane):
        self.captures += 1
        out = fn()
        return (lambda: out.copy_(fn())), out


def test_each_layer_setting_keeps_its_own_cuda_graphs(tmp_path, tiny_models, source_latents):
    backend = _CountingBackend()
    models = dataclasses.replace(tiny_models)
    tr = Translator(_cfg(), str(tmp_path / "g"), models=models, worker="g")
    models.unet = GraphedUNet(tiny_models.unet, tr.injector.controller, backend)
    try:
        row = {"index": 0, "id": "r", "image": None, "image_bytes": None, "source_prompt": "a photo",
               "target_prompt": "a cat"}
        tr.translate(source_latents, [Row(**row)])
        first = backend.captures
        assert first > 0 and set(models.unet._sets) == {"pnp"}
        tr.translate(source_latents, [Row(**row, overrides={"pnp_attn_layers": ()})])
        assert backend.captures > first  # recorded anew, not replayed from the default's graphs
        assert len(models.unet._sets) == 2 and models.unet.controller is tr.injector.controller
        again = backend.captures
        tr.translate(source_latents, [Row(**row)])
        assert backend.captures == again and models.unet.graphs is models.unet._sets["pnp"]
    finally:
        tr.injector.remove()
