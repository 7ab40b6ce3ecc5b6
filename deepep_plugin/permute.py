"""Group received tokens by local expert for the expert MLPs, and scatter the expert outputs back.

After ``dispatch`` each received row carries up to ``K`` local expert ids (``-1`` for experts elsewhere). The
experts want their rows contiguous (one block per local expert, optionally padded for grouped GEMMs);
``permute`` builds that and ``unpermute`` sums each expert row back into its received row. Both are plain,
differentiable PyTorch on any device.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .errors import expect


class Permutation(NamedTuple):
    x: torch.Tensor  # [M, H]: rows grouped by local expert, zero rows padding each block to the alignment
    tokens_per_expert: torch.Tensor  # [E_loc] int64 (padded block sizes), on x's device
    row_ids: torch.Tensor  # [M] int64: received row of each permuted row, -1 for padding
    probs: Optional[torch.Tensor]  # [M] float32: routing weight of each permuted row (0 for padding), or None


def worst_case_rows(num_rows: int, num_topk: int, num_local_experts: int, alignment: int = 1) -> int:
    """The most rows ``permute`` can produce from ``num_rows`` received rows of ``num_topk`` slots: every row in
    ``min(K, E_loc)`` local experts, every block padded to ``alignment``; a multiple of ``alignment``. A static
    ``num_out_rows`` for dispatches padded to ``num_worst_tokens``."""
    k = min(num_topk, num_local_experts)
    rows = num_rows * k + num_local_experts * (alignment - 1)
    return (rows + alignment - 1) // alignment * alignment


def permute(recv_x: torch.Tensor, recv_topk_idx: torch.Tensor, num_local_experts: int,
            recv_topk_weights: Optional[torch.Tensor] = None, alignment: int = 1,
            num_out_rows: Optional[int] = None) -> Permutation:
    """Rows of ``recv_x`` grouped by local expert (stable: received order inside an expert).

    Args:
        recv_x: ``[N, H]`` received tokens.
        recv_topk_idx: ``[N, K]`` int64 local expert ids, ``-1`` (or anything outside ``[0, E_loc)``) ignored.
        num_local_experts: ``E_loc``.
        recv_topk_weights: ``[N, K]`` float32 routing weights (optional; gives ``probs``).
        alignment: pad each expert's block with zero rows to a multiple of this.
        num_out_rows: ``M`` if known (e.g. the sum of dispatch's ``num_recv_tokens_per_expert_list``, or a fixed
            worst case for CUDA graphs): then every shape is static and nothing reads the device (no
            ``nonzero``), so the call can be captured in a CUDA graph. Rows past the padded blocks are padding;
            ``M`` must be at least the padded total (rows beyond ``M`` would be dropped, unchecked: checking would
            read the device).

    Returns:
        ``Permutation(x [M, H], tokens_per_expert [E_loc] int64, row_ids [M] int64, probs [M] float32 or None)``.
        A row selecting two local experts appears in both blocks. Without ``num_out_rows``, computing ``M`` reads
        the counts on the host.
    """
    expect(recv_x.dim() == 2, f"permute: recv_x must be 2-D [N, H], got shape {tuple(recv_x.shape)}")
    expect(recv_topk_idx.dim() == 2 and recv_topk_idx.size(0) == recv_x.size(0),
           f"permute: recv_topk_idx must be [N={recv_x.size(0)}, K], got shape {tuple(recv_topk_idx.shape)}")
    expect(alignment >= 1, f"permute: alignment must be >= 1, got {alignment}")
    if recv_topk_weights is not None:
        expect(recv_topk_weights.shape == recv_topk_idx.shape,
               f"permute: recv_topk_weights must have the shape of recv_topk_idx {tuple(recv_topk_idx.shape)}, "
               f"got {tuple(recv_topk_weights.shape)}")
    dev = recv_x.device
    idx = recv_topk_idx.long()
    if num_out_rows is not None:
        return _permute_static(recv_x, idx, num_local_experts, recv_topk_weights, alignment, num_out_rows)
    valid = (idx >= 0) & (idx < num_local_experts)
    rows, slots = torch.nonzero(valid, as_tuple=True)
    experts = idx[rows, slots]
    order = torch.argsort(experts * max(recv_x.size(0), 1) + rows, stable=True)
    rows, slots, experts = rows[order], slots[order], experts[order]
    counts = torch.bincount(experts, minlength=num_local_experts)
    padded = (counts + alignment - 1) // alignment * alignment
    start = torch.cumsum(counts, 0) - counts
    padded_start = torch.cumsum(padded, 0) - padded
    dest = padded_start[experts] + torch.arange(rows.numel(), device=dev) - start[experts]
    total = int(padded.sum()) if num_out_rows is None else num_out_rows
    row_ids = torch.full((total,), -1, dtype=torch.long, device=dev)
    row_ids[dest] = rows
    x = recv_x.new_zeros(total, recv_x.size(1)).index_copy(0, dest, recv_x.index_select(0, rows))
    probs = None
    if recv_topk_weights is not None:
        probs = recv_topk_weights.new_zeros(total).index_copy(0, dest, recv_topk_weights[rows, slots])
    return Permutation(x, padded, row_ids, probs)


def _permute_static(recv_x: torch.Tensor, idx: torch.Tensor, num_local_experts: int,
                    recv_topk_weights: Optional[torch.Tensor], alignment: int, num_out_rows: int) -> Permutation:
    """``permute`` with ``M`` given, in static shapes: every (row, slot) entry is sorted, the unused ones last, and
    sent to a dump row ``M`` that is cut off. Gives exactly what the dynamic path gives."""
    n, k = idx.shape
    e, m, dev = num_local_experts, num_out_rows, recv_x.device
    flat = idx.reshape(-1)
    valid = (flat >= 0) & (flat < e)
    key = torch.where(valid, flat, torch.full_like(flat, e))  # unused entries sort after every expert
    pos = torch.arange(n * k, device=dev)
    rows_all = torch.div(pos, max(k, 1), rounding_mode="floor")
    order = torch.argsort(key * max(n, 1) + rows_all, stable=True)  # the dynamic path's order, entries row-major
    experts, rows = key[order], rows_all[order]
    counts = torch.zeros(e + 1, dtype=torch.long, device=dev).scatter_add_(0, key, torch.ones_like(key))[:e]
    padded = (counts + alignment - 1) // alignment * alignment
    start = torch.cumsum(counts, 0) - counts
    padded_start = torch.cumsum(padded, 0) - padded
    expert = experts.clamp(max=max(e - 1, 0))
    dest = padded_start[expert] + pos - start[expert]
    dest = torch.where((experts < e) & (dest < m), dest, torch.full_like(dest, m))
    row_ids = torch.full((m + 1,), -1, dtype=torch.long, device=dev).scatter_(0, dest, rows)[:m]
    x = recv_x.new_zeros(m + 1, recv_x.size(1)).index_copy(0, dest, recv_x.index_select(0, rows))[:m]
    probs = None
    if recv_topk_weights is not None:
        w = recv_topk_weights.reshape(-1)[order]
        probs = recv_topk_weights.new_zeros(m + 1).index_copy(0, dest, w)[:m]
    return Permutation(x, padded, row_ids, probs)


def unpermute(y: torch.Tensor, perm: Permutation, num_rows: int) -> torch.Tensor:
    """Sum expert rows back into received rows: ``[M, H]`` -> ``[num_rows, H]`` (FP32 sums, y's dtype).

    Padding rows are dropped. Weighting by the routing probabilities is the caller's (multiply ``y`` by
    ``perm.probs[:, None]`` first), as Megatron's experts do.
    """
    expect(y.dim() == 2 and y.size(0) == perm.row_ids.numel(),
           f"unpermute: y must be [{perm.row_ids.numel()}, H], got shape {tuple(y.shape)}")
    # Padding rows go to a dump row that is cut off: static shapes, no device read, and the real rows are summed
    # in the same order as before.
    target = torch.where(perm.row_ids >= 0, perm.row_ids, torch.full_like(perm.row_ids, num_rows))
    out = torch.zeros(num_rows + 1, y.size(1), dtype=torch.float32, device=y.device)
    out = out.index_add(0, target, y.float())[:num_rows]
    return out.to(y.dtype)
