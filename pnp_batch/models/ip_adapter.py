"""IP-Adapters (pipeline key `ip_adapter`, docs/ip_adapter.md): checked against the model, then loaded
through diffusers' own `load_ip_adapter`, and the offline random-weight test adapter.

diffusers loads an adapter into a pipeline (`IPAdapterMixin`); `ip_pipeline` builds one around the parts
already loaded (no copy: its UNet is the model's), so `load_ip_adapter`, `set_ip_adapter_scale` and
`prepare_ip_adapter_image_embeds` are diffusers' own. The loader puts IP-Adapter processors on every
cross-attention layer (attn2) and resets every attn1 processor: it runs before PnP's processors are
installed (the Translator installs them module by module afterwards, pnp/injection.py).

Where the adapter is: `tiny` (the offline test adapter of `tiny` / `tiny-sdxl`), a weight file, a local
folder or a hub id, with `ip_adapter_subfolder` / `ip_adapter_weight_name` inside it (a hub id without a
weight name: the published adapter of the model's family, h94/IP-Adapter's layout) and the image encoder
in `ip_adapter_image_encoder` (relative to the subfolder, as diffusers reads it, or a folder of its own).
A file whose layers do not match the UNet, or a missing image encoder, is a ModelLoadError (exit 2)
naming the file, before any work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pnp_batch.backbones import SDXL
from pnp_batch.config import PipelineConfig
from pnp_batch.errors import UsageError

log = logging.getLogger(__name__)

TEST_IP_VERSION = "tiny-ip-v1"
TEST_SUBFOLDER = "models"
TEST_WEIGHT_NAME = "ip-adapter_tiny.safetensors"
TEST_IMAGE_EMBED_DIM = 16
# The published adapters per family (h94/IP-Adapter's layout), by the UNet's cross-attention width.
PUBLISHED = {
    768: ("SD 1.5", "models", "ip-adapter_sd15.safetensors"),
    2048: ("SDXL", "sdxl_models", "ip-adapter_sdxl.safetensors"),
}
FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}


class IPAdapterError(UsageError):
    """The IP-Adapter named by the pipeline cannot be used with this model (exit status 2)."""


@dataclass
class IPAdapter:
    """A loaded adapter: the diffusers pipeline around the model's parts that holds it."""

    pipe: Any
    name: str  # where it came from, for messages and records
    layers: list[str]  # the UNet's cross-attention layers that carry it


def _available() -> str:
    return "; ".join(f"{fam}: h94/IP-Adapter {sub}/{w}" for fam, sub, w in PUBLISHED.values())


def family_of(unet) -> str:
    dim = unet.config.cross_attention_dim
    return FAMILIES.get(dim, f"a model with cross-attention width {dim}")


def cross_attention_layers(unet) -> list[str]:
    """The UNet's cross-attention (attn2) modules, in diffusers' processor order (the adapter's key order)."""
    return [n.removesuffix(".processor") for n in unet.attn_processors if not n.endswith("attn1.processor")]


@dataclass(frozen=True)
class Location:
    source: str  # hub id or local folder, as load_ip_adapter takes it
    subfolder: str
    weight_name: str
    image_encoder: str  # relative to source/subfolder (diffusers' image_encoder_folder), or a folder of its own
    local: bool


def locate(cfg: PipelineConfig, unet) -> Location:
    """Where the adapter's weights and image encoder are, from the pipeline keys."""
    name, sub, weight = cfg.ip_adapter, cfg.ip_adapter_subfolder, cfg.ip_adapter_weight_name
    enc = cfg.ip_adapter_image_encoder
    if name == "tiny":
        return Location(str(tiny_ip_adapter_dir(unet)), TEST_SUBFOLDER, TEST_WEIGHT_NAME, enc, True)
    if os.path.isfile(name):
        return Location(os.path.dirname(os.path.abspath(name)), "", os.path.basename(name), enc, True)
    if os.path.isdir(name):
        marker = Path(name, "PNP_BATCH_TEST_IP_ADAPTER.json")
        if not weight and not sub and marker.is_file():  # a test adapter (make-test-model --ip-adapter)
            info = json.loads(marker.read_text())
            sub, weight = info["subfolder"], info["weight_name"]
        if not weight:
            found = sorted(p.name for p in Path(name, sub).glob("*.safetensors"))
            if len(found) != 1:
                raise IPAdapterError(f"ip_adapter {name!r}: set ip_adapter_weight_name (and ip_adapter_subfolder); "
                                     f"weight files in {os.path.join(name, sub)}: {', '.join(found) or 'none'}")
            weight = found[0]
        return Location(name, sub, weight, enc, True)
    if name.startswith(("/", "./", "../")):
        raise IPAdapterError(f"ip_adapter {name!r} does not exist")
    if not weight:  # a hub id: the published adapter of the model's family
        dim = unet.config.cross_attention_dim
        if dim not in PUBLISHED:
            raise IPAdapterError(f"ip_adapter {name!r}: no IP-Adapter is published for {family_of(unet)}; "
                                 f"available: {_available()}")
        _, sub, weight = PUBLISHED[dim]
    return Location(name, sub, weight, enc, False)


def check_weights(path: Path, unet) -> None:
    """The adapter file's layers against the UNet's cross-attention layers: a mismatch is an IPAdapterError."""
    from safetensors import safe_open

    if path.suffix != ".safetensors":
        return  # a pickle file: diffusers' loader reports what does not fit
    with safe_open(str(path), framework="pt", device="cpu") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - a safetensors file
    layers = cross_attention_layers(unet)
    problems = []
    for j, layer in enumerate(layers):
        attn = unet.get_submodule(layer)
        want = (attn.to_k.out_features, attn.to_k.in_features)
        got = shapes.get(f"ip_adapter.{2 * j + 1}.to_k_ip.weight")
        if got != want:
            problems.append(f"{layer}: {got or 'missing'} instead of {want}")
    extra = sum(1 for k in shapes if k.startswith("ip_adapter.") and k.endswith("to_k_ip.weight")) - len(layers)
    if problems or extra > 0 or not any(k.startswith("image_proj.") for k in shapes):
        detail = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
        raise IPAdapterError(
            f"IP-Adapter {path} does not match the model ({family_of(unet)}, {len(layers)} cross-attention layers): "
            f"{detail or f'{extra} layers too many, or no image projection'}. Adapters: {_available()}")


def _encoder_dir(loc: Location) -> Path | None:
    """The local image encoder folder (None for a hub adapter: diffusers downloads it)."""
    if os.path.isabs(loc.image_encoder) or os.path.isdir(loc.image_encoder):
        return Path(loc.image_encoder)
    if not loc.local:
        return None
    rel = Path(loc.subfolder, loc.image_encoder) if loc.image_encoder.count("/") == 0 else Path(loc.image_encoder)
    return Path(loc.source) / rel


def ip_pipeline(models: Any) -> Any:
    """A diffusers pipeline around the loaded parts (the same module objects), for its IP-Adapter methods."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = DDIMScheduler.from_config(models.scheduler_config)
    if models.architecture == SDXL:
        return StableDiffusionXLPipeline(vae=models.vae, text_encoder=models.text_encoder,
                                         text_encoder_2=models.text_encoder_2, tokenizer=models.tokenizer,
                                         tokenizer_2=models.tokenizer_2, unet=models.unet, scheduler=scheduler,
                                         image_encoder=None, feature_extractor=None)
    return StableDiffusionPipeline(vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer,
                                   unet=models.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   image_encoder=None, requires_safety_checker=False)


def load_ip_adapter(cfg: PipelineConfig, models: Any) -> IPAdapter | None:
    """Load cfg.ip_adapter into models.unet through diffusers' loader (None when no adapter is set)."""
    if not cfg.ip_adapter:
        return None
    from transformers import CLIPVisionModelWithProjection

    unet = models.unet
    loc = locate(cfg, unet)
    weights = Path(loc.source, loc.subfolder, loc.weight_name)
    if loc.local:
        if not weights.is_file():
            raise IPAdapterError(f"IP-Adapter weight file {weights} does not exist")
        check_weights(weights, unet)
    enc = _encoder_dir(loc)
    if enc is not None and not (enc / "config.json").is_file():
        raise IPAdapterError(f"IP-Adapter {weights}: image encoder not found in {enc} (no config.json); set "
                             "ip_adapter_image_encoder to its folder")
    pipe = ip_pipeline(models)
    try:
        if enc is not None:  # loaded here so it can live anywhere; diffusers then keeps the one registered
            encoder = CLIPVisionModelWithProjection.from_pretrained(str(enc), dtype=models.dtype)
            pipe.register_modules(image_encoder=encoder.to(models.device).eval())
        pipe.load_ip_adapter(loc.source, subfolder=loc.subfolder, weight_name=loc.weight_name,
                             image_encoder_folder=loc.image_encoder, local_files_only=loc.local or None)
    except IPAdapterError:
        raise
    except Exception as e:
        raise IPAdapterError(f"cannot load IP-Adapter {weights}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    image_dim = pipe.image_encoder.config.projection_dim
    proj = unet.encoder_hid_proj.image_projection_layers[0]
    want = getattr(getattr(proj, "image_embeds", None), "in_features", image_dim)
    if want != image_dim:
        raise IPAdapterError(f"IP-Adapter {weights} takes image embeddings of width {want}, its image encoder "
                             f"{enc or loc.image_encoder} gives {image_dim}")
    pipe.image_encoder.requires_grad_(False)
    return IPAdapter(pipe=pipe, name=str(weights), layers=cross_attention_layers(unet))


# ---------------------------------------------------------------------------------------------
# The offline test adapter


def make_test_ip_adapter(out_dir: str | os.PathLike, unet, seed: int = 0) -> Path:
    """Write a random-weight IP-Adapter for `unet` in h94/IP-Adapter's layout, as load_ip_adapter reads it:
    OUT/models/ip-adapter_tiny.safetensors (image_proj.* and ip_adapter.{1,3,5...}.to_{k,v}_ip.weight) and
    OUT/models/image_encoder/ (a tiny CLIPVisionModelWithProjection)."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    out = Path(out_dir)
    sub = out / TEST_SUBFOLDER
    sub.mkdir(parents=True, exist_ok=True)
    cross = unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "image_proj.proj.weight": torch.randn(4 * cross, TEST_IMAGE_EMBED_DIM, generator=g) / TEST_IMAGE_EMBED_DIM**0.5,
        "image_proj.proj.bias": torch.zeros(4 * cross),
        "image_proj.norm.weight": torch.ones(cross),
        "image_proj.norm.bias": torch.zeros(cross),
    }
    for j, layer in enumerate(cross_attention_layers(unet)):
        attn = unet.get_submodule(layer)
        for kind in ("k", "v"):
            w = torch.randn(attn.to_k.out_features, cross, generator=g) / cross**0.5
            tensors[f"ip_adapter.{2 * j + 1}.to_{kind}_ip.weight"] = w
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(sub / TEST_WEIGHT_NAME))
    torch.manual_seed(seed + 1)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=TEST_IMAGE_EMBED_DIM))
    encoder.save_pretrained(str(sub / "image_encoder"), safe_serialization=True)
    (out / "PNP_BATCH_TEST_IP_ADAPTER.json").write_text(json.dumps(
        {"name": TEST_IP_VERSION, "seed": seed, "subfolder": TEST_SUBFOLDER, "weight_name": TEST_WEIGHT_NAME,
         "note": "random-weight test adapter: outputs show the plumbing, not quality"}, indent=2) + "\n")
    return out


def tiny_ip_adapter_dir(unet) -> Path:
    """The test adapter for this UNet's layout in the local cache, built on first use (no download)."""
    import inspect

    from pnp_batch.models.tiny import cache_dir

    layout = json.dumps([unet.config.cross_attention_dim, [
        (unet.get_submodule(n).to_k.out_features) for n in cross_attention_layers(unet)]])
    recipe = hashlib.sha256((inspect.getsource(make_test_ip_adapter) + layout).encode()).hexdigest()[:10]
    path = cache_dir() / f"{TEST_IP_VERSION}-{recipe}"
    if not (path / "PNP_BATCH_TEST_IP_ADAPTER.json").is_file():
        log.info("building the offline test IP-Adapter in %s", path)
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        make_test_ip_adapter(tmp, unet)
        if not path.exists():
            os.replace(tmp, path)
    return path


def write_test_ip_adapter(model_dir: str | os.PathLike, seed: int = 0) -> Path:
    """The test adapter of the diffusers model folder `model_dir`, written to MODEL_DIR/ip_adapter."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(model_dir), subfolder="unet")
    return make_test_ip_adapter(Path(model_dir) / "ip_adapter", unet, seed=seed)
