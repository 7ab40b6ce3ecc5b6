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


requires_kernels = pytest.mark.skipif(bool(missing_kernels("_nvshmem_C")),
                                      reason=missing_kernels("_nvshmem_C") or "built")
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
@pytest.mark.parametrize("world", [2, 4], ids="{}-ranks".format)
@pytest.mark.parametrize("hook", [False, True], ids=["no-hook", "hook"])
def test_dispatch_bf16_matches_expected_layout(world: int, hook: bool) -> None:
    pool(world).run("case_dispatch", seed=1, n_ll=64, hidden=2048, e_loc=4, topk=6, hook=hook)


@pytest.mark.gpu
@requires_kernels
@pytest.mark.parametrize("round_scale,use_ue8m0", [(False, False), (True, False), (True, True)],
                         ids=["fp32-scales", "pow2-scales", "ue8m0-scales"])
@pytest.mark.parametrize("hidden", [7168, 640], ids="hidden-{}".format)
def test_dispatch_fp8_cast_is_bit_exact(hidden: int, round_scale: bool, use_ue8m0: bool) -> None:
    pool(2).run("case_dispatch", seed=2, n_ll=128, hidden=hidden, e_loc=16, topk=8, use_fp8=True,
                round_scale=round_scale, use_ue8m0=use_ue8m0)


@pytest.mark.gpu
@requires_kernels
def test_dispatch_top16_of_32_experts() -> None:
    pool(2).run("case_dispatch", seed=3, n_ll=48, hidden=1024, e_loc=16, topk=16, use_fp8=True)


@pytest.mark.gpu
@requires_kernels
def test_dispatch_one_expert_per_rank() -> None:
    pool(2).run("case_dispatch", seed=4, n_ll=40, hidden=128, e_loc=1, topk=2)


@pytest.mark.gpu
@requires_kernels
def test_dispatch_tokens_routed_to_one_rank_only() -> None:
    pool(2).run("case_dispatch", seed=5, n_ll=64, hidden=2048, e_loc=8, topk=4, use_fp8=True, pattern="one_rank")


@pytest.mark.gpu
@requires_kernels
def test_dispatch_duplicate_expert_is_received_once() -> None:
    pool(2).run("case_dispatch", seed=6, n_ll=32, hidden=512, e_loc=4, topk=4, pattern="duplicates")


@pytest.mark.gpu
@requires_kernels
def test_dispatch_rank_without_tokens() -> None:
    pool(2).run("case_dispatch", seed=7, n_ll=32, hidden=1024, e_loc=4, topk=4, use_fp8=True, round_scale=True,
                use_ue8m0=True, pattern="zero_last", hook=True)


@pytest.mark.gpu
@requires_kernels
@pytest.mark.parametrize("world", [2, 4], ids="{}-ranks".format)
def test_combine_weighted_sum_is_exact(world: int) -> None:
    pool(world).run("case_combine", seed=8, n_ll=64, hidden=2048, e_loc=4, topk=6)


@pytest.mark.gpu
@requires_kernels
@pytest.mark.parametrize("zero_copy,use_out,hook",
                         [(True, False, False), (False, True, True), (True, True, True)],
                         ids=["zero-copy", "out-hook", "zero-copy-out-hook"])
def test_combine_zero_copy_out_and_hook(zero_copy: bool, use_out: bool, hook: bool) -> None:
    pool(2).run("case_combine", seed=9, n_ll=48, hidden=1024, e_loc=8, topk=8, pattern="duplicates",
                zero_copy=zero_copy, use_out=use_out, hook=hook)


@pytest.mark.gpu
@requires_kernels
def test_combine_with_rank_without_tokens() -> None:
    pool(2).run("case_combine", seed=10, n_ll=32, hidden=1024, e_loc=4, topk=4, pattern="zero_last", hook=True)


@pytest.mark.gpu
@requires_kernels
def test_recv_stats_accumulate() -> None:
    pool(2).run("case_stats", seed=11)


@pytest.mark.gpu
@requires_kernels
def test_send_kernel_does_not_wait_for_peers() -> None:
    pool(2).run("case_hook_send_does_not_wait", seed=12)


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                    reason="overlap timing needs one GPU per rank (ranks sharing a GPU are time-sliced)")
@pytest.mark.gpu
@requires_kernels
def test_compute_between_send_and_hook_overlaps() -> None:
    pool(2).run("case_hook_overlap_timing", seed=13)


@pytest.mark.gpu
@requires_kernels
def test_cuda_graph_replays_with_fresh_inputs() -> None:
    pool(2).run("case_cuda_graph", seed=14)


@pytest.mark.gpu
@requires_kernels
def test_timeout_reports_rank_and_peer_and_recovers() -> None:
    pool(2).run("case_timeout", seed=15, timeout=180)


@pytest.mark.gpu
@requires_kernels
def test_create_and_destroy_repeatedly() -> None:
    pool(2).run("case_create_destroy", seed=16)


@pytest.mark.gpu
@requires_kernels
def test_nvshmem_put_path() -> None:
    pool(2).run("case_nvshmem_puts", seed=17)


@pytest.mark.gpu
@requires_kernels
def test_four_ranks_graph_and_fp8() -> None:
    pool(4).run("case_dispatch", seed=18, n_ll=32, hidden=7168, e_loc=8, topk=8, use_fp8=True, round_scale=True,
                use_ue8m0=True, hook=True)
    pool(4).run("case_cuda_graph", seed=19)

