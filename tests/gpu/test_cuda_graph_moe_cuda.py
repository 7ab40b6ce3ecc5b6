"""A sync-free MoE layer in a CUDA graph, on the intranode kernels: its forward and backward read nothing from the
GPU, and the captured step replayed on new inputs (new routing) gives what the eager step gives, output, input
gradient and parameter gradients, bit for bit under deterministic algorithms, within BF16 atomics' reordering
otherwise (reasons and bounds: ``cuda_graph_moe_workers``).

Two layers: the plain recipe's MoE layer with ``sync_free`` (``examples/deepseek_v3``), and a megatron-core
``MoELayer`` on the plugin's dispatcher with ``--deepep-plugin-sync-free`` (skipped without megatron-core). 2
processes over one gloo group; they may share one GPU. ``python -m deepep_plugin.bench graph-moe`` times the same
step, replayed against eager.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_utils import run_distributed  # noqa: E402
from gpu_env import SPAWN, missing_kernels  # noqa: E402

pytestmark = pytest.mark.gpu

if missing_kernels("_intranode_C"):
    pytest.skip(missing_kernels("_intranode_C"), allow_module_level=True)

import cuda_graph_moe_workers as w  # noqa: E402

MODES = ["deterministic", "default"]


@pytest.mark.parametrize("mode", MODES)
def test_plain_recipe_moe_layer_replayed_from_a_cuda_graph_equals_eager(mode: str) -> None:
    run_distributed(w.plain_worker, 2, seed=61, deterministic=mode == "deterministic", **SPAWN)


@pytest.mark.parametrize("mode", MODES)
def test_megatron_moe_layer_replayed_from_a_cuda_graph_equals_eager(mode: str) -> None:
    pytest.importorskip("megatron.core", reason="needs megatron-core (its wheel on the GPU machine)")
    run_distributed(w.megatron_worker, 2, seed=62, deterministic=mode == "deterministic", **SPAWN)
