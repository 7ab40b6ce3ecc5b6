"""Who sends what where: the dispatch layout and the handle, as pure functions of the routing.

Everything here is plain PyTorch on any device; the reference backend uses it directly and the CUDA backend's
kernels must produce the same tensors (tests compare them element by element).

Notation: ``R`` ranks, ``G`` ranks per node, ``N = R / G`` nodes, ``E`` experts, ``E_loc = E / R`` experts per rank
(expert ``e`` lives on rank ``e // E_loc``), ``T`` tokens on this rank, ``K`` top-k, ``C`` channels.
"""

from __future__ import annotations

from typing import Optional

import torch

from .backends.base import DispatchLayout


def expert_rank(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> torch.Tensor:
    """Rank owning each selected expert: ``[T, K]`` int64, ``num_ranks`` (one past the last) where no selection.

    An entry outside ``[0, num_experts)`` (``-1`` is the usual one) selects nothing.
    """
    valid = (topk_idx >= 0) & (topk_idx < num_experts)
    ranks = torch.div(topk_idx.clamp(min=0), num_experts // num_ranks, rounding_mode="floor")
    return torch.where(valid, ranks, torch.full_like(ranks, num_ranks))


def get_dispatch_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int,
                        num_ranks_per_node: Optional[int] = None) -> DispatchLayout:
    """Counts and membership of a routing (DeepEP's ``get_dispatch_layout``, exact semantics).

    Args:
        topk_idx: ``[T, K]`` integer, any device; entries outside ``[0, num_experts)`` select nothing.
        num_experts: ``E``, a multiple of ``num_ranks``.
        num_ranks: ``R``.
        num_ranks_per_node: ``G``; ``num_tokens_per_rdma_rank`` is computed only when ``R > G``.

    Returns:
        ``DispatchLayout(num_tokens_per_rank [R] int32, num_tokens_per_rdma_rank [N] int32 or None,
        num_tokens_per_expert [E] int32, is_token_in_rank [T, R] bool)``, all on ``topk_idx.device``.
        A token selecting two experts of one rank counts once for that rank and twice for the experts.
        Device-side ops only: no host sync on a GPU, so it can be captured in a CUDA graph.
    """
    num_tokens = topk_idx.size(0)
    idx = topk_idx.long()
    valid = (idx >= 0) & (idx < num_experts)
    # Invalid entries count in an extra bin that is dropped (a boolean index or bincount would sync with the host).
    binned = torch.where(valid, idx, torch.full_like(idx, num_experts)).flatten()
    per_expert = torch.zeros(num_experts + 1, dtype=torch.int32, device=idx.device)
    per_expert.scatter_add_(0, binned, torch.ones_like(binned, dtype=torch.int32))
    num_tokens_per_expert = per_expert[:num_experts].contiguous()
    ranks = expert_rank(idx, num_experts, num_ranks)
    member = torch.zeros(num_tokens, num_ranks + 1, dtype=torch.bool, device=idx.device)
    member.scatter_(1, ranks, True)
    is_token_in_rank = member[:, :num_ranks].contiguous()
    num_tokens_per_rank = is_token_in_rank.sum(0, dtype=torch.int32)
    num_tokens_per_rdma_rank = None
    if num_ranks_per_node is not None and num_ranks > num_ranks_per_node:
        in_node = is_token_in_rank.view(num_tokens, num_ranks // num_ranks_per_node, num_ranks_per_node).any(-1)
        num_tokens_per_rdma_rank = in_node.sum(0, dtype=torch.int32)
    return DispatchLayout(num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank)


def channel_of_tokens(num_tokens: int, num_channels: int, device: torch.device) -> torch.Tensor:
    """Channel of each token: ``[T]`` int64, tokens split into ``C`` contiguous ranges of ``ceil(T / C)``."""
    per_channel = max((num_tokens + num_channels - 1) // num_channels, 1)
    return torch.div(torch.arange(num_tokens, device=device), per_channel, rounding_mode="floor")


def channel_counts(mask: torch.Tensor, num_channels: int) -> torch.Tensor:
    """``[D, C]`` int32: per destination column ``d`` of ``mask [T, D]`` and channel ``c``, the tokens selected."""
    num_tokens, num_dst = mask.shape
    channel = channel_of_tokens(num_tokens, num_channels, mask.device)
    counts = torch.zeros(num_channels, num_dst, dtype=torch.int64, device=mask.device)
    counts.index_add_(0, channel, mask.long())
    return counts.t().to(torch.int32).contiguous()


def stream_slots(mask: torch.Tensor, num_channels: int) -> torch.Tensor:
    """``[T, D]`` int32: for each selected ``(t, d)`` the number of earlier tokens of t's channel selecting ``d``,
    ``-1`` where ``mask[t, d]`` is false (DeepEP's ``send_head``)."""
    num_tokens = mask.size(0)
    m = mask.long()
    exclusive = torch.cumsum(m, 0) - m
    channel = channel_of_tokens(num_tokens, num_channels, mask.device)
    per_channel = max((num_tokens + num_channels - 1) // num_channels, 1)
    start = (channel * per_channel).clamp(max=max(num_tokens - 1, 0))
    slots = exclusive - exclusive[start]
    return torch.where(mask, slots, torch.full_like(slots, -1)).to(torch.int32)


def index_among_selected(mask: torch.Tensor) -> torch.Tensor:
    """``[T, D]`` int32: for each selected ``(t, d)`` of ``mask [T, D]``, the number of earlier tokens selecting ``d``
    (over all tokens, not per channel); ``-1`` where ``mask[t, d]`` is false. Contiguous."""
    m = mask.int()
    exclusive = torch.cumsum(m, 0, dtype=torch.int32) - m
    return torch.where(mask, exclusive, torch.full_like(exclusive, -1)).contiguous()


def round_up_counts(counts: list[int], alignment: int) -> list[int]:
    """Each count rounded up to a multiple of ``alignment``."""
    return [(c + alignment - 1) // alignment * alignment for c in counts]
