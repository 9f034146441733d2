#!/usr/bin/env bash
# Download, on a machine with PyPI, the wheels that scripts/gpu_check.sh installs on a GPU machine without
# a network: the engine's pure-Python needs absent from a bare CUDA image (pydantic and its parts) and the
# peers the kernel benchmark compares against (Liger-Kernel, cut-cross-entropy) plus torchao for the FP8
# step. About 11 MB, into ./wheels (git-ignored). Defaults fit a CPython 3.12 x86_64 image with torch 2.11.
#
#   bash scripts/fetch_gpu_wheels.sh            # then carry ./wheels to the GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
py_version=${PY_VERSION:-3.12}
mkdir -p wheels
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py_version" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d wheels \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection "typing-extensions>=4.16" \
  liger-kernel==0.8.5 cut-cross-entropy==25.1.1 torchao==0.15.0
ls -1 wheels
