"""Download a diffusers model from the Hugging Face hub into ROOT/<name> (used by infra/Dockerfile).

    python infra/bake_model.py stabilityai/stable-diffusion-2-1-base --root /models
    # -> /models/stable-diffusion-2-1-base, then: pnp-batch run ... --set model=/models/stable-diffusion-2-1-base

Only the diffusers folder layout is fetched (configs, tokenizer files, safetensors weights); single-file
checkpoints, duplicate .bin weights and fp16 / non-EMA variants are skipped. A token for gated models
is read from HF_TOKEN.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

ALLOW = ["model_index.json", "*/*.json", "*/*.txt", "*/*.safetensors"]
IGNORE = ["*.fp16.*", "*non_ema*", "*.ckpt", "*.bin", "*.msgpack", "*.onnx", "*.onnx_data"]


def local_name(repo_id: str) -> str:
    """The folder name for a hub id: its last path part (stabilityai/sd-2-1 -> sd-2-1)."""
    return repo_id.rstrip("/").rsplit("/", 1)[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo_id", help="hub id, e.g. stabilityai/stable-diffusion-2-1-base")
    parser.add_argument("--revision", default="main")
    parser.add_argument("--root", default=os.environ.get("PNP_MODEL_DIR", "/models"))
    args = parser.parse_args()

    from huggingface_hub import snapshot_download

    target = Path(args.root) / local_name(args.repo_id)
    snapshot_download(
        repo_id=args.repo_id,
        revision=args.revision,
        local_dir=target,
        token=os.environ.get("HF_TOKEN") or None,
        allow_patterns=ALLOW,
        ignore_patterns=IGNORE,
    )
    if not (target / "model_index.json").is_file():
        raise SystemExit(f"{args.repo_id}@{args.revision} has no model_index.json: not a diffusers model")
    shutil.rmtree(target / ".cache", ignore_errors=True)  # download bookkeeping, not needed at run time
    print(f"baked {args.repo_id}@{args.revision} into {target}; use it with --set model={target}")


if __name__ == "__main__":
    main()
