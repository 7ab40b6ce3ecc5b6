"""The reference backend: DeepEP V1's semantics in plain PyTorch over ``torch.distributed``.

It runs wherever ``torch.distributed`` does (gloo on CPU, NCCL on GPUs; with a gloo group and CUDA tensors it
stages through host memory), and it is the oracle every kernel is tested against. Rows travel as raw bytes, so
BF16, FP8 and float32 all move bit for bit through any process-group backend.

Every collective here is made by all ranks in the same order. On a gloo group (the CPU path, and ranks sharing a
GPU) each one is waited for with ``DEEPEP_PLUGIN_TIMEOUT_S``: when a peer does not make the matching call, the
wait raises :class:`~deepep_plugin.errors.DeepEPTimeoutError` naming the op, this rank and the collective, and the
backend refuses every later call (the group holds a collective that will never complete). On an NCCL group the
collectives are stream-ordered, so no host thread waits in them; NCCL's own timeout (the group's) applies there.
"""

from __future__ import annotations

import datetime
import functools
import time
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist

from .. import fp8 as fp8_mod
from ..config import Config
from ..errors import DeepEPError, DeepEPInputError, DeepEPTimeoutError, expect
from ..layout import channel_counts, get_dispatch_layout, index_among_selected, round_up_counts, stream_slots
from .base import (
    CombineResult,
    DispatchLayout,
    DispatchResult,
    Handle,
    InternodeHandle,
    IntranodeHandle,
    LowLatencyDispatchResult,
    LowLatencyHandle,
)


class _Comm:
    """Byte-level collectives over a process group. CUDA tensors go through host memory when the group cannot
    carry them (gloo), so the reference also runs with several processes sharing one GPU.

    ``op`` names the Buffer call in progress (set by :func:`_collective`); ``broken`` says why this backend can no
    longer be used, once a wait timed out.
    """

    def __init__(self, group: dist.ProcessGroup, timeout_s: float) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.nccl = "nccl" in str(dist.get_backend(group)).lower()
        self.timeout_s = timeout_s
        self.op = "?"
        self.broken: Optional[str] = None

    def _wait(self, work: Any, collective: str) -> None:
        """Wait for ``work`` (gloo) at most ``timeout_s``; on NCCL the stream orders it and nothing waits here."""
        if self.nccl:
            return
        try:
            work.wait(timeout=datetime.timedelta(seconds=self.timeout_s))
        except RuntimeError as e:
            ranks = dist.get_process_group_ranks(self.group)
            self.broken = (f"{self.op} on rank {self.rank} waited {self.timeout_s:g} s (DEEPEP_PLUGIN_TIMEOUT_S) for "
                           f"the {collective} of the group's ranks {ranks} (global ranks) and gave up: a peer did "
                           f"not make the matching call, or died ({e})")
            raise DeepEPTimeoutError(self.broken + ". This Buffer can no longer be used.") from None

    def _comm_device(self, device: torch.device) -> torch.device:
        return device if (device.type == "cuda") == self.nccl else torch.device("cuda" if self.nccl else "cpu")

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """``[R, *t.shape]``: every rank's ``t`` (same shape and dtype on all ranks)."""
        src = t.contiguous().to(self._comm_device(t.device))
        parts = [torch.empty_like(src) for _ in range(self.num_ranks)]
        self._wait(dist.all_gather(parts, src, group=self.group, async_op=True), "all_gather of counts")
        return torch.stack(parts).to(t.device)

    def alltoall_rows(self, rows: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        """Send ``rows[sum(send_counts[:j]) : ...]`` to rank j; return the rows received, grouped by source rank."""
        rows = rows.contiguous()
        row_shape = rows.shape[1:]
        row_bytes = row_shape.numel() * rows.element_size()
        src = rows.reshape(-1).view(torch.uint8) if rows.numel() else \
            torch.empty(0, dtype=torch.uint8, device=rows.device)
        comm_device = self._comm_device(rows.device)
        src = src.to(comm_device)
        out = torch.empty(sum(recv_counts) * row_bytes, dtype=torch.uint8, device=comm_device)
        work = dist.all_to_all_single(out, src, [c * row_bytes for c in recv_counts],
                                      [c * row_bytes for c in send_counts], group=self.group, async_op=True)
        self._wait(work, "all_to_all of rows")
        out = out.to(rows.device)
        return out.view(rows.dtype).reshape(sum(recv_counts), *row_shape)

    def barrier(self) -> None:
        self._wait(dist.barrier(group=self.group, async_op=True), "barrier")


_F = TypeVar("_F", bound=Callable[..., Any])


def _collective(op: str) -> Callable[[_F], _F]:
    """Name the op for the errors of its waits, and refuse it once an earlier wait timed out."""
    def wrap(fn: _F) -> _F:
        @functools.wraps(fn)
        def method(self: "ReferenceBackend", *args: Any, **kwargs: Any) -> Any:
            self.check_error()
            self.comm.op = op
            return fn(self, *args, **kwargs)
        return method  # type: ignore[return-value]
    return wrap


def _rows_to(mask: torch.Tensor) -> list[torch.Tensor]:
    """Per destination column of ``mask [T, R]``, the token indices going there (increasing)."""
    return [torch.nonzero(mask[:, j], as_tuple=False).flatten() for j in range(mask.size(1))]


class ReferenceBackend:
    """DeepEP V1 semantics over ``torch.distributed`` (see the module docstring)."""

    name = "reference"
    #: Buffer adds stream and event bookkeeping around its calls (only the intranode kernels order their own).
    orders_streams = False

    def __init__(self, group: dist.ProcessGroup, num_ranks_per_node: int, num_nvl_bytes: int = 0,
                 num_rdma_bytes: int = 0, timeout_s: Optional[float] = None) -> None:
        from ..config import get_timeout_s

        self.comm = _Comm(group, get_timeout_s() if timeout_s is None else timeout_s)
        self.rank = self.comm.rank
        self.num_ranks = self.comm.num_ranks
        self.num_ranks_per_node = num_ranks_per_node
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self._local_buffers: dict[bool, torch.Tensor] = {}
        # Low-latency state: which of the two buffers the next call uses, and the combine send buffers.
        self._ll_parity = 0
        self._ll_combine_buffers: dict[tuple, list[torch.Tensor]] = {}

    @property
    def reference(self) -> "ReferenceBackend":
        """The backend that serves what no kernel does: this one."""
        return self

    def runtime_for(self, op: str, cuda: bool, dtype: Optional[torch.dtype] = None) -> "ReferenceBackend":
        """Every call runs here (``backend="reference"``, or a machine without CUDA)."""
        return self

    # ------------------------------------------------------------------------------------------------------
    # Normal kernels
    # ------------------------------------------------------------------------------------------------------
    @property
    def _internode(self) -> bool:
        return self.num_ranks > self.num_ranks_per_node

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int) -> DispatchLayout:
        return get_dispatch_layout(topk_idx, num_experts, self.num_ranks, self.num_ranks_per_node)

    def _make_handle(self, is_token_in_rank: torch.Tensor, num_channels: int, count_matrix: torch.Tensor,
                     recv_src_idx: torch.Tensor) -> Handle:
        """The handle of a fresh dispatch. ``count_matrix [R, R]``: tokens sent from rank i to rank j."""
        r, nr = self.rank, self.num_ranks
        dev = is_token_in_rank.device
        my_channels = channel_counts(is_token_in_rank, num_channels)  # [R(dst), C]
        all_channels = self.comm.all_gather(my_channels)  # [R(src), R(dst), C]
        from_src = all_channels[:, r, :].long()  # [R(src), C]: tokens each source sends me, per its channel
        recv_channel_prefix = (torch.cumsum(from_src, 1) - from_src).to(torch.int32)
        send_head = stream_slots(is_token_in_rank, num_channels)
        if not self._internode:
            rank_prefix = torch.cumsum(count_matrix.long(), 0).to(torch.int32).to(dev)
            return IntranodeHandle(rank_prefix, torch.cumsum(my_channels, 1, dtype=torch.int32),
                                   recv_channel_prefix.contiguous(), recv_src_idx, is_token_in_rank, send_head)
        g = self.num_ranks_per_node
        nn = nr // g
        num_tokens = is_token_in_rank.size(0)
        in_node = is_token_in_rank.view(num_tokens, nn, g).any(-1)  # [T, N]
        node_channels = channel_counts(in_node, num_channels)  # [N, C]
        all_node_channels = self.comm.all_gather(node_channels)  # [R(src), N, C]
        local, node = r % g, r // g
        # Forwarder view: sources are the GPUs with my local index on every node.
        fwd_src = [n * g + local for n in range(nn)]
        recv_rdma_channel = torch.cumsum(all_node_channels[fwd_src, node, :].long(), 1).to(torch.int32)
        recv_rdma_rank_prefix = torch.cumsum(recv_rdma_channel[:, -1].long(), 0).to(torch.int32)
        recv_counts = count_matrix[:, r].long().to(dev)
        block_start = torch.cumsum(recv_counts, 0) - recv_counts
        recv_gbl_channel = (block_start[:, None] + recv_channel_prefix.long()).to(torch.int32)
        recv_gbl_rank_prefix = torch.cumsum(recv_counts, 0).to(torch.int32)
        src_rank = torch.repeat_interleave(torch.arange(nr, device=dev), recv_counts)
        meta = torch.stack([recv_src_idx.to(torch.int32), src_rank.to(torch.int32)], 1).contiguous()
        # send_rdma_head: each token's index among my tokens to node n, over all channels.
        send_rdma_head = index_among_selected(in_node)
        # Row of each of my tokens in each destination's recv_x: the rows from lower source ranks come first,
        # then my earlier tokens to that destination.
        cm = count_matrix.long()
        row_base = (torch.cumsum(cm, 0) - cm)[r].to(dev)  # [R(dst)]
        dst_row = torch.where(is_token_in_rank, index_among_selected(is_token_in_rank).long() + row_base,
                              torch.full_like(row_base, -1))  # [T, R]
        # Each source n*G + local sends its forwarder on node n, for every token going to node n (in token
        # order), the rows that token takes on node n's G ranks; the forwarder receives them by source node.
        send_counts = [0] * nr
        rows_by_node = []
        for n in range(nn):
            sel = torch.nonzero(in_node[:, n], as_tuple=False).flatten()
            rows_by_node.append(dst_row[sel, n * g:(n + 1) * g])
            send_counts[n * g + local] = sel.numel()
        recv_counts_rdma = [0] * nr
        for n in range(nn):
            recv_counts_rdma[n * g + local] = int(recv_rdma_channel[n, -1])
        send_nvl_head = self.comm.alltoall_rows(torch.cat(rows_by_node, 0), send_counts, recv_counts_rdma)
        send_nvl_head = send_nvl_head.to(torch.int32).contiguous()
        return InternodeHandle(is_token_in_rank, torch.cumsum(node_channels, 1, dtype=torch.int32),
                               torch.cumsum(my_channels, 1, dtype=torch.int32), recv_rdma_channel.contiguous(),
                               recv_rdma_rank_prefix, recv_gbl_channel.contiguous(), recv_gbl_rank_prefix,
                               meta.view(torch.uint8).reshape(-1, 8), send_rdma_head, send_nvl_head)

    def _recv_counts(self, handle: Handle) -> list[int]:
        if isinstance(handle, IntranodeHandle):
            col = handle.rank_prefix_matrix[:, self.rank].long()
        else:
            col = handle.recv_gbl_rank_prefix_sum.long()
        return torch.diff(col, prepend=col.new_zeros(1)).tolist()

    @_collective("dispatch")
    def dispatch(self, x: torch.Tensor, x_scales: Optional[torch.Tensor], handle: Optional[Handle],
                 layout: Optional[DispatchLayout], topk_idx: Optional[torch.Tensor],
                 topk_weights: Optional[torch.Tensor], expert_alignment: int, num_worst_tokens: int,
                 config: Config) -> DispatchResult:
        r, nr = self.rank, self.num_ranks
        is_token_in_rank = handle.is_token_in_rank if handle is not None else layout.is_token_in_rank
        rows_to = _rows_to(is_token_in_rank)
        send_counts = [int(t.numel()) for t in rows_to]
        order = torch.cat(rows_to) if rows_to else torch.empty(0, dtype=torch.long, device=x.device)
        if handle is None:
            count_matrix = self.comm.all_gather(torch.tensor(send_counts, dtype=torch.int64))  # [R(src), R(dst)]
            recv_counts = count_matrix[:, r].tolist()
        else:
            recv_counts = self._recv_counts(handle)
        n_recv = sum(recv_counts)
        if num_worst_tokens:
            expect(n_recv <= num_worst_tokens,
                   f"dispatch: num_worst_tokens={num_worst_tokens} is smaller than the {n_recv} tokens rank {r} "
                   "receives; pass at least that many")
        recv_x = self.comm.alltoall_rows(x[order], send_counts, recv_counts)
        recv_scales = None
        if x_scales is not None:
            recv_scales = self.comm.alltoall_rows(x_scales[order], send_counts, recv_counts)
        if handle is not None:
            return DispatchResult(self._pad(recv_x, num_worst_tokens), self._pad(recv_scales, num_worst_tokens),
                                  None, None, [], handle)
        src_idx = self.comm.alltoall_rows(order.to(torch.int32)[:, None], send_counts, recv_counts).flatten()
        new_handle = self._make_handle(is_token_in_rank, config.num_channels, count_matrix, src_idx)
        if num_worst_tokens:
            # A shape cannot depend on a count the GPU kernels know only on the device: pad with -1, as they do.
            if isinstance(new_handle, IntranodeHandle):
                new_handle = new_handle._replace(recv_src_idx=self._pad(src_idx, num_worst_tokens, fill=-1))
            else:
                # A forwarder holds at most G * W records: each goes to >= 1 of the G local ranks, which receive
                # <= W rows each. 0xFF bytes read as int32 (-1, -1) in recv_src_meta.
                new_handle = new_handle._replace(
                    recv_src_meta=self._pad(new_handle.recv_src_meta, num_worst_tokens, fill=0xFF),
                    send_nvl_head=self._pad(new_handle.send_nvl_head, self.num_ranks_per_node * num_worst_tokens,
                                            fill=-1))
        recv_idx = recv_w = None
        counts_list: list[int] = []
        if topk_idx is not None:
            num_experts = layout.num_tokens_per_expert.numel()
            e_loc = num_experts // nr
            got_idx = self.comm.alltoall_rows(topk_idx[order].long(), send_counts, recv_counts)
            local = got_idx - r * e_loc
            mine = (got_idx >= 0) & (got_idx < num_experts) & (local >= 0) & (local < e_loc)
            recv_idx = torch.where(mine, local, torch.full_like(local, -1))
            if topk_weights is not None:
                got_w = self.comm.alltoall_rows(topk_weights[order].float(), send_counts, recv_counts)
                recv_w = torch.where(mine, got_w, torch.zeros_like(got_w))
            counts = torch.bincount(recv_idx[mine], minlength=e_loc).tolist()
            counts_list = [] if num_worst_tokens else round_up_counts(counts, expert_alignment)
        if num_worst_tokens:
            recv_x, recv_scales = self._pad(recv_x, num_worst_tokens), self._pad(recv_scales, num_worst_tokens)
            recv_w = self._pad(recv_w, num_worst_tokens)
            if recv_idx is not None:
                recv_idx = self._pad(recv_idx, num_worst_tokens, fill=-1)
        return DispatchResult(recv_x, recv_scales, recv_idx, recv_w, counts_list, new_handle)

    @staticmethod
    def _pad(t: Optional[torch.Tensor], rows: int, fill: float = 0) -> Optional[torch.Tensor]:
        if t is None or rows == 0 or t.size(0) == rows:
            return t
        out = torch.full((rows, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
        out[: t.size(0)] = t
        return out

    @_collective("combine")
    def combine(self, x: torch.Tensor, handle: Handle, topk_weights: Optional[torch.Tensor],
                bias0: Optional[torch.Tensor], bias1: Optional[torch.Tensor], config: Config) -> CombineResult:
        is_token_in_rank = handle.is_token_in_rank
        num_tokens, hidden = is_token_in_rank.size(0), x.size(1)
        rows_to = _rows_to(is_token_in_rank)
        back_counts = [int(t.numel()) for t in rows_to]  # rows each rank j returns to me
        recv_counts = self._recv_counts(handle)  # rows I hold from each source
        n_recv = sum(recv_counts)
        got = self.comm.alltoall_rows(x[:n_recv], recv_counts, back_counts)
        order = torch.cat(rows_to) if rows_to else torch.empty(0, dtype=torch.long, device=x.device)
        acc = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=x.device)
        for bias in (bias0, bias1):
            if bias is not None:
                acc += bias.float()
        # Sum the copies in source-rank order, in FP32.
        start = 0
        for count in back_counts:
            acc.index_add_(0, order[start:start + count], got[start:start + count].float())
            start += count
        combined_w = None
        if topk_weights is not None:
            got_w = self.comm.alltoall_rows(topk_weights[:n_recv].float(), recv_counts, back_counts)
            combined_w = torch.zeros(num_tokens, topk_weights.size(1), dtype=torch.float32, device=x.device)
            combined_w.index_add_(0, order, got_w)
        return CombineResult(acc.to(x.dtype), combined_w)

    # ------------------------------------------------------------------------------------------------------
    # Low-latency kernels
    # ------------------------------------------------------------------------------------------------------
    def _next_parity(self) -> int:
        parity = self._ll_parity
        self._ll_parity ^= 1
        return parity

    def _combine_buffer(self, num_local_experts: int, slots: int, hidden: int, parity: int,
                        device: torch.device) -> torch.Tensor:
        """BF16 ``[E_loc, R*N_ll, H]`` view (row stride ``H + H/64``) of the combine send buffer ``parity``."""
        key = (num_local_experts, slots, hidden, device)
        if key not in self._ll_combine_buffers:
            # each slot: 2H bytes of BF16 + H/128 float32 words (DeepEP's), rounded up to 16 bytes as the kernels'
            stride = (hidden + hidden // 64 + 7) // 8 * 8
            self._ll_combine_buffers = {key: [torch.zeros(num_local_experts, slots, stride, dtype=torch.bfloat16,
                                                          device=device) for _ in range(2)]}
        return self._ll_combine_buffers[key][parity][:, :, :hidden]

    @_collective("low_latency_dispatch")
    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, *, cumulative_local_expert_recv_stats: Optional[torch.Tensor],
                             dispatch_wait_recv_cost_stats: Optional[torch.Tensor], use_fp8: bool, round_scale: bool,
                             use_ue8m0: bool, return_recv_hook: bool) -> LowLatencyDispatchResult:
        r, nr = self.rank, self.num_ranks
        n_ll, hidden = num_max_dispatch_tokens_per_rank, x.size(1)
        e_loc = num_experts // nr
        self._next_parity()
        # One row per distinct (token, expert): a token listing an expert twice is received once by it.
        idx = topk_idx.long()
        valid = (idx >= 0) & (idx < num_experts)
        dup = torch.zeros_like(valid)
        for k in range(1, idx.size(1)):
            dup[:, k] = ((idx[:, :k] == idx[:, k:k + 1]) & valid[:, :k]).any(1)
        valid &= ~dup
        tok, slot = torch.nonzero(valid, as_tuple=True)
        expert = idx[tok, slot]
        dst = torch.div(expert, e_loc, rounding_mode="floor")
        order = torch.argsort(dst * (n_ll * num_experts) + expert * n_ll + tok, stable=True)
        tok, expert, dst = tok[order], expert[order], dst[order]
        send_counts = torch.bincount(dst, minlength=nr).tolist()
        recv_counts = self.comm.all_gather(torch.tensor(send_counts, dtype=torch.int64))[:, r].tolist()
        if use_fp8:
            data, scales = fp8_mod.per_token_cast_to_fp8(x, round_scale=round_scale, use_ue8m0=use_ue8m0)
        else:
            data, scales = x, None
        started = time.perf_counter_ns()
        meta = self.comm.alltoall_rows(torch.stack([tok, expert - dst * e_loc], 1), send_counts, recv_counts)
        rows = self.comm.alltoall_rows(data[tok], send_counts, recv_counts)
        got_scales = self.comm.alltoall_rows(scales[tok], send_counts, recv_counts) if scales is not None else None
        waited = time.perf_counter_ns() - started

        slots = nr * n_ll
        recv_x = torch.empty(e_loc, slots, hidden, dtype=data.dtype, device=x.device)
        recv_scales = None
        if scales is not None:
            recv_scales = torch.empty(e_loc, scales.size(1), slots, dtype=scales.dtype, device=x.device)
        recv_count = torch.zeros(e_loc, dtype=torch.int32, device=x.device)
        src_info = torch.zeros(e_loc, slots, dtype=torch.int32, device=x.device)
        layout_range = torch.zeros(e_loc, nr, dtype=torch.int64, device=x.device)
        src_rank = torch.repeat_interleave(torch.arange(nr, device=x.device),
                                           torch.tensor(recv_counts, device=x.device))

        def receive() -> None:
            # Per local expert, the blocks of source ranks 0..R-1 in turn, tokens in increasing index.
            for i in range(e_loc):
                begin = 0
                for j in range(nr):
                    sel = torch.nonzero((meta[:, 1] == i) & (src_rank == j), as_tuple=False).flatten()
                    n = sel.numel()
                    layout_range[i, j] = (begin << 32) | n
                    if n:
                        recv_x[i, begin:begin + n] = rows[sel]
                        src_info[i, begin:begin + n] = meta[sel, 0].to(torch.int32)
                        if recv_scales is not None:
                            recv_scales[i, :, begin:begin + n] = got_scales[sel].t()
                    begin += n
                recv_count[i] = begin
            if cumulative_local_expert_recv_stats is not None:
                cumulative_local_expert_recv_stats.add_(recv_count)
            if dispatch_wait_recv_cost_stats is not None:
                # The reference cannot tell sources apart inside one collective: each gets the whole wait (ns).
                dispatch_wait_recv_cost_stats.add_(waited)

        hook: Optional[Callable[[], None]] = receive
        if not return_recv_hook:
            receive()
            hook = None
        handle = LowLatencyHandle(src_info, layout_range, n_ll, hidden, num_experts)
        scales_view = recv_scales.transpose(1, 2) if recv_scales is not None else None
        return LowLatencyDispatchResult(recv_x, scales_view, recv_count, handle, hook)

    @_collective("low_latency_combine")
    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                            handle: LowLatencyHandle, *, zero_copy: bool, return_recv_hook: bool,
                            out: Optional[torch.Tensor],
                            combine_wait_recv_cost_stats: Optional[torch.Tensor]
                            ) -> tuple[torch.Tensor, Optional[Callable[[], None]]]:
        r, nr = self.rank, self.num_ranks
        src_info, layout_range = handle.src_info, handle.layout_range
        e_loc = src_info.size(0)
        parity = self._next_parity()
        if zero_copy:
            x = self._combine_buffer(e_loc, src_info.size(1), handle.hidden, parity, src_info.device)
        # Expert side: send each valid row back to its source, tagged (global expert, source token).
        send_rows, send_meta, send_counts = [], [], [0] * nr
        for j in range(nr):
            for i in range(e_loc):
                packed = int(layout_range[i, j])
                begin, n = packed >> 32, packed & 0xFFFFFFFF
                if n:
                    send_rows.append(x[i, begin:begin + n])
                    tokens = src_info[i, begin:begin + n].long()
                    send_meta.append(torch.stack([torch.full_like(tokens, r * e_loc + i), tokens], 1))
                    send_counts[j] += n
        hidden = x.size(-1)
        rows = torch.cat(send_rows) if send_rows else x.new_empty(0, hidden)
        meta = torch.cat(send_meta) if send_meta else torch.empty(0, 2, dtype=torch.long, device=x.device)
        recv_counts = self.comm.all_gather(torch.tensor(send_counts, dtype=torch.int64))[:, r].tolist()
        started = time.perf_counter_ns()
        got_meta = self.comm.alltoall_rows(meta, send_counts, recv_counts)
        got_rows = self.comm.alltoall_rows(rows.contiguous(), send_counts, recv_counts)
        waited = time.perf_counter_ns() - started
        num_tokens = topk_idx.size(0)
        result = out if out is not None else torch.empty(num_tokens, hidden, dtype=x.dtype, device=x.device)

        def receive() -> None:
            num_experts = handle.num_experts
            table = torch.full((num_experts, max(num_tokens, 1)), -1, dtype=torch.long, device=x.device)
            if got_meta.numel():
                table[got_meta[:, 0], got_meta[:, 1]] = torch.arange(got_meta.size(0), device=x.device)
            acc = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=x.device)
            idx = topk_idx.long()
            for k in range(idx.size(1)):
                e = idx[:, k]
                valid = (e >= 0) & (e < num_experts)
                row = table[e.clamp(0, num_experts - 1), torch.arange(num_tokens, device=x.device)]
                valid &= row >= 0
                if got_rows.size(0) == 0:  # nothing came back (every slot of every token is -1 or empty)
                    break
                contrib = got_rows[row.clamp(min=0)].float() * topk_weights[:, k:k + 1].float()
                acc += torch.where(valid[:, None], contrib, torch.zeros_like(contrib))
            result.copy_(acc.to(result.dtype))
            if combine_wait_recv_cost_stats is not None:
                combine_wait_recv_cost_stats.add_(waited)

        if return_recv_hook:
            return result, receive
        receive()
        return result, None

    @_collective("clean_low_latency_buffer")
    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        for buffers in self._ll_combine_buffers.values():
            for b in buffers:
                b.zero_()
        self.comm.barrier()

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        e_loc = handle.src_info.size(0)
        return self._combine_buffer(e_loc, handle.src_info.size(1), handle.hidden, self._ll_parity,
                                    handle.src_info.device)

    # ------------------------------------------------------------------------------------------------------
    def local_buffer(self, use_rdma_buffer: bool, device: torch.device) -> torch.Tensor:
        """A host-side stand-in for the communication buffer (allocated on first use)."""
        if use_rdma_buffer not in self._local_buffers:
            size = self.num_rdma_bytes if use_rdma_buffer else self.num_nvl_bytes
            if size == 0:
                raise DeepEPInputError("get_local_buffer_tensor: this Buffer was created with 0 "
                                       f"{'num_rdma_bytes' if use_rdma_buffer else 'num_nvl_bytes'}")
            self._local_buffers[use_rdma_buffer] = torch.zeros(size, dtype=torch.uint8, device=device)
        return self._local_buffers[use_rdma_buffer]

    def check_error(self) -> None:
        if self.comm.broken is not None:
            raise DeepEPError(f"Buffer: this Buffer can no longer be used: {self.comm.broken}")

    def destroy(self) -> None:
        self._local_buffers.clear()
        self._ll_combine_buffers.clear()
