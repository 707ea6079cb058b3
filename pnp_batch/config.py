"""PipelineConfig: presets (YAML) plus --set overrides, validated once at the edge."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from pnp_batch.errors import UsageError

PRESET_DIR = Path(__file__).parent / "pipelines"

DTYPES = ("auto", "float32", "float16", "bfloat16")
RESIZE_MODES = ("short_side", "center_crop")
NEGATIVE_MODES = ("fixed", "source", "blend")
NEGATIVE_SCHEDULES = ("linear", "constant", "exp")
OUTPUT_FORMATS = ("png", "jpg", "webp")
QUANTIZE = ("round", "floor")

# Keys that change the stored inversion (the feature key hashes exactly these).
INVERSION_KEYS = ("resolution", "resize_mode", "inversion_steps", "inversion_prompt", "steps")
# Keys a manifest row may override for that row alone.
ROW_OVERRIDES = ("negative_prompt", "seed", "guidance_scale", "pnp_f_t", "pnp_attn_t")
# Injection layers (PNP_SPEC.md §4): None = the architecture's table; a tuple of module paths otherwise.
LAYER_KEYS = ("pnp_feature_blocks", "pnp_attn_layers")
# Keys a sweep may set per row although rows differing in them cannot share a UNet batch: such rows
# form separate groups of the same source (one inversion still: the feature store shares it).
GROUP_KEYS = ("negative_prompt_mode", *LAYER_KEYS)
# SD 1.x/2.x decoder layer n (the paper's numbering, 0-11) is up_blocks[n // 3], layer n % 3 of it.
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
    max_pixels: int = 64_000_000
    compile: bool = False
    channels_last: bool = False
    cuda_graphs: bool | str = "auto"
    cudnn_benchmark: bool = False
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
                  "cuda_graphs", "cudnn_benchmark", "max_pixels"):
            d.pop(k, None)
        for k in LAYER_KEYS:  # part of the hash only when set: outputs made before these keys keep theirs
            if d.get(k) is None:
                d.pop(k, None)
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
    if cfg.cuda_graphs not in (True, False, "auto"):
        raise ConfigError(f"cuda_graphs={cfg.cuda_graphs!r} must be true, false or 'auto' (on for CUDA devices)")
    if cfg.compile and cfg.cuda_graphs is True:
        raise ConfigError("compile and cuda_graphs are alternatives: set one of them")
    if not isinstance(cfg.max_pixels, int) or cfg.max_pixels < 1:
        raise ConfigError(f"max_pixels={cfg.max_pixels!r} must be a positive whole number")
    if not isinstance(cfg.seed, int):
        raise ConfigError(f"seed={cfg.seed!r} must be a whole number")
    err = _steps_error(cfg)
    if err:
        raise ConfigError(err)


_FIELDS = {f.name: f for f in fields(PipelineConfig)}


def layer_names(key: str) -> list[str]:
    """The valid injection layers of SD 1.x/2.x for `key`, in decoder order (index = the paper's decoder
    layer number for attention; feature blocks: every decoder resnet, numbered alike)."""
    if key == "pnp_feature_blocks":
        return [f"up_blocks.{n // 3}.resnets.{n % 3}" for n in range(DECODER_LAYERS)]
    if key == "pnp_attn_layers":  # up_blocks.0 has no attention: decoder layers 3-11
        return [f"up_blocks.{n // 3}.attentions.{n % 3}.transformer_blocks.0.attn1" for n in range(3, DECODER_LAYERS)]
    raise ConfigError(f"{key!r} is not an injection-layer key ({', '.join(LAYER_KEYS)})")


def _layer_numbers(item: str, key: str) -> list[int] | None:
    """'7' -> [7]; '4-11' -> [4, ..., 11]; anything else None (a module path)."""
    a, sep, b = item.partition("-")
    if a.isdigit() and (not sep or b.isdigit()):
        lo, hi = int(a), int(b) if sep else int(a)
        if lo > hi:
            raise ConfigError(f"{key}: range {item!r} runs backwards")
        return list(range(lo, hi + 1))
    return None


def parse_layers(key: str, value: Any) -> tuple[str, ...] | None:
    """A layer setting as the canonical tuple of module paths (decoder order, no repeats), or None for
    the architecture's own table (PNP_SPEC.md §4). Accepted: `default`; `none` (no injection of this
    kind); a list, or a string of `;`-separated items, each a module path (`up_blocks.1.resnets.1`),
    a decoder layer number (`4`) or an inclusive range of them (`4-11`)."""
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
    valid = layer_names(key)
    offset = 3 if key == "pnp_attn_layers" else 0
    chosen: set[str] = set()
    for item in items:
        text = str(item).strip()
        if not text:
            raise ConfigError(f"{key}={value!r} has an empty item")
        numbers = _layer_numbers(text, key)
        names = [valid[n - offset] if 0 <= n - offset < len(valid) else f"#{n}" for n in numbers] \
            if numbers is not None else [text]
        unknown = [n for n in names if n not in valid]
        if unknown:
            nums = f"{offset}-{DECODER_LAYERS - 1}"
            raise ConfigError(
                f"{key}: unknown layer {text!r}; valid: decoder layer numbers {nums} (ranges like 4-11), "
                f"'default', 'none', or the module paths {', '.join(valid)}"
            )
        chosen.update(names)
    return tuple(n for n in valid if n in chosen)


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
    if isinstance(value, str) and key not in ("model", "revision", "inversion_prompt", "negative_prompt", "name"):
        try:
            value = yaml.safe_load(value) if value != "" else value
        except yaml.YAMLError:
            pass
    typ = _FIELDS[key].type
    if value is None and key in ("inversion_prompt", "negative_prompt"):
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
