"""The public ``Buffer`` with ``backend="cuda"`` against ``backend="reference"``: streams, events, handles, the
low-latency hook. 2 processes (they may share one GPU)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_utils import run_distributed  # noqa: E402
from gpu_env import SPAWN, missing_kernels  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(bool(missing_kernels("_intranode_C")), reason=missing_kernels("_intranode_C") or "built")
@pytest.mark.parametrize("kind", ["imbalanced", "zero_tokens", "one_rank"])
def test_buffer_cuda_matches_reference(kind: str) -> None:
    import buffer_workers as w

    run_distributed(w.normal_worker, 2, kind=kind, seed=5, **SPAWN)


@pytest.mark.skipif(bool(missing_kernels("_nvshmem_C")), reason=missing_kernels("_nvshmem_C") or "built")
def test_buffer_low_latency_cuda_matches_reference() -> None:
    import buffer_workers as w

    run_distributed(w.low_latency_worker, 2, seed=9, **SPAWN)
