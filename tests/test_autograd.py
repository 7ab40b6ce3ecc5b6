"""Autograd dispatch/combine: an expert-parallel MoE layer against the same layer computed densely in one process."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed
from routing_cases import make_case

import deepep_plugin as dp
from deepep_plugin import autograd as ep
from deepep_plugin.permute import permute, unpermute

HIDDEN = 128


def _expert_weights(num_experts: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(99)
    return torch.randn(num_experts, HIDDEN, HIDDEN, generator=g) / HIDDEN ** 0.5


def _grad_seed(rank: int, num_tokens: int) -> torch.Tensor:
    return torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(500 + rank))


def _dense(case, weights: torch.Tensor, rank: int):
    """y[t] = sum_k w[t, k] * (x[t] @ W[e_k]) with gradients, in one process."""
    x = case.x.float().clone().requires_grad_()
    w = case.topk_weights.clone().requires_grad_()
    weights = weights.clone().requires_grad_()
    y = torch.zeros(case.num_tokens, HIDDEN)
    for k in range(case.num_topk):
        e = case.topk_idx[:, k]
        valid = (e >= 0)[:, None].float()
        out = torch.bmm(x[:, None, :], weights[e.clamp(min=0)])[:, 0]
        y = y + valid * w[:, k:k + 1] * out
    (y * _grad_seed(rank, case.num_tokens)).sum().backward()
    return y.detach(), x.grad, w.grad, weights.grad


def _check(rank: int, world_size: int, kind: str) -> None:
    cases = [make_case(kind, 61, r, world_size, hidden=HIDDEN, dtype=torch.float32) for r in range(world_size)]
    me = cases[rank]
    e_loc = me.num_experts // world_size
    all_weights = _expert_weights(me.num_experts)
    local_weights = all_weights[rank * e_loc:(rank + 1) * e_loc].clone().requires_grad_()
    buf = dp.Buffer(dist.group.WORLD, dp.Buffer.get_dispatch_config(world_size).get_nvl_buffer_size_hint(
        HIDDEN * 4, world_size), 0)
    x = me.x.clone().requires_grad_()
    w = me.topk_weights.clone().requires_grad_()
    out = ep.dispatch(buf, x, me.topk_idx, w, me.num_experts)
    perm = permute(out.recv_x, out.recv_topk_idx, e_loc, out.recv_topk_weights, alignment=4)
    assert perm.tokens_per_expert.tolist() == [(c + 3) // 4 * 4 for c in out.num_recv_tokens_per_expert_list]
    rows = []
    start = 0
    for i, n in enumerate(perm.tokens_per_expert.tolist()):
        rows.append(perm.x[start:start + n] @ local_weights[i])
        start += n
    expert_out = torch.cat(rows) * perm.probs[:, None]
    y = ep.combine(buf, unpermute(expert_out, perm, out.recv_x.size(0)), out.handle)
    (y * _grad_seed(rank, me.num_tokens)).sum().backward()
    # Expert gradients: each rank holds its experts' share of every rank's loss; the dense oracle sums all losses.
    total = [torch.zeros_like(all_weights)]
    want_y = want_x = want_w = None
    for r, c in enumerate(cases):
        dy, dx, dw, dW = _dense(c, all_weights, r)
        total[0] += dW
        if r == rank:
            want_y, want_x, want_w = dy, dx, dw
    torch.testing.assert_close(y.detach(), want_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, want_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, want_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(local_weights.grad, total[0][rank * e_loc:(rank + 1) * e_loc], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("kind", ["random", "zero_tokens", "duplicates", "one_rank"])
def test_expert_parallel_moe_matches_dense_forward_and_gradients(world_size: int, kind: str) -> None:
    run_distributed(_check, world_size, kind)


def _check_fp8(rank: int, world_size: int) -> None:
    me = make_case("random", 71, rank, world_size, hidden=HIDDEN)
    buf = dp.Buffer(dist.group.WORLD, dp.Buffer.get_dispatch_config(world_size).get_nvl_buffer_size_hint(
        HIDDEN * 2, world_size), 0)
    x = me.x.clone().requires_grad_()
    out = ep.dispatch(buf, x, me.topk_idx, me.topk_weights, me.num_experts, fp8=True)
    plain = ep.dispatch(buf, me.x, me.topk_idx, me.topk_weights, me.num_experts)
    assert out.recv_x.dtype == torch.bfloat16
    # Within FP8 e4m3 precision (3 mantissa bits: relative error at most 2^-4 of the value, plus the group floor).
    err = (out.recv_x.float() - plain.recv_x.float()).abs()
    assert bool((err <= plain.recv_x.float().abs() / 16 + 1e-2).all())
    # Straight-through gradient: d(sum recv_x)/dx = number of ranks each token went to.
    out.recv_x.float().sum().backward()
    copies = out.handle.is_token_in_rank.sum(1, keepdim=True).float().expand_as(x)
    assert torch.equal(x.grad.float(), copies)


def test_fp8_dispatch_is_differentiable_straight_through() -> None:
    run_distributed(_check_fp8, 2)
