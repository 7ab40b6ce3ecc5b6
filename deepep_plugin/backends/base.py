"""The contract between ``Buffer`` (the public, DeepEP-compatible surface) and a backend.

``Buffer`` validates every argument (dtype, shape, device, ranges, buffer sizes), manages streams and events
(``previous_event``, ``async_finish``, ``allocate_on_comm_stream``) and converts results to DeepEP's tuples.
A backend only moves data: each method runs on the *current* stream (``Buffer`` makes the communication stream
current where DeepEP would use it), receives arguments that are already validated, and returns the named
results below.

Handles are ``NamedTuple``s, so they index like DeepEP's tuples (``handle[0]`` is the rank prefix matrix) and
read by name inside the library. Every backend produces the *same* handle contents for the same inputs and
``Config.num_sms``: a handle is a pure function of the layout (tests compare backends element by element).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Protocol, Union

import torch

from ..config import Config


class DispatchLayout(NamedTuple):
    """Result of ``get_dispatch_layout`` (see ``deepep_plugin.layout`` for exact semantics)."""

    num_tokens_per_rank: torch.Tensor  # [R] int32: tokens with >= 1 expert on rank j
    num_tokens_per_rdma_rank: Optional[torch.Tensor]  # [N_nodes] int32, None within one node
    num_tokens_per_expert: torch.Tensor  # [E] int32: (token, k) entries selecting expert e
    is_token_in_rank: torch.Tensor  # [T, R] bool


class IntranodeHandle(NamedTuple):
    """DeepEP V1's 6-tuple intranode handle. ``C = Config.num_sms // 2`` channels, ``T`` local tokens.

    Channel partition: tokens ``[0, T)`` in ``C`` contiguous ranges of ``ceil(T / C)`` tokens.
    """

    # [R, R] int32: [i][j] = sum over source ranks k <= i of tokens sent from k to j (inclusive prefix over
    # the source rank). Unlike DeepEP, every column is valid, not only this rank's.
    rank_prefix_matrix: torch.Tensor
    # [R, C] int32, sender side: [j][c] = tokens of this rank in channels <= c that go to rank j (inclusive).
    channel_prefix_matrix: torch.Tensor
    # [R, C] int32, receiver side: [i][c] = tokens from source rank i in its channels < c (exclusive prefix),
    # i.e. where channel c starts inside source i's block of received rows.
    recv_channel_prefix_matrix: torch.Tensor
    # [n_recv] int32: index, within its source rank, of each received row.
    recv_src_idx: torch.Tensor
    # [T, R] bool: the dispatch input.
    is_token_in_rank: torch.Tensor
    # [T, R] int32: for token t going to rank j, the number of earlier tokens of t's channel that go to j
    # (its slot in the (channel, j) stream); -1 where the token does not go to j.
    send_head: torch.Tensor


class InternodeHandle(NamedTuple):
    """DeepEP V1's 10-tuple internode handle (EP groups spanning more than one node).

    ``N`` nodes of ``G`` ranks (``G`` = node size: ranks per host unless set), ``C`` channels. A token crosses the
    network once per destination node ``n``, to its forwarder ``n * G + (source rank % G)``, which passes it on by
    NVLink. A forwarder's RDMA-received records are ordered by source node, then source token index. With
    ``num_worst_tokens = W > 0`` the shapes that depend on received counts are fixed (padding noted per field).
    """

    is_token_in_rank: torch.Tensor  # [T, R] bool
    rdma_channel_prefix_matrix: torch.Tensor  # [N, C] int32: inclusive prefix of this rank's tokens to node n
    gbl_channel_prefix_matrix: torch.Tensor  # [R, C] int32: inclusive prefix of this rank's tokens to rank j
    recv_rdma_channel_prefix_matrix: torch.Tensor  # [N, C] int32: per source node, inclusive channel prefix
    recv_rdma_rank_prefix_sum: torch.Tensor  # [N] int32: inclusive prefix over source nodes of RDMA-recv tokens
    recv_gbl_channel_prefix_matrix: torch.Tensor  # [R, C] int32: absolute start row of (source rank, channel)
    recv_gbl_rank_prefix_sum: torch.Tensor  # [R] int32: inclusive prefix over source ranks of received tokens
    # [n_recv, 8] uint8 ([W, 8] with W): int32 source token index + int32 source rank; padding rows 0xFF (-1, -1).
    recv_src_meta: torch.Tensor
    # [T, N] int32: index of token t among this rank's tokens to node n (over all tokens, not per channel), or -1.
    send_rdma_head: torch.Tensor
    # [n_rdma_recv, G] int32 ([G*W, G] with W), forwarder: row of record i in recv_x of rank node*G + g, else -1.
    send_nvl_head: torch.Tensor


Handle = IntranodeHandle | InternodeHandle


def handle_recv_count(handle: Handle) -> int:
    """Rows the dispatch that made ``handle`` received (``num_worst_tokens`` when it padded them)."""
    return (handle.recv_src_idx if isinstance(handle, IntranodeHandle) else handle.recv_src_meta).shape[0]


def handle_channel_matrix(handle: Handle) -> torch.Tensor:
    """The handle's per-channel prefix matrix, whose width is its channel count."""
    return handle.channel_prefix_matrix if isinstance(handle, IntranodeHandle) else handle.gbl_channel_prefix_matrix


def handle_num_channels(handle: Handle) -> int:
    """Channels (``num_sms / 2``) of the config that made ``handle``."""
    return handle_channel_matrix(handle).shape[1]


class DispatchResult(NamedTuple):
    recv_x: torch.Tensor  # [n_recv or num_worst_tokens, H], dtype of x
    recv_x_scales: Optional[torch.Tensor]  # [rows, S] (dtype of the input scales, row-major), FP8 only
    recv_topk_idx: Optional[torch.Tensor]  # [rows, K] int64, local expert ids or -1
    recv_topk_weights: Optional[torch.Tensor]  # [rows, K] float32, 0.0 where recv_topk_idx == -1
    num_recv_tokens_per_expert_list: list[int]  # [E_loc], rounded up to expert_alignment; [] for worst-tokens
    handle: Handle


class CombineResult(NamedTuple):
    combined_x: torch.Tensor  # [T, H], dtype of x
    combined_topk_weights: Optional[torch.Tensor]  # [T, K] float32


class LowLatencyHandle(NamedTuple):
    """DeepEP V1's low-latency handle ``(src_info, layout_range, N_ll, H, E)``."""

    src_info: torch.Tensor  # [E_loc, R * N_ll] int32: source token index of each valid row
    layout_range: torch.Tensor  # [E_loc, R] int64: (start row << 32) | count, per (local expert, source rank)
    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_experts: int


class LowLatencyDispatchResult(NamedTuple):
    recv_x: torch.Tensor  # [E_loc, R*N_ll, H] bf16, or float8_e4m3fn when FP8
    recv_x_scales: Optional[torch.Tensor]  # FP8: [E_loc, R*N_ll, S] float32 or [.., S/4] int32 (UE8M0),
    # a transposed view of a [E_loc, S, R*N_ll] contiguous tensor
    recv_count: torch.Tensor  # [E_loc] int32
    handle: LowLatencyHandle
    hook: Optional[Callable[[], None]]  # completes the receive when return_recv_hook=True, else None


class NormalOps(Protocol):
    """The normal ops of a runtime (intranode, internode, reference)."""

    name: str
    #: True when the runtime orders its own calls across streams and reads its error mailbox at every call, so
    #: ``Buffer`` runs it on the current stream with no event bookkeeping (the intranode kernels).
    orders_streams: bool

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int) -> DispatchLayout: ...

    def dispatch(self, x: torch.Tensor, x_scales: Optional[torch.Tensor], handle: Optional[Handle],
                 layout: Optional[DispatchLayout], topk_idx: Optional[torch.Tensor],
                 topk_weights: Optional[torch.Tensor], expert_alignment: int, num_worst_tokens: int,
                 config: Config) -> DispatchResult: ...

    def combine(self, x: torch.Tensor, handle: Handle, topk_weights: Optional[torch.Tensor],
                bias0: Optional[torch.Tensor], bias1: Optional[torch.Tensor], config: Config) -> CombineResult: ...

    def check_error(self) -> None: ...

    def destroy(self) -> None: ...


class LowLatencyOps(Protocol):
    """The low-latency ops of a runtime (low-latency kernels, reference)."""

    name: str
    orders_streams: bool

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, *, cumulative_local_expert_recv_stats: Optional[torch.Tensor],
                             dispatch_wait_recv_cost_stats: Optional[torch.Tensor], use_fp8: bool,
                             round_scale: bool, use_ue8m0: bool, return_recv_hook: bool
                             ) -> LowLatencyDispatchResult: ...

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                            handle: LowLatencyHandle, *, zero_copy: bool, return_recv_hook: bool,
                            out: Optional[torch.Tensor], combine_wait_recv_cost_stats: Optional[torch.Tensor]
                            ) -> tuple[torch.Tensor, Optional[Callable[[], None]]]: ...

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int,
                                 num_experts: int) -> None: ...

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor: ...

    def check_error(self) -> None: ...

    def destroy(self) -> None: ...


Runtime = Union[NormalOps, LowLatencyOps]


class Backend(NormalOps, LowLatencyOps, Protocol):
    """What ``Buffer.runtime`` is (``ReferenceBackend`` or ``CudaBackend``): every op, the runtime that serves
    each kind of call (``selection.choose``), and the Buffer's raw memory."""

    @property
    def reference(self) -> Any: ...

    def runtime_for(self, op: str, cuda: bool, dtype: Optional[torch.dtype] = None) -> Any: ...

    def local_buffer(self, use_rdma_buffer: bool, device: torch.device) -> torch.Tensor: ...
