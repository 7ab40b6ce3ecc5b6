"""The public ``Buffer`` with ``backend="cuda"`` against ``backend="reference"``: streams, events, handles, the
low-latency hook. 2 processes (they may share one GPU)."""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_utils import run_distributed  # noqa: E402

pytestmark = pytest.mark.gpu
SPAWN = {"backend": "gloo", "start_method": "spawn", "timeout": 300.0}


def _built(name: str) -> bool:
    try:
        importlib.import_module(f"deepep_plugin.{name}")
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(not _built("_intranode_C"), reason="needs CUDA and deepep_plugin._intranode_C")
@pytest.mark.parametrize("kind", ["imbalanced", "zero_tokens", "one_rank"])
def test_buffer_cuda_matches_reference(kind: str) -> None:
    import buffer_workers as w

    run_distributed(w.normal_worker, 2, kind, 5, **SPAWN)


@pytest.mark.skipif(not _built("_low_latency_C"), reason="needs CUDA and deepep_plugin._low_latency_C")
def test_buffer_low_latency_cuda_matches_reference() -> None:
    import buffer_workers as w

    run_distributed(w.low_latency_worker, 2, 9, **SPAWN)
