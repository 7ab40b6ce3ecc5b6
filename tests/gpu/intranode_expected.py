"""Plain-PyTorch expectations for the intranode kernels (CPU, no communication).

Every rank regenerates every rank's inputs from the test's seed (``make_inputs``), so each rank can compute
what it must receive without any collective. Definitions follow ``deepep_plugin/backends/base.py`` and the
spec (sections 3.1-3.3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RankInputs:
    x: torch.Tensor  # [T, H] bf16 (CPU)
    topk_idx: torch.Tensor  # [T, K] int64, -1 = unused, may contain out-of-range ids
    topk_weights: torch.Tensor  # [T, K] float32


def num_tokens_of(rank: int, num_ranks: int, base_tokens: int) -> int:
    """Token count of ``rank``: imbalanced, and the last rank of a 3+ group has none."""
    if num_ranks >= 3 and rank == num_ranks - 1:
        return 0
    return base_tokens + 37 * rank


def make_inputs(seed: int, rank: int, num_ranks: int, base_tokens: int, hidden: int, num_experts: int,
                topk: int) -> RankInputs:
    """Random tokens and a skewed routing: rank 0's experts are picked more often, some slots are -1."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    T = num_tokens_of(rank, num_ranks, base_tokens)
    x = torch.randn(T, hidden, generator=g).to(torch.bfloat16)
    scores = torch.rand(T, num_experts, generator=g)
    scores[:, : num_experts // num_ranks] += 0.3  # imbalance towards rank 0
    topk_idx = scores.topk(topk, dim=1).indices.to(torch.int64)
    drop = torch.rand(T, topk, generator=g) < 0.15
    topk_idx[drop] = -1
    # A few tokens that go nowhere.
    if T > 4:
        topk_idx[1] = -1
    topk_weights = torch.rand(T, topk, generator=g).to(torch.float32)
    return RankInputs(x, topk_idx, topk_weights)


def layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int):
    """(num_tokens_per_rank [R], num_tokens_per_expert [E], is_token_in_rank [T, R]) as spec 3.1."""
    E_loc = num_experts // num_ranks
    valid = (topk_idx >= 0) & (topk_idx < num_experts)
    e = torch.where(valid, topk_idx, torch.zeros_like(topk_idx))
    per_expert = torch.zeros(num_experts, dtype=torch.int64)
    per_expert.scatter_add_(0, e[valid], torch.ones_like(e[valid]))
    in_rank = torch.zeros(topk_idx.size(0), num_ranks, dtype=torch.bool)
    for r in range(num_ranks):
        in_rank[:, r] = (valid & (e // E_loc == r)).any(dim=1)
    return in_rank.sum(0).to(torch.int32), per_expert.to(torch.int32), in_rank


def channel_bounds(T: int, C: int) -> list[tuple[int, int]]:
    per = (T + C - 1) // C
    return [(min(c * per, T), min(c * per + per, T)) for c in range(C)]


@dataclass
class Expected:
    recv_x: torch.Tensor
    recv_topk_idx: torch.Tensor
    recv_topk_weights: torch.Tensor
    per_expert: list[int]
    rank_prefix_matrix: torch.Tensor
    channel_prefix_matrix: torch.Tensor
    recv_channel_prefix_matrix: torch.Tensor
    recv_src_idx: torch.Tensor
    is_token_in_rank: torch.Tensor
    send_head: torch.Tensor
    recv_from: list[torch.Tensor]  # per source rank: source token indices received here, in order


def expected_dispatch(inputs: list[RankInputs], rank: int, num_experts: int, num_channels: int,
                      expert_alignment: int = 1) -> Expected:
    R = len(inputs)
    E_loc = num_experts // R
    C = num_channels
    lays = [layout(inp.topk_idx, num_experts, R) for inp in inputs]
    counts = torch.stack([lay[0] for lay in lays])  # [src, dst]
    rank_prefix = counts.cumsum(0).to(torch.int32)
    xs, idxs, ws, srcs, recv_from = [], [], [], [], []
    recv_cp = torch.zeros(R, C, dtype=torch.int32)
    for i, inp in enumerate(inputs):
        in_rank = lays[i][2]
        tok = torch.nonzero(in_rank[:, rank]).flatten()
        recv_from.append(tok)
        xs.append(inp.x[tok])
        ti = inp.topk_idx[tok]
        mine = (ti >= rank * E_loc) & (ti < (rank + 1) * E_loc)
        idxs.append(torch.where(mine, ti - rank * E_loc, torch.full_like(ti, -1)))
        ws.append(torch.where(mine, inp.topk_weights[tok], torch.zeros_like(inp.topk_weights[tok])))
        srcs.append(tok.to(torch.int32))
        acc = 0
        for c, (t0, t1) in enumerate(channel_bounds(inp.x.size(0), C)):
            recv_cp[i, c] = acc
            acc += int(in_rank[t0:t1, rank].sum())
    recv_topk_idx = torch.cat(idxs)
    per_expert = []
    for e in range(E_loc):
        n = int((recv_topk_idx == e).sum())
        per_expert.append((n + expert_alignment - 1) // expert_alignment * expert_alignment)
    own = inputs[rank]
    in_rank = lays[rank][2]
    T = own.x.size(0)
    cp = torch.zeros(R, C, dtype=torch.int32)
    send_head = torch.full((T, R), -1, dtype=torch.int32)
    for j in range(R):
        acc = 0
        for c, (t0, t1) in enumerate(channel_bounds(T, C)):
            sel = in_rank[t0:t1, j]
            pos = torch.cumsum(sel.to(torch.int32), 0) - 1
            send_head[t0:t1, j] = torch.where(sel, pos.to(torch.int32), torch.full_like(pos, -1, dtype=torch.int32))
            acc += int(sel.sum())
            cp[j, c] = acc
    return Expected(torch.cat(xs), recv_topk_idx, torch.cat(ws), per_expert, rank_prefix, cp, recv_cp,
                    torch.cat(srcs), in_rank, send_head, recv_from)


def expected_combine(ys: list[torch.Tensor], weights: list[torch.Tensor] | None,
                     recv_from_all: list[list[torch.Tensor]], rank: int, num_tokens: int, hidden: int,
                     bias: list[torch.Tensor]):
    """combined_x [T, H] float32 and combined weights [T, K] of ``rank``.

    ``ys[j]`` is rank j's combine input (its received rows); ``recv_from_all[j][i]`` the source token indices
    of the rows rank j received from rank i, in order.
    """
    out = torch.zeros(num_tokens, hidden, dtype=torch.float32)
    for b in bias:
        out += b.float()
    w_out = None
    if weights is not None:
        w_out = torch.zeros(num_tokens, weights[0].size(1), dtype=torch.float32)
    for j, y in enumerate(ys):
        start = sum(int(recv_from_all[j][i].numel()) for i in range(rank))
        tok = recv_from_all[j][rank]
        rows = torch.arange(start, start + tok.numel())
        out.index_add_(0, tok, y[rows].float())
        if weights is not None:
            w_out.index_add_(0, tok, weights[j][rows])
    return out, w_out
