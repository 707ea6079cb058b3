"""Which UNet architecture a model has, recognised from the UNet itself (its config and decoder).

Shared by loading (models/load.py rejects what PnP cannot run, before any work) and injection
(pnp/layers.py picks the architecture's table of injection points); both may import this root module,
neither may import the other. A new backbone adds its name here and its table in pnp/layers.py.
"""

from __future__ import annotations

SD = "sd"  # Stable Diffusion 1.x / 2.x: 4 decoder blocks, text hidden states only
SDXL = "sdxl"  # SDXL base: 3 decoder blocks, `text_time` added conditioning (pooled text + 6 size ids)
ARCHITECTURES = (SD, SDXL)


class UnsupportedArchitecture(ValueError):
    """The UNet is not one PnP has injection points for; the message says what it is and why not."""


def recognise(unet) -> str:
    """SD or SDXL, from the UNet's input channels, added conditioning and decoder layout."""
    cfg = unet.config
    ups = getattr(unet, "up_blocks", None)
    n_up = len(ups) if ups is not None else 0
    in_channels = int(getattr(cfg, "in_channels", 4))
    if in_channels != 4:
        kind = "an inpainting UNet (latents + mask + masked image)" if in_channels == 9 else "not a text-to-image UNet"
        raise UnsupportedArchitecture(
            f"its UNet takes {in_channels} input channels: {kind}; PnP inverts and samples plain 4-channel "
            "latents, so it needs the text-to-image model (e.g. the base model, not its inpainting variant)"
        )
    added = getattr(cfg, "addition_embed_type", None)
    if added == "text_time":
        if n_up == 3 and len(ups[0].attentions) > 1:
            return SDXL
        raise UnsupportedArchitecture(
            f"its UNet has SDXL's size conditioning (text_time) but {n_up} decoder blocks, not SDXL base's 3: "
            "an SDXL refiner (an img2img model for the last denoising steps, conditioned on an aesthetic "
            "score) or another variant; use the SDXL base model"
        )
    if added is not None:
        raise UnsupportedArchitecture(f"its UNet uses added conditioning {added!r}, which PnP does not know")
    if n_up == 4 and len(ups[1].resnets) > 1:
        return SD
    raise UnsupportedArchitecture(
        f"its UNet has {n_up} decoder blocks; PnP knows Stable Diffusion 1.x/2.x's (4) and SDXL base's (3 with "
        "text_time conditioning)"
    )
