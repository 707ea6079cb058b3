"""`tiny-v`: the offline test model with v-prediction, the objective of SD 2.x at 768 px.

The same seeded weights as `tiny` (models/tiny.make_test_model); only the scheduler's
`prediction_type` differs, so every v-prediction code path (the DDIM inversion's v -> eps
conversion, the scheduler's own in sampling) runs offline through the normal folder loader.
`tiny` itself is untouched: its cache folder is named by a hash of make_test_model's source.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from pathlib import Path

from pnp_batch.models.tiny import TINY_SEED, builder_hash, cached_model, make_test_model

log = logging.getLogger(__name__)

TINY_V_VERSION = "tiny-v-v1"


def make_test_model_v(out_dir: str | os.PathLike, seed: int = TINY_SEED) -> Path:
    """Write `tiny` with `prediction_type: v_prediction` in its scheduler config."""
    out = make_test_model(out_dir, seed)
    sched_json = out / "scheduler" / "scheduler_config.json"
    cfg = json.loads(sched_json.read_text())
    cfg["prediction_type"] = "v_prediction"
    sched_json.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    marker = out / "PNP_BATCH_TEST_MODEL.json"
    note = json.loads(marker.read_text())
    note["name"] = TINY_V_VERSION
    marker.write_text(json.dumps(note, indent=2) + "\n")
    return out


def tiny_v_model_dir() -> Path:
    """The tiny v-prediction model in the local cache, built on first use (seconds, no download)."""
    recipe = builder_hash(inspect.getsource(make_test_model), inspect.getsource(make_test_model_v))
    return cached_model(TINY_V_VERSION, recipe, make_test_model_v, "v-prediction test model")
