"""LoRA adapters (pipeline key `lora: [PATH_OR_ID[:SCALE], ...]`), applied through diffusers' LoRA loading.

Each adapter is read with diffusers' `lora_state_dict` (which also converts kohya/A1111 layouts),
checked against the loaded model before anything else happens (every layer it adapts must exist
with the shapes it assumes: a mismatch is a usage error naming the file and the layer), loaded as a
peft adapter, weighted by its scale and, by default, fused into the base weights and the adapter
layers removed: the UNet then runs at its plain speed, and PnP's processors and hooks see plain
modules. Fused and unfused outputs differ by float rounding only (docs/checkpoints.md).

Each adapter is part of the model fingerprint (and so of the feature key): its content hash
(a local file) or hub id, and its scale.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from pnp_batch.config import parse_lora
from pnp_batch.errors import UsageError
from pnp_batch.filehash import file_sha256

log = logging.getLogger(__name__)

_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


class LoraError(UsageError):
    """A LoRA adapter cannot be used with this model; the message names the file and the reason."""


@dataclass(frozen=True)
class LoraSpec:
    """One `lora` entry: where it is, its scale, and what identifies its content."""

    source: str
    scale: float
    identity: str  # sha256:<hex> of a local file, or the hub id


def resolve_loras(entries: tuple[str, ...] | list[str]) -> list[LoraSpec]:
    """Parse `PATH_OR_ID[:SCALE]` entries; a local file is identified by its content hash."""
    specs = []
    for entry in entries:
        source, scale = parse_lora(entry)
        if os.path.isfile(source):
            specs.append(LoraSpec(source, scale, f"sha256:{file_sha256(source)[:20]}"))
        elif os.path.exists(source) or source.startswith(("/", "./", "../")) or source.endswith(
                (".safetensors", ".bin", ".pt", ".ckpt")):
            raise LoraError(f"LoRA {source!r} does not exist or is not a file")
        else:
            specs.append(LoraSpec(source, scale, f"hub:{source}"))
    return specs


def lora_fingerprint(specs: list[LoraSpec]) -> str:
    """The fingerprint suffix for these adapters ('' for none)."""
    return "".join(f"+lora:{s.identity}@{s.scale!r}" for s in specs)


def _loader(text_encoders: dict[str, Any]):
    if "text_encoder_2" in text_encoders:
        from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

        return StableDiffusionXLLoraLoaderMixin
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    return StableDiffusionLoraLoaderMixin


def read_lora(spec: LoraSpec, text_encoders: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The adapter's state dict in diffusers' layout, and its network alphas (kohya files)."""
    try:
        state_dict, alphas = _loader(text_encoders).lora_state_dict(spec.source)
    except Exception as e:  # unreadable, not a LoRA, not on the hub: all unusable input
        raise LoraError(f"LoRA {spec.source!r} could not be read as a LoRA adapter: {_first_line(e)}") from e
    if not state_dict or not all("lora" in k for k in state_dict):
        raise LoraError(f"LoRA {spec.source!r} is not a LoRA adapter (no LoRA weights, or keys without 'lora')")
    return state_dict, alphas


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _peft_layout(component: str, state_dict: dict[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
    """The part of a diffusers-layout LoRA state dict for one component, in peft's key layout."""
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    part = {k.removeprefix(component + "."): v for k, v in state_dict.items() if k.startswith(component + ".")}
    if not part:
        return {}
    if component == "unet":
        return convert_unet_state_dict_to_peft(part)
    part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
    if not hasattr(model, "text_model"):
        part = {k.removeprefix("text_model."): v for k, v in part.items()}
    return part


def check_lora(spec: LoraSpec, state_dict: dict[str, torch.Tensor], unet: Any, text_encoders: dict[str, Any]) -> None:
    """Raise LoraError unless every layer the adapter changes exists in the model with matching shapes."""
    components = {"unet": unet, **text_encoders}
    known = [k for k in state_dict if k.split(".", 1)[0] in components]
    foreign = sorted({k.split(".", 1)[0] for k in state_dict} - set(components))
    if not known or foreign:
        raise LoraError(f"LoRA {spec.source!r} does not match the model: it adapts "
                        f"{', '.join(foreign) or 'nothing'}; this model has {', '.join(components)}")
    for name, model in components.items():
        part = _peft_layout(name, state_dict, model)
        modules = dict(model.named_modules())
        for key, value in part.items():
            if not key.endswith(_SUFFIXES):
                continue
            layer = key[: -len(".lora_A.weight")]
            module = modules.get(layer)
            weight = getattr(module, "weight", None)
            if weight is None:
                raise LoraError(f"LoRA {spec.source!r} does not match the model: layer {name}.{layer} is not in it "
                                "(an adapter for another architecture?)")
            side = 1 if key.endswith(".lora_A.weight") else 0
            if value.shape[side] != weight.shape[side]:
                raise LoraError(
                    f"LoRA {spec.source!r} does not match the model: {name}.{layer} has "
                    f"{'input' if side else 'output'} size {weight.shape[side]}, the adapter expects "
                    f"{value.shape[side]} (an adapter for another model family?)")


def _load_into_text_encoder(loader, state_dict, alphas, model, prefix: str, name: str) -> None:
    """diffusers' text-encoder loading; where the installed transformers refuses the installed peft
    (its `load_adapter` asks for a newer one), the same injection through peft's own functions."""
    try:
        loader.load_lora_into_text_encoder(state_dict, alphas, model, prefix=prefix, adapter_name=name)
        return
    except ValueError as e:
        if "PEFT" not in str(e):
            raise
        log.debug("transformers refused peft (%s); injecting the text-encoder adapter with peft directly", e)
    from diffusers.utils.peft_utils import _create_lora_config
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    part = _peft_layout(prefix, state_dict, model)
    if not part:
        return
    rank = {k: v.shape[1] for k, v in part.items() if k.endswith(".lora_B.weight")}
    if alphas is not None:
        alphas = {k.removeprefix(prefix + "."): v for k, v in alphas.items() if k.split(".")[0] == prefix}
    config = _create_lora_config(part, alphas, None, rank, is_unet=False)
    inject_adapter_in_model(config, model, adapter_name=name)
    set_peft_model_state_dict(model, part, adapter_name=name)
    model.to(device=model.device, dtype=model.dtype)


def apply_loras(unet: Any, text_encoders: dict[str, Any], specs: list[LoraSpec], fuse: bool = True) -> None:
    """Check every adapter against the model, then load them all, weight each by its scale and
    (fuse=True) fold them into the base weights. Raises LoraError before changing anything."""
    if not specs:
        return
    loaded = [(s, *read_lora(s, text_encoders)) for s in specs]
    for spec, state_dict, _alphas in loaded:
        check_lora(spec, state_dict, unet, text_encoders)
    loader = _loader(text_encoders)
    names = [f"pnp_lora_{i}" for i in range(len(specs))]
    te_names: dict[str, list[tuple[str, float]]] = {k: [] for k in text_encoders}
    unet_names: list[tuple[str, float]] = []
    for name, (spec, state_dict, alphas) in zip(names, loaded):
        log.info("LoRA %s (scale %g): %d tensors", spec.source, spec.scale, len(state_dict))
        if any(k.startswith("unet.") for k in state_dict):
            loader.load_lora_into_unet(state_dict, alphas, unet, adapter_name=name)
            unet_names.append((name, spec.scale))
        for prefix, model in text_encoders.items():
            if any(k.startswith(prefix + ".") for k in state_dict):
                _load_into_text_encoder(loader, state_dict, alphas, model, prefix, name)
                te_names[prefix].append((name, spec.scale))
    _activate_and_fuse(unet, text_encoders, unet_names, te_names, fuse)


def _activate_and_fuse(unet: Any, text_encoders: dict[str, Any], unet_names: list[tuple[str, float]],
                       te_names: dict[str, list[tuple[str, float]]], fuse: bool) -> None:
    from diffusers.loaders.lora_base import fuse_text_encoder_lora, set_adapters_for_text_encoder
    from diffusers.utils import recurse_remove_peft_layers

    if unet_names:
        unet.set_adapters([n for n, _ in unet_names], [s for _, s in unet_names])
        if fuse:
            unet.fuse_lora(lora_scale=1.0, adapter_names=[n for n, _ in unet_names])
            unet.unload_lora()  # the adapter layers go, the fused weights stay
    for prefix, pairs in te_names.items():
        if not pairs:
            continue
        model = text_encoders[prefix]
        set_adapters_for_text_encoder([n for n, _ in pairs], model, [s for _, s in pairs])
        if fuse:
            fuse_text_encoder_lora(model, lora_scale=1.0, adapter_names=[n for n, _ in pairs])
            recurse_remove_peft_layers(model)
