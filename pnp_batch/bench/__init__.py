"""`pnp-batch bench`: what the benchmark measures, one module per family (the translation paths, the
figures and table, the data plane, the Ray engine)."""
