"""Dispatch and combine as differentiable operations.

* ``dispatch``'s backward is a combine of the gradients (summing the copies a token sent to several ranks), which
  also returns the gradient of the top-k weights;
* ``combine``'s backward is a cached dispatch of the gradient (the handle holds the layout: no layout work and
  no host sync in the backward pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch

from . import fp8 as fp8_mod
from .backends.base import handle_num_channels, handle_recv_count
from .buffer import Buffer
from .config import Config, dispatch_config


class DispatchOutput(NamedTuple):
    recv_x: torch.Tensor  # [n_recv, H], x.dtype (dequantised when fp8)
    recv_topk_idx: torch.Tensor  # [n_recv, K] int64 local expert ids or -1
    recv_topk_weights: torch.Tensor  # [n_recv, K] float32, differentiable
    num_recv_tokens_per_expert_list: list  # [E_loc] ints ([] with num_worst_tokens)
    handle: Any  # for combine / cached dispatch


@dataclass
class _State:
    handle: Any = None
    counts: Optional[list] = None
    num_recv: int = 0


def _handle_config(handle: Any, num_ranks: int) -> Config:
    """A dispatch config whose channel count matches ``handle`` (cached dispatch requires it)."""
    return dispatch_config(num_ranks, 2 * handle_num_channels(handle))


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, topk_weights: torch.Tensor, buffer: Buffer, topk_idx: torch.Tensor,
                num_experts: int, fp8: bool, round_scale: bool, use_ue8m0: bool, expert_alignment: int,
                num_worst_tokens: int, config: Optional[Config], state: _State) -> Any:
        num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = \
            buffer.get_dispatch_layout(topk_idx.contiguous(), num_experts)
        payload: Any = x.contiguous()
        if fp8:
            payload = fp8_mod.per_token_cast_to_fp8(payload, round_scale=round_scale, use_ue8m0=use_ue8m0)
        recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
            payload, None, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert,
            topk_idx.contiguous(), topk_weights.float().contiguous(), expert_alignment=expert_alignment,
            num_worst_tokens=num_worst_tokens, config=config)
        if fp8:
            recv_x = fp8_mod.per_token_cast_back(recv_x[0], recv_x[1], dtype=x.dtype)
        state.handle, state.counts, state.num_recv = handle, counts, handle_recv_count(handle)
        ctx.buffer, ctx.handle, ctx.x_dtype, ctx.w_dtype = buffer, handle, x.dtype, topk_weights.dtype
        ctx.save_for_backward(recv_idx)
        ctx.mark_non_differentiable(recv_idx)
        return recv_x, recv_idx, recv_w

    @staticmethod
    def backward(ctx: Any, grad_recv_x: Optional[torch.Tensor], _grad_idx: Any,
                 grad_recv_w: Optional[torch.Tensor]) -> Any:
        (recv_idx,) = ctx.saved_tensors
        n = handle_recv_count(ctx.handle)
        hidden = grad_recv_x.size(1) if grad_recv_x is not None else 0
        if grad_recv_x is None:
            grad_recv_x = torch.zeros(recv_idx.size(0), hidden, dtype=ctx.x_dtype, device=recv_idx.device)
        grad_w = None
        if grad_recv_w is not None:
            # Only the copy on the rank owning expert k carries weight k: the others are constant zeros.
            grad_w = torch.where(recv_idx[:n] >= 0, grad_recv_w[:n].float(), torch.zeros_like(grad_recv_w[:n]))
            grad_w = grad_w.contiguous()
        grad_x, grad_topk_w, _ = ctx.buffer.combine(grad_recv_x[:n].to(ctx.x_dtype).contiguous(), ctx.handle,
                                                   topk_weights=grad_w)
        if grad_topk_w is not None:
            grad_topk_w = grad_topk_w.to(ctx.w_dtype)
        return grad_x, grad_topk_w, None, None, None, None, None, None, None, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, buffer: Buffer, handle: Any, config: Optional[Config]) -> torch.Tensor:
        combined, _, _ = buffer.combine(x.contiguous(), handle, config=config)
        ctx.buffer, ctx.handle, ctx.rows = buffer, handle, x.size(0)
        return combined

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        buffer, handle = ctx.buffer, ctx.handle
        recv, *_ = buffer.dispatch(grad.contiguous(), handle=handle,
                                   config=_handle_config(handle, buffer.group_size))
        if recv.size(0) < ctx.rows:  # num_worst_tokens padding rows get no gradient
            recv = torch.cat([recv, recv.new_zeros(ctx.rows - recv.size(0), recv.size(1))])
        return recv, None, None, None


def dispatch(buffer: Buffer, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
             *, fp8: bool = False, round_scale: bool = False, use_ue8m0: bool = False, expert_alignment: int = 1,
             num_worst_tokens: int = 0, config: Optional[Config] = None) -> DispatchOutput:
    """Differentiable dispatch (layout computed here).

    Args:
        buffer: the EP group's ``Buffer``.
        x: ``[T, H]`` floating point (BF16 for the CUDA kernels); differentiable.
        topk_idx: ``[T, K]`` int64 global expert ids, ``-1`` for unused slots.
        topk_weights: ``[T, K]`` floating point; differentiable.
        num_experts: ``E``.
        fp8: cast to FP8 (per token, per 128 channels) once before sending; ``recv_x`` comes back dequantised to
            ``x.dtype`` and the gradient passes straight through the cast.
        round_scale, use_ue8m0: FP8 scale options (see ``deepep_plugin.fp8``).
        expert_alignment, num_worst_tokens, config: as ``Buffer.dispatch``.

    Returns:
        ``DispatchOutput(recv_x [n_recv, H], recv_topk_idx [n_recv, K] int64, recv_topk_weights [n_recv, K]
        float32, num_recv_tokens_per_expert_list, handle)``; the backward pass combines the gradients of
        ``recv_x`` and ``recv_topk_weights`` back to ``x`` and ``topk_weights``.
    """
    state = _State()
    recv_x, recv_idx, recv_w = _Dispatch.apply(x, topk_weights, buffer, topk_idx, num_experts, fp8, round_scale,
                                               use_ue8m0, expert_alignment, num_worst_tokens, config, state)
    return DispatchOutput(recv_x, recv_idx, recv_w, state.counts, state.handle)


def combine(buffer: Buffer, x: torch.Tensor, handle: Any, *, config: Optional[Config] = None) -> torch.Tensor:
    """Differentiable combine: ``[n_recv, H]`` expert outputs -> ``[T, H]`` unweighted sums of the copies.

    The backward pass is a cached dispatch of the gradient with ``handle``.
    """
    return _Combine.apply(x, buffer, handle, config)
