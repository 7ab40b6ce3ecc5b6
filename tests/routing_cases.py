"""Deterministic per-rank inputs and the single-process dense oracle the multi-process tests compare against.

Every rank can rebuild every other rank's inputs from ``(seed, rank)``, so a test computes, in one process and
plain PyTorch, exactly what each rank must receive.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("random", "one_rank", "zero_tokens", "duplicates", "imbalanced")


@dataclass
class Case:
    num_tokens: int
    hidden: int
    num_experts: int
    num_topk: int
    x: torch.Tensor  # [T, H] bf16
    topk_idx: torch.Tensor  # [T, K] int64
    topk_weights: torch.Tensor  # [T, K] float32


def make_case(kind: str, seed: int, rank: int, num_ranks: int, hidden: int = 128, num_experts: int = 0,
              num_topk: int = 4, dtype: torch.dtype = torch.bfloat16) -> Case:
    """Inputs of ``rank`` for routing ``kind`` (see KINDS)."""
    num_experts = num_experts or 4 * num_ranks
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    num_tokens = int(torch.randint(5, 40, (1,), generator=g))
    if kind == "zero_tokens" and rank == num_ranks - 1:
        num_tokens = 0
    x = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    scores = torch.rand(num_tokens, num_experts, generator=g)
    if kind == "one_rank":
        scores[:, num_experts // num_ranks:] = -1  # every token picks only rank 0's experts
    if kind == "imbalanced":
        scores *= torch.linspace(4.0, 0.1, num_experts)  # heavily skewed towards low expert ids
    k = min(num_topk, num_experts // num_ranks) if kind == "one_rank" else num_topk
    topk_idx = torch.topk(scores, k, dim=1).indices
    if k < num_topk:
        topk_idx = torch.cat([topk_idx, torch.full((num_tokens, num_topk - k), -1)], 1)
    drop = torch.rand(num_tokens, num_topk, generator=g) < 0.2
    topk_idx = torch.where(drop, torch.full_like(topk_idx, -1), topk_idx)
    if kind == "duplicates" and num_tokens and num_topk > 1:
        topk_idx[:, 1] = topk_idx[:, 0]  # the same expert twice in one row
    topk_weights = torch.rand(num_tokens, num_topk, generator=g)
    return Case(num_tokens, hidden, num_experts, num_topk, x, topk_idx.long().contiguous(), topk_weights)


def expected_dispatch(cases: list[Case], rank: int) -> dict:
    """What ``rank`` receives from ``cases`` (one per source rank): rows by source rank then token index."""
    num_ranks = len(cases)
    e_loc = cases[0].num_experts // num_ranks
    xs, idxs, ws, src_idx, counts = [], [], [], [], []
    per_expert = torch.zeros(e_loc, dtype=torch.long)
    for c in cases:
        valid = c.topk_idx >= 0
        mine = valid & (torch.div(c.topk_idx, e_loc, rounding_mode="floor") == rank)
        sel = mine.any(1)
        counts.append(int(sel.sum()))
        xs.append(c.x[sel])
        local = torch.where(mine, c.topk_idx - rank * e_loc, torch.full_like(c.topk_idx, -1))[sel]
        idxs.append(local)
        ws.append(torch.where(mine, c.topk_weights, torch.zeros_like(c.topk_weights))[sel])
        src_idx.append(torch.nonzero(sel).flatten())
        per_expert += torch.bincount(local[local >= 0], minlength=e_loc)
    return {"x": torch.cat(xs), "topk_idx": torch.cat(idxs), "topk_weights": torch.cat(ws),
            "src_idx": torch.cat(src_idx), "counts": counts, "per_expert": per_expert.tolist()}


def expected_combine(cases: list[Case], rank: int, rows_of: list[torch.Tensor]) -> torch.Tensor:
    """Sum over ranks j that received token t of ``rows_of[j][row of t on j]`` (FP32), for the tokens of ``rank``.

    ``rows_of[j]`` is the full ``[n_recv_j, H]`` tensor rank j sends back.
    """
    num_ranks = len(cases)
    e_loc = cases[0].num_experts // num_ranks
    me = cases[rank]
    acc = torch.zeros(me.num_tokens, rows_of[0].size(1) if rows_of else 0, dtype=torch.float32)
    for j in range(num_ranks):
        start = 0
        for src, c in enumerate(cases):
            mine = (c.topk_idx >= 0) & (torch.div(c.topk_idx, e_loc, rounding_mode="floor") == j)
            sel = torch.nonzero(mine.any(1)).flatten()
            if src == rank:
                acc.index_add_(0, sel, rows_of[j][start:start + sel.numel()].float())
            start += sel.numel()
    return acc
