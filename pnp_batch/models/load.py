"""Load Stable Diffusion parts once per worker: a hub id, a local diffusers folder, a single checkpoint file,
`tiny` or `tiny-sdxl` (SDXL's own part: models/sdxl.py)."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pnp_batch.backbones import SD, SDXL, UnsupportedArchitecture, recognise
from pnp_batch.config import PipelineConfig
from pnp_batch.errors import UsageError
from pnp_batch.models import sdxl
from pnp_batch.models.ip_adapter import load_ip_adapter
from pnp_batch.models.lora import apply_loras, lora_fingerprint, resolve_loras
from pnp_batch.models.single_file import is_single_file, load_single_file, single_file_fingerprint
from pnp_batch.models.tiny import TINY_VERSION, tiny_model_dir
from pnp_batch.models.tiny_sdxl import TINY_SDXL_VERSION, tiny_sdxl_dir

log = logging.getLogger(__name__)

class ModelLoadError(UsageError):
    """The model named by the pipeline cannot be loaded; the message says what to do."""


@dataclass
class Models:
    """One loaded model: the parts PnP needs, on one device and dtype."""

    vae: Any
    text_encoder: Any
    tokenizer: Any
    unet: Any
    scheduler_config: dict
    device: torch.device
    dtype: torch.dtype
    fingerprint: str
    name: str
    is_test_model: bool
    architecture: str = SD  # backbones.SD or backbones.SDXL
    text_encoder_2: Any = None  # SDXL: CLIPTextModelWithProjection (hidden states + pooled embedding)
    tokenizer_2: Any = None
    ip_adapter: Any = None  # models/ip_adapter.IPAdapter when the pipeline names one (loaded into `unet`)

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"device={name!r} is not a torch device ({e})") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device={name!r} but no CUDA device is available here; use device=auto or cpu")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


# ---------------------------------------------------------------------------------------------
# Loading


def _folder_fingerprint(path: Path) -> str:
    """Content fingerprint of a diffusers folder: component configs and weight-file sizes."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(path).as_posix()
        if rel.startswith("."):
            continue
        h.update(rel.encode())
        if p.suffix in (".json", ".txt"):
            h.update(p.read_bytes())
        else:
            h.update(str(p.stat().st_size).encode())
    return h.hexdigest()[:16]


def _load_folder(path: Path, revision: str | None, dtype: torch.dtype, local_only: bool) -> tuple:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kw: dict[str, Any] = {"revision": revision} if revision else {}
    if local_only:
        kw["local_files_only"] = True
    src = str(path)
    index = sdxl.pipeline_index(src, kw)
    problem = sdxl.unsupported(index)
    if problem:
        raise ModelLoadError(f"model {src!r} cannot be used: {problem}")
    tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **kw)
    text_encoder = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", torch_dtype=dtype, **kw)
    vae_dtype = sdxl.vae_dtype(AutoencoderKL.load_config(src, subfolder="vae", **kw), dtype) \
        if sdxl.is_sdxl(index) else dtype
    vae = AutoencoderKL.from_pretrained(src, subfolder="vae", torch_dtype=vae_dtype, **kw)
    unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", torch_dtype=dtype, **kw)
    sched = _scheduler_config(src, kw)
    second = sdxl.load_second_encoder(src, dtype, kw) if sdxl.is_sdxl(index) else {}
    return vae, text_encoder, tokenizer, unet, sched, second


def _scheduler_config(src: str, kw: dict) -> dict:
    from diffusers import DDIMScheduler

    cfg = dict(DDIMScheduler.load_config(src, subfolder="scheduler", **kw))
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _hub_help(model: str, revision: str, err: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"could not load model {model!r} (revision {revision!r}): it is not a local folder or file, and the "
        f"model hub did not provide it ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
        "If this machine has no hub access, download it once where there is access "
        f"(`huggingface-cli download {model}`) and copy the Hugging Face cache here, or pass a local "
        "diffusers folder or checkpoint file: --set model=/path/to/model. "
        "For an offline check of the pipeline, use --pipeline tiny."
    )


def hub_problem(model: str, revision: str) -> Exception | None:
    """One quick request to the hub (10 s timeout): None if the model is reachable, else the error.

    Without it, an unreachable hub costs minutes of diffusers' and huggingface_hub's own retries
    before the first error; with it, the user is told at once.
    """
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(model, revision=revision, timeout=10)
    except Exception as e:  # noqa: BLE001 - any failure means "not reachable from here"
        return e
    return None


def model_available(cfg: PipelineConfig) -> str | None:
    """None when cfg.model can be loaded here (local folder/file, cached, or reachable); else why not."""
    model = cfg.model
    if model in ("tiny", "tiny-sdxl") or os.path.isdir(model) or os.path.isfile(model):
        return None
    if model.startswith(("/", "./", "../")) or is_single_file(model):
        return f"{model!r} does not exist"
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(model, revision=cfg.revision, local_files_only=True, allow_patterns=["model_index.json"])
        return None
    except Exception as e:  # noqa: BLE001 - not in the cache: ask the hub
        log.debug("%s is not in the local Hugging Face cache: %s", model, e)
    problem = hub_problem(model, cfg.revision)
    if problem is None:
        return None
    return f"{model!r} is not in the local cache and the hub is not reachable ({problem})"


def load_models(cfg: PipelineConfig) -> Models:
    """Load the model named by cfg.model once, onto cfg.device in cfg.dtype, eval mode, no grads."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    model = cfg.model
    is_test = False
    if model == "tiny":
        path = tiny_model_dir()
        parts = _load_folder(path, None, dtype, local_only=True)
        fingerprint = f"{TINY_VERSION}:{_folder_fingerprint(path)}"
        is_test = True
    elif model == "tiny-sdxl":
        path = tiny_sdxl_dir()
        parts = _load_folder(path, None, dtype, local_only=True)
        fingerprint = f"{TINY_SDXL_VERSION}:{_folder_fingerprint(path)}"
        is_test = True
    elif os.path.isdir(model):
        path = Path(model)
        if not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
            raise ModelLoadError(f"model folder {model!r} is not a diffusers folder (no model_index.json / unet/)")
        parts = _load_folder(path, None, dtype, local_only=True)
        fingerprint = f"folder:{_folder_fingerprint(path)}"
        is_test = (path / "PNP_BATCH_TEST_MODEL.json").is_file()
    elif is_single_file(model):
        parts, fingerprint = _load_single_file(model, cfg.model_config, dtype)
    elif os.path.exists(model) or model.startswith(("/", "./", "../")):
        raise ModelLoadError(f"model path {model!r} does not exist or is not a diffusers folder or checkpoint file")
    else:
        try:  # the local Hugging Face cache first: no network needed when the weights are there
            parts = _load_folder(Path(model), cfg.revision, dtype, local_only=True)
        except (OSError, ValueError, RuntimeError):
            problem = hub_problem(model, cfg.revision)
            if problem is not None:
                raise _hub_help(model, cfg.revision, problem) from problem
            try:
                parts = _load_folder(Path(model), cfg.revision, dtype, local_only=False)
            except (OSError, ValueError, RuntimeError) as e:
                raise _hub_help(model, cfg.revision, e) from e
        fingerprint = f"hub:{model}@{cfg.revision}"
    vae, text_encoder, tokenizer, unet, sched, *rest = parts
    second = rest[0] if rest else {}
    try:
        arch = recognise(unet)
    except UnsupportedArchitecture as e:
        raise ModelLoadError(f"model {model!r} cannot be used: {e}") from e
    if arch == SDXL:
        if not second:
            raise ModelLoadError(f"model {model!r} has an SDXL UNet but no second text encoder (text_encoder_2)")
        fingerprint = f"{SDXL}|{fingerprint}"  # the architecture in the feature key (SD's keys stay as they were)
    for m in (vae, text_encoder, unet, second.get("text_encoder_2")):
        if m is None:
            continue
        m.to(device)
        m.eval()
        m.requires_grad_(False)
    pred = sched.get("prediction_type", "epsilon")
    if pred not in ("epsilon", "v_prediction"):
        raise ModelLoadError(f"model {model!r} uses prediction_type={pred!r}; pnp-batch supports epsilon and v_prediction")
    loras = resolve_loras(cfg.lora)  # LoRA adapters (models/lora.py): checked against the model, then fused
    apply_loras(unet, {"text_encoder": text_encoder, **({"text_encoder_2": second["text_encoder_2"]} if second else {})},
                loras)
    fingerprint += lora_fingerprint(loras)
    models = Models(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler_config=sched,
        device=device,
        dtype=dtype,
        fingerprint=fingerprint,
        name=model,
        is_test_model=is_test,
        architecture=arch,
        **second,
    )
    # An IP-Adapter (models/ip_adapter.py) changes no inversion (image prompts ride only on the targets),
    # so it stays out of the fingerprint and the feature key.
    models.ip_adapter = load_ip_adapter(cfg, models)
    return models


def _load_single_file(path: str, model_config: str, dtype: torch.dtype) -> tuple[tuple, str]:
    """A single .safetensors/.ckpt checkpoint, offline (models/single_file.py); its parts and fingerprint."""
    pipe, family, config_name, folder = load_single_file(path, model_config, dtype)
    sched = _scheduler_config(str(folder), {"local_files_only": True})
    parts: tuple = (pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet, sched)
    if family == "sdxl":  # the second text encoder, and the VAE in fp32 where SDXL's overflows (models/sdxl.py)
        pipe.vae.to(sdxl.vae_dtype(pipe.vae.config, dtype))
        parts += ({"text_encoder_2": pipe.text_encoder_2, "tokenizer_2": pipe.tokenizer_2},)
    return parts, single_file_fingerprint(path, config_name)
