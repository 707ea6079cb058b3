"""Load Stable Diffusion parts (hub id, local diffusers folder, single checkpoint file); the tiny test model."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pnp_batch.config import PipelineConfig
from pnp_batch.errors import UsageError

log = logging.getLogger(__name__)

TINY_VERSION = "tiny-v1"
TINY_SEED = 0
TOKENIZER_ASSETS = Path(__file__).parent / "assets" / "tiny_tokenizer"
TEST_MODEL_NOTE = "random-weight test model: outputs show the plumbing, not quality"

# SD 2.1-base's scheduler config (the tiny model ships the same one, so the schedules match SD's).
SD_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


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


def cache_dir() -> Path:
    root = os.environ.get("PNP_BATCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pnp-batch")
    return Path(root)


# ---------------------------------------------------------------------------------------------
# The offline test model


def sd_unet(block_out_channels: tuple[int, ...], norm_num_groups: int, **conditioning: Any):
    """A UNet2DConditionModel with Stable Diffusion's block topology (4 down, 4 up, 2 layers each,
    cross-attention in the first three down and last three up blocks); widths and text settings given."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=block_out_channels,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=norm_num_groups,
        **conditioning,
    )


def sd_vae(block_out_channels: tuple[int, ...], layers_per_block: int, norm_num_groups: int):
    """An AutoencoderKL with Stable Diffusion's VAE layout (4 blocks, 4 latent channels, 0.18215)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=block_out_channels,
        latent_channels=4,
        layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups,
        sample_size=512,
        scaling_factor=0.18215,
    )


def make_test_model(out_dir: str | os.PathLike, seed: int = TINY_SEED) -> Path:
    """Write the tiny test model in diffusers format: SD's block topology, tiny widths, seeded weights.

    Every injection point of PNP_SPEC.md section 4 exists (up_blocks[1].resnets[1], and attn1 of
    up_blocks[1].attentions[1..2], up_blocks[2..3].attentions[0..2]). Saved with
    StableDiffusionPipeline.save_pretrained, so any diffusers code (ours or the authors') loads it.
    """
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out = Path(out_dir)
    tokenizer = CLIPTokenizer(
        vocab=str(TOKENIZER_ASSETS / "vocab.json"),
        merges=str(TOKENIZER_ASSETS / "merges.txt"),
        model_max_length=77,
    )
    vocab_size = len(tokenizer)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_act="gelu",
            projection_dim=32,
        )
    )
    torch.manual_seed(seed + 1)
    unet = sd_unet((16, 16, 32, 32), norm_num_groups=8, cross_attention_dim=32, attention_head_dim=1,
                   use_linear_projection=True)
    # Random weights give an eps prediction of large, arbitrary scale; shrink the output layer so the
    # model behaves like a trained one in magnitude (|eps| around 1) and DDIM inversion stays stable.
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.2)
        unet.conv_out.bias.zero_()
    torch.manual_seed(seed + 2)
    vae = sd_vae((8, 16, 16, 16), layers_per_block=1, norm_num_groups=4)
    # A random encoder gives latents of std ~0.07 after SD's 0.18215 scaling; SD's trained VAE gives
    # ~1, the scale the noise schedule assumes. Scale the posterior mean up (and the decoder's input
    # down by as much) so DDIM inversion sees latents of the size it does with real models.
    with torch.no_grad():
        vae.quant_conv.weight[:4].mul_(15.0)
        vae.quant_conv.bias[:4].mul_(15.0)
        vae.post_quant_conv.weight.div_(15.0)
    scheduler = PNDMScheduler(**{k: v for k, v in SD_SCHEDULER.items() if k not in ("clip_sample",)})
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    # SD's own scheduler_config.json carries clip_sample=false for the DDIM scheduler built from it
    # (DDIM's default is true); PNDMScheduler does not keep that key, so write the file as SD has it.
    sched_json = tmp / "scheduler" / "scheduler_config.json"
    sched_cfg = json.loads(sched_json.read_text())
    sched_cfg.update(SD_SCHEDULER)
    sched_json.write_text(json.dumps(sched_cfg, indent=2, sort_keys=True) + "\n")
    # Older transformers read the slow-tokenizer files; ship them beside tokenizer.json.
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(TOKENIZER_ASSETS / name, tmp / "tokenizer" / name)
    (tmp / "PNP_BATCH_TEST_MODEL.json").write_text(
        json.dumps({"name": TINY_VERSION, "seed": seed, "note": TEST_MODEL_NOTE}, indent=2) + "\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _builder_hash() -> str:
    """Changes whenever the recipe of the tiny model changes, so a stale cached build is never used."""
    import inspect

    h = hashlib.sha256(inspect.getsource(make_test_model).encode())
    for name in ("vocab.json", "merges.txt"):
        h.update((TOKENIZER_ASSETS / name).read_bytes())
    return h.hexdigest()[:10]


def tiny_model_dir() -> Path:
    """The tiny model in the local cache, built on first use (a few seconds, no download)."""
    path = cache_dir() / f"{TINY_VERSION}-{_builder_hash()}"
    if not (path / "model_index.json").is_file():
        log.info("building the offline test model in %s", path)
        make_test_model(path)
    return path


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
    tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **kw)
    text_encoder = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", torch_dtype=dtype, **kw)
    vae = AutoencoderKL.from_pretrained(src, subfolder="vae", torch_dtype=dtype, **kw)
    unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", torch_dtype=dtype, **kw)
    sched = _scheduler_config(src, kw)
    return vae, text_encoder, tokenizer, unet, sched


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
    if model == "tiny" or os.path.isdir(model) or os.path.isfile(model):
        return None
    if model.startswith(("/", "./", "../")) or model.endswith((".safetensors", ".ckpt")):
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
    elif os.path.isdir(model):
        path = Path(model)
        if not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
            raise ModelLoadError(f"model folder {model!r} is not a diffusers folder (no model_index.json / unet/)")
        parts = _load_folder(path, None, dtype, local_only=True)
        fingerprint = f"folder:{_folder_fingerprint(path)}"
        is_test = (path / "PNP_BATCH_TEST_MODEL.json").is_file()
    elif model.endswith((".safetensors", ".ckpt")):
        parts = _load_single_file(model, dtype)
        fingerprint = f"file:{os.path.basename(model)}:{os.path.getsize(model)}"
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
    vae, text_encoder, tokenizer, unet, sched = parts
    for m in (vae, text_encoder, unet):
        m.to(device)
        m.eval()
        m.requires_grad_(False)
    pred = sched.get("prediction_type", "epsilon")
    if pred not in ("epsilon", "v_prediction"):
        raise ModelLoadError(f"model {model!r} uses prediction_type={pred!r}; pnp-batch supports epsilon and v_prediction")
    if model != "tiny" and not (unet.up_blocks[1].resnets and len(unet.up_blocks) == 4):
        raise ModelLoadError(f"model {model!r} does not have Stable Diffusion 1.x/2.x's UNet layout; see PNP_SPEC.md §7")
    return Models(
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
    )


def _load_single_file(path: str, dtype: torch.dtype) -> tuple:
    """A single .safetensors/.ckpt checkpoint via diffusers' from_single_file."""
    from diffusers import StableDiffusionPipeline

    if not os.path.isfile(path):
        raise ModelLoadError(f"checkpoint file {path!r} does not exist")
    try:
        pipe = StableDiffusionPipeline.from_single_file(path, torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(
            f"could not load checkpoint {path!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}. "
            "diffusers reads the matching model configuration from the hub (cached after the first use); "
            "offline, convert the checkpoint once to a diffusers folder and pass that folder."
        ) from e
    sched = {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")}
    return pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet, sched
