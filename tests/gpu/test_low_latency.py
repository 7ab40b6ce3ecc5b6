"""Low-latency kernels (NVSHMEM) against plain-PyTorch expectations, with 2 and 4 ranks.

Ranks share the GPUs there are (NVSHMEM 3.4.5 runs several PEs on one GPU), so these tests also run on a
one-GPU machine. Each test runs one ``ll_cases.case_*`` on every worker of a pool that lives for the module.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from gpu_env import missing_kernels

from deepep_plugin.backends.cuda_low_latency import required_rdma_bytes
from deepep_plugin.buffer import Buffer


def test_required_rdma_bytes_never_exceeds_deepep_hint() -> None:
    for r, e_loc, h, n in itertools.product([1, 2, 3, 8, 16, 64, 256], [1, 2, 3, 16, 144, 256],
                                            [128, 640, 2048, 7168], [1, 3, 128, 512]):
        e = r * e_loc
        assert required_rdma_bytes(n, h, r, e) <= Buffer.get_low_latency_rdma_size_hint(n, h, r, e), (n, h, r, e)


requires_kernels = pytest.mark.skipif(bool(missing_kernels("_low_latency_C")),
                                      reason=missing_kernels("_low_latency_C") or "built")
_pools: dict = {}


def pool(world: int):
    from ll_pool import WorkerPool

    if world not in _pools:
        _pools[world] = WorkerPool(world)
    return _pools[world]


@pytest.fixture(scope="module", autouse=True)
def _close_pools():
    yield
    for p in _pools.values():
        p.close()
    _pools.clear()


@pytest.mark.gpu
@requires_kernels
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("hook", [False, True])
def test_dispatch_bf16_matches_expected_layout(world: int, hook: bool) -> None:
    pool(world).run("case_dispatch", 1, 64, 2048, 4, 6, False, False, False, "random", hook)


@pytest.mark.gpu
@requires_kernels
@pytest.mark.parametrize("round_scale,use_ue8m0", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("hidden", [7168, 640])
def test_dispatch_fp8_cast_is_bit_exact(hidden: int, round_scale: bool, use_ue8m0: bool) -> None:
    pool(2).run("case_dispatch", 2, 128, hidden, 16, 8, True, round_scale, use_ue8m0, "random", False)


@pytest.mark.gpu
@requires_kernels
def test_dispatch_top16_of_32_experts() -> None:
    pool(2).run("case_dispatch", 3, 48, 1024, 16, 16, True, False, False, "random", False)


@pytest.mark.gpu
@requires_kernels
def test_dispatch_one_expert_per_rank() -> None:
    pool(2).run("case_dispatch", 4, 40, 128, 1, 2, False, False, False, "random", False)


@pytest.mark.gpu
@requires_kernels
def test_dispatch_tokens_routed_to_one_rank_only() -> None:
    pool(2).run("case_dispatch", 5, 64, 2048, 8, 4, True, False, False, "one_rank", False)


@pytest.mark.gpu
@requires_kernels
def test_dispatch_duplicate_expert_is_received_once() -> None:
    pool(2).run("case_dispatch", 6, 32, 512, 4, 4, False, False, False, "duplicates", False)


@pytest.mark.gpu
@requires_kernels
def test_dispatch_rank_without_tokens() -> None:
    pool(2).run("case_dispatch", 7, 32, 1024, 4, 4, True, True, True, "zero_last", True)


@pytest.mark.gpu
@requires_kernels
@pytest.mark.parametrize("world", [2, 4])
def test_combine_weighted_sum_is_exact(world: int) -> None:
    pool(world).run("case_combine", 8, 64, 2048, 4, 6, "random", False, False, False)


@pytest.mark.gpu
@requires_kernels
@pytest.mark.parametrize("zero_copy,use_out,hook", [(True, False, False), (False, True, True), (True, True, True)])
def test_combine_zero_copy_out_and_hook(zero_copy: bool, use_out: bool, hook: bool) -> None:
    pool(2).run("case_combine", 9, 48, 1024, 8, 8, "duplicates", zero_copy, use_out, hook)


@pytest.mark.gpu
@requires_kernels
def test_combine_with_rank_without_tokens() -> None:
    pool(2).run("case_combine", 10, 32, 1024, 4, 4, "zero_last", False, False, True)


@pytest.mark.gpu
@requires_kernels
def test_recv_stats_accumulate() -> None:
    pool(2).run("case_stats", 11)


@pytest.mark.gpu
@requires_kernels
def test_send_kernel_does_not_wait_for_peers() -> None:
    pool(2).run("case_hook_send_does_not_wait", 12)


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                    reason="overlap timing needs one GPU per rank (ranks sharing a GPU are time-sliced)")
@pytest.mark.gpu
@requires_kernels
def test_compute_between_send_and_hook_overlaps() -> None:
    pool(2).run("case_hook_overlap_timing", 13)


@pytest.mark.gpu
@requires_kernels
def test_cuda_graph_replays_with_fresh_inputs() -> None:
    pool(2).run("case_cuda_graph", 14)


@pytest.mark.gpu
@requires_kernels
def test_timeout_reports_rank_and_peer_and_recovers() -> None:
    pool(2).run("case_timeout", 15, timeout=180)


@pytest.mark.gpu
@requires_kernels
def test_create_and_destroy_repeatedly() -> None:
    pool(2).run("case_create_destroy", 16)


@pytest.mark.gpu
@requires_kernels
def test_nvshmem_put_path() -> None:
    pool(2).run("case_nvshmem_puts", 17)


@pytest.mark.gpu
@requires_kernels
def test_four_ranks_graph_and_fp8() -> None:
    pool(4).run("case_dispatch", 18, 32, 7168, 8, 8, True, True, True, "random", True)
    pool(4).run("case_cuda_graph", 19)

