"""PipelineConfig: presets (YAML) plus --set overrides, validated once at the edge."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from pnp_batch.errors import UsageError
from pnp_batch.ip_keys import IP_KEYS, IP_LITERAL_KEYS, IP_SCALE, check_ip_keys, ip_hash_part, parse_ip_scale
from pnp_batch.mask_keys import MASK_KEYS, MaskKeyError, check_mask_keys, mask_hash_part, parse_mask_value
from pnp_batch.resources import PRESET_DIR

DTYPES = ("auto", "float32", "float16", "bfloat16")
RESIZE_MODES = ("short_side", "center_crop")
NEGATIVE_MODES = ("fixed", "source", "blend")
NEGATIVE_SCHEDULES = ("linear", "constant", "exp")
OUTPUT_FORMATS = ("png", "jpg", "webp")
QUANTIZE = ("round", "floor")

# Keys that change the stored inversion (the feature key hashes exactly these).
INVERSION_KEYS = ("resolution", "resize_mode", "inversion_steps", "inversion_prompt", "steps")
# Keys a manifest row may override for that row alone.
ROW_OVERRIDES = ("negative_prompt", "seed", "guidance_scale", "pnp_f_t", "pnp_attn_t", IP_SCALE)
# Keys of the metric models (pnp-batch eval, run --eval): not in the config hash.
EVAL_KEYS = ("eval_clip_model", "eval_clip_revision", "eval_dino_model", "eval_dino_revision")
# Keys of the input policy (io/policy.py): not in the config hash.
POLICY_KEYS = ("allow_uri", "allow_private_network")
# Keys whose --set values are taken as written (not parsed as YAML).
_LITERAL_KEYS = ("model", "model_config", "revision", "inversion_prompt", "negative_prompt", "name", *EVAL_KEYS,
                 *IP_LITERAL_KEYS)
# Injection layers (PNP_SPEC.md §4): None = the architecture's table; a tuple of module paths otherwise.
LAYER_KEYS = ("pnp_feature_blocks", "pnp_attn_layers")
# Keys a sweep may set per row although rows differing in them cannot share a UNet batch: such rows
# form separate groups of the same source (one inversion still: the feature store shares it).
GROUP_KEYS = ("negative_prompt_mode", *LAYER_KEYS)
# Decoder layer n (the paper's numbering: SD 0-11, SDXL 0-8) is up_blocks[n // 3], layer n % 3 of it.
DECODER_LAYERS = 12


class ConfigError(UsageError, ValueError):
    """The pipeline configuration cannot be used (exit status 2)."""


@dataclass(frozen=True)
class PipelineConfig:
    """Every setting of a translation pipeline; see pipelines/*.yaml and the README."""

    model: str = "stabilityai/stable-diffusion-2-1-base"
    revision: str = "main"
    dtype: str = "auto"
    device: str = "auto"
    resolution: int = 512
    resize_mode: str = "short_side"
    inversion_steps: int = 50
    inversion_prompt: str = ""
    steps: int = 50
    guidance_scale: float = 7.5
    negative_prompt: str = "ugly, blurry, black, low res, unrealistic"
    negative_prompt_mode: str = "fixed"
    negative_prompt_alpha: float = 1.0
    negative_prompt_schedule: str = "linear"
    pnp_f_t: float = 0.8
    pnp_attn_t: float = 0.5
    pnp_feature_blocks: tuple[str, ...] | None = None
    pnp_attn_layers: tuple[str, ...] | None = None
    seed: int = 1
    output_format: str = "png"
    quantize: str = "round"
    batch_size: int | str = "auto"
    inversion_batch: int = 1
    inversion_streams: int = 1
    sources_per_batch: int | str = 1  # sources packed into one UNet call per step (translate/packs.py)
    max_pixels: int = 64_000_000
    compile: bool = False
    channels_last: bool = False
    cuda_graphs: bool | str = "auto"
    cudnn_benchmark: bool = False
    model_config: str = "auto"
    lora: tuple[str, ...] = ()
    # IP-Adapter (ip_keys.py, docs/ip_adapter.md): "" = none
    ip_adapter: str = ""
    ip_adapter_weight_name: str = ""
    ip_adapter_subfolder: str = ""
    ip_adapter_image_encoder: str = "image_encoder"
    ip_adapter_scale: Any = 1.0
    # Region edits (mask_keys.py, docs/masks.md): "none" = the whole frame, as before
    mask_mode: str = "none"
    mask_threshold: float = 0.5
    mask_strength: float = 0.5
    mask_samples: int = 10
    mask_blend_until: float = 1.0
    mask_dilate: int = 0
    mask_feather: int = 0
    mask_paste: bool = False
    # Metric models of `pnp-batch eval` and `run --eval` (hub id, local folder, or tiny-clip/tiny-dino);
    # they score images, they do not change them, so they stay out of the config hash.
    eval_clip_model: str = "openai/clip-vit-large-patch14"
    eval_clip_revision: str = ""
    eval_dino_model: str = "facebook/dino-vitb8"
    eval_dino_revision: str = ""
    # The input policy (io/policy.py): URI prefixes a row may read besides the defaults, and http(s) to
    # private addresses. They decide what may be read, not what an image looks like: not in the hash.
    allow_uri: tuple[str, ...] = ()
    allow_private_network: bool = False
    name: str = "custom"

    def __post_init__(self) -> None:
        for key in LAYER_KEYS:  # lists, aliases and presets become the canonical tuple of module paths
            value = getattr(self, key)
            if value is not None:
                object.__setattr__(self, key, parse_layers(key, value))
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """A short stable hash of every setting that changes the output image."""
        d = self.to_dict()
        for k in ("name", "device", "batch_size", "inversion_batch", "inversion_streams", "compile", "channels_last",
                  "cuda_graphs", "cudnn_benchmark", "max_pixels", *EVAL_KEYS, *POLICY_KEYS):
            d.pop(k, None)
        # Keys added later count only when set, so configs that do not use them keep their hash.
        if d.get("sources_per_batch") == 1:  # packs change the last bits; 1 keeps the hash of before
            d.pop("sources_per_batch")
        if d.get("model_config") == "auto":
            d.pop("model_config")
        if d.get("lora"):
            d["lora"] = [lora_identity(spec) for spec in d["lora"]]
        else:
            d.pop("lora", None)
        for k in LAYER_KEYS:  # part of the hash only when set: outputs made before these keys keep theirs
            if d.get(k) is None:
                d.pop(k, None)
        ip = ip_hash_part(d)  # likewise the IP-Adapter keys: only with an adapter
        for k in IP_KEYS:
            d.pop(k, None)
        d.update(ip)
        masks = mask_hash_part(d)  # likewise the mask keys: only with a mask_mode
        for k in MASK_KEYS:
            d.pop(k, None)
        d.update(masks)
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def window(self) -> int:
        """Sources a worker inverts at once: `inversion_batch` per UNet call, `inversion_streams`
        calls side by side. The engines hand a worker windows of this many groups."""
        return self.inversion_batch * self.inversion_streams

    def replace(self, **changes: Any) -> PipelineConfig:
        return dataclasses.replace(self, **changes)


def _steps_error(cfg: PipelineConfig) -> str | None:
    gen = generation_timesteps(cfg.steps)
    inv = set(inversion_timesteps(cfg.inversion_steps))
    missing = [t for t in gen if t not in inv]
    if missing:
        return (
            f"inversion_steps={cfg.inversion_steps} gives timesteps {_describe(sorted(inv))}, "
            f"which do not contain the generation timesteps of steps={cfg.steps} "
            f"({_describe(sorted(gen))}; missing {_describe(missing)}). Use inversion_steps={cfg.steps}, "
            f"999, or another count whose timesteps contain them."
        )
    return None


def _describe(ts: list[int]) -> str:
    if len(ts) <= 6:
        return "[" + ", ".join(map(str, ts)) + "]"
    return f"[{ts[0]}, {ts[1]}, {ts[2]}, ..., {ts[-1]}] ({len(ts)} steps)"


def leading_timesteps(n: int, train_steps: int = 1000, offset: int = 1) -> list[int]:
    """DDIM 'leading' spacing with SD's steps_offset=1, as diffusers' DDIMScheduler; descending."""
    ratio = train_steps // n
    return sorted(((i * ratio) + offset for i in range(n)), reverse=True)


def generation_timesteps(steps: int) -> list[int]:
    return leading_timesteps(steps)


def inversion_timesteps(steps: int) -> list[int]:
    return leading_timesteps(steps)


def parse_lora(spec: str) -> tuple[str, float]:
    """`PATH_OR_ID[:SCALE]` -> (path or hub id, scale); the scale defaults to 1.0."""
    source, sep, tail = spec.rpartition(":")
    if sep and source:
        try:
            return source, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def lora_identity(spec: str) -> str:
    """What a LoRA entry contributes to the config hash: the file's content hash (a local file) or
    its hub id, and the scale; so two copies of one adapter give one hash and an edited file another."""
    from pnp_batch.filehash import file_sha256

    source, scale = parse_lora(spec)
    ident = f"sha256:{file_sha256(source)}" if os.path.isfile(source) else source
    return f"{ident}@{scale!r}"


def validate(cfg: PipelineConfig) -> None:
    """Raise ConfigError naming the key and the allowed values."""

    def choice(key: str, allowed: tuple[str, ...]) -> None:
        v = getattr(cfg, key)
        if v not in allowed:
            raise ConfigError(f"{key}={v!r} is not one of {', '.join(allowed)}")

    choice("dtype", DTYPES)
    choice("resize_mode", RESIZE_MODES)
    choice("negative_prompt_mode", NEGATIVE_MODES)
    choice("negative_prompt_schedule", NEGATIVE_SCHEDULES)
    choice("output_format", OUTPUT_FORMATS)
    choice("quantize", QUANTIZE)
    if not cfg.model:
        raise ConfigError("model must name a hub id, a local diffusers folder, a checkpoint file or 'tiny'")
    for key in ("steps", "inversion_steps"):
        v = getattr(cfg, key)
        if not isinstance(v, int) or not 1 <= v <= 1000:
            raise ConfigError(f"{key}={v!r} must be a whole number from 1 to 1000")
    if not isinstance(cfg.resolution, int) or not 64 <= cfg.resolution <= 4096 or cfg.resolution % 8:
        raise ConfigError(f"resolution={cfg.resolution!r} must be a multiple of 8 from 64 to 4096")
    for key in ("pnp_f_t", "pnp_attn_t", "negative_prompt_alpha"):
        v = getattr(cfg, key)
        if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise ConfigError(f"{key}={v!r} must be a number from 0 to 1")
    if not isinstance(cfg.guidance_scale, (int, float)) or cfg.guidance_scale < 0:
        raise ConfigError(f"guidance_scale={cfg.guidance_scale!r} must be a number >= 0")
    if cfg.batch_size != "auto" and (not isinstance(cfg.batch_size, int) or cfg.batch_size < 3):
        raise ConfigError(f"batch_size={cfg.batch_size!r} must be 'auto' or a whole number >= 3 (UNet batch elements)")
    if not isinstance(cfg.inversion_batch, int) or not 1 <= cfg.inversion_batch <= 64:
        raise ConfigError(f"inversion_batch={cfg.inversion_batch!r} must be a whole number from 1 to 64")
    if not isinstance(cfg.inversion_streams, int) or not 1 <= cfg.inversion_streams <= 16:
        raise ConfigError(f"inversion_streams={cfg.inversion_streams!r} must be a whole number from 1 to 16")
    n = cfg.sources_per_batch  # packs of sources (docs/packs.md)
    if n != "auto" and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 64):
        raise ConfigError(f"sources_per_batch={n!r} must be 'auto' or a whole number from 1 to 64")
    if cfg.cuda_graphs not in (True, False, "auto"):
        raise ConfigError(f"cuda_graphs={cfg.cuda_graphs!r} must be true, false or 'auto' (on for CUDA devices)")
    if cfg.compile and cfg.cuda_graphs is True:
        raise ConfigError("compile and cuda_graphs are alternatives: set one of them")
    if not isinstance(cfg.max_pixels, int) or cfg.max_pixels < 1:
        raise ConfigError(f"max_pixels={cfg.max_pixels!r} must be a positive whole number")
    for key in ("eval_clip_model", "eval_dino_model"):
        if not isinstance(getattr(cfg, key), str) or not getattr(cfg, key):
            raise ConfigError(f"{key} must name a hub id, a local folder, or tiny-clip / tiny-dino")
    if not isinstance(cfg.seed, int):
        raise ConfigError(f"seed={cfg.seed!r} must be a whole number")
    if not isinstance(cfg.model_config, str) or not cfg.model_config:
        raise ConfigError("model_config must be 'auto', a family name (sd15, sd21, sd21-base, sdxl) or a local "
                          "diffusers folder")
    if not isinstance(cfg.allow_uri, tuple) or not all(isinstance(s, str) and s for s in cfg.allow_uri):
        raise ConfigError(f"allow_uri={cfg.allow_uri!r} must be a list of URI prefixes")
    if not isinstance(cfg.allow_private_network, bool):
        raise ConfigError(f"allow_private_network={cfg.allow_private_network!r} must be true or false")
    if not isinstance(cfg.lora, tuple) or not all(isinstance(s, str) and s for s in cfg.lora):
        raise ConfigError(f"lora={cfg.lora!r} must be a list of PATH_OR_ID[:SCALE] entries")
    for spec in cfg.lora:
        source, scale = parse_lora(spec)
        if not source or not -10.0 <= scale <= 10.0:
            raise ConfigError(f"lora entry {spec!r} must be PATH_OR_ID[:SCALE] with a scale from -10 to 10")
    err = _steps_error(cfg) or check_ip_keys(cfg.to_dict()) or check_mask_keys(cfg.to_dict())
    if err:
        raise ConfigError(err)


_FIELDS = {f.name: f for f in fields(PipelineConfig)}


# A layer item of each key, as a module path of diffusers' UNet: a decoder resnet for features; an
# attention module (all the self-attention layers of its transformer blocks) or one attn1 for attention.
_LAYER_PATH = {
    "pnp_feature_blocks": re.compile(r"up_blocks\.(\d+)\.resnets\.(\d+)"),
    "pnp_attn_layers": re.compile(r"up_blocks\.(\d+)\.attentions\.(\d+)(?:\.transformer_blocks\.(\d+)\.attn1)?"),
}


def layer_path(key: str, n: int) -> str:
    """The module path of decoder layer `n` (the paper's numbering: up_blocks[n // 3], layer n % 3 of
    it; SD has 12, 0-11, SDXL 9, 0-8). For attention, the attention module of that layer: every
    self-attention layer of its transformer blocks (one in SD, two or ten in SDXL)."""
    block, layer = divmod(n, 3)
    return f"up_blocks.{block}.resnets.{layer}" if key == "pnp_feature_blocks" else f"up_blocks.{block}.attentions.{layer}"


def _layer_numbers(item: str, key: str) -> list[int] | None:
    """'7' -> [7]; '4-11' -> [4, ..., 11]; anything else None (a module path)."""
    a, sep, b = item.partition("-")
    if a.isdigit() and (not sep or b.isdigit()):
        lo, hi = int(a), int(b) if sep else int(a)
        if lo > hi:
            raise ConfigError(f"{key}: range {item!r} runs backwards")
        if hi >= DECODER_LAYERS:
            raise ConfigError(f"{key}: decoder layer {hi} does not exist; decoder layers are numbered "
                              f"0-{DECODER_LAYERS - 1} (SDXL: 0-8)")
        return list(range(lo, hi + 1))
    return None


def _layer_order(path: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", path))


def parse_layers(key: str, value: Any) -> tuple[str, ...] | None:
    """A layer setting as its canonical tuple of module paths (decoder order, no repeats), or None for
    the architecture's own table (PNP_SPEC.md §4). Accepted: `default`; `none` (no injection of this
    kind); a list, or a string of `;`-separated items, each a module path (`up_blocks.1.resnets.1`,
    `up_blocks.2.attentions.0` or one `...transformer_blocks.N.attn1`), a decoder layer number (`4`)
    or an inclusive range of them (`4-11`). Only the form is checked here: whether the UNet has those
    layers is checked against the loaded model (pnp/layers.injection_points: exit 2, naming the valid
    ones), since the layers differ between architectures."""
    if key not in LAYER_KEYS:
        raise ConfigError(f"{key!r} is not an injection-layer key ({', '.join(LAYER_KEYS)})")
    if value is None or (isinstance(value, str) and value.strip().lower() == "default"):
        return None
    if isinstance(value, str):
        items: list[Any] = [v.strip() for v in value.split(";")]
        if value.strip().lower() == "none":
            items = []
    elif isinstance(value, (list, tuple)):
        items = list(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        items = [value]
    else:
        raise ConfigError(f"{key}={value!r} must be a list of layers, a ';'-separated string, 'default' or 'none'")
    chosen: set[str] = set()
    for item in items:
        text = str(item).strip()
        if not text:
            raise ConfigError(f"{key}={value!r} has an empty item")
        numbers = _layer_numbers(text, key)
        if numbers is not None:
            chosen.update(layer_path(key, n) for n in numbers)
        elif _LAYER_PATH[key].fullmatch(text):
            chosen.add(text)
        else:
            form = ("a decoder resnet such as up_blocks.1.resnets.1" if key == "pnp_feature_blocks" else
                    "an attention module such as up_blocks.2.attentions.0, or one of its self-attention "
                    "layers such as up_blocks.2.attentions.0.transformer_blocks.0.attn1")
            raise ConfigError(
                f"{key}: unknown layer {text!r}; valid: decoder layer numbers 0-{DECODER_LAYERS - 1} (ranges "
                f"like 4-11; SDXL 0-8), 'default', 'none', or module paths: {form}"
            )
    return tuple(sorted(chosen, key=_layer_order))


def _coerce(key: str, value: Any) -> Any:
    """Turn a YAML/--set value into the field's type; strings from --set are parsed as YAML."""
    if key not in _FIELDS:
        raise ConfigError(f"unknown pipeline key {key!r}; known keys: {', '.join(sorted(_FIELDS))}")
    if key in LAYER_KEYS:
        if isinstance(value, str) and value.strip().startswith("["):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as e:
                raise ConfigError(f"{key}={value!r} is not a valid list: {e}") from e
        return parse_layers(key, value)
    if isinstance(value, str) and key not in _LITERAL_KEYS:
        try:
            value = yaml.safe_load(value) if value != "" else value
        except yaml.YAMLError:
            pass
    typ = _FIELDS[key].type
    if key == "lora":
        return _coerce_lora(value)
    if key == "allow_uri":
        return _coerce_list(key, value, "URI prefixes, e.g. [s3://bucket/, /data/images/]")
    if key in MASK_KEYS:
        try:
            return parse_mask_value(key, value)
        except MaskKeyError as e:
            raise ConfigError(str(e)) from None
    if key == IP_SCALE:
        try:
            return parse_ip_scale(value)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if value is None and key in IP_LITERAL_KEYS:
        value = ""
    if value is None and key in ("inversion_prompt", "negative_prompt", "eval_clip_revision", "eval_dino_revision"):
        value = ""
    try:
        if typ == "int" and isinstance(value, float) and value.is_integer():
            value = int(value)
        if typ == "float" and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if typ == "bool" and isinstance(value, str):
            value = {"true": True, "false": False}[value.lower()]
    except KeyError as e:
        raise ConfigError(f"{key}={value!r} must be true or false") from e
    if typ == "str" and not isinstance(value, str):
        value = str(value)
    if typ in ("int", "float") and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"{key}={value!r} must be a number")
    return value


def _coerce_list(key: str, value: Any, what: str) -> tuple[str, ...]:
    """A list key: a YAML list, one string, or nothing."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise ConfigError(f"{key}={value!r} must be a list of {what}")


def _coerce_lora(value: Any) -> tuple[str, ...]:
    """`lora`: a YAML list (`[a.safetensors:0.8, b.safetensors]`), one entry, or nothing."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"lora={value!r} must be a list of PATH_OR_ID[:SCALE] entries, e.g. [style.safetensors:0.8]")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_config(pipeline: str = "sd21-base", overrides: list[str] | dict[str, Any] | None = None) -> PipelineConfig:
    """Load a preset by name or a YAML file, apply KEY=VALUE overrides, validate."""
    path = Path(pipeline)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"pipeline file {pipeline!r} does not exist")
        name = path.stem
    else:
        path = PRESET_DIR / f"{pipeline}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown pipeline {pipeline!r}; presets: {', '.join(preset_names())}, or a YAML file")
        name = pipeline
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"pipeline {pipeline!r} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"pipeline {pipeline!r} must be a mapping of keys to values")
    values: dict[str, Any] = {"name": name}
    for k, v in raw.items():
        values[k] = _coerce(k, v)
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = []
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"--set {item!r} must be KEY=VALUE")
            k, v = item.split("=", 1)
            items.append((k.strip(), v))
    for k, v in items:
        values[k] = _coerce(k, v)
    try:
        return PipelineConfig(**values)
    except TypeError as e:
        raise ConfigError(str(e)) from e


def with_overrides(cfg: PipelineConfig, overrides: list[str], allowed: tuple[str, ...] | None = None) -> PipelineConfig:
    """`cfg` with KEY=VALUE overrides applied (as `--set` does); `allowed` limits the keys a command takes."""
    changes: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} must be KEY=VALUE")
        k, v = (x.strip() for x in item.split("=", 1))
        if allowed is not None and k in _FIELDS and k not in allowed:
            raise ConfigError(f"--set {k}: this command takes only {', '.join(allowed)}")
        changes[k] = _coerce(k, v)
    try:
        return cfg.replace(**changes)
    except TypeError as e:
        raise ConfigError(str(e)) from e


def config_from_dict(values: dict[str, Any]) -> PipelineConfig:
    """A config from a run summary's resolved `config` (keys this version does not know are dropped)."""
    return PipelineConfig(**{k: _coerce(k, v) for k, v in values.items() if k in _FIELDS})
