#!/usr/bin/env bash
# Train the DeepSeek-V3-style MoE model with DeepSpeed + deepep_plugin, configured by ds_config.json.
#
#   examples/deepspeed/launch.sh                     # no GPU: 2 CPU processes (gloo), 30 steps
#   examples/deepspeed/launch.sh --steps 100 --set hidden_size=256
#   NUM_GPUS=8 examples/deepspeed/launch.sh --preset small   # GPUs: the deepspeed launcher, one process per GPU
#
# Extra arguments go to examples/deepspeed/train.py (--help lists them).
set -euo pipefail
cd "$(dirname "$0")/../.."
CONFIG="${DS_CONFIG:-examples/deepspeed/ds_config.json}"
if [[ -n "${NUM_GPUS:-}" ]]; then
    exec deepspeed --num_gpus "$NUM_GPUS" --module examples.deepspeed.train --deepspeed_config "$CONFIG" "$@"
fi
exec python -m examples.deepspeed.train --deepspeed_config "$CONFIG" "$@"
