#!/usr/bin/env bash
# Install megatron-core 0.16.1 for the CPU tests of deepep_plugin.integrations.megatron, on a machine where the
# CPU build of torch is already installed. megatron-core's only requirements are torch>=2.6, numpy and
# packaging>=24.2; it is installed with --no-deps so pip can never replace the installed torch, and the two
# small requirements are installed explicitly (no-ops when present). No TransformerEngine, Apex or deep_ep is needed.
#
# Measured on the project's 2-core CPU machine (wheel cache cold): about 3 s. `import megatron.core` then takes ~6 s.
set -euo pipefail
PY="${PYTHON:-python}"
"$PY" -m pip install --no-deps "megatron-core==0.16.1"
"$PY" -m pip install --no-deps "numpy" "packaging>=24.2"
# Megatron warns at import that Transformer Engine and Apex are missing; neither is needed here.
"$PY" -W "ignore:Transformer Engine and Apex:UserWarning" - <<'PY'
import torch
import megatron.core
assert megatron.core.__version__ == "0.16.1", megatron.core.__version__
print(f"megatron-core {megatron.core.__version__} on torch {torch.__version__}")
PY
