"""`pnp-batch features`: what the decoder holds at the layers PnP injects, as joint-PCA images
(docs/features.md). capture.py records features, pca.py reduces them, figures.py draws, run.py drives."""
