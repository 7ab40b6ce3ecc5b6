"""deepep_plugin's CUDA backend inside real Megatron-Core MoE layers, against Megatron's own alltoall dispatcher.

2 processes over one gloo group (they may share one GPU), EP=2, 8 experts (4 per rank), unequal token counts per
rank. Each rank builds Megatron's ``alltoall`` layer and a ``flex`` layer with the same weights that the plugin
serves on ``Buffer(backend="cuda")`` (in ``compat`` or ``dispatcher`` mode), runs one forward/backward on the GPU
and compares the output, the input gradient and every parameter gradient. The workers also check which runtime
moved the tokens: every dispatch on the intranode kernels (and, in BF16, every combine; the kernels combine BF16
only, FP32 combines take the reference path with a warning, under ``backend="auto"``). Tolerances and their reasons:
``megatron_cuda_workers`` (FP32: 1e-6 absolute + 1e-5 relative, TF32 off; BF16: 2**-5 of the largest value).

The same workers run on a CPU-only machine with ``device="cpu", backend="reference"`` (see the module docstring
of ``megatron_cuda_workers``); the CPU tests in ``tests/test_megatron_integration.py`` cover that side.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_utils import run_distributed  # noqa: E402
from gpu_env import SPAWN, missing_kernels  # noqa: E402

pytestmark = pytest.mark.gpu

pytest.importorskip("megatron.core", reason="needs megatron-core (tools/ci_install_megatron.sh)")


if missing_kernels("_intranode_C"):
    pytest.skip(missing_kernels("_intranode_C"), allow_module_level=True)

import megatron_cuda_workers as w  # noqa: E402

MODES = ["compat", "dispatcher"]


@pytest.mark.parametrize("style", sorted(w.TOPK))
@pytest.mark.parametrize("mode", MODES)
def test_fp32_layer_on_cuda_backend_matches_megatron_alltoall(mode: str, style: str) -> None:
    # backend "auto": the FP32 combines run on the reference path with a warning ("cuda" is strict and would raise)
    run_distributed(w.parity_worker, w.WORLD, case=w.Case(mode=mode, style=style), seed=21, device="cuda",
                    plugin_backend="auto", **SPAWN)


@pytest.mark.parametrize("mode", MODES)
def test_bf16_layer_combines_on_the_kernel_and_matches_megatron_alltoall(mode: str) -> None:
    run_distributed(w.parity_worker, w.WORLD, case=w.Case(mode=mode, dtype="bfloat16"), seed=22, device="cuda",
                    plugin_backend="cuda", **SPAWN)


@pytest.mark.parametrize("mode", MODES)
def test_rank_whose_experts_receive_no_tokens_on_cuda_backend(mode: str) -> None:
    """Rank 1 receives no row, yet combines its own tokens' rows (and, backwards, their weights) from rank 0:
    BF16, so the combine kernel runs with an empty receiver."""
    case = w.Case(mode=mode, style="deepseek_v3", dtype="bfloat16", idle_rank=True)
    run_distributed(w.parity_worker, w.WORLD, case=case, seed=23, device="cuda", plugin_backend="cuda", **SPAWN)


def test_fp8_dispatch_on_cuda_backend_quantises_once_and_matches_megatron_alltoall() -> None:
    run_distributed(w.fp8_worker, w.WORLD, seed=24, device="cuda", plugin_backend="auto", **SPAWN)  # FP32 combine
