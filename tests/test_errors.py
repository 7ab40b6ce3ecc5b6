"""Bad input to the normal path raises DeepEPInputError naming the argument and what was expected."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed
from routing_cases import make_case

import deepep_plugin as dp


def _layout(buf, idx, num_experts):
    return buf.get_dispatch_layout(idx, num_experts)[:4]


def _check(rank: int, world_size: int) -> None:
    me = make_case("random", 81, rank, world_size, hidden=256)
    group = dist.group.WORLD
    size = dp.Buffer.get_dispatch_config(world_size).get_nvl_buffer_size_hint(512, world_size)
    buf = dp.Buffer(group, size, 0)
    per_rank, per_rdma, per_expert, in_rank = _layout(buf, me.topk_idx, me.num_experts)

    def dispatch(x=me.x, idx=me.topk_idx, w=me.topk_weights, **kw):
        return buf.dispatch(x, None, per_rank, per_rdma, in_rank, per_expert, idx, w, **kw)

    cases = [
        (lambda: dispatch(x=me.x.float().to(torch.int32)), "x must have dtype"),
        (lambda: dispatch(x=me.x[:, :100].contiguous()), "multiple of 16 bytes"),
        (lambda: dispatch(x=me.x.t()), "x must be contiguous"),
        (lambda: dispatch(idx=me.topk_idx.int()), "topk_idx must have dtype"),
        (lambda: dispatch(w=me.topk_weights.double()), "topk_weights must have dtype"),
        (lambda: dispatch(w=me.topk_weights[:, :2].contiguous()), "topk_weights must have shape"),
        (lambda: dispatch(idx=torch.full_like(me.topk_idx, me.num_experts)), r"\[-1, num_experts=8\)"),
        (lambda: dispatch(idx=torch.full_like(me.topk_idx, -2)), r"\[-1, num_experts=8\)"),
        (lambda: dispatch(expert_alignment=0), "expert_alignment"),
        (lambda: dispatch(num_worst_tokens=-1), "num_worst_tokens"),
        (lambda: buf.dispatch(me.x, None, per_rank, None, in_rank.int(), per_expert), "is_token_in_rank"),
        (lambda: buf.dispatch(me.x, None, per_rank, None, in_rank, per_expert[:-1]), "divisible by the group"),
        (lambda: buf.dispatch(me.x, None, per_rank, None, in_rank, per_expert, None, me.topk_weights),
         "topk_weights given without topk_idx"),
        (lambda: buf.get_dispatch_layout(me.topk_idx, 15), "divisible by the group size"),
        (lambda: buf.get_dispatch_layout(me.topk_idx.int(), me.num_experts), "topk_idx must have dtype"),
        (lambda: dispatch(x=(me.x.to(torch.float8_e4m3fn), torch.ones(me.num_tokens, 3))), r"scales\) must have shape"),
        (lambda: dispatch(x=(me.x[:, :200].contiguous().to(torch.float8_e4m3fn), torch.ones(me.num_tokens, 2))),
         "multiple of 128"),
        (lambda: dp.Config(23), "even"),
        (lambda: dp.Config(24, 8, 8), "smaller than"),
        (lambda: dp.Buffer(group, 100, 0), "multiple of 128"),
        (lambda: dp.Buffer(group, 0, 1 << 20), "low_latency_mode"),
        (lambda: dp.Buffer(group, 0, 0, backend="nope"), "backend must be one of"),
        (lambda: dp.Buffer(group, 0, 0, enable_shrink=True), "enable_shrink"),
        (lambda: dp.Buffer.set_num_sms(7), "even"),
    ]
    for call, pattern in cases:
        with pytest.raises(dp.DeepEPInputError, match=pattern):
            call()
            print(f"no error for the case expecting {pattern!r}")
    # Handles: wrong token count, wrong type; buffer too small says how large it must be.
    _, _, _, _, handle, _ = dispatch()
    with pytest.raises(dp.DeepEPInputError, match="tokens"):
        buf.dispatch(torch.cat([me.x, me.x]), handle=handle)
    with pytest.raises(dp.DeepEPInputError, match="topk_idx and topk_weights must be None"):
        buf.dispatch(me.x, handle=handle, topk_idx=me.topk_idx)
    with pytest.raises(dp.DeepEPInputError, match="handle"):
        buf.combine(me.x, handle=(1, 2, 3))
    # Checks made once (a handle, the last layout) are made again when what they depend on changes.
    buf.dispatch(me.x, handle=handle)
    with pytest.raises(dp.DeepEPInputError, match="handle was made with num_sms"):
        buf.dispatch(me.x, handle=handle, config=dp.Config(dp.Buffer.get_dispatch_config(world_size).num_sms + 2))
    with pytest.raises(dp.DeepEPInputError, match="is_token_in_rank must have shape"):
        buf.dispatch(torch.cat([me.x, me.x]), None, per_rank, per_rdma, in_rank, per_expert)
    small = dp.Buffer(group, 1 << 12, 0)
    with pytest.raises(dp.DeepEPBufferTooSmall, match=r"needs at least \d+ bytes"):
        small.dispatch(me.x, None, per_rank, per_rdma, in_rank, per_expert, me.topk_idx, me.topk_weights)
    # Errors are also AssertionErrors, so code written against DeepEP's asserts keeps working.
    with pytest.raises(AssertionError):
        dispatch(expert_alignment=0)


def test_bad_inputs_raise_errors_naming_the_argument() -> None:
    run_distributed(_check, 2)


def _check_destroy(rank: int, world_size: int) -> None:
    buf = dp.Buffer(dist.group.WORLD, 1 << 20, 0, explicitly_destroy=True)
    buf.destroy()
    with pytest.raises(dp.DeepEPError, match="destroyed"):
        buf.get_dispatch_layout(torch.zeros(2, 2, dtype=torch.long), 4)
    implicit = dp.Buffer(dist.group.WORLD, 1 << 20, 0)
    with pytest.raises(dp.DeepEPInputError, match="explicitly_destroy"):
        implicit.destroy()


def test_destroyed_buffer_refuses_work() -> None:
    run_distributed(_check_destroy, 2)


def _check_local_buffer(rank: int, world_size: int) -> None:
    buf = dp.Buffer(dist.group.WORLD, 1 << 12, 0)
    whole = buf.get_local_buffer_tensor(torch.int32)
    assert whole.numel() == (1 << 12) // 4
    part = buf.get_local_buffer_tensor(torch.float32, torch.Size([4, 8]), offset=64)
    part.fill_(rank + 1)
    assert torch.equal(whole[16:48].view(torch.float32), torch.full((32,), float(rank + 1)))
    with pytest.raises(dp.DeepEPInputError, match="offset"):
        buf.get_local_buffer_tensor(torch.int32, offset=1 << 12)
    with pytest.raises(dp.DeepEPInputError, match="num_rdma_bytes"):
        buf.get_local_buffer_tensor(torch.int32, use_rdma_buffer=True)


def test_local_buffer_tensor_is_a_byte_offset_view() -> None:
    run_distributed(_check_local_buffer, 2)


def _check_low_latency_inputs(rank: int, world_size: int) -> None:
    n_ll, hidden, num_experts = 8, 256, 4 * world_size
    size = dp.Buffer.get_low_latency_rdma_size_hint(n_ll, hidden, world_size, num_experts)
    buf = dp.Buffer(dist.group.WORLD, 0, size, low_latency_mode=True)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(5, hidden, generator=g).to(torch.bfloat16)
    idx = torch.randint(-1, num_experts, (5, 2), generator=g)
    w = torch.rand(5, 2, generator=g)
    local = num_experts // world_size
    recv_x, _, handle, _, _ = buf.low_latency_dispatch(x, idx, n_ll, num_experts, use_fp8=False)
    y = torch.zeros(local, world_size * n_ll, hidden, dtype=torch.bfloat16)

    def dispatch(x=x, idx=idx, **kw):
        return buf.low_latency_dispatch(x, idx, n_ll, num_experts, **kw)

    def combine(y=y, idx=idx, w=w, handle=handle, **kw):
        return buf.low_latency_combine(y, idx, w, handle, **kw)

    cases = [
        (lambda: dispatch(x=x.float()), "x must have dtype torch.bfloat16"),
        (lambda: dispatch(x=x.t().contiguous().t()), "x must be contiguous"),
        (lambda: dispatch(x=x[None]), "x must be 2-D"),
        (lambda: dispatch(x=x[:, :200].contiguous()), "hidden must be a multiple of 128"),
        (lambda: dispatch(x=torch.cat([x, x])), "num_max_dispatch_tokens_per_rank"),
        (lambda: dispatch(idx=idx.int()), "topk_idx must have dtype"),
        (lambda: dispatch(idx=idx[:3].contiguous()), "topk_idx must have shape"),
        (lambda: dispatch(idx=torch.zeros(5, 17, dtype=torch.long)), r"top-k must be in \[1, 16\]"),
        (lambda: dispatch(idx=torch.full_like(idx, num_experts)), "num_experts"),
        (lambda: dispatch(cumulative_local_expert_recv_stats=torch.zeros(local, dtype=torch.int64)),
         "cumulative_local_expert_recv_stats must have dtype"),
        (lambda: dispatch(cumulative_local_expert_recv_stats=torch.zeros(local + 1, dtype=torch.int32)),
         "cumulative_local_expert_recv_stats must have shape"),
        (lambda: dispatch(dispatch_wait_recv_cost_stats=torch.zeros(world_size + 1, dtype=torch.int64)),
         "dispatch_wait_recv_cost_stats must have shape"),
        (lambda: dispatch(use_ue8m0=True), "use_ue8m0=True requires round_scale=True"),
        (lambda: dispatch(async_finish=True, return_recv_hook=True), "cannot both be True"),
        (lambda: buf.low_latency_dispatch(x, idx, n_ll, num_experts + 1), "divisible by the group size"),
        (lambda: buf.low_latency_dispatch(x, idx, 1 << 20, num_experts), "num_rdma_bytes"),
        (lambda: combine(y=y[:, :-1].contiguous()), "x must have shape"),
        (lambda: combine(y=y.float()), "x must have dtype"),
        (lambda: combine(w=w.double()), "topk_weights must have dtype"),
        (lambda: combine(w=w[:, :1].contiguous()), "topk_weights must have shape"),
        (lambda: combine(idx=idx.int()), "topk_idx must have dtype"),
        (lambda: combine(handle=tuple(handle)), "passed on unchanged"),
        (lambda: combine(use_logfmt=True), "use_logfmt"),
        (lambda: combine(out=torch.empty(5, hidden)), "out must have dtype"),
        (lambda: combine(out=torch.empty(4, hidden, dtype=torch.bfloat16)), "out must have shape"),
        (lambda: combine(combine_wait_recv_cost_stats=torch.zeros(world_size, dtype=torch.int32)),
         "combine_wait_recv_cost_stats must have dtype"),
        (lambda: buf.get_next_low_latency_combine_buffer(list(handle)), "passed on unchanged"),
        (lambda: buf.clean_low_latency_buffer(n_ll, 100, num_experts), "hidden must be a multiple of 128"),
    ]
    for call, pattern in cases:
        with pytest.raises(dp.DeepEPInputError, match=pattern):
            call()
    normal = dp.Buffer.sized_for(dist.group.WORLD, hidden * 2)
    with pytest.raises(dp.DeepEPInputError, match="low_latency_mode"):
        normal.low_latency_dispatch(x, idx, n_ll, num_experts)
    assert recv_x.shape == (local, world_size * n_ll, hidden)


def test_low_latency_bad_inputs_raise_errors_naming_the_argument() -> None:
    run_distributed(_check_low_latency_inputs, 2)


def _check_internode_inputs(rank: int, world_size: int) -> None:
    buf = dp.Buffer.sized_for(dist.group.WORLD, 256 * 2, num_ranks_per_node=2)
    assert buf.num_nodes == 2
    me = make_case("random", 83, rank, world_size, hidden=256)
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(me.topk_idx, me.num_experts)
    assert per_rdma is not None and per_rdma.shape == (2,)

    def dispatch(x=me.x, rdma=per_rdma, **kw):
        return buf.dispatch(x, None, per_rank, rdma, in_rank, per_expert, me.topk_idx, me.topk_weights, **kw)

    q = me.x.to(torch.float8_e4m3fn)
    cases = [
        (lambda: dispatch(rdma=None), "num_tokens_per_rdma_rank must be a torch.Tensor"),
        (lambda: dispatch(rdma=per_rdma[:1]), "num_tokens_per_rdma_rank must have shape"),
        (lambda: dispatch(rdma=per_rdma.long()), "num_tokens_per_rdma_rank must have dtype"),
        (lambda: dispatch(x=(q, torch.ones(me.num_tokens, 2, dtype=torch.float16))),
         r"x\[1\] \(scales\) must have dtype"),
        (lambda: dispatch(x=(q, torch.ones(me.num_tokens + 1, 2))), r"x\[1\] \(scales\) must have shape"),
        (lambda: dispatch(x=(q.float(), torch.ones(me.num_tokens, 2))), r"x\[0\] \(FP8 data\) must have dtype"),
        (lambda: dispatch(x=(q, torch.ones(me.num_tokens, 2), 3)), "tuple"),
        (lambda: buf.dispatch(me.x, None, per_rank, per_rdma, in_rank, per_expert,
                              torch.zeros(me.num_tokens, 17, dtype=torch.long), torch.zeros(me.num_tokens, 17)),
         r"top-k must be in \[1, 16\] for a group of 2 node"),
    ]
    for call, pattern in cases:
        with pytest.raises(dp.DeepEPInputError, match=pattern):
            call()
    _, _, _, _, handle, _ = dispatch()
    assert isinstance(handle, dp.InternodeHandle)
    one_node = dp.Buffer.sized_for(dist.group.WORLD, 256 * 2, num_ranks_per_node=world_size)
    with pytest.raises(dp.DeepEPInputError, match="internode handle"):
        one_node.dispatch(me.x, handle)
    with pytest.raises(dp.DeepEPInputError, match="num_sms"):
        buf.dispatch(me.x, handle, config=dp.Config(8))


def test_internode_bad_inputs_raise_errors_naming_the_argument() -> None:
    run_distributed(_check_internode_inputs, 4)
