#!/usr/bin/env bash
# The project's checks: lint, the kernel compile check (when nvcc is present), and the test suite.
# GPU tests (marked `gpu`) skip themselves without CUDA; on a GPU machine they run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -m ruff check .
if command -v nvcc >/dev/null 2>&1 || [[ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]]; then
  bash tools/ci_compile_kernels.sh
else
  echo "run_tests: nvcc not found, kernel compile check skipped"
fi
"$PY" -m pytest -q -p no:cacheprovider tests "$@"
