"""On the GPU: each silent fallback the library used to take is warned (``backend="auto"``) or raised (strict),
and a group spanning emulated nodes, built through ``Buffer.sized_for`` or the Megatron adapter, runs the
internode kernels (a test sees them called)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_utils import run_distributed  # noqa: E402
from gpu_env import SPAWN, missing_kernels  # noqa: E402

pytestmark = pytest.mark.gpu

if missing_kernels("_intranode_C") or missing_kernels("_nvshmem_C"):
    pytest.skip(missing_kernels("_intranode_C") or missing_kernels("_nvshmem_C"), allow_module_level=True)

import selection_workers as w  # noqa: E402


@pytest.mark.parametrize("how", ["auto", "strict", "cuda"])
def test_fp32_combine_is_warned_or_raised(how: str) -> None:
    run_distributed(w.fallback_worker, 2, how=how, **SPAWN)


def test_multinode_buffer_without_rdma_warns_and_sized_for_runs_internode() -> None:
    run_distributed(w.multinode_worker, 4, per_node=2, **SPAWN)


@pytest.mark.parametrize("mode", ["compat", "dispatcher"])
def test_megatron_adapter_two_nodes_runs_internode_kernels(mode: str) -> None:
    pytest.importorskip("megatron.core", reason="needs megatron-core")
    run_distributed(w.megatron_two_node_worker, 4, mode=mode, seed=31, **SPAWN)


@pytest.mark.parametrize("mps_percentage", ["", "10"], ids=["gpu-sm-count", "mps-percentage"])
def test_more_sms_than_can_be_resident_is_refused(mps_percentage: str) -> None:
    run_distributed(w.residency_worker, 2, mps_percentage=mps_percentage, **SPAWN)
