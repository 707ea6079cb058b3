"""The files pnp-batch reads at run time from its own package: presets, tokenizer and model configs.

Every such path is named here, so the wheel's contents can be checked against what the code opens
(tests/test_packaging.py builds the wheel and looks for each file); nothing is read from the source
tree or the working directory, so an installed package runs from anywhere.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
PRESET_DIR = PACKAGE / "pipelines"  # pipelines/*.yaml (the repository's pipelines/ links here)
ASSETS = PACKAGE / "assets"
TOKENIZER_ASSETS = ASSETS / "tiny_tokenizer"  # the offline test models' BPE vocabulary
CONFIG_ASSETS = ASSETS / "model_configs"  # diffusers configs for single checkpoint files, per family
CLIP_BPE = ASSETS / "clip_bpe" / "clip_merges.txt.gz"  # CLIP's merges, for single-file tokenizers
BROWSE_PAGE = ASSETS / "report" / "browse.html"  # OUT/report/index.html (report/browse.py)

# The folders whose every file must ship in the wheel.
DATA_DIRS = (PRESET_DIR, ASSETS)
