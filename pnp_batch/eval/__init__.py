"""The evaluation stage: row-independent scorers of translated images (CLIP score, structure distance).

Each score depends only on its own row (output image, prompt, source image), so scoring parallelises
like translation and can run beside it or afterwards. `load_metric_models` loads the models once per
worker; `clip_score` and `structure_dist` score a batch of rows on them; `Scorer` (score.py) turns
rows into the score records the drivers write (run --eval, pnp-batch eval). Names are imported lazily,
so `import pnp_batch.eval` does not load torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "clip_score": "pnp_batch.eval.metrics",
    "structure_dist": "pnp_batch.eval.metrics",
    "structure_size": "pnp_batch.eval.metrics",
    "MetricModels": "pnp_batch.eval.models",
    "load_metric_models": "pnp_batch.eval.models",
    "DEFAULT_CLIP_MODEL": "pnp_batch.eval.models",
    "DEFAULT_DINO_MODEL": "pnp_batch.eval.models",
    "TINY_CLIP": "pnp_batch.eval.tiny",
    "TINY_DINO": "pnp_batch.eval.tiny",
    "Scorer": "pnp_batch.eval.score",
    "ScoreItem": "pnp_batch.eval.score",
    "load_scorer": "pnp_batch.eval.score",
}

__all__ = [
    "DEFAULT_CLIP_MODEL",
    "DEFAULT_DINO_MODEL",
    "TINY_CLIP",
    "TINY_DINO",
    "MetricModels",
    "ScoreItem",
    "Scorer",
    "clip_score",
    "load_metric_models",
    "load_scorer",
    "structure_dist",
    "structure_size",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
