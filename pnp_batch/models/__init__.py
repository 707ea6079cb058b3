"""Diffusion models: loading (hub id, local folder, single checkpoint file) and the random-weight
builders, one per architecture (the offline `tiny` and `tiny-sdxl` test models; full-size ones for the
benchmark). SDXL's own part of loading is models/sdxl.py."""
