"""Diffusion models: loading (hub id, local folder, single checkpoint file) and the random-weight
builders, one per architecture (the offline `tiny` test model; full-size ones for the benchmark)."""
