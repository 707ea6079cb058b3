#!/usr/bin/env bash
# Fill .devcarry/wheels (git-ignored) with the Python 3.12 wheels a lent GPU machine lacks: it has torch
# (CUDA) but none of the other packages the compute path needs, and no network. ~57 MB, under the
# 64 MiB a device call can carry; pyarrow is left out (the bench and GPU tests do not import it).
# Then: device run with carry [".devcarry"] and the command `OUT=$OUT bash tools/gpu_check.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .devcarry/wheels
python -m pip download -q -d .devcarry/wheels --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --no-deps \
  "diffusers==$(python -c 'import diffusers; print(diffusers.__version__)')" \
  "transformers==$(python -c 'import transformers; print(transformers.__version__)')" \
  "huggingface_hub==$(python -c 'import huggingface_hub; print(huggingface_hub.__version__)')" \
  tokenizers safetensors numpy pillow pyyaml fsspec tqdm regex filelock requests packaging typing_extensions \
  importlib_metadata zipp idna urllib3 charset-normalizer certifi httpx2 httpcore2 h11 anyio sniffio hf-xet \
  truststore click typer shellingham rich markdown-it-py mdurl pygments annotated-doc pytest pluggy iniconfig psutil
du -sh .devcarry/wheels
