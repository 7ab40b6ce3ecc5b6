"""Plain-PyTorch expectations for the low-latency kernels (CPU, no communication).

Every rank regenerates every rank's inputs from the test's seed (``make_inputs``), so each rank computes what it
must receive on its own. Semantics: spec section 3.5 and deepep_plugin/backends/base.py, with the receive layout
the kernels promise (per local expert: source ranks in order, each source's tokens in increasing index; a token
listing an expert twice is received once by it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deepep_plugin import fp8


@dataclass
class RankInputs:
    x: torch.Tensor  # [T, H] bf16
    topk_idx: torch.Tensor  # [T, K] int64, -1 = unused
    topk_weights: torch.Tensor  # [T, K] float32


def make_inputs(seed: int, rank: int, num_ranks: int, num_tokens: int, hidden: int, num_experts: int, topk: int,
                pattern: str = "random") -> RankInputs:
    """Random tokens (row magnitudes over four decades) and a routing chosen by ``pattern``.

    ``random``: distinct experts, skewed towards rank 0's experts, ~15% of the slots ``-1``, one token with no
    expert at all, and (when there are enough experts) token 0 selecting two experts of one rank.
    ``one_rank``: every token selects only experts of rank 0 (the other ranks receive nothing).
    ``duplicates``: like ``random`` but every token lists its first expert twice.
    """
    g = torch.Generator().manual_seed(seed * 7919 + rank)
    x = torch.randn(num_tokens, hidden, generator=g) * torch.pow(10.0, torch.rand(num_tokens, 1, generator=g) * 4 - 2)
    x = x.to(torch.bfloat16)
    e_loc = num_experts // num_ranks
    scores = torch.rand(num_tokens, num_experts, generator=g)
    if pattern == "one_rank":
        scores[:, e_loc:] = -1.0
    else:
        scores[:, :e_loc] += 0.3
    topk_idx = scores.topk(topk, dim=1).indices.to(torch.int64)
    if pattern == "one_rank":
        topk_idx[scores.gather(1, topk_idx) < 0] = -1
    else:
        topk_idx[torch.rand(num_tokens, topk, generator=g) < 0.15] = -1
        if num_tokens > 1:
            topk_idx[num_tokens - 1] = -1
        if pattern == "duplicates" and topk >= 2:
            topk_idx[:, 1] = topk_idx[:, 0]
    weights = torch.rand(num_tokens, topk, generator=g).to(torch.float32)
    return RankInputs(x, topk_idx, weights)


def distinct_mask(topk_idx: torch.Tensor) -> torch.Tensor:
    """``[T, K]`` bool: slot k holds the first occurrence of a valid expert in its row."""
    valid = topk_idx >= 0
    first = valid.clone()
    for k in range(1, topk_idx.size(1)):
        first[:, k] &= ~((topk_idx[:, :k] == topk_idx[:, k:k + 1]) & valid[:, :k]).any(1)
    return first


@dataclass
class ExpectedDispatch:
    rows: list  # per local expert: list of (source rank, source token)
    layout_range: torch.Tensor  # [E_loc, R] int64
    recv_count: torch.Tensor  # [E_loc] int32


def expected_layout(rank: int, inputs: list, num_experts: int) -> ExpectedDispatch:
    num_ranks = len(inputs)
    e_loc = num_experts // num_ranks
    rows: list = [[] for _ in range(e_loc)]
    layout_range = torch.zeros(e_loc, num_ranks, dtype=torch.int64)
    for i in range(e_loc):
        e = rank * e_loc + i
        for j, inp in enumerate(inputs):
            first = distinct_mask(inp.topk_idx)
            tokens = ((inp.topk_idx == e) & first).any(1).nonzero().flatten().tolist()
            layout_range[i, j] = (len(rows[i]) << 32) | len(tokens)
            rows[i].extend((j, t) for t in tokens)
    recv_count = torch.tensor([len(r) for r in rows], dtype=torch.int32)
    return ExpectedDispatch(rows, layout_range, recv_count)


def expected_payload(inputs: list, rows: list, use_fp8: bool, round_scale: bool, use_ue8m0: bool):
    """The rows a local expert must receive: bf16 ``[n, H]``, or ``(fp8 [n, H], scales [n, S'])``."""
    hidden = inputs[0].x.size(1)
    if not rows:
        data = torch.empty(0, hidden, dtype=torch.bfloat16)
    else:
        data = torch.stack([inputs[j].x[t] for j, t in rows])
    if not use_fp8:
        return data, None
    return fp8.per_token_cast_to_fp8(data, round_scale=round_scale, use_ue8m0=use_ue8m0)


def expert_output(x_rows: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """A stand-in expert: ``bf16(x * (1 + e / 64) - e / 256)`` per row, ``experts`` the global expert ids."""
    e = experts.to(torch.float32).unsqueeze(1)
    return (x_rows.float() * (1.0 + e / 64.0) - e / 256.0).to(torch.bfloat16)


def expected_combine(inp: RankInputs) -> torch.Tensor:
    """``bf16(sum_k w[t, k] * expert_output(x[t], topk_idx[t, k]))``: FP32, k in order, ``-1`` skipped."""
    num_tokens, hidden = inp.x.shape
    acc = torch.zeros(num_tokens, hidden, dtype=torch.float32)
    for k in range(inp.topk_idx.size(1)):
        e = inp.topk_idx[:, k]
        valid = e >= 0
        y = expert_output(inp.x, e.clamp(min=0))
        contrib = y.float() * inp.topk_weights[:, k:k + 1]
        acc = acc + torch.where(valid[:, None], contrib, torch.zeros_like(contrib))
    return acc.to(torch.bfloat16)
