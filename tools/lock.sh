#!/usr/bin/env bash
# Refresh the install locks (requirements/cpu.lock, requirements/gpu.lock) from pyproject.toml.
#
#   bash tools/lock.sh            # both locks, newest versions pyproject.toml's ranges allow
#   bash tools/lock.sh --upgrade-package ray   # extra options go to `uv pip compile`
#
# Needs uv (`pip install uv`). Both locks are for CPython 3.11 on Linux x86_64, the platform CI tests.
# torch is pinned by hand here (TORCH): the CPU lock leaves torch itself out (requirements/cpu.txt
# pins the CPU build, torch==2.13.0, which this workplace serves from a local file), but keeps the
# packages the CPU build needs; the GPU lock pins PyPI's CUDA build and its nvidia-* libraries.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=2.13.0
common=(--python-version 3.11 --python-platform x86_64-manylinux_2_28 --quiet
        --custom-compile-command "bash tools/lock.sh" "$@")
# The CPU build of torch: a local wheel (--find-links) on this workplace's machines.
find_links=()
[ -d /opt/wheels ] && find_links=(--find-links /opt/wheels)
uv pip compile pyproject.toml --extra s3 --extra ray --extra test --extra dev \
   -P "torch==${TORCH}" "${find_links[@]}" --no-emit-package torch "${common[@]}" -o requirements/cpu.lock
uv pip compile pyproject.toml --extra s3 --extra ray \
   -P "torch==${TORCH}" --no-emit-package pnp-batch "${common[@]}" -o requirements/gpu.lock
echo "requirements/cpu.lock: $(grep -c '==' requirements/cpu.lock) pins; requirements/gpu.lock: $(grep -c '==' requirements/gpu.lock) pins"
