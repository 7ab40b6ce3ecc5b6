"""Normal dispatch/combine through ``Buffer`` (reference backend, gloo) against a single-process dense oracle."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed
from routing_cases import KINDS, expected_combine, expected_dispatch, make_case

import deepep_plugin as dp
from deepep_plugin.fp8 import per_token_cast_to_fp8


def _buffer(world_size: int, hidden: int, **kwargs) -> dp.Buffer:
    size = max(dp.Buffer.get_dispatch_config(world_size).get_nvl_buffer_size_hint(hidden * 2, world_size),
               dp.Buffer.get_combine_config(world_size).get_nvl_buffer_size_hint(hidden * 2, world_size))
    return dp.Buffer(dist.group.WORLD, size, 0, **kwargs)


def _dispatch(buf: dp.Buffer, x, idx, w, num_experts: int, **kwargs):
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, num_experts)
    return buf.dispatch(x, None, per_rank, per_rdma, in_rank, per_expert, idx, w, **kwargs)


# ----------------------------------------------------------------------------------------------------------
def _check_dispatch(rank: int, world_size: int, kind: str, seed: int) -> None:
    cases = [make_case(kind, seed, r, world_size) for r in range(world_size)]
    me = cases[rank]
    buf = _buffer(world_size, me.hidden)
    recv_x, recv_idx, recv_w, counts, handle, event = _dispatch(buf, me.x, me.topk_idx, me.topk_weights,
                                                                me.num_experts, expert_alignment=4)
    want = expected_dispatch(cases, rank)
    assert torch.equal(recv_x, want["x"])
    assert torch.equal(recv_idx, want["topk_idx"])
    assert torch.equal(recv_w, want["topk_weights"])
    assert counts == [(c + 3) // 4 * 4 for c in want["per_expert"]]
    assert torch.equal(handle.recv_src_idx.long(), want["src_idx"])
    counts_matrix = torch.tensor([expected_dispatch(cases, j)["counts"] for j in range(world_size)]).t()  # [src, dst]
    assert torch.equal(handle[0].long(), torch.cumsum(counts_matrix, 0))
    assert event.event is None


@pytest.mark.parametrize("world_size", [2, 4, 8])
@pytest.mark.parametrize("kind", KINDS)
def test_dispatch_delivers_each_token_once_per_rank_in_source_order(world_size: int, kind: str) -> None:
    run_distributed(_check_dispatch, world_size, kind, 7)


# ----------------------------------------------------------------------------------------------------------
def _check_combine(rank: int, world_size: int, kind: str, seed: int) -> None:
    cases = [make_case(kind, seed, r, world_size) for r in range(world_size)]
    me = cases[rank]
    buf = _buffer(world_size, me.hidden)
    recv_x, _, recv_w, _, handle, _ = _dispatch(buf, me.x, me.topk_idx, me.topk_weights, me.num_experts)
    # Each rank returns its rows scaled by a rank-specific factor, so the sum shows which copies were added.
    rows = [(expected_dispatch(cases, j)["x"].float() * (j + 1)).to(torch.bfloat16) for j in range(world_size)]
    g = torch.Generator().manual_seed(seed + rank)
    bias0 = torch.randn(me.num_tokens, me.hidden, generator=g).to(torch.bfloat16)
    bias1 = torch.randn(me.num_tokens, me.hidden, generator=g).to(torch.bfloat16)
    out, out_w, _ = buf.combine(rows[rank], handle, recv_w, bias=(bias0, bias1))
    want = expected_combine(cases, rank, rows) + bias0.float() + bias1.float()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want.to(torch.bfloat16).float(), rtol=1e-2, atol=1e-2)
    # Weights: each (t, k) is non-zero on exactly the rank owning expert k, so the sum restores the input.
    assert torch.allclose(out_w, torch.where(me.topk_idx >= 0, me.topk_weights, torch.zeros_like(me.topk_weights)))
    # Tokens that went nowhere get only the bias.
    nowhere = ~(me.topk_idx >= 0).any(1)
    assert torch.equal(out[nowhere], (bias0.float() + bias1.float()).to(torch.bfloat16)[nowhere])


@pytest.mark.parametrize("world_size", [2, 4, 8])
@pytest.mark.parametrize("kind", ["random", "zero_tokens", "duplicates"])
def test_combine_sums_the_copies_plus_bias(world_size: int, kind: str) -> None:
    run_distributed(_check_combine, world_size, kind, 11)


# ----------------------------------------------------------------------------------------------------------
def _check_cached(rank: int, world_size: int) -> None:
    cases = [make_case("imbalanced", 3, r, world_size) for r in range(world_size)]
    me = cases[rank]
    buf = _buffer(world_size, me.hidden)
    recv_x, _, _, _, handle, _ = _dispatch(buf, me.x, me.topk_idx, me.topk_weights, me.num_experts)
    other = torch.randn_like(me.x.float()).to(torch.bfloat16)
    again, idx, w, counts, no_handle, _ = buf.dispatch(other, handle=handle)
    assert idx is None and w is None and counts is None and no_handle is None
    fresh = _dispatch(buf, other, me.topk_idx, me.topk_weights, me.num_experts)[0]
    assert torch.equal(again, fresh)
    # A handle survives repeated combines and a payload of another type (the FP8 tuple).
    first = buf.combine(recv_x, handle)[0]
    assert torch.equal(buf.combine(recv_x, handle)[0], first)
    data, scales = per_token_cast_to_fp8(me.x)
    (r8, s8), *_ = buf.dispatch((data, scales), handle=handle)
    want = _dispatch(buf, (data, scales), me.topk_idx, me.topk_weights, me.num_experts)[0]
    assert torch.equal(r8.view(torch.uint8), want[0].view(torch.uint8)) and torch.equal(s8, want[1])


def test_cached_dispatch_reuses_the_layout() -> None:
    run_distributed(_check_cached, 2)


# ----------------------------------------------------------------------------------------------------------
def _check_fp8(rank: int, world_size: int) -> None:
    cases = [make_case("random", 5, r, world_size, hidden=256) for r in range(world_size)]
    me = cases[rank]
    buf = _buffer(world_size, me.hidden)
    data, scales = per_token_cast_to_fp8(me.x)
    col_major = scales.t().contiguous().t()  # arbitrary strides are accepted, as DeepEP
    (recv_data, recv_scales), *_ = _dispatch(buf, (data, col_major), me.topk_idx, me.topk_weights,
                                             me.num_experts)
    want = []
    for c in cases:
        d, s = per_token_cast_to_fp8(c.x)
        mine = (c.topk_idx >= 0) & (torch.div(c.topk_idx, c.num_experts // world_size, rounding_mode="floor")
                                    == rank)
        want.append((d[mine.any(1)], s[mine.any(1)]))
    assert torch.equal(recv_data.view(torch.uint8), torch.cat([d for d, _ in want]).view(torch.uint8))
    assert recv_scales.is_contiguous() and torch.equal(recv_scales, torch.cat([s for _, s in want]))


def test_fp8_tuple_travels_bit_exact_with_its_scales() -> None:
    run_distributed(_check_fp8, 2)


# ----------------------------------------------------------------------------------------------------------
def _check_worst(rank: int, world_size: int) -> None:
    cases = [make_case("random", 9, r, world_size) for r in range(world_size)]
    me = cases[rank]
    buf = _buffer(world_size, me.hidden)
    normal = _dispatch(buf, me.x, me.topk_idx, me.topk_weights, me.num_experts)
    worst_rows = sum(c.num_tokens for c in cases)
    worst = _dispatch(buf, me.x, me.topk_idx, me.topk_weights, me.num_experts, num_worst_tokens=worst_rows)
    n = normal[0].size(0)
    assert worst[0].size(0) == worst_rows and worst[3] == []
    assert torch.equal(worst[0][:n], normal[0]) and torch.equal(worst[1][:n], normal[1])
    assert torch.equal(worst[2][:n], normal[2])
    assert bool((worst[1][n:] == -1).all())
    # Combine accepts the padded rows (ignoring the padding).
    padded = torch.cat([normal[0], torch.full((worst_rows - n, me.hidden), 7.0, dtype=torch.bfloat16)])
    assert torch.equal(buf.combine(padded, worst[4])[0], buf.combine(normal[0], normal[4])[0])
    # Too few worst-case rows is an error on every rank (each checks its own count after the exchange).
    too_few = min(expected_dispatch(cases, j)["x"].size(0) for j in range(world_size)) - 1
    if too_few > 0:
        with pytest.raises(dp.DeepEPInputError, match="num_worst_tokens"):
            _dispatch(buf, me.x, me.topk_idx, me.topk_weights, me.num_experts, num_worst_tokens=too_few)


def test_num_worst_tokens_pads_without_changing_the_prefix() -> None:
    run_distributed(_check_worst, 2)


# ----------------------------------------------------------------------------------------------------------
def _check_handle_channels(rank: int, world_size: int) -> None:
    cases = [make_case("random", 13, r, world_size) for r in range(world_size)]
    me = cases[rank]
    buf = _buffer(world_size, me.hidden)
    config = dp.Config(8, 6, 256)  # 4 channels
    _, _, _, _, handle, _ = _dispatch(buf, me.x, me.topk_idx, me.topk_weights, me.num_experts, config=config)
    in_rank = handle.is_token_in_rank
    per = -(-me.num_tokens // 4)
    channel = torch.arange(me.num_tokens) // max(per, 1)
    for j in range(world_size):
        for c in range(4):
            sel = in_rank[:, j] & (channel <= c)
            assert int(handle.channel_prefix_matrix[j, c]) == int(sel.sum())
        for t in range(me.num_tokens):
            earlier = in_rank[:, j] & (channel == channel[t]) & (torch.arange(me.num_tokens) < t)
            want = int(earlier.sum()) if in_rank[t, j] else -1
            assert int(handle.send_head[t, j]) == want
    # Receiver side: exclusive channel prefix of each source's tokens to me.
    src_per_channel = []
    for c_ in cases:
        mine = ((c_.topk_idx >= 0) & (torch.div(c_.topk_idx, c_.num_experts // world_size, rounding_mode="floor")
                                     == rank)).any(1)
        per_src = -(-c_.num_tokens // 4)
        ch = torch.arange(c_.num_tokens) // max(per_src, 1)
        src_per_channel.append([int((mine & (ch == c)).sum()) for c in range(4)])
    for src in range(world_size):
        counts = src_per_channel[src]
        assert handle.recv_channel_prefix_matrix[src].tolist() == [sum(counts[:c]) for c in range(4)]
    with pytest.raises(dp.DeepEPInputError, match="num_sms"):
        buf.dispatch(me.x, handle=handle, config=dp.Config(12, 6, 256))


def test_handle_follows_deepep_channel_semantics() -> None:
    run_distributed(_check_handle_channels, 2)


# ----------------------------------------------------------------------------------------------------------
def _check_async(rank: int, world_size: int) -> None:
    cases = [make_case("random", 17, r, world_size) for r in range(world_size)]
    me = cases[rank]
    buf = _buffer(world_size, me.hidden)
    previous = dp.Buffer.capture()
    out = _dispatch(buf, me.x, me.topk_idx, me.topk_weights, me.num_experts, previous_event=previous,
                    async_finish=True, allocate_on_comm_stream=True)
    event = out[5]
    assert event.event is not None  # on CPU the work is done: the event is a no-op to wait on
    event.current_stream_wait()
    with event:
        pass
    sync = _dispatch(buf, me.x, me.topk_idx, me.topk_weights, me.num_experts)
    assert torch.equal(out[0], sync[0])
    with pytest.raises(dp.DeepEPInputError, match="allocate_on_comm_stream"):
        _dispatch(buf, me.x, me.topk_idx, me.topk_weights, me.num_experts, allocate_on_comm_stream=True)


def test_async_and_previous_event_are_accepted_on_cpu() -> None:
    run_distributed(_check_async, 2)
