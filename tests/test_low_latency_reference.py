"""Low-latency dispatch/combine through ``Buffer`` (reference backend, gloo) against a dense oracle."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed
from routing_cases import make_case

import deepep_plugin as dp
from deepep_plugin.fp8 import per_token_cast_back, per_token_cast_to_fp8, unpack_ue8m0

N_LL = 48


def _buffer(world_size: int, hidden: int, num_experts: int) -> dp.Buffer:
    size = dp.Buffer.get_low_latency_rdma_size_hint(N_LL, hidden, world_size, num_experts)
    return dp.Buffer(dist.group.WORLD, 0, size, low_latency_mode=True, num_qps_per_rank=num_experts // world_size)


def _rows_by_expert(recv_x: torch.Tensor, recv_count: torch.Tensor, handle: tuple, world_size: int) -> dict:
    """{(local expert, source rank, source token): row} from the 3-D layout, checking layout_range on the way."""
    src_info, layout_range = handle[0], handle[1]
    rows = {}
    for i in range(recv_x.size(0)):
        total = 0
        for j in range(world_size):
            packed = int(layout_range[i, j])
            begin, n = packed >> 32, packed & 0xFFFFFFFF
            total += n
            for row in range(begin, begin + n):
                rows[(i, j, int(src_info[i, row]))] = recv_x[i, row]
        assert total == int(recv_count[i])
    return rows


def _expected_rows(cases: list, rank: int, world_size: int) -> dict:
    e_loc = cases[0].num_experts // world_size
    want = {}
    for j, c in enumerate(cases):
        for t in range(c.num_tokens):
            for e in set(c.topk_idx[t].tolist()):
                if e >= 0 and e // e_loc == rank:
                    want[(e - rank * e_loc, j, t)] = c.x[t]
    return want


def _check_dispatch(rank: int, world_size: int, kind: str, use_fp8: bool, round_scale: bool, use_ue8m0: bool) -> None:
    cases = [make_case(kind, 31, r, world_size, hidden=256, num_topk=5) for r in range(world_size)]
    me = cases[rank]
    e_loc = me.num_experts // world_size
    buf = _buffer(world_size, me.hidden, me.num_experts)
    stats = torch.zeros(e_loc, dtype=torch.int32)
    recv_x, recv_count, handle, event, hook = buf.low_latency_dispatch(
        me.x, me.topk_idx, N_LL, me.num_experts, cumulative_local_expert_recv_stats=stats, use_fp8=use_fp8,
        round_scale=round_scale, use_ue8m0=use_ue8m0)
    assert hook is None and len(handle) == 5 and handle[2:] == (N_LL, me.hidden, me.num_experts)
    want = _expected_rows(cases, rank, world_size)
    if use_fp8:
        data, scales = recv_x
        assert data.shape == (e_loc, world_size * N_LL, me.hidden) and data.dtype == torch.float8_e4m3fn
        # Scales: a transposed view, token dimension fastest.
        assert scales.stride(1) == 1
        if use_ue8m0:
            packed = (me.hidden // 128 + 3) // 4
            assert scales.dtype == torch.int32 and scales.shape == (e_loc, world_size * N_LL, packed)
            flat_scales = unpack_ue8m0(scales.contiguous().reshape(-1, scales.size(-1)), me.hidden // 128)
        else:
            assert scales.dtype == torch.float32 and scales.shape == (e_loc, world_size * N_LL, me.hidden // 128)
            flat_scales = scales.contiguous().reshape(-1, me.hidden // 128)
        deq = per_token_cast_back(data.reshape(-1, me.hidden), flat_scales, torch.float32).view(data.shape)
        got = _rows_by_expert(deq, recv_count, handle, world_size)
        assert set(got) == set(want)
        for key, row in got.items():
            d, s = per_token_cast_to_fp8(want[key][None], round_scale=round_scale, use_ue8m0=use_ue8m0)
            assert torch.equal(row, per_token_cast_back(d, s, torch.float32)[0])
    else:
        got = _rows_by_expert(recv_x, recv_count, handle, world_size)
        assert set(got) == set(want)
        for key, row in got.items():
            assert torch.equal(row, want[key])
    per_expert = [sum(1 for k in want if k[0] == i) for i in range(e_loc)]
    assert recv_count.tolist() == per_expert and stats.tolist() == per_expert


@pytest.mark.parametrize("kind", ["random", "one_rank", "zero_tokens", "duplicates"])
def test_low_latency_dispatch_bf16_fills_each_expert_with_its_tokens(kind: str) -> None:
    run_distributed(_check_dispatch, 2, kind, False, False, False)


@pytest.mark.parametrize("round_scale,use_ue8m0", [(False, False), (True, False), (True, True)])
def test_low_latency_dispatch_casts_to_fp8_per_128_channels(round_scale: bool, use_ue8m0: bool) -> None:
    run_distributed(_check_dispatch, 4, "random", True, round_scale, use_ue8m0)


def _check_combine(rank: int, world_size: int, zero_copy: bool, use_hook: bool) -> None:
    cases = [make_case("random", 41, r, world_size, hidden=256, num_topk=5) for r in range(world_size)]
    me = cases[rank]
    e_loc = me.num_experts // world_size
    buf = _buffer(world_size, me.hidden, me.num_experts)
    recv_x, recv_count, handle, _, hook = buf.low_latency_dispatch(me.x, me.topk_idx, N_LL, me.num_experts,
                                                                   use_fp8=False, return_recv_hook=use_hook)
    if use_hook:
        hook()
    # Expert e answers token x with x * (e + 1): combine must weight and sum those per token.
    factor = (torch.arange(e_loc) + rank * e_loc + 1).float()[:, None, None]
    y = (recv_x.float() * factor).to(torch.bfloat16)
    out = torch.empty(me.num_tokens, me.hidden, dtype=torch.bfloat16)
    if zero_copy:
        target = buf.get_next_low_latency_combine_buffer(handle)
        assert target.shape == y.shape and target.stride(1) == (me.hidden + me.hidden // 64 + 7) // 8 * 8
        target.copy_(y)
    combined, event, hook = buf.low_latency_combine(y, me.topk_idx, me.topk_weights, handle, zero_copy=zero_copy,
                                                    return_recv_hook=use_hook, out=out)
    if use_hook:
        hook()
    assert combined.data_ptr() == out.data_ptr()
    want = torch.zeros(me.num_tokens, me.hidden)
    for k in range(me.num_topk):
        e = me.topk_idx[:, k]
        valid = (e >= 0)[:, None]
        scaled = (me.x.float() * (e.clamp(min=0) + 1).float()[:, None]).to(torch.bfloat16).float()
        want += torch.where(valid, me.topk_weights[:, k:k + 1] * scaled, torch.zeros_like(scaled))
    torch.testing.assert_close(combined.float(), want.to(torch.bfloat16).float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("zero_copy,use_hook", [(False, False), (True, False), (False, True)])
def test_low_latency_combine_is_the_weighted_sum_of_expert_outputs(zero_copy: bool, use_hook: bool) -> None:
    run_distributed(_check_combine, 2, zero_copy, use_hook)


def _check_hook_completes_receive(rank: int, world_size: int) -> None:
    me = make_case("random", 43, rank, world_size, hidden=128)
    buf = _buffer(world_size, me.hidden, me.num_experts)
    recv_x, recv_count, handle, event, hook = buf.low_latency_dispatch(me.x, me.topk_idx, N_LL, me.num_experts,
                                                                       use_fp8=False, return_recv_hook=True)
    assert callable(hook) and event.event is None
    assert int(recv_count.sum()) == 0  # nothing has been received before the hook runs
    hook()
    want = _expected_rows([make_case("random", 43, r, world_size, hidden=128) for r in range(world_size)], rank,
                          world_size)
    assert int(recv_count.sum()) == len(want)
    buf.clean_low_latency_buffer(N_LL, me.hidden, me.num_experts)


def test_receive_hook_completes_the_receive() -> None:
    run_distributed(_check_hook_completes_receive, 2)


def _check_errors(rank: int, world_size: int) -> None:
    me = make_case("random", 47, rank, world_size, hidden=128)
    buf = _buffer(world_size, me.hidden, me.num_experts)
    with pytest.raises(dp.DeepEPInputError, match="num_max_dispatch_tokens_per_rank"):
        buf.low_latency_dispatch(torch.zeros(N_LL + 1, 128, dtype=torch.bfloat16),
                                 torch.zeros(N_LL + 1, 2, dtype=torch.long), N_LL, me.num_experts)
    with pytest.raises(dp.DeepEPInputError, match="use_ue8m0"):
        buf.low_latency_dispatch(me.x, me.topk_idx, N_LL, me.num_experts, use_ue8m0=True)
    with pytest.raises(dp.DeepEPInputError, match="return_recv_hook"):
        buf.low_latency_dispatch(me.x, me.topk_idx, N_LL, me.num_experts, async_finish=True, return_recv_hook=True)
    with pytest.raises(dp.DeepEPBufferTooSmall, match="num_rdma_bytes"):
        buf.low_latency_dispatch(me.x, me.topk_idx, 4 * N_LL, me.num_experts)
    with pytest.raises(dp.DeepEPInputError, match="hidden"):
        buf.low_latency_dispatch(torch.zeros(2, 96, dtype=torch.bfloat16), me.topk_idx[:2], N_LL, me.num_experts)
    with pytest.raises(dp.DeepEPInputError, match="top-k"):
        buf.low_latency_dispatch(me.x, torch.zeros(me.num_tokens, 17, dtype=torch.long), N_LL, me.num_experts)
    with pytest.raises(dp.DeepEPInputError, match="topk_idx"):
        bad = me.topk_idx.clone()
        bad[0, 0] = me.num_experts
        buf.low_latency_dispatch(me.x, bad, N_LL, me.num_experts)
    normal = dp.Buffer(dist.group.WORLD, 1 << 20, 0)
    with pytest.raises(dp.DeepEPInputError, match="low_latency_mode"):
        normal.low_latency_dispatch(me.x, me.topk_idx, N_LL, me.num_experts)


def test_low_latency_bad_inputs_raise_clear_errors() -> None:
    run_distributed(_check_errors, 2)


def _all_slots_unused(rank: int, world_size: int) -> None:
    n_ll, hidden, num_experts = 4, 128, 2 * world_size
    buf = dp.Buffer(dist.group.WORLD, 0, dp.Buffer.get_low_latency_rdma_size_hint(n_ll, hidden, world_size,
                                                                                 num_experts),
                    low_latency_mode=True, backend="reference")
    x = torch.randn(3, hidden).to(torch.bfloat16)
    idx = torch.full((3, 2), -1, dtype=torch.int64) if rank == 1 else torch.tensor([[0, 1], [2, -1], [3, 0]])
    w = torch.rand(3, 2)
    recv_x, count, handle, _, _ = buf.low_latency_dispatch(x, idx, n_ll, num_experts, use_fp8=False)
    out, _, _ = buf.low_latency_combine(recv_x, idx, w, handle)
    if rank == 1:  # its tokens selected nothing, so nothing comes back: zero rows, not an IndexError
        assert torch.equal(out, torch.zeros_like(out))


def test_rank_whose_tokens_select_nothing_combines_to_zero() -> None:
    run_distributed(_all_slots_unused, 2)
