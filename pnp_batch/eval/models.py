"""Load the metric models once: CLIP (prompt fidelity) and DINO ViT (structure), hub id or local folder."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pnp_batch.eval.tiny import BUILDERS, tiny_build_name, tiny_dir
from pnp_batch.models.load import ModelLoadError, hub_problem, resolve_device, resolve_dtype

log = logging.getLogger(__name__)

# torchmetrics' CLIPScore and PIE-Bench score with this CLIP; the PnP paper's structure metric
# (Splice's self-similarity distance) uses DINO ViT-B/8.
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
DEFAULT_DINO_MODEL = "facebook/dino-vitb8"


@dataclass
class MetricModels:
    """The loaded metric models on one device and dtype, with what was loaded, for the record."""

    clip: Any
    clip_processor: Any
    dino: Any
    device: torch.device
    dtype: torch.dtype
    clip_model: str
    clip_revision: str | None
    dino_model: str
    dino_revision: str | None


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def _pretrained_kwargs(revision: str | None, dtype: torch.dtype | None, local_only: bool) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if revision:
        kw["revision"] = revision
    if local_only:
        kw["local_files_only"] = True
    if dtype is not None:  # transformers 5 renamed torch_dtype (and loads in the checkpoint's dtype by default)
        kw["dtype" if _transformers_major() >= 5 else "torch_dtype"] = dtype
    return kw


def _processor_backend_kwargs() -> dict[str, Any]:
    """Ask for the PIL image processor: the preprocessing CLIP score references use (PIL bicubic)."""
    return {"backend": "pil"} if _transformers_major() >= 5 else {"use_fast": False}


def _read_clip(src: str, revision: str | None, dtype: torch.dtype, local_only: bool) -> tuple[Any, Any]:
    from transformers import AutoProcessor, CLIPModel

    model = CLIPModel.from_pretrained(src, **_pretrained_kwargs(revision, dtype, local_only))
    processor = AutoProcessor.from_pretrained(
        src, **_pretrained_kwargs(revision, None, local_only), **_processor_backend_kwargs()
    )
    return model, processor


def _read_dino(src: str, revision: str | None, dtype: torch.dtype, local_only: bool) -> tuple[Any, None]:
    from transformers import ViTModel

    model = ViTModel.from_pretrained(src, add_pooling_layer=False, **_pretrained_kwargs(revision, dtype, local_only))
    return model, None


Reader = Callable[[str, str | None, torch.dtype, bool], tuple[Any, Any]]


def _first_line(err: Exception) -> str:
    text = str(err)
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def _load_help(role: str, model_id: str, revision: str | None, why: str) -> ModelLoadError:
    tiny = "tiny-clip" if role == "CLIP" else "tiny-dino"
    return ModelLoadError(
        f"could not load the {role} metric model {model_id!r} (revision {revision or 'main'!r}): {why}. "
        "Pass a hub id or a local folder written by save_pretrained. If this machine has no hub access, "
        f"download it once where there is access (`huggingface-cli download {model_id}`) and copy the "
        f"Hugging Face cache here, or pass that folder. For an offline check of the plumbing, use {tiny!r}."
    )


def _load_one(role: str, model_id: str, revision: str | None, dtype: torch.dtype, read: Reader) -> tuple:
    """(model, processor, revision for the record) from a tiny id, a local folder, or the hub."""
    if model_id in BUILDERS:
        model, processor = read(str(tiny_dir(model_id)), None, dtype, True)
        return model, processor, tiny_build_name(model_id)
    local = os.path.expanduser(model_id)
    if os.path.isdir(local):
        try:
            model, processor = read(local, None, dtype, True)
        except (OSError, ValueError, RuntimeError) as e:
            raise _load_help(role, model_id, revision, f"the folder does not hold one ({_first_line(e)})") from e
        return model, processor, None
    if os.path.exists(local) or model_id.startswith(("/", "./", "../", "~")):
        raise _load_help(role, model_id, revision, "that path does not exist or is not a model folder")
    try:  # the local Hugging Face cache first: no network needed when the weights are there
        model, processor = read(model_id, revision, dtype, True)
    except (OSError, ValueError, RuntimeError):
        problem = hub_problem(model_id, revision or "main")
        if problem is not None:
            raise _load_help(role, model_id, revision, f"not cached here and the hub did not provide it "
                                                       f"({_first_line(problem)})") from problem
        try:
            model, processor = read(model_id, revision, dtype, False)
        except (OSError, ValueError, RuntimeError) as e:
            raise _load_help(role, model_id, revision, _first_line(e)) from e
    resolved = getattr(model.config, "_commit_hash", None)  # the exact hub commit, where transformers tells it
    return model, processor, resolved or revision or "main"


def _ready(model: Any, device: torch.device) -> Any:
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def load_metric_models(
    clip_id: str = DEFAULT_CLIP_MODEL,
    dino_id: str = DEFAULT_DINO_MODEL,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    clip_revision: str | None = None,
    dino_revision: str | None = None,
) -> MetricModels:
    """Load both metric models once, eval mode, no grads; dtype "auto" is fp16 on CUDA, fp32 on CPU.

    Each id is `tiny-clip`/`tiny-dino` (random weights, built offline), a local folder, or a hub id
    (the local Hugging Face cache first). A model that cannot be loaded raises ModelLoadError (a
    UsageError) naming it and saying what to do.
    """
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if isinstance(dtype, torch.dtype):
        dt = dtype
    else:
        try:
            dt = resolve_dtype(dtype, dev)
        except KeyError as e:
            raise ModelLoadError(f"metric dtype {dtype!r} is not auto, float32, float16 or bfloat16") from e
    clip, processor, clip_rev = _load_one("CLIP", clip_id, clip_revision, dt, _read_clip)
    dino, _, dino_rev = _load_one("DINO", dino_id, dino_revision, dt, _read_dino)
    log.info("metric models: CLIP %s@%s, DINO %s@%s on %s (%s)", clip_id, clip_rev, dino_id, dino_rev, dev, dt)
    return MetricModels(
        clip=_ready(clip, dev),
        clip_processor=processor,
        dino=_ready(dino, dev),
        device=dev,
        dtype=dt,
        clip_model=clip_id,
        clip_revision=clip_rev,
        dino_model=dino_id,
        dino_revision=dino_rev,
    )

