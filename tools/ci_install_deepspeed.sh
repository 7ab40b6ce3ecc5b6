#!/usr/bin/env bash
# Install DeepSpeed 0.19.8 for the CPU tests of deepep_plugin.integrations.deepspeed, on a machine where the CPU
# build of torch is already installed, and build the one C++ op DeepSpeed compiles on first use on CPU.
#
# * DeepSpeed ships only an sdist; pip builds a pure-Python wheel from it (DS_BUILD_OPS=0: no op is compiled at
#   install time, no nvcc is used).
# * torch is pinned to the installed version through a constraints file, so pip can never replace the CPU build
#   (DeepSpeed requires torch>=2.0.0; without torch installed, pip would pull a CUDA build of torch from PyPI).
# * deepspeed.comm JIT-builds its shared-memory op (deepspeed_shm_comm, g++ -O2 -fopenmp through ninja) the first
#   time it initialises on CPU, in every fresh torch-extensions cache. Building it here keeps that cost out of
#   the tests; it lands in ${TORCH_EXTENSIONS_DIR:-~/.cache/torch_extensions}.
# * The tests set DS_ACCELERATOR=cpu themselves (tests/deepspeed_harness.py).
#
# Measured on the project's 2-core CPU machine (shared with other jobs): pip install 10-13 s (download and wheel
# build), op build 45-75 s cold; 88 s in all at worst. A second run takes a few seconds (everything cached).
set -euo pipefail
PY="${PYTHON:-python}"
TORCH_VERSION="$("$PY" -c 'import torch; print(torch.__version__)')" || {
    echo "ci_install_deepspeed.sh: install the CPU build of torch first (pip install torch==2.13.0)" >&2
    exit 1
}
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==${TORCH_VERSION}" > "$CONSTRAINTS"
DS_BUILD_OPS=0 "$PY" -m pip install --constraint "$CONSTRAINTS" "deepspeed==0.19.8"
DS_ACCELERATOR=cpu "$PY" - <<'PY'
import torch
import deepspeed
from deepspeed.comm.torch import build_shm_op

assert deepspeed.__version__ == "0.19.8", deepspeed.__version__
assert build_shm_op() is not None, "deepspeed_shm_comm did not build (is a C++ compiler installed?)"
print(f"deepspeed {deepspeed.__version__} on torch {torch.__version__}, CPU comm op built")
PY
