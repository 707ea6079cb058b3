"""The metric cost (`eval_vs_translate`): scoring one output against translating it, same device.

Scoring is timed exactly as `run --eval` does it in the worker (eval/score.Scorer.score on one group:
K outputs of 512x512 and their preprocessed source, the prompts tokenised inside), with full-size
random-weight metric models built from the configs of openai/clip-vit-large-patch14 and
facebook/dino-vitb8 written out below (no download; random weights cost exactly what trained ones
do). On the tiny arch (`--eval`) the tiny metric models stand in: informational only.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import torch

from pnp_batch.eval.models import DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL, MetricModels, load_metric_models

# openai/clip-vit-large-patch14's config.json (the architecture; ids and training fields left out)
CLIP_VIT_L14_TEXT = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "projection_dim": 768,
}
CLIP_VIT_L14_VISION = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "image_size": 224, "patch_size": 14, "num_channels": 3, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    "projection_dim": 768,
}
CLIP_VIT_L14_PROJECTION = 768
# facebook/dino-vitb8's config.json
DINO_VITB8 = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "image_size": 224, "patch_size": 8, "num_channels": 3, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
    "qkv_bias": True,
}
EVAL_RESOLUTION = 512  # the target is stated for a 512x512 output
TIMED_REPEATS = 3  # on a GPU, after one untimed call
# On a CPU one full-size call takes about a minute here (2 shared cores: ~30 s per output, ~30 s to
# build the models), so it is timed once, untimed call skipped, on a group of one output (the
# dearest per output: its source is scored for it alone).
CPU_FULL_SIZE = {"k": 1, "repeats": 1, "warmup": False}


def wanted(args: Any, device: torch.device) -> bool:
    """Measured with --eval, and always for full-size archs on a GPU (a fraction of a second there)."""
    return bool(getattr(args, "eval", False)) or (args.arch != "tiny" and device.type == "cuda")


def full_clip(seed: int = 0) -> Any:
    """CLIP ViT-L/14 with random weights (427.6 M parameters)."""
    from transformers import CLIPConfig, CLIPModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPModel(CLIPConfig(text_config=CLIP_VIT_L14_TEXT, vision_config=CLIP_VIT_L14_VISION,
                                    projection_dim=CLIP_VIT_L14_PROJECTION))


def full_dino(seed: int = 0) -> Any:
    """DINO ViT-B/8 with random weights, without the pooler (as load_metric_models loads it)."""
    from transformers import ViTConfig, ViTModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ViTModel(ViTConfig(**DINO_VITB8), add_pooling_layer=False)


def full_metric_models(device: torch.device, dtype: torch.dtype) -> MetricModels:
    """Both full-size metric models, random weights, with CLIP's own preprocessing (its default image
    processor; the offline tokenizer, whose ids fit CLIP's vocabulary)."""
    from transformers import CLIPProcessor

    from pnp_batch.eval.tiny import _clip_image_processor, _tiny_tokenizer

    def ready(model: Any) -> Any:
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)

    processor = CLIPProcessor(image_processor=_clip_image_processor(), tokenizer=_tiny_tokenizer())
    return MetricModels(
        clip=ready(full_clip()), clip_processor=processor, dino=ready(full_dino()), device=device, dtype=dtype,
        clip_model=f"random:{DEFAULT_CLIP_MODEL}", clip_revision=None,
        dino_model=f"random:{DEFAULT_DINO_MODEL}", dino_revision=None,
    )


def _images(n: int, seed: int) -> list[Any]:
    from PIL import Image

    out = []
    for i in range(n):
        rng = np.random.default_rng(seed + i)
        low = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
        out.append(Image.fromarray(low, "RGB").resize((EVAL_RESOLUTION, EVAL_RESOLUTION), Image.BICUBIC))
    return out


def measure_eval(arch: str, device: torch.device, dtype: torch.dtype, k: int, prompts: list[str]) -> dict[str, Any]:
    """Seconds to score one output (median over TIMED_REPEATS groups of K outputs, after one untimed;
    on a CPU with the full-size models, CPU_FULL_SIZE)."""
    from pnp_batch.eval.score import ScoreItem, Scorer

    repeats, warmup = TIMED_REPEATS, True
    if arch != "tiny" and device.type != "cuda":
        k, repeats, warmup = CPU_FULL_SIZE["k"], CPU_FULL_SIZE["repeats"], CPU_FULL_SIZE["warmup"]

    t0 = time.perf_counter()
    if arch == "tiny":
        models = load_metric_models("tiny-clip", "tiny-dino", device=device, dtype=dtype)
    else:
        models = full_metric_models(device, dtype)
    build = time.perf_counter() - t0
    scorer = Scorer(models)
    source, *outputs = _images(k + 1, seed=100)
    items = [ScoreItem(id=f"o{j}", config_hash="bench", target_prompt=prompts[j % len(prompts)], output=img,
                       source=source) for j, img in enumerate(outputs)]

    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        recs = scorer.score(items)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        bad = [r["error"] for r in recs if r["status"] != "ok"]
        if bad:
            raise RuntimeError(f"scoring failed in the bench: {bad[0]}")
        return time.perf_counter() - t

    if warmup:
        once()  # untimed: first-call costs
    times = [once() for _ in range(repeats)]
    per_output = [t / k for t in times]
    return {
        "clip_model": models.clip_model,
        "dino_model": models.dino_model,
        "outputs_per_call": k,
        "output_size": [EVAL_RESOLUTION, EVAL_RESOLUTION],
        "build_seconds": build,
        "seconds_per_output": statistics.median(per_output),
        "seconds_per_output_min": min(per_output),
        "seconds_per_output_max": max(per_output),
        "repeats": repeats,
    }


def eval_ratio(fig: dict[str, Any], ev: dict[str, Any]) -> tuple[float | None, float]:
    """(eval seconds per output / translation seconds per image, that translation time): the default
    path at the largest K, at 50 steps (its '@spec' figure when the bench ran fewer)."""
    d = fig["k"][str(fig["images_per_minute_k"])]["default"]
    translate = d.get("seconds_per_image_at_spec") or d["seconds_per_image"]
    return (ev["seconds_per_output"] / translate if translate > 0 else None), translate
