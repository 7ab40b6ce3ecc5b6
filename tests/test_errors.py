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
