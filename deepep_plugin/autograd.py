"""Dispatch and combine as differentiable operations.

* ``dispatch``'s backward is a combine of the gradients (summing the copies a token sent to several ranks), which
  also returns the gradient of the top-k weights;
* ``combine``'s backward is a cached dispatch of the gradient (the handle holds the layout: no layout work and
  no host sync in the backward pass).

Under ``torch.compile`` both are ``torch.library`` custom ops (``deepep_plugin::dispatch``,
``deepep_plugin::combine`` and, for combine's backward, ``deepep_plugin::cached_dispatch``) with fake
implementations and registered autograd, so the compiler keeps them in its graphs as opaque calls: the
``Buffer``'s Python checks and host reads run inside the real implementations, which the compiler never traces.
A custom op takes only tensors and plain values, so the wrappers below pass the ``Buffer`` as a registry key, a
``Config`` as its five ints and a handle as the list of its tensors, and rebuild the handle's ``NamedTuple`` from
the op's outputs. Eager calls run the same op bodies and backward math through a ``torch.autograd.Function``
instead, without the custom-op dispatch's host cost; ``tests/test_compile.py`` checks that both give the same bits.

With ``num_worst_tokens`` every output shape is static and a step calling both compiles with ``fullgraph=True``.
Without it the number of received rows depends on the routing: the compiler stops its graph at the dispatch (one
graph break), runs it eagerly and resumes after it.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch

from . import fp8 as fp8_mod
from .backends.base import InternodeHandle, IntranodeHandle, handle_num_channels
from .buffer import Buffer, buffer_of_key
from .config import Config, dispatch_config
from .errors import DeepEPError, DeepEPInputError


class DispatchOutput(NamedTuple):
    recv_x: torch.Tensor  # [n_recv, H], x.dtype (dequantised when fp8)
    recv_topk_idx: torch.Tensor  # [n_recv, K] int64 local expert ids or -1
    recv_topk_weights: torch.Tensor  # [n_recv, K] float32, differentiable
    num_recv_tokens_per_expert_list: list  # [E_loc] ints ([] with num_worst_tokens)
    handle: Any  # for combine / cached dispatch


# ----------------------------------------------------------------------------------------------------------
# What a custom op cannot take as-is: the Buffer (a registry key), a Config (its fields), a handle (its tensors)
# ----------------------------------------------------------------------------------------------------------
def _buffer_key(buffer: Buffer) -> int:
    """The int a custom op carries for ``buffer``: fixed at the Buffer's construction, so reading it under the
    compiler is a plain attribute read (guarded: a graph is never reused with another Buffer)."""
    if not isinstance(buffer, Buffer):
        raise DeepEPInputError(f"buffer must be a deepep_plugin.Buffer, got {type(buffer).__name__}")
    return buffer._op_key


def _buffer(key: int) -> Buffer:
    buffer = buffer_of_key(key)
    if buffer is None:
        raise DeepEPError("deepep_plugin.autograd: the Buffer this call was made with has been garbage collected")
    return buffer


def _config_fields(config: Optional[Config], what: str) -> list[int]:
    """A ``Config`` as the ints that rebuild it (``Config`` rounds only on the way in, so they round-trip);
    ``[]`` for the Buffer's default."""
    if config is None:
        return []
    if not isinstance(config, Config):
        raise DeepEPInputError(f"{what}: config must be a deepep_plugin.Config, got {type(config)}")
    return [config.num_sms, config.num_max_nvl_chunked_send_tokens, config.num_max_nvl_chunked_recv_tokens,
            config.num_max_rdma_chunked_send_tokens, config.num_max_rdma_chunked_recv_tokens]


def _config(fields: list[int]) -> Optional[Config]:
    return Config(*fields) if fields else None


_INTRANODE_LEN = len(IntranodeHandle._fields)
# Where is_token_in_rank ([T, R]) and the received-rows tensor (recv_src_idx / recv_src_meta) sit in each handle.
_IN_RANK = {len(IntranodeHandle._fields): IntranodeHandle._fields.index("is_token_in_rank"),
            len(InternodeHandle._fields): InternodeHandle._fields.index("is_token_in_rank")}
_RECV_ROWS = {len(IntranodeHandle._fields): IntranodeHandle._fields.index("recv_src_idx"),
              len(InternodeHandle._fields): InternodeHandle._fields.index("recv_src_meta")}


def _handle_tensors(handle: Any, what: str) -> list[torch.Tensor]:
    if not isinstance(handle, (IntranodeHandle, InternodeHandle)):
        raise DeepEPInputError(f"{what}: handle must be the handle a dispatch returned, passed on unchanged "
                               f"(an IntranodeHandle or InternodeHandle), got {type(handle).__name__}")
    return list(handle)


def _handle(tensors: list[torch.Tensor]) -> Any:
    return IntranodeHandle(*tensors) if len(tensors) == _INTRANODE_LEN else InternodeHandle(*tensors)


def _no_grads(inputs: tuple) -> list:
    """The gradient of each op input, all None, in the structure ``register_autograd`` checks: a list that could
    hold tensors (a handle, or an empty config) gets a list of Nones of its length."""
    return [[None] * len(a) if isinstance(a, list) and all(isinstance(v, torch.Tensor) for v in a) else None
            for a in inputs]


def _handle_config(handle: Any, num_ranks: int) -> Config:
    """A dispatch config whose channel count matches ``handle`` (cached dispatch requires it)."""
    return dispatch_config(num_ranks, 2 * handle_num_channels(handle))


# ----------------------------------------------------------------------------------------------------------
# deepep_plugin::dispatch: layout + fresh dispatch (+ FP8 cast)
# ----------------------------------------------------------------------------------------------------------
def _dispatch_impl(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, buffer: int, num_experts: int,
                 fp8: bool, round_scale: bool, use_ue8m0: bool, expert_alignment: int, num_worst_tokens: int,
                 config: list[int], num_sms: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """-> (recv_x, recv_topk_idx, recv_topk_weights, per-expert counts [E_loc] int64 on the CPU ([0] with
    num_worst_tokens), handle tensors). ``num_sms``: the SM count of the call (fixes the handle's channels)."""
    buf = _buffer(buffer)
    topk_idx = topk_idx.contiguous()
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = \
        buf.get_dispatch_layout(topk_idx, num_experts)
    payload: Any = x.contiguous()
    if fp8:
        payload = fp8_mod.per_token_cast_to_fp8(payload, round_scale=round_scale, use_ue8m0=use_ue8m0)
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
        payload, None, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert,
        topk_idx, topk_weights.float().contiguous(), expert_alignment=expert_alignment,
        num_worst_tokens=num_worst_tokens, config=_config(config))
    if fp8:
        recv_x = fp8_mod.per_token_cast_back(recv_x[0], recv_x[1], dtype=x.dtype)
    return recv_x, recv_idx, recv_w, torch.tensor(counts, dtype=torch.int64, device="cpu"), list(handle)


_dispatch_op = torch.library.custom_op("deepep_plugin::dispatch", mutates_args=())(_dispatch_impl)


@_dispatch_op.register_fake
def _dispatch_fake(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, buffer: int,
                   num_experts: int, fp8: bool, round_scale: bool, use_ue8m0: bool, expert_alignment: int,
                   num_worst_tokens: int, config: list[int], num_sms: int) -> Any:
    buf = _buffer(buffer)
    r, g = buf.group_size, buf.num_ranks_per_node
    num_tokens, hidden = x.shape
    c = (config[0] if config else num_sms) // 2
    dev = x.device
    if num_worst_tokens:  # every size is fixed: rows padded to W, forwarders hold at most G * W records
        rows, rdma_rows, num_counts = num_worst_tokens, g * num_worst_tokens, 0
    else:  # the received rows (and a forwarder's records) are counts only the exchange knows
        ctx = torch.library.get_ctx()
        rows, rdma_rows, num_counts = ctx.new_dynamic_size(), None, num_experts // r
        if g != r:
            rdma_rows = ctx.new_dynamic_size()

    def i32(*shape: Any) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.int32, device=dev)

    in_rank = torch.empty(num_tokens, r, dtype=torch.bool, device=dev)
    if g == r:
        handle = [i32(r, r), i32(r, c), i32(r, c), i32(rows), in_rank, i32(num_tokens, r)]
    else:
        n = r // g
        handle = [in_rank, i32(n, c), i32(r, c), i32(n, c), i32(n), i32(r, c), i32(r),
                  torch.empty(rows, 8, dtype=torch.uint8, device=dev), i32(num_tokens, n), i32(rdma_rows, g)]
    k = topk_idx.size(1)
    counts = torch.empty(num_counts, dtype=torch.int64, device="cpu")
    return (x.new_empty(rows, hidden), torch.empty(rows, k, dtype=torch.int64, device=dev),
            torch.empty(rows, k, dtype=torch.float32, device=dev), counts, handle)


def _dispatch_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, _, topk_weights, buffer = inputs[:4]
    _, recv_idx, _, _, handle = output
    ctx.save_for_backward(recv_idx, *handle)
    ctx.buffer, ctx.hidden, ctx.x_dtype, ctx.w_dtype = buffer, x.size(1), x.dtype, topk_weights.dtype
    ctx.no_grads = _no_grads(inputs)


def _dispatch_backward(ctx: Any, grad_recv_x: Optional[torch.Tensor], _grad_idx: Any,
                       grad_recv_w: Optional[torch.Tensor], _grad_counts: Any, _grad_handle: Any) -> tuple:
    recv_idx, *handle = ctx.saved_tensors
    grad_x, grad_topk_w = _dispatch_grads(ctx, recv_idx, handle, grad_recv_x, grad_recv_w,
                                          torch.ops.deepep_plugin.combine)
    grads = list(ctx.no_grads)
    grads[0], grads[2] = grad_x, grad_topk_w
    return tuple(grads)


def _dispatch_grads(ctx: Any, recv_idx: torch.Tensor, handle: list[torch.Tensor], grad_recv_x: Optional[torch.Tensor],
                    grad_recv_w: Optional[torch.Tensor], combine_fn: Any) -> tuple:
    """(grad of x, grad of topk_weights or None): a combine of the received rows' gradients (eager and compiled
    alike; ``combine_fn`` is the combine op or its body)."""
    n = handle[_RECV_ROWS[len(handle)]].size(0)  # rows received, or num_worst_tokens
    if grad_recv_x is None:
        grad_recv_x = torch.zeros(recv_idx.size(0), ctx.hidden, dtype=ctx.x_dtype, device=recv_idx.device)
    grad_w = None
    if grad_recv_w is not None:
        # Only the copy on the rank owning expert k carries weight k: the others are constant zeros.
        grad_w = torch.where(recv_idx[:n] >= 0, grad_recv_w[:n].float(), torch.zeros_like(grad_recv_w[:n]))
    grad_x, grad_topk_w = combine_fn(grad_recv_x[:n].to(ctx.x_dtype), grad_w, handle, ctx.buffer, [])
    return grad_x, grad_topk_w.to(ctx.w_dtype) if grad_w is not None else None


_dispatch_op.register_autograd(_dispatch_backward, setup_context=_dispatch_setup)


# ----------------------------------------------------------------------------------------------------------
# deepep_plugin::combine (optionally with top-k weights: dispatch's backward) and its backward, a cached dispatch
# ----------------------------------------------------------------------------------------------------------
def _combine_impl(x: torch.Tensor, topk_weights: Optional[torch.Tensor], handle: list[torch.Tensor], buffer: int,
                config: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (combined_x [T, H], combined_topk_weights [T, K] float32, or an empty tensor without weights)."""
    weights = topk_weights.contiguous() if topk_weights is not None else None
    combined, combined_w, _ = _buffer(buffer).combine(x.contiguous(), _handle(handle), topk_weights=weights,
                                                      config=_config(config))
    return combined, combined_w if combined_w is not None else x.new_empty(0)


_combine_op = torch.library.custom_op("deepep_plugin::combine", mutates_args=())(_combine_impl)


@_combine_op.register_fake
def _combine_fake(x: torch.Tensor, topk_weights: Optional[torch.Tensor], handle: list[torch.Tensor], buffer: int,
                  config: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens = handle[_IN_RANK[len(handle)]].size(0)
    weights = x.new_empty(0) if topk_weights is None else \
        torch.empty(num_tokens, topk_weights.size(1), dtype=torch.float32, device=x.device)
    return x.new_empty(num_tokens, x.size(1)), weights


def _combine_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, _, handle, buffer, _ = inputs
    ctx.save_for_backward(*handle)
    ctx.buffer, ctx.rows, ctx.no_grads = buffer, x.size(0), _no_grads(inputs)


def _combine_backward(ctx: Any, grad: Optional[torch.Tensor], _grad_w: Any) -> tuple:
    grads = list(ctx.no_grads)
    if grad is not None:
        grads[0] = torch.ops.deepep_plugin.cached_dispatch(grad, list(ctx.saved_tensors), ctx.buffer, ctx.rows)
    return tuple(grads)


_combine_op.register_autograd(_combine_backward, setup_context=_combine_setup)


def _cached_dispatch_impl(x: torch.Tensor, handle: list[torch.Tensor], buffer: int, rows: int) -> torch.Tensor:
    """Dispatch ``x`` with ``handle``'s layout, zero-padded to ``rows`` (num_worst_tokens padding gets none)."""
    buf = _buffer(buffer)
    h = _handle(handle)
    recv, *_ = buf.dispatch(x.contiguous(), handle=h, config=_handle_config(h, buf.group_size))
    if recv.size(0) < rows:
        recv = torch.cat([recv, recv.new_zeros(rows - recv.size(0), recv.size(1))])
    return recv


_cached_dispatch_op = torch.library.custom_op("deepep_plugin::cached_dispatch", mutates_args=())(_cached_dispatch_impl)


@_cached_dispatch_op.register_fake
def _cached_dispatch_fake(x: torch.Tensor, handle: list[torch.Tensor], buffer: int, rows: int) -> torch.Tensor:
    return x.new_empty(rows, x.size(1))


# ----------------------------------------------------------------------------------------------------------
# Eager calls: the same op bodies and backward math behind a torch.autograd.Function, without the custom-op
# dispatch (which costs about 100 us of host time per call; the CUDA kernels' whole call costs 20-40 us)
# ----------------------------------------------------------------------------------------------------------
class _EagerDispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, topk_weights: torch.Tensor, topk_idx: torch.Tensor, key: int,
                *args: Any) -> Any:
        recv_x, recv_idx, recv_w, counts, handle = _dispatch_impl(x, topk_idx, topk_weights, key, *args)
        ctx.save_for_backward(recv_idx, *handle)
        ctx.buffer, ctx.hidden, ctx.x_dtype, ctx.w_dtype = key, x.size(1), x.dtype, topk_weights.dtype
        ctx.num_args = len(args)
        ctx.mark_non_differentiable(recv_idx, counts, *handle)
        return (recv_x, recv_idx, recv_w, counts, *handle)

    @staticmethod
    def backward(ctx: Any, grad_recv_x: Optional[torch.Tensor], _grad_idx: Any, grad_recv_w: Optional[torch.Tensor],
                 *_rest: Any) -> Any:
        recv_idx, *handle = ctx.saved_tensors
        grad_x, grad_topk_w = _dispatch_grads(ctx, recv_idx, handle, grad_recv_x, grad_recv_w, _combine_impl)
        return (grad_x, grad_topk_w, None, None) + (None,) * ctx.num_args


class _EagerCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, key: int, fields: list[int], *handle: torch.Tensor) -> torch.Tensor:
        combined, _ = _combine_impl(x, None, list(handle), key, fields)
        ctx.save_for_backward(*handle)
        ctx.buffer, ctx.rows = key, x.size(0)
        return combined

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        grad_x = _cached_dispatch_impl(grad, list(ctx.saved_tensors), ctx.buffer, ctx.rows)
        return (grad_x, None, None) + (None,) * len(ctx.saved_tensors)


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------
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
        expert_alignment, num_worst_tokens, config: as ``Buffer.dispatch``. With ``num_worst_tokens`` every
            output has a static shape, so ``torch.compile(fullgraph=True)`` takes the call.

    Returns:
        ``DispatchOutput(recv_x [n_recv, H], recv_topk_idx [n_recv, K] int64, recv_topk_weights [n_recv, K]
        float32, num_recv_tokens_per_expert_list, handle)``; the backward pass combines the gradients of
        ``recv_x`` and ``recv_topk_weights`` back to ``x`` and ``topk_weights``.
    """
    key = _buffer_key(buffer)
    fields = _config_fields(config, "dispatch")
    # Read here, not in the fake: the compiler guards on it, so a later Buffer.set_num_sms recompiles.
    num_sms = config.num_sms if config is not None else Buffer.num_sms
    args = (num_experts, bool(fp8), bool(round_scale), bool(use_ue8m0), expert_alignment, num_worst_tokens, fields,
            num_sms)
    if torch.compiler.is_compiling():
        recv_x, recv_idx, recv_w, counts, handle = torch.ops.deepep_plugin.dispatch(x, topk_idx, topk_weights, key,
                                                                                    *args)
    else:
        recv_x, recv_idx, recv_w, counts, *handle = _EagerDispatch.apply(x, topk_weights, topk_idx, key, *args)
    counts_list = [] if num_worst_tokens else counts.tolist()
    return DispatchOutput(recv_x, recv_idx, recv_w, counts_list, _handle(handle))


def combine(buffer: Buffer, x: torch.Tensor, handle: Any, *, config: Optional[Config] = None) -> torch.Tensor:
    """Differentiable combine: ``[n_recv, H]`` expert outputs -> ``[T, H]`` unweighted sums of the copies.

    The backward pass is a cached dispatch of the gradient with ``handle``.
    """
    tensors, key, fields = _handle_tensors(handle, "combine"), _buffer_key(buffer), _config_fields(config, "combine")
    if torch.compiler.is_compiling():
        return torch.ops.deepep_plugin.combine(x, None, tensors, key, fields)[0]
    return _EagerCombine.apply(x, key, fields, *tensors)
