"""Internode normal dispatch and combine on CUDA GPUs (EP groups spanning several nodes), over NVSHMEM.

The kernels are in ``csrc/internode`` and are compiled into ``deepep_plugin._nvshmem_C`` (the NVSHMEM layer's
extension, which owns the process's NVSHMEM world). ``R`` ranks form ``N`` nodes of ``G`` ranks (``G`` =
``Buffer(num_ranks_per_node=...)``, at most 8 = ``limits.MAX_NVL_PEERS``; at most 32 nodes); rank ``r`` is node
``r // G``, local index ``r % G``.

How a token travels (the DeepSeek-V3 path: node-limited routing keeps ``N`` hops small):

* **dispatch** — the token crosses the network **once per destination node**, as one record, to the GPU of that
  node with the sender's local index (its *forwarder*); every GPU of that node then **pulls over NVLink** the
  records that list it from its node's ``G`` forwarders, straight into its output rows. Each row's position is
  fixed at the source (its offset among the source's tokens to that rank), so outputs are ordered by source
  rank, then token index — bit-identical to the reference backend, handle included. One kernel does both hops:
  ``C = num_sms / 2`` sender blocks (one per channel, a contiguous token range) and ``C`` receiver blocks; each
  (source node, channel) stream publishes its progress every ``Config.num_max_rdma_chunked_send_tokens`` records,
  and receivers pull records as soon as they are published, so the network and NVLink hops overlap. Each stream
  is a ring of ``Config.num_max_rdma_chunked_recv_tokens`` records at the forwarder; readers publish how far they
  have read and the sender reuses a slot only once every reader of that node is past it.
* **combine** — one kernel: in each of ``C`` forwarder blocks, ``G`` pusher warps push this GPU's expert-output
  rows over NVLink, in the order their forwarder reads them, into an NVL ring of
  ``Config.num_max_nvl_chunked_recv_tokens`` rows per (node peer, channel) at that forwarder (tail published every
  ``num_max_nvl_chunked_send_tokens`` rows); 8 forwarder warps sum, per record, the node peers' rows from the local
  rings (FP32, rounded once to BF16) and send **one partial row per record** back over the network into a ring of
  ``num_max_rdma_chunked_recv_tokens`` rows per (node, channel) at the source, publishing each stream's progress
  every ``num_max_rdma_chunked_send_tokens``; ``C`` receiver blocks add bias and each token's ``<= N`` partial rows
  (FP32, rounded once) as soon as they have arrived, and tell the forwarders which slots are free.
* Peers NVSHMEM maps into this process (NVLink P2P) are written with stores; the others (other nodes over RDMA)
  get one NVSHMEM put per chunk of records from local staging, its signal carrying the stream's progress. Node
  peers must be P2P-reachable. ``DEEPEP_PLUGIN_INTERNODE_PUTS=1`` sends to every other node with puts even where
  P2P would work (the RDMA code path, testable on one host).
* Dispatch's NVLink hop is a pull straight into the outputs, so the NVL chunk sizes of ``Config`` shape combine
  only.

Buffers: one NVSHMEM symmetric allocation of ``num_rdma_bytes + num_nvl_bytes`` per rank (``csrc/internode/layout.h``,
which the extension's ``InternodeLayout`` reports). The data
region holds ``N x C`` rings of ``num_max_rdma_chunked_recv_tokens`` items (plus as many put-staging slots when
some peer is reached with puts), the NVL region ``G x C`` rings of ``num_max_nvl_chunked_recv_tokens`` rows; so
any number of tokens runs in fixed buffers, and buffers sized by ``Config.get_rdma_buffer_size_hint`` and
``get_nvl_buffer_size_hint`` hold them. A call that does not fit raises ``DeepEPBufferTooSmall`` with the bytes
needed.

Host synchronisation: only a fresh dispatch without ``num_worst_tokens`` reads counts on the host (once, after
the notify kernel); everything else is free of host syncs and CUDA-graph capturable.

On one host with emulated nodes the "network" hop is NVLink P2P or NVSHMEM puts over it: tests there check
correctness, not RDMA speed.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple, Optional

import torch
import torch.distributed as dist

from ..config import Config
from ..errors import DeepEPBufferTooSmall, DeepEPInputError, DeepEPTimeoutError, expect
from ..layout import channel_counts, get_dispatch_layout, index_among_selected, round_up_counts
from ..limits import (
    MAILBOX_TIMEOUT,
    MAX_CHANNELS,
    MAX_LOCAL_EXPERTS,
    MAX_NODES,
    MAX_NVL_PEERS,
    MAX_TOPK_INTERNODE,
    wait_message,
)
from .base import CombineResult, DispatchLayout, DispatchResult, InternodeHandle
from .nvshmem import SymmetricRuntime, cuda_device, extension, extension_if_built, join_nvshmem_world

#: Set to 1 to reach every rank of another node with NVSHMEM puts (the RDMA path) even where P2P works.
FORCE_PUTS_ENV = "DEEPEP_PLUGIN_INTERNODE_PUTS"
#: Ring slots per stream the kernels need at least (a batch of 16 items, plus 16 in flight at the consumer).
MIN_RING_SLOTS = 32
#: NVL ring rows per (node peer, channel) combine needs at least (a forwarder batch of 8 records, and some slack).
MIN_NVL_SLOTS = 16


# ---------------------------------------------------------------------------------------------------------------
# Buffer layout and record sizes: the extension's (csrc/internode/layout.h). Where it is not built (sizing on a
# machine without the kernels, CPU tests), a Python mirror of that header answers; the runtime never uses it.
# ---------------------------------------------------------------------------------------------------------------
def buffer_layout(num_ranks: int, num_nodes: int, num_rdma_bytes: int, num_nvl_bytes: int) -> Any:
    """Where the flags, stream words, notify rows, data region and NVL region lie (``InternodeLayout``)."""
    c = extension_if_built()
    if c is not None:
        return c.InternodeLayout(num_ranks, num_nodes, num_rdma_bytes, num_nvl_bytes)
    return _LayoutMirror.of(num_ranks, num_nodes, num_rdma_bytes, num_nvl_bytes)


def record_bytes(hidden_bytes: int, num_scales: int, num_topk: int, ranks_per_node: int) -> int:
    """One dispatch record: data | scales | int32 meta (token, pos[G], topk_idx[K], weights[K])."""
    c = extension_if_built()
    if c is not None:
        return c.internode_record_bytes(hidden_bytes, num_scales, num_topk, ranks_per_node)
    return _align(hidden_bytes, 16) + _align(4 * num_scales, 16) + _align(4 * (1 + ranks_per_node + 2 * num_topk), 16)


def combine_row_bytes(hidden: int, num_topk: int) -> int:
    """One combine row (NVL ring row or partial row): BF16 data | float32 weights, each part 16-byte aligned."""
    c = extension_if_built()
    if c is not None:
        return c.internode_combine_row_bytes(hidden, num_topk)
    return _align(2 * hidden, 16) + _align(4 * num_topk, 16)


def ring_bytes(layout: Any, num_nodes: int, num_channels: int, slots: int, item_bytes: int,
               has_rdma_peers: bool) -> int:
    """``num_rdma_bytes`` that ``num_nodes x num_channels`` rings of ``slots`` items need (with their put staging
    when some peer is reached over RDMA), control block included."""
    expect(num_nodes == layout.num_nodes, f"ring_bytes: the layout is for {layout.num_nodes} nodes, not {num_nodes}")
    return layout.ring_bytes(num_channels, slots, item_bytes, has_rdma_peers)


def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


class _LayoutMirror(NamedTuple):
    """``internode::Layout`` of ``csrc/internode/layout.h`` for machines without the extension (sizing only)."""

    num_ranks: int
    num_nodes: int
    ranks_per_node: int
    stream_off: int
    notify_off: int
    notify_stage_off: int
    notify_row_ints: int
    notify_experts_off: int
    notify_gbl_channels_off: int
    notify_rdma_channels_off: int
    data_off: int
    data_bytes: int
    nvl_off: int
    nvl_bytes: int

    @classmethod
    def of(cls, num_ranks: int, num_nodes: int, num_rdma_bytes: int, num_nvl_bytes: int) -> _LayoutMirror:
        flag_kinds = 2  # kFlagKinds
        g = num_ranks // num_nodes
        experts_off = num_ranks
        gbl_off = experts_off + MAX_LOCAL_EXPERTS
        rdma_off = gbl_off + MAX_CHANNELS
        row_ints = _align(rdma_off + MAX_CHANNELS, 4)
        stream_off = _align(8 * flag_kinds * num_ranks, 16)
        words = (3 + g) * num_nodes * MAX_CHANNELS + 2 * g * MAX_CHANNELS
        notify_off = _align(stream_off + 8 * words, 256)
        notify = _align(4 * num_ranks * row_ints, 256)
        data_off = notify_off + 2 * notify
        nvl_off = _align(num_rdma_bytes, 256)
        return cls(num_ranks, num_nodes, g, stream_off, notify_off, notify_off + notify, row_ints, experts_off,
                   gbl_off, rdma_off, data_off, max(nvl_off - data_off, 0), nvl_off, num_nvl_bytes)

    @property
    def total_bytes(self) -> int:
        return self.nvl_off + _align(self.nvl_bytes, 256)

    def ring_bytes(self, num_channels: int, slots: int, item_bytes: int, has_rdma_peers: bool) -> int:
        return self.data_off + (2 if has_rdma_peers else 1) * self.num_nodes * num_channels * slots * item_bytes

    def nvl_ring_bytes(self, num_channels: int, nvl_slots: int, row_bytes: int) -> int:
        return self.ranks_per_node * num_channels * nvl_slots * row_bytes


class InternodeRuntime(SymmetricRuntime):
    """One rank's internode state: its symmetric buffer, peer mappings, epoch and mailbox.

    Collective: every rank of ``group`` constructs it together (and calls :meth:`destroy` together).

    Args:
        group: the EP process group (any backend; gloo works): shares the NVSHMEM unique id.
        rank, num_ranks: this rank and the group size (NVSHMEM PE numbers follow them).
        ranks_per_node: ``G``; ``num_ranks`` must be a multiple of it, with at least two nodes.
        num_nvl_bytes, num_rdma_bytes: the Buffer's sizes; one symmetric allocation of their sum.
        device: this rank's CUDA device.
        timeout_s: how long any wait on a peer may take before the kernel gives up and reports.
        num_qps_per_rank: RDMA queue pairs per peer (``NVSHMEM_IBGDA_NUM_RC_PER_PE``).
    """

    name = "internode"
    def __init__(self, group: dist.ProcessGroup, rank: int, num_ranks: int, ranks_per_node: int,
                 num_nvl_bytes: int, num_rdma_bytes: int, device: torch.device, timeout_s: float,
                 num_qps_per_rank: int) -> None:
        expect(num_ranks % ranks_per_node == 0 and num_ranks // ranks_per_node >= 2,
               f"InternodeRuntime: {num_ranks} ranks do not form >= 2 nodes of {ranks_per_node}")
        expect(ranks_per_node <= MAX_NVL_PEERS,
               f"InternodeRuntime: at most {MAX_NVL_PEERS} ranks per node are supported, got {ranks_per_node}")
        expect(num_ranks // ranks_per_node <= MAX_NODES,
               f"InternodeRuntime: at most {MAX_NODES} nodes are supported, got {num_ranks // ranks_per_node}")
        self._c = extension()
        self.rank, self.num_ranks, self.ranks_per_node = rank, num_ranks, ranks_per_node
        self.num_nodes = num_ranks // ranks_per_node
        self.device = cuda_device(device)
        self.timeout_s = timeout_s
        self._alive = False
        self._broken: Optional[str] = None
        join_nvshmem_world(self._c, group, rank, num_ranks, self.device, num_qps_per_rank, allow_nvlink=True)
        self.layout = self._c.InternodeLayout(num_ranks, self.num_nodes, num_rdma_bytes, num_nvl_bytes)
        expect(self.layout.data_bytes > 0,
               f"InternodeRuntime: num_rdma_bytes={num_rdma_bytes} is smaller than the control block "
               f"({self.layout.data_off} bytes) of {num_ranks} ranks")
        self._open(self.layout.total_bytes)
        my_node = rank // ranks_per_node
        node_of = [j // ranks_per_node for j in range(num_ranks)]
        if os.environ.get(FORCE_PUTS_ENV) == "1":
            self._sym.use_puts_for([j for j in range(num_ranks) if node_of[j] != my_node])
        missing = [j for j, mapped in enumerate(self._sym.mapped_peers()) if node_of[j] == my_node and not mapped]
        if missing:
            self.destroy()
            raise DeepEPInputError(
                f"InternodeRuntime: NVSHMEM does not map the buffers of node peers {missing} into rank {rank}: the "
                "ranks of one node must be NVLink/P2P-connected (check num_ranks_per_node and "
                "NVSHMEM_DISABLE_P2P)")
        flags = [False] * num_ranks
        dist.all_gather_object(flags, bool(self._sym.has_rdma_peers), group=group)
        if any(flags):
            self._sym.has_rdma_peers = True  # every rank lays out the staging areas the same way
        self._epoch = torch.zeros(1, dtype=torch.int64, device=self.device)
        torch.cuda.synchronize(self.device)
        self._c.barrier_all()

    # ------------------------------------------------------------------------------------------------------
    def _check_rings(self, what: str, num_channels: int, slots: int, item_bytes: int) -> None:
        expect(slots >= MIN_RING_SLOTS, f"{what}: Config.num_max_rdma_chunked_recv_tokens must be at least "
               f"{MIN_RING_SLOTS} for the internode kernels, got {slots}")
        need = self.layout.ring_bytes(num_channels, slots, item_bytes, self._sym.has_rdma_peers)
        if need > self.layout.nvl_off:
            raise DeepEPBufferTooSmall(
                f"{what}: num_rdma_bytes={self.layout.nvl_off} is too small for {self.num_nodes} x {num_channels} "
                f"rings of {slots} items of {item_bytes} bytes (Config.num_max_rdma_chunked_recv_tokens, "
                f"num_sms / 2 channels): it needs at least {need} bytes (Config.get_rdma_buffer_size_hint sizes it)")

    def _state(self) -> dict[str, Any]:
        """The arguments every internode binding takes first."""
        return {"buffer": self._sym, "epoch": self._epoch, "layout": self.layout}

    def _check_alive(self, what: str) -> None:
        if self._broken is not None:
            raise DeepEPTimeoutError(self._broken)
        expect(self._alive, f"{what}: the internode runtime was destroyed")

    # ------------------------------------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int) -> DispatchLayout:
        """``get_dispatch_layout`` on the GPU with device-side ops only (``deepep_plugin.layout``; no host sync)."""
        self._check_alive("get_dispatch_layout")
        expect(num_experts % self.num_ranks == 0,
               f"num_experts ({num_experts}) must be a multiple of the number of ranks ({self.num_ranks})")
        return get_dispatch_layout(topk_idx, num_experts, self.num_ranks, self.ranks_per_node)

    def dispatch(self, x: torch.Tensor, x_scales: Optional[torch.Tensor], handle: Optional[InternodeHandle],
                 layout: Optional[DispatchLayout], topk_idx: Optional[torch.Tensor],
                 topk_weights: Optional[torch.Tensor], expert_alignment: int, num_worst_tokens: int,
                 config: Config) -> DispatchResult:
        """Send every token to each rank that owns one of its experts, through its node's forwarder.

        Args:
            x: ``[T, H]`` CUDA, rows a multiple of 16 bytes (BF16, or FP8 with ``x_scales``).
            x_scales: ``[T, S]`` float32 or int32 (any strides), or None.
            handle: a previous internode dispatch's handle (cached mode), or None with ``layout``.
            topk_idx / topk_weights: ``[T, K]`` int64 / float32 (fresh dispatch), ``K <= 16``.
            expert_alignment: each per-expert count is rounded up to a multiple of it.
            num_worst_tokens: ``W > 0``: outputs of ``W`` rows, no host sync (padding as the reference's).
            config: ``config.num_sms`` bounds the blocks; ``num_channels`` shapes the channel fields.

        Returns:
            ``DispatchResult`` with the reference backend's rows, order and handle (``InternodeHandle``).
        """
        self._check_alive("dispatch")
        r, R, G, N = self.rank, self.num_ranks, self.ranks_per_node, self.num_nodes
        T, H = x.shape
        dev = x.device
        x = x.contiguous()
        hidden_bytes = H * x.element_size()
        expect(hidden_bytes % 16 == 0, f"dispatch: a row of x must be a multiple of 16 bytes, got {hidden_bytes}")
        fresh = handle is None
        in_rank = layout.is_token_in_rank if fresh else handle.is_token_in_rank
        expect(in_rank.is_cuda and tuple(in_rank.shape) == (T, R), "dispatch: is_token_in_rank must be [T, R] on "
               "the GPU")
        S = 0
        if x_scales is not None:
            expect(x_scales.dim() == 2 and x_scales.size(0) == T and x_scales.element_size() == 4,
                   "dispatch: x_scales must be [T, S] with 4-byte elements")
            S = x_scales.size(1)
        K = topk_idx.size(1) if (fresh and topk_idx is not None) else 0
        expect(K <= MAX_TOPK_INTERNODE, f"dispatch: top-k must be <= {MAX_TOPK_INTERNODE}, got {K}")
        rec = self._c.internode_record_bytes(hidden_bytes, S, K, G)
        W = num_worst_tokens
        C = config.num_channels if fresh else handle.rdma_channel_prefix_matrix.size(1)
        slots = config.num_max_rdma_chunked_recv_tokens
        self._check_rings("dispatch", C, slots, rec)
        pos = index_among_selected(in_rank)
        in_node = in_rank.view(T, N, G).any(-1)
        node_slot = index_among_selected(in_node) if fresh else handle.send_rdma_head.contiguous()
        counts_list: list[int] = []
        bad_input: Optional[str] = None
        head_base: Optional[torch.Tensor] = None
        if fresh:
            num_experts = layout.num_tokens_per_expert.numel()
            e_loc = num_experts // R
            expect(e_loc <= MAX_LOCAL_EXPERTS and C <= MAX_CHANNELS,
                   f"dispatch: at most {MAX_LOCAL_EXPERTS} local experts and {MAX_CHANNELS} channels, got "
                   f"{e_loc} and {C}")
            gbl_prefix = torch.cumsum(channel_counts(in_rank, C), 1, dtype=torch.int32)  # [R, C]
            rdma_prefix = torch.cumsum(channel_counts(in_node, C), 1, dtype=torch.int32)  # [N, C]
            # One notify row per destination (layout.h): token counts per rank, then per local expert, then the
            # channel prefixes to the rank and to its node.
            lay = self.layout
            o_exp, o_gch, o_rch = lay.notify_experts_off, lay.notify_gbl_channels_off, lay.notify_rdma_channels_off
            payload = torch.zeros(R, lay.notify_row_ints, dtype=torch.int32, device=dev)
            payload[:, :R] = in_rank.sum(0, dtype=torch.int32)
            payload[:, o_exp:o_exp + e_loc] = layout.num_tokens_per_expert.to(torch.int32).view(R, e_loc)
            payload[:, o_gch:o_gch + C] = gbl_prefix
            payload[:, o_rch:o_rch + C] = rdma_prefix.repeat_interleave(G, 0)
            received = torch.empty_like(payload)
            self._c.internode_notify(**self._state(), payload=payload, received=received)
            count_matrix = received[:, :R].contiguous()
            recv_counts = count_matrix[:, r]
            recv_gbl_rank_prefix = torch.cumsum(recv_counts, 0, dtype=torch.int32)
            recv_base = (recv_gbl_rank_prefix - recv_counts).contiguous()
            gch = received[:, o_gch:o_gch + C]
            gch_exclusive = torch.cat([torch.zeros_like(gch[:, :1]), gch[:, :-1]], 1)
            recv_gbl_channel = (recv_base[:, None] + gch_exclusive).to(torch.int32).contiguous()
            fwd_src = torch.arange(N, device=dev) * G + r % G
            recv_rdma_channel = received[fwd_src, o_rch:o_rch + C].contiguous()
            recv_rdma_rank_prefix = torch.cumsum(recv_rdma_channel[:, -1], 0, dtype=torch.int32)
            expert_recv = received[:, o_exp:o_exp + e_loc].sum(0, dtype=torch.int32)
            # head_base[n, g]: first output row of source (n, my local index) at node peer g of this rank.
            before = torch.cumsum(count_matrix, 0, dtype=torch.int32) - count_matrix
            my_node = r // G
            head_base = before[fwd_src, my_node * G:(my_node + 1) * G].to(torch.int32).contiguous()
            if W:
                rows, head_rows = W, G * W
            else:
                # The one host read: the counts, with the range check of topk_idx riding along (the first flat
                # index of an id outside [-1, E), or T * K when none), raised once the dispatch is enqueued.
                parts = [recv_gbl_rank_prefix[-1:], recv_rdma_rank_prefix[-1:], expert_recv]
                if topk_idx is not None and topk_idx.numel() > 0:
                    bad = (topk_idx < -1) | (topk_idx >= num_experts)
                    flat = torch.arange(topk_idx.numel(), device=dev, dtype=torch.int64)
                    parts.append(torch.where(bad.flatten(), flat, topk_idx.numel()).min().view(1).to(torch.int32))
                info = torch.cat(parts).cpu()
                self.check_error()
                rows, head_rows = int(info[0]), int(info[1])
                counts_list = round_up_counts(info[2:2 + e_loc].tolist(), expert_alignment)
                if len(parts) == 4 and int(info[-1]) < topk_idx.numel():
                    first = int(info[-1])
                    t, k = divmod(first, topk_idx.size(1))
                    bad_input = (f"topk_idx entries must be in [-1, num_experts={num_experts}) (-1 = unused slot), "
                                 f"got topk_idx[{t}, {k}] = {int(topk_idx[t, k])} on rank {r} (it selected nothing)")
        else:
            rdma_prefix = handle.rdma_channel_prefix_matrix
            recv_gbl_rank_prefix = handle.recv_gbl_rank_prefix_sum
            prev = torch.cat([torch.zeros_like(recv_gbl_rank_prefix[:1]), recv_gbl_rank_prefix[:-1]])
            recv_base = prev.to(torch.int32).contiguous()
            rows = handle.recv_src_meta.size(0)
            self._c.internode_barrier(**self._state())

        def out(shape: tuple, dtype: torch.dtype, fill: Optional[float]) -> torch.Tensor:
            if W and fill is not None:
                return torch.full(shape, fill, dtype=dtype, device=dev)
            return torch.empty(shape, dtype=dtype, device=dev)

        recv_x = out((rows, H), x.dtype, 0)
        recv_scales = out((rows, S), x_scales.dtype, 0) if x_scales is not None else None
        recv_idx = recv_w = meta = send_nvl_head = None
        if fresh:
            meta = out((rows, 2), torch.int32, -1)
            send_nvl_head = torch.full((head_rows, G), -1, dtype=torch.int32, device=dev)
            if topk_idx is not None:
                recv_idx = out((rows, K), torch.int64, -1)
                if topk_weights is not None:
                    recv_w = out((rows, K), torch.float32, 0)
        self._c.internode_dispatch(  # 2C blocks: C senders, C receivers
            **self._state(), slots=slots, chunk=max(1, config.num_max_rdma_chunked_send_tokens), x=x,
            x_scales=x_scales, topk_idx=topk_idx.contiguous() if K else None,
            topk_weights=topk_weights.to(torch.float32).contiguous() if (K and topk_weights is not None) else None,
            pos=pos, node_slot=node_slot, rdma_channel_prefix=rdma_prefix, head_base=head_base,
            recv_rdma_rank_prefix=recv_rdma_rank_prefix if fresh else None, send_nvl_head=send_nvl_head,
            recv_base=recv_base, num_local_experts=(layout.num_tokens_per_expert.numel() // R) if fresh else 0,
            recv_x=recv_x, recv_scales=recv_scales, recv_topk_idx=recv_idx, recv_topk_weights=recv_w,
            recv_src_meta=meta)
        if bad_input is not None:  # after the launch, so that the peers' dispatch completes
            raise DeepEPInputError(bad_input)
        if not fresh:
            return DispatchResult(recv_x, recv_scales, None, None, [], handle)
        new_handle = InternodeHandle(in_rank, rdma_prefix, gbl_prefix, recv_rdma_channel, recv_rdma_rank_prefix,
                                     recv_gbl_channel, recv_gbl_rank_prefix, meta.view(torch.uint8).view(rows, 8),
                                     node_slot, send_nvl_head)
        return DispatchResult(recv_x, recv_scales, recv_idx, recv_w, counts_list, new_handle)

    def combine(self, x: torch.Tensor, handle: InternodeHandle, topk_weights: Optional[torch.Tensor],
                bias0: Optional[torch.Tensor], bias1: Optional[torch.Tensor], config: Config) -> CombineResult:
        """Reduce the expert outputs back to their source tokens (inside each node first, then across nodes).

        Args:
            x: ``[n, H]`` bfloat16 CUDA, the rows of the dispatch that made ``handle`` (``n`` its row count).
            handle: that dispatch's ``InternodeHandle``.
            topk_weights: ``[n, K]`` float32 or None; combined like ``x`` (a plain sum).
            bias0, bias1: ``[T, H]`` bfloat16 or None, added once per token.
            config: ``config.num_sms`` bounds the blocks.

        Returns:
            ``CombineResult(combined_x [T, H] bfloat16, combined_topk_weights [T, K] float32 | None)``.
        """
        self._check_alive("combine")
        expect(x.dtype == torch.bfloat16 and x.dim() == 2, "combine: x must be a 2-D bfloat16 tensor")
        T, H = handle.is_token_in_rank.size(0), x.size(1)
        expect(H % 8 == 0, f"combine: hidden must be a multiple of 8, got {H}")
        K = topk_weights.size(1) if topk_weights is not None else 0
        expect(K <= MAX_TOPK_INTERNODE, f"combine: top-k must be <= {MAX_TOPK_INTERNODE}, got {K}")
        rows = handle.recv_src_meta.size(0)
        expect(x.size(0) == rows, f"combine: x must have the {rows} rows of the dispatch that made the handle, got "
               f"{x.size(0)}")
        row = self._c.internode_combine_row_bytes(H, K)
        C = handle.rdma_channel_prefix_matrix.size(1)
        slots = config.num_max_rdma_chunked_recv_tokens
        self._check_rings("combine", C, slots, row)
        nvl_slots = config.num_max_nvl_chunked_recv_tokens
        expect(nvl_slots >= MIN_NVL_SLOTS, f"combine: Config.num_max_nvl_chunked_recv_tokens must be at least "
               f"{MIN_NVL_SLOTS} for the internode kernels, got {nvl_slots}")
        nvl_need = self.layout.nvl_ring_bytes(C, nvl_slots, row)
        if nvl_need > self.layout.nvl_bytes:
            raise DeepEPBufferTooSmall(
                f"combine: num_nvl_bytes={self.layout.nvl_bytes} is too small for {self.ranks_per_node} x {C} NVL "
                f"rings of {nvl_slots} rows of {row} bytes (Config.num_max_nvl_chunked_recv_tokens): it needs at least "
                f"{nvl_need} bytes (Config.get_nvl_buffer_size_hint sizes it)")
        x = x.contiguous()
        w = topk_weights.to(torch.float32).contiguous() if topk_weights is not None else None
        combined = torch.empty((T, H), dtype=torch.bfloat16, device=x.device)
        combined_w = torch.empty((T, K), dtype=torch.float32, device=x.device) if w is not None else None
        b0 = bias0.contiguous() if bias0 is not None else None
        b1 = bias1.contiguous() if bias1 is not None else None
        self._c.internode_barrier(**self._state())
        self._c.internode_combine(  # 2C blocks: C pushers + forwarders, C receivers
            **self._state(), slots=slots, chunk=max(1, config.num_max_rdma_chunked_send_tokens), nvl_slots=nvl_slots,
            nvl_chunk=max(1, min(config.num_max_nvl_chunked_send_tokens, nvl_slots)), x=x, topk_weights=w,
            recv_gbl_channel_prefix=handle.recv_gbl_channel_prefix_matrix.contiguous(),
            recv_gbl_rank_prefix_sum=handle.recv_gbl_rank_prefix_sum.contiguous(),
            send_nvl_head=handle.send_nvl_head.contiguous(),
            recv_rdma_rank_prefix_sum=handle.recv_rdma_rank_prefix_sum.contiguous(),
            recv_rdma_channel_prefix=handle.recv_rdma_channel_prefix_matrix.contiguous(),
            send_rdma_head=handle.send_rdma_head.contiguous(),
            rdma_channel_prefix=handle.rdma_channel_prefix_matrix.contiguous(), bias0=b0, bias1=b1,
            combined_x=combined, combined_topk_weights=combined_w)
        return CombineResult(combined, combined_w)

    # ------------------------------------------------------------------------------------------------------
    def local_buffer(self) -> torch.Tensor:
        """uint8 view of this rank's symmetric buffer (valid until :meth:`destroy`)."""
        self._check_alive("local_buffer")
        return self._buffer

    def check_error(self) -> None:
        """Raise what a kernel reported through the mailbox, without synchronising the device.

        Raises:
            DeepEPTimeoutError: a wait timed out (names rank, peer and the wait); the runtime is unusable after.
            DeepEPInputError: a ``num_worst_tokens`` dispatch received more rows than it had room for (the
                extra rows were dropped, nothing was written out of bounds).
        """
        if self._broken is not None:
            raise DeepEPTimeoutError(self._broken)
        report = self._take_report()
        if report is None:
            return
        status, rank, peer, what, expected, observed, _channel = report
        if status == MAILBOX_TIMEOUT:
            self._broken = (
                f"internode kernel on rank {rank} waited more than {self.timeout_s:g} s for rank {peer}: "
                f"{wait_message(what)} (expected epoch {expected}, last seen {observed}). A peer "
                "died, hung or did not make the same call; this buffer is unusable now (destroy it). "
                "DEEPEP_PLUGIN_TIMEOUT_S sets the timeout")
            raise DeepEPTimeoutError(self._broken)
        self._sym.clear_abort()
        raise DeepEPInputError(
            f"dispatch on rank {rank}: {wait_message(what)}: {expected} rows needed, room for "
            f"{observed} (num_worst_tokens too small); the extra rows were dropped")
