"""Random-weight stand-ins for the metric models (`tiny-clip`, `tiny-dino`): offline tests, no download.

Each is built once from a config with a fixed seed, saved with `save_pretrained` into the pnp-batch
cache, and then loaded back through the same `from_pretrained` path as a real model. Their scores
show the plumbing, not image quality.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from pnp_batch.models.tiny import TOKENIZER_ASSETS, cache_dir

log = logging.getLogger(__name__)

TINY_CLIP = "tiny-clip"
TINY_DINO = "tiny-dino"
TINY_METRIC_VERSION = "v1"
TINY_METRIC_SEED = 0
MARKER = "PNP_BATCH_TEST_MODEL.json"
NOTE = "random-weight metric model: scores show the plumbing, not quality"


def _tiny_tokenizer():
    """The tiny SD model's tokenizer (a 1,206-token BPE vocabulary), at CLIP's 77-token length."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        vocab=str(TOKENIZER_ASSETS / "vocab.json"),
        merges=str(TOKENIZER_ASSETS / "merges.txt"),
        model_max_length=77,
    )


def _clip_image_processor():
    """CLIP's default preprocessing (short side 224 bicubic, centre crop 224, CLIP mean/std), PIL backend."""
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls()


def write_tiny_clip(out: Path, seed: int) -> None:
    """A CLIPModel with CLIP's two towers and projections at tiny widths, plus its processor, into `out`."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    tokenizer = _tiny_tokenizer()
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 224,
        "patch_size": 32,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32))
    model.save_pretrained(out, safe_serialization=True)
    CLIPProcessor(image_processor=_clip_image_processor(), tokenizer=tokenizer).save_pretrained(out)


def write_tiny_dino(out: Path, seed: int) -> None:
    """A ViTModel with DINO ViT-B/8's patch size and input size at tiny widths, no pooler, into `out`."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        image_size=224,
        patch_size=8,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        qkv_bias=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTModel(config, add_pooling_layer=False)
    model.save_pretrained(out, safe_serialization=True)


BUILDERS: dict[str, Callable[[Path, int], None]] = {TINY_CLIP: write_tiny_clip, TINY_DINO: write_tiny_dino}


def _recipe_hash(name: str) -> str:
    """Changes whenever a builder's recipe (or the tokenizer) changes, so a stale build is never used."""
    h = hashlib.sha256(inspect.getsource(BUILDERS[name]).encode())
    for helper in (_tiny_tokenizer, _clip_image_processor):
        h.update(inspect.getsource(helper).encode())
    for asset in ("vocab.json", "merges.txt"):
        h.update((TOKENIZER_ASSETS / asset).read_bytes())
    return h.hexdigest()[:10]


def tiny_build_name(name: str) -> str:
    """The versioned name of a tiny metric model's build, e.g. `tiny-clip-v1-0123456789`."""
    return f"{name}-{TINY_METRIC_VERSION}-{_recipe_hash(name)}"


def build_tiny(name: str, out_dir: str | os.PathLike, seed: int = TINY_METRIC_SEED) -> Path:
    """Write tiny model `name` (`tiny-clip` or `tiny-dino`) into `out_dir`; a finished folder appears at once."""
    out = Path(out_dir)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    BUILDERS[name](tmp, seed)
    marker = {"name": name, "build": tiny_build_name(name), "seed": seed, "note": NOTE}
    (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished the same build first: keep theirs
        if not (out / MARKER).is_file():
            raise
        shutil.rmtree(tmp)
    return out


def tiny_dir(name: str) -> Path:
    """The tiny metric model `name` in the pnp-batch cache, built on first use (a second, no download)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown tiny metric model {name!r}; known: {sorted(BUILDERS)}")
    path = cache_dir() / tiny_build_name(name)
    if not (path / MARKER).is_file():
        log.info("building the random-weight metric model %s in %s", name, path)
        build_tiny(name, path)
    return path
