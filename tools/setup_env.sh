#!/usr/bin/env bash
# Install what deepep_plugin, its tests and its examples need, on a fresh machine. Idempotent.
#   * torch: kept if already importable (a GPU machine's CUDA build); otherwise torch==2.13.0 (on the project's CPU
#     machines that is the local CPU wheel). It is installed first so nothing below pulls another build.
#   * megatron-core and deepspeed with --no-deps (their own scripts), so they never replace torch.
#   * the package itself, editable, without build isolation so that a CUDA torch builds the kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q pytest hypothesis ruff numpy matplotlib tqdm pyyaml pybind11 setuptools wheel
"$PY" -m pip install -q --no-deps "nvidia-nvshmem-cu13==3.4.5"   # headers for the kernel compile check
[[ -f tools/ci_install_megatron.sh ]] && PYTHON="$PY" bash tools/ci_install_megatron.sh >/dev/null
[[ -f tools/ci_install_deepspeed.sh ]] && PYTHON="$PY" bash tools/ci_install_deepspeed.sh >/dev/null
"$PY" -m pip install -q --no-build-isolation --no-deps -e .
"$PY" -c "import deepep_plugin, torch; print(f'deepep_plugin {deepep_plugin.__version__} on torch {torch.__version__}')"
