"""CUDA graphs holding a Buffer's calls, replayed several times and mixed with eager calls and other graphs.

Low-latency: a graph of dispatch + combine pairs stays correct among eager pairs; a graph whose replays make two
consecutive ops use one buffer half (an odd number of ops replayed twice in a row, or replays after a lone eager op)
is refused on the GPU without a hang, raises a clear error at the next call, and ``clean_low_latency_buffer``
recovers. Normal (intranode): a ``num_worst_tokens`` graph, a graph of cached calls of the same Buffer and eager calls
interleaved give the eager bits. 2 processes (they may share one GPU).
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_utils import run_distributed  # noqa: E402
from gpu_env import SPAWN, missing_kernels  # noqa: E402

pytestmark = pytest.mark.gpu

needs_nvshmem = pytest.mark.skipif(bool(missing_kernels("_nvshmem_C")), reason=missing_kernels("_nvshmem_C") or "built")
needs_intranode = pytest.mark.skipif(bool(missing_kernels("_intranode_C")),
                                     reason=missing_kernels("_intranode_C") or "built")


@needs_nvshmem
def test_low_latency_graph_of_pairs_mixed_with_eager_pairs() -> None:
    import graph_workers as w

    run_distributed(w.low_latency_pairs_graph_worker, 2, seed=81, **SPAWN)


@needs_nvshmem
@pytest.mark.parametrize("scenario", ["replayed_twice", "after_lone_eager_op"])
def test_low_latency_graph_reusing_a_buffer_half_is_refused(scenario: str) -> None:
    import graph_workers as w

    run_distributed(w.low_latency_odd_graph_worker, 2, seed=82, scenario=scenario, **SPAWN)


@needs_intranode
def test_worst_tokens_graph_with_another_graph_and_eager_calls() -> None:
    import graph_workers as w

    run_distributed(w.worst_tokens_graphs_worker, 2, seed=83, **SPAWN)
