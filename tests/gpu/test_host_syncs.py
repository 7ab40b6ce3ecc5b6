"""What the public ``Buffer`` reads from the GPU, on the intranode kernels: nothing, except the receive counts of a
fresh dispatch without ``num_worst_tokens`` (once). Also: a bad expert id is reported from the GPU, and calls on
different streams are ordered by the library. 2 and 4 processes (they may share one GPU)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_utils import run_distributed  # noqa: E402
from gpu_env import SPAWN, missing_kernels  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(bool(missing_kernels("_intranode_C")), reason=missing_kernels("_intranode_C") or "")]


@pytest.mark.parametrize("world_size", [2, 4], ids="{}-ranks".format)
def test_only_a_fresh_dispatch_reads_the_gpu(world_size: int) -> None:
    import sync_workers as w

    run_distributed(w.host_sync_worker, world_size, seed=3, **SPAWN)


def test_a_bad_expert_id_is_reported_from_the_gpu() -> None:
    import sync_workers as w

    run_distributed(w.bad_expert_id_worker, 2, seed=4, **SPAWN)


def test_calls_on_different_streams_are_ordered() -> None:
    import sync_workers as w

    run_distributed(w.stream_order_worker, 2, seed=5, **SPAWN)
