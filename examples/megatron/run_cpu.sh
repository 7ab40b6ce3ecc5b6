#!/usr/bin/env bash
# A DeepSeek-V3-style MoE GPT (sigmoid router, expert bias, 8 expert groups of which 4 are kept, scaling 2.5,
# top-4 of 8 experts, EP=2) trained for a few steps on 2 CPU processes, MoE token dispatch on deepep_plugin.
# Extra arguments are passed through (e.g. --deepep-plugin-mode compat, --train-iters 50).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # runs from a clone, installed or not
exec torchrun --standalone --nproc-per-node 2 examples/megatron/pretrain_moe.py \
    --num-layers 2 --hidden-size 128 --ffn-hidden-size 256 --num-attention-heads 4 \
    --seq-length 32 --vocab-size 64 --micro-batch-size 4 \
    --num-experts 8 --moe-ffn-hidden-size 64 --moe-router-topk 4 \
    --moe-router-score-function sigmoid --moe-router-enable-expert-bias --moe-router-bias-update-rate 1e-3 \
    --moe-router-num-groups 8 --moe-router-group-topk 4 --moe-router-topk-scaling-factor 2.5 \
    --moe-router-load-balancing-type seq_aux_loss --moe-aux-loss-coeff 1e-4 --moe-router-dtype fp32 \
    --expert-model-parallel-size 2 \
    --moe-token-dispatcher-type flex --moe-flex-dispatcher-backend deepep \
    --deepep-plugin --deepep-plugin-mode dispatcher \
    --train-iters 20 --lr 3e-3 \
    "$@"
