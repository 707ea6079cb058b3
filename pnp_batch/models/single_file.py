"""Single-file checkpoints (`model=/path/file.safetensors` or `.ckpt`), loaded offline.

diffusers' `from_single_file` converts the original (CompVis/LDM) key layout; it needs the
family's diffusers configuration, which it would fetch from the hub. pnp-batch never lets it:
`config=` is always a local folder and `local_files_only=True`. Which folder (pipeline key
`model_config`):

- `auto` (default): the family recognised from the checkpoint's keys and shapes (the text
  encoder's layout, the cross-attention width, SDXL's `label_emb`), then that family's shipped
  configuration; SD 2.x files must name theirs (`sd21` at 768 px with v-prediction, or
  `sd21-base` at 512 px with epsilon: the weights do not say which objective they were trained for);
- a family name, `sd15`, `sd21`, `sd21-base`, `sdxl`: the configuration shipped with pnp-batch
  (assets/model_configs: configs only, no weights; laid out once in the cache with the CLIP
  tokenizer's vocabulary built from assets/clip_bpe);
- a local diffusers folder with model_index.json and the components' configs (weights not needed).

Checkpoints that are not a text-to-image SD UNet (inpainting, SDXL refiner, other architectures)
are refused before any work, naming the file and the reason.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from pnp_batch.errors import UsageError
from pnp_batch.filehash import file_sha256
from pnp_batch.resources import CLIP_BPE, CONFIG_ASSETS

log = logging.getLogger(__name__)

FAMILIES = ("sd15", "sd21", "sd21-base", "sdxl")
SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

_UNET = "model.diffusion_model."
_KEYS = {
    "clip": "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    "open_clip": "cond_stage_model.model.token_embedding.weight",
    "sdxl_label_emb": "model.diffusion_model.label_emb.0.0.weight",
    "sdxl_open_clip": "conditioner.embedders.1.model.token_embedding.weight",
    "refiner_open_clip": "conditioner.embedders.0.model.token_embedding.weight",
    "conv_in": "model.diffusion_model.input_blocks.0.0.weight",
    "cross_attn": "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
}


class CheckpointError(UsageError):
    """A checkpoint file cannot be used; the message names the file and the reason."""


def is_single_file(model: str) -> bool:
    return model.endswith(SUFFIXES) and not os.path.isdir(model)


def read_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape; a .safetensors header is read without loading the weights."""
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
        sd = _torch_load(path)
    except Exception as e:  # unreadable, truncated, not a checkpoint: all unusable input
        raise CheckpointError(f"checkpoint {path!r} could not be read: {type(e).__name__}: {e}") from e
    while isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise CheckpointError(f"checkpoint {path!r} holds no state dict (a {type(sd).__name__})")
    return {k: tuple(v.shape) for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _torch_load(path: str) -> Any:
    """A .ckpt's tensors without running its pickled code (weights_only); memory-mapped where the
    file is in torch's zip format, read whole where it is the legacy format."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def detect_family(path: str, shapes: dict[str, tuple[int, ...]]) -> str:
    """`sd15`, `sd2` (2.x: 512 or 768 px, undecidable from the weights) or `sdxl`; else CheckpointError."""
    if not any(k.startswith(_UNET) for k in shapes):
        raise CheckpointError(
            f"checkpoint {path!r} is not a Stable Diffusion checkpoint in the original layout: it has no "
            f"'{_UNET}*' UNet weights ({len(shapes)} tensors; first: {', '.join(sorted(shapes)[:3]) or 'none'}). "
            "A diffusers folder is passed as a folder; other architectures are not supported")
    conv_in = shapes.get(_KEYS["conv_in"])
    if conv_in is not None and conv_in[1] != 4:
        raise CheckpointError(f"checkpoint {path!r} is an inpainting or other image-conditioned model (its UNet "
                              f"takes {conv_in[1]} input channels, not 4); PnP needs a text-to-image checkpoint")
    if _KEYS["refiner_open_clip"] in shapes and _KEYS["sdxl_open_clip"] not in shapes:
        raise CheckpointError(f"checkpoint {path!r} is an SDXL refiner (one OpenCLIP text encoder, no CLIP-L); "
                              "PnP needs a base model")
    if _KEYS["sdxl_label_emb"] in shapes or _KEYS["sdxl_open_clip"] in shapes:
        return "sdxl"
    width = shapes.get(_KEYS["cross_attn"], (0, 0))[-1]
    if _KEYS["open_clip"] in shapes:
        return "sd2"
    if _KEYS["clip"] in shapes:
        return "sd15"
    raise CheckpointError(
        f"checkpoint {path!r}: architecture not recognised (a UNet with cross-attention width {width or '?'} but no "
        "known text encoder: neither CLIP 'cond_stage_model.transformer.*' (SD 1.x), OpenCLIP "
        "'cond_stage_model.model.*' (SD 2.x) nor SDXL's 'conditioner.embedders.*'). "
        "Set model_config to a local diffusers folder with its configuration, or convert it to a diffusers folder")


def _bpe_vocab() -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary and merges, built from the shipped merges as CLIP's own tokenizer does."""
    with gzip.open(CLIP_BPE) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [m for m in lines[1:] if m]
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def _assets_hash(family: str) -> str:
    h = hashlib.sha256(CLIP_BPE.read_bytes())
    for p in sorted((CONFIG_ASSETS / family).rglob("*")):
        if p.is_file():
            h.update(p.relative_to(CONFIG_ASSETS).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:10]


def family_config_dir(family: str) -> Path:
    """The shipped configuration of `family` as a diffusers folder (configs and tokenizers, no
    weights), laid out once in the pnp-batch cache."""
    from pnp_batch.models.tiny import cache_dir

    if family not in FAMILIES:
        raise CheckpointError(f"model_config={family!r} is not one of {', '.join(FAMILIES)}, 'auto' or a local folder")
    out = cache_dir() / "model-configs" / f"{family}-{_assets_hash(family)}"
    if (out / "model_index.json").is_file():
        return out
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(CONFIG_ASSETS / family, tmp)
    vocab, merges = _bpe_vocab()
    for tok in tmp.glob("tokenizer*"):
        (tok / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        (tok / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another process laid it out first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_config(path: str, model_config: str, family: str) -> tuple[Path, str]:
    """The local diffusers folder to read the configuration from, and its name for the fingerprint."""
    if model_config not in ("auto", *FAMILIES):
        folder = Path(model_config)
        if not (folder / "model_index.json").is_file():
            raise CheckpointError(f"model_config={model_config!r} is neither a family ({', '.join(FAMILIES)}) nor a "
                                  "local diffusers folder with model_index.json")
        return folder, f"folder:{_config_fingerprint(folder)}"
    if model_config == "auto":
        if family == "sd2":
            raise CheckpointError(
                f"checkpoint {path!r} is a Stable Diffusion 2.x model, trained either for 768 px with v-prediction "
                "or for 512 px with epsilon, which its weights do not tell: set model_config=sd21 (768-v, "
                "e.g. --pipeline sd21) or model_config=sd21-base")
        model_config = family
    expected = "sd2" if model_config.startswith("sd21") else model_config
    if expected != family:
        raise CheckpointError(f"checkpoint {path!r} is a {family} model but model_config={model_config!r}")
    return family_config_dir(model_config), model_config


def _config_fingerprint(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*.json")):
        if not p.name.startswith("."):
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def inspect_checkpoint(path: str, model_config: str) -> tuple[str, Path, str]:
    """Check a checkpoint before loading it: (family, config folder, config name); CheckpointError if unusable."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path!r} does not exist")
    shapes = read_shapes(path)
    family = detect_family(path, shapes)
    folder, name = resolve_config(path, model_config, family)
    _check_widths(path, shapes, folder)
    return family, folder, name


def _check_widths(path: str, shapes: dict[str, tuple[int, ...]], folder: Path) -> None:
    """The configuration's UNet widths must be the checkpoint's (a 2.x config for a 1.x file, ...)."""
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    conv_in = shapes.get(_KEYS["conv_in"])
    width = int(cfg["block_out_channels"][0])
    if conv_in is not None and conv_in[0] != width:
        raise CheckpointError(f"checkpoint {path!r} has UNet width {conv_in[0]}, its configuration "
                              f"({folder}) {width}: set model_config to the checkpoint's family or folder")
    cross = shapes.get(_KEYS["cross_attn"])
    if cross is not None and cross[-1] != int(cfg["cross_attention_dim"]):
        raise CheckpointError(f"checkpoint {path!r} has cross-attention width {cross[-1]}, its configuration "
                              f"({folder}) {cfg['cross_attention_dim']}: set model_config to its family or folder")


def load_single_file(path: str, model_config: str, dtype: torch.dtype) -> tuple[Any, str, str, Path]:
    """The checkpoint as a diffusers pipeline (SD or SDXL), loaded offline; also its family, the
    name of the configuration used (for the fingerprint) and its folder. Read the scheduler's
    settings from the folder's scheduler_config.json, not from the pipeline's scheduler: a
    PNDMScheduler (SD 1.5's) drops `clip_sample: false`, which a DDIMScheduler made from it then
    turns into DDIM's default, true."""
    family, folder, config_name = inspect_checkpoint(path, model_config)
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    try:
        pipe = cls.from_single_file(path, config=str(folder), local_files_only=True, torch_dtype=dtype)
    except Exception as e:  # any conversion failure is an unusable checkpoint
        text = str(e).strip().splitlines()
        raise CheckpointError(f"could not load checkpoint {path!r} with configuration {config_name}: "
                              f"{type(e).__name__}: {text[0] if text else ''}") from e
    _check_no_meta(path, pipe)
    _own_memory(pipe)
    return pipe, family, config_name, folder


def _check_no_meta(path: str, pipe: Any) -> None:
    """Weights the checkpoint lacked stay on the meta device: refuse them here, not mid-run."""
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        missing = [n for n, p in module.named_parameters() if p.device.type == "meta"]
        if missing:
            raise CheckpointError(f"checkpoint {path!r} lacks {len(missing)} {name} weights (e.g. {missing[0]}); "
                                  "it does not match its configuration")


def _own_memory(pipe: Any) -> None:
    """Give every weight its own fresh allocation. from_single_file leaves them as views into the
    file's memory map at arbitrary offsets: a later change to the file would show through, and the
    alignment picks other CPU kernels than a diffusers folder's weights get (last-bit differences)."""
    with torch.no_grad():
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            module = getattr(pipe, name, None)
            if module is None:
                continue
            for p in list(module.parameters()) + list(module.buffers()):
                p.data = p.data.clone()


def single_file_fingerprint(path: str, config_name: str) -> str:
    """`file:sha256:<content>:<configuration>`: copies of one file share it, an edited file does not."""
    return f"file:sha256:{file_sha256(path)[:20]}:{config_name}"
