"""pnp-batch: Plug-and-Play diffusion features image-to-image translation over whole datasets."""

__version__ = "0.1.0"
