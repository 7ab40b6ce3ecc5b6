"""Low-latency dispatch and combine on CUDA GPUs, over an NVSHMEM symmetric buffer (extension ``_nvshmem_C``).

For inference decoding: up to a few hundred tokens per rank, fixed-size buffers (CUDA-graph friendly), FP8 cast
inside the kernel, and a receive hook (the send kernel returns at once; ``hook()`` launches the receive kernel,
so no SM waits while the data is in flight). NVSHMEM comes from the ``nvidia-nvshmem-cu13``/``-cu12`` wheel.
Peers whose buffer NVSHMEM maps into this process (NVLink P2P, or processes sharing a GPU) are written with
plain stores; other peers (other nodes) with NVSHMEM puts (IBGDA where the machine has it).

What differs from DeepEP V1 (same signatures, same results):

* **A token is sent once per destination rank**, not once per expert: the message header lists the
  destination's local experts the token selected, and the receiver fans the payload out. A token that lists
  an expert twice reaches it once (one row), and combine adds both weights to that row.
* **Deterministic receive layout**: per local expert, the sources' blocks in rank order, each source's tokens
  in increasing index (DeepEP leaves both orders to atomics). ``layout_range``/``src_info`` describe it.
* **Any hidden size that is a multiple of 128** (FP8 and BF16) and **top-k up to 16**; ``N_ll`` up to 65535.
* **Smaller buffer** (``required_rdma_bytes``; about half of DeepEP's hint for DeepSeek-V3 shapes, and never
  more, so buffers sized by ``get_low_latency_rdma_size_hint`` always work). Layout (``csrc/low_latency/layout.h``,
  which the extension's ``LowLatencyLayout`` reports), for ``R`` ranks, ``E`` experts (``E_loc = E / R``),
  ``N = N_ll`` and hidden ``H``, per parity (there are two):
  ``align16(4R)`` signal words + ``max(N * Md, E * N * (2H + H/32))`` send/zero-copy staging
  + ``max(counts + R * N * Md, N * min(16, E) * 2H)`` receive, where
  ``Md = align16(8 * min(16, E_loc)) + 2H`` is one message and ``counts = align16(4E)`` when ``E_loc >= 2``.
  Example: ``N=128, H=7168, R=2, E=288`` needs 1.05 GiB (DeepEP's hint: 2.0 GiB).
* **No hangs**: every wait times out (``timeout_s``, from ``DEEPEP_PLUGIN_TIMEOUT_S``) and reports
  ``{rank, peer, what}`` through a host-mapped mailbox; :meth:`LowLatencyRuntime.check_error` raises
  ``DeepEPTimeoutError``. Kernels never ``__trap``.
* **Calls on different streams are ordered**: a launch on another stream than this Buffer's previous one waits for
  that one (one event, ``csrc/common/stream_order.h``), so a hook or a combine may run on another stream than its
  dispatch; the hook then records its tensors on its stream.
* **Parity guard**: two consecutive ops must use different buffer halves, and the host picks the half when a call is
  issued, so a CUDA graph holding an odd number of low-latency ops, replayed twice in a row or between eager calls,
  would reuse one. The kernels check it on the GPU (one word per block, ``csrc/low_latency/low_latency.cu``): such an
  op and every later one does no work on every rank, and the next call raises ``DeepEPError`` saying what happened
  and what to do (capture dispatch + combine pairs; ``clean_low_latency_buffer`` restarts).
* Wait-cost statistics are GPU clock cycles (as DeepEP), measured from the receive kernel's start.
* NVSHMEM is initialised once per process and kept (NVSHMEM cannot be re-initialised in one process):
  :meth:`LowLatencyRuntime.destroy` frees the symmetric buffer, and a later runtime with the same rank, group
  size and device reuses the NVSHMEM world.

Combine reads the per-row combine slot from ``handle.src_info``'s base tensor (``src_info`` is row 0 of an
int32 ``[2, E_loc, R*N]`` tensor whose row 1 holds the slots), so pass the handle returned by dispatch.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from ..errors import DeepEPBufferTooSmall, DeepEPError, DeepEPInputError, DeepEPTimeoutError, expect
from ..limits import (
    FP8_GROUP,
    MAILBOX_BAD_INPUT,
    MAILBOX_REFUSED,
    MAX_LOW_LATENCY_ENTRIES,
    MAX_LOW_LATENCY_TOKENS_PER_RANK,
    MAX_TOPK_LOW_LATENCY,
    wait_message,
)
from .base import LowLatencyDispatchResult, LowLatencyHandle
from .nvshmem import SymmetricRuntime, cuda_device, extension_if_built, join_nvshmem_world
from .nvshmem import extension as _extension

#: Set to 1 to send to every peer with NVSHMEM puts (the RDMA code path) even where P2P stores would work.
FORCE_PUTS_ENV = "DEEPEP_PLUGIN_LL_NVSHMEM_PUTS"


def required_rdma_bytes(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int) -> int:
    """Bytes of symmetric buffer the low-latency kernels need (the layout in the module docstring).

    Always ``<=`` DeepEP's ``get_low_latency_rdma_size_hint`` for the same arguments. Asks the extension
    (``LowLatencyLayout``); where it is not built, a Python mirror of ``csrc/low_latency/layout.h`` answers.
    """
    c = extension_if_built()
    if c is not None:
        return c.LowLatencyLayout(num_ranks, num_experts, hidden, num_max_dispatch_tokens_per_rank).total_bytes
    return _required_bytes_without_extension(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)


def _required_bytes_without_extension(n: int, h: int, r: int, e: int) -> int:
    """``Layout::total_bytes`` of ``csrc/low_latency/layout.h``, for machines without the extension (sizing only)."""
    def align16(x: int) -> int:
        return (x + 15) // 16 * 16

    e_loc = e // r
    msg = align16(8 * min(MAX_LOW_LATENCY_ENTRIES, e_loc)) + 2 * h
    signal = align16(4 * r)
    send = max(n * msg, e * n * align16(2 * h + 4 * (h // FP8_GROUP)))
    counts = align16(4 * e) if e_loc >= 2 else 0
    recv = max(counts + r * n * msg, n * min(MAX_TOPK_LOW_LATENCY, e) * 2 * h)
    return 2 * (signal + send + recv)


class LowLatencyRuntime(SymmetricRuntime):
    """One rank's low-latency state: its NVSHMEM symmetric buffer, peer mappings, workspace and mailbox.

    Collective: every rank of ``group`` constructs it together (and calls :meth:`destroy` together).

    Args:
        group: the EP process group (any backend; gloo works): used to share the NVSHMEM unique id.
        rank, num_ranks: this rank and the group size (NVSHMEM PE numbers follow them).
        num_rdma_bytes: bytes of the symmetric buffer (``>= required_rdma_bytes(...)`` of every call).
        device: this rank's CUDA device.
        timeout_s: how long any wait on a peer may take before the kernel gives up and reports.
        num_qps_per_rank: RDMA queue pairs per peer (``NVSHMEM_IBGDA_NUM_RC_PER_PE``).
        allow_nvlink: let NVSHMEM use P2P (NVLink) between peers of one node.
    """

    name = "low_latency"
    def __init__(self, group: dist.ProcessGroup, rank: int, num_ranks: int, num_rdma_bytes: int,
                 device: torch.device, timeout_s: float, num_qps_per_rank: int, allow_nvlink: bool) -> None:
        self._c = _extension()
        self.rank, self.num_ranks = rank, num_ranks
        self.num_rdma_bytes = num_rdma_bytes
        self.device = cuda_device(device)
        self.timeout_s = timeout_s
        self._alive = False
        self._layouts: dict[tuple[int, int, int], Any] = {}
        join_nvshmem_world(self._c, group, rank, num_ranks, self.device, num_qps_per_rank, allow_nvlink)
        self._open(num_rdma_bytes)
        if os.environ.get(FORCE_PUTS_ENV) == "1":
            self._sym.use_puts_for([j for j in range(num_ranks) if j != rank])
        self._workspace = torch.zeros(self._c.LL_WORKSPACE_INTS, dtype=torch.int32, device=self.device)
        self._num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        self._parity = 0
        self._refused: Optional[str] = None  # set once the parity guard refused an op (until clean)
        torch.cuda.synchronize(self.device)
        self._c.barrier_all()

    # ------------------------------------------------------------------------------------------------------
    def _layout(self, what: str, n_ll: int, hidden: int, num_experts: int) -> Any:
        """The extension's ``LowLatencyLayout`` of a call, after the checks that give the clearest messages."""
        expect(self._alive, f"{what}: the low-latency runtime was destroyed")
        key = (n_ll, hidden, num_experts)
        layout = self._layouts.get(key)
        if layout is not None:
            return layout
        expect(0 < n_ll <= MAX_LOW_LATENCY_TOKENS_PER_RANK,
               f"{what}: num_max_dispatch_tokens_per_rank must be in [1, {MAX_LOW_LATENCY_TOKENS_PER_RANK}], got "
               f"{n_ll}")
        expect(hidden > 0 and hidden % FP8_GROUP == 0,
               f"{what}: hidden must be a positive multiple of {FP8_GROUP}, got {hidden}")
        expect(num_experts > 0 and num_experts % self.num_ranks == 0,
               f"{what}: num_experts={num_experts} must be a positive multiple of the group size {self.num_ranks}")
        expect(num_experts <= self._c.ll_max_experts(),
               f"{what}: num_experts={num_experts} exceeds what the kernels hold ({self._c.ll_max_experts()})")
        layout = self._c.LowLatencyLayout(self.num_ranks, num_experts, hidden, n_ll)
        if layout.total_bytes > self.num_rdma_bytes:
            raise DeepEPBufferTooSmall(
                f"{what}: num_rdma_bytes={self.num_rdma_bytes} is too small for num_max_dispatch_tokens_per_rank="
                f"{n_ll}, hidden={hidden}, num_experts={num_experts}: it needs at least {layout.total_bytes} bytes")
        self._layouts[key] = layout
        return layout

    def _next_parity(self, what: str) -> int:
        if self._refused is not None:
            raise DeepEPError(f"{what}: {self._refused}")
        parity = self._parity
        self._parity ^= 1
        return parity

    # ------------------------------------------------------------------------------------------------------
    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, *, cumulative_local_expert_recv_stats: Optional[torch.Tensor],
                             dispatch_wait_recv_cost_stats: Optional[torch.Tensor], use_fp8: bool, round_scale: bool,
                             use_ue8m0: bool, return_recv_hook: bool) -> LowLatencyDispatchResult:
        """Send each token to the ranks of its experts; receive this rank's experts' tokens.

        Args:
            x: ``[T, H]`` bfloat16, contiguous, on this rank's GPU; ``T <= N_ll``.
            topk_idx: ``[T, K]`` int64 global expert ids (``-1`` = unused), ``K <= 16``.
            num_max_dispatch_tokens_per_rank: ``N_ll``, the same on every rank.
            num_experts: ``E``, a multiple of the group size ``R``.
            cumulative_local_expert_recv_stats: optional int32 ``[E_loc]``: received rows are added to it.
            dispatch_wait_recv_cost_stats: optional int64 ``[R]``: clock cycles waited per source are added.
            use_fp8, round_scale, use_ue8m0: the in-kernel FP8 cast (``deepep_plugin.fp8`` semantics).
            return_recv_hook: launch only the send kernel; the returned hook launches the receive kernel.

        Returns:
            ``LowLatencyDispatchResult``: ``recv_x`` ``[E_loc, R*N_ll, H]`` (float8_e4m3fn or bfloat16),
            ``recv_x_scales`` (FP8: float32 ``[E_loc, R*N_ll, H/128]`` or UE8M0 int32 ``[E_loc, R*N_ll,
            ceil(H/512)]``, transposed views of ``[E_loc, S, R*N_ll]`` tensors; else ``None``), ``recv_count``
            int32 ``[E_loc]``, the handle and the hook (or ``None``). All on this rank's GPU; rows past
            ``recv_count[i]`` are unspecified.
        """
        n_ll, hidden, r = num_max_dispatch_tokens_per_rank, x.size(1), self.num_ranks
        layout = self._layout("low_latency_dispatch", n_ll, hidden, num_experts)
        expect(topk_idx.size(1) <= MAX_TOPK_LOW_LATENCY,
               f"low_latency_dispatch: top-k must be <= {MAX_TOPK_LOW_LATENCY}, got {topk_idx.size(1)}")
        e_loc, slots, dev = layout.num_local_experts, r * n_ll, x.device
        parity = self._next_parity("low_latency_dispatch")
        if use_fp8:
            recv_x = torch.empty((e_loc, slots, hidden), dtype=torch.float8_e4m3fn, device=dev)
            groups = hidden // FP8_GROUP
            if use_ue8m0:
                scales = torch.empty((e_loc, (groups + 3) // 4, slots), dtype=torch.int32, device=dev)
            else:
                scales = torch.empty((e_loc, groups, slots), dtype=torch.float32, device=dev)
        else:
            recv_x = torch.empty((e_loc, slots, hidden), dtype=torch.bfloat16, device=dev)
            scales = None
        recv_count = torch.empty(e_loc, dtype=torch.int32, device=dev)
        info = torch.empty((2, e_loc, slots), dtype=torch.int32, device=dev)  # [0] source token, [1] combine slot
        layout_range = torch.empty((e_loc, r), dtype=torch.int64, device=dev)
        # The send and receive kernels take the same arguments; the hook keeps them (and so the tensors) alive.
        args: dict[str, Any] = dict(
            buffer=self._sym, workspace=self._workspace, layout=layout, parity=parity, x=x.contiguous(),
            topk_idx=topk_idx.contiguous(), recv_x=recv_x, recv_scales=scales, recv_count=recv_count,
            recv_info=info, layout_range=layout_range, cumulative_stats=cumulative_local_expert_recv_stats,
            wait_stats=dispatch_wait_recv_cost_stats, use_fp8=use_fp8, round_scale=round_scale,
            use_ue8m0=use_ue8m0, num_sms=self._num_sms)
        send_stream = self._c.ll_dispatch_send(**args)

        def hook() -> None:
            expect(self._alive, "low_latency_dispatch hook: the low-latency runtime was destroyed")
            expect(bool(args), "low_latency_dispatch hook: a receive hook can be called only once")
            if self._c.ll_dispatch_recv(**args) != send_stream:
                _record_on_current_stream(args)
            args.clear()

        if not return_recv_hook:
            hook()
        handle = LowLatencyHandle(info[0], layout_range, n_ll, hidden, num_experts)
        return LowLatencyDispatchResult(recv_x, scales.transpose(1, 2) if scales is not None else None, recv_count,
                                        handle, hook if return_recv_hook else None)

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                            handle: LowLatencyHandle, *, zero_copy: bool, return_recv_hook: bool,
                            out: Optional[torch.Tensor], combine_wait_recv_cost_stats: Optional[torch.Tensor]
                            ) -> tuple[torch.Tensor, Optional[Callable[[], None]]]:
        """Send the expert outputs back to their sources and reduce them there.

        Args:
            x: ``[E_loc, R*N_ll, H]`` bfloat16 expert outputs in the layout of the dispatch that made ``handle``
                (only each expert's first ``recv_count`` rows are read); ignored with ``zero_copy``.
            topk_idx: ``[T, K]`` int64, the same as given to that dispatch.
            topk_weights: ``[T, K]`` float32.
            handle: the handle returned by that dispatch.
            zero_copy: the outputs were written into :meth:`get_next_low_latency_combine_buffer`.
            return_recv_hook: launch only the send kernel; the returned hook launches the reduction.
            out: optional ``[T, H]`` bfloat16 result tensor (written and returned).
            combine_wait_recv_cost_stats: optional int64 ``[R]``: clock cycles waited per source are added.

        Returns:
            ``(combined_x, hook)``: ``combined_x`` ``[T, H]`` bfloat16 on this GPU with
            ``combined_x[t] = bf16(sum_k w[t, k] * y(topk_idx[t, k], t))`` (FP32, in k order, ``-1`` skipped);
            ``hook`` or ``None``.
        """
        n_ll, hidden, num_experts = handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts
        layout = self._layout("low_latency_combine", n_ll, hidden, num_experts)
        e_loc, slots = layout.num_local_experts, self.num_ranks * n_ll
        info = handle.src_info._base
        expect(info is not None and tuple(info.shape) == (2, e_loc, slots) and info.dtype == torch.int32
               and info[0].data_ptr() == handle.src_info.data_ptr(),
               "low_latency_combine: handle.src_info must be the tensor returned by this Buffer's "
               "low_latency_dispatch (its base tensor carries the combine slots)")
        expect(topk_idx.size(1) <= MAX_TOPK_LOW_LATENCY,
               f"low_latency_combine: top-k must be <= {MAX_TOPK_LOW_LATENCY}, got {topk_idx.size(1)}")
        parity = self._next_parity("low_latency_combine")
        num_tokens = topk_idx.size(0)
        result = out if out is not None else torch.empty((num_tokens, hidden), dtype=torch.bfloat16,
                                                         device=topk_idx.device)
        args: dict[str, Any] = dict(
            buffer=self._sym, workspace=self._workspace, layout=layout, parity=parity, x=x.contiguous(),
            recv_info=info, layout_range=handle.layout_range, topk_idx=topk_idx.contiguous(),
            topk_weights=topk_weights.to(torch.float32).contiguous(), zero_copy=zero_copy, out=result,
            wait_stats=combine_wait_recv_cost_stats, num_sms=self._num_sms)
        send_stream = self._c.ll_combine_send(**args)

        def hook() -> None:
            expect(self._alive, "low_latency_combine hook: the low-latency runtime was destroyed")
            expect(bool(args), "low_latency_combine hook: a receive hook can be called only once")
            if self._c.ll_combine_recv(**args) != send_stream:
                _record_on_current_stream(args)
            args.clear()

        if not return_recv_hook:
            hook()
            return result, None
        return result, hook

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Reset the low-latency state on every rank (collective, on the current stream, with barriers).

        Zeroes the signal words of both parities and the kernels' counters and parity guard, and restarts the buffer
        toggle at parity 0 on every rank, so ranks that fell out of step (a call that timed out on some ranks only,
        or ops the parity guard refused) agree again. Runs after this Buffer's earlier low-latency calls, whatever
        their stream.
        """
        layout = self._layout("clean_low_latency_buffer", num_max_dispatch_tokens_per_rank, hidden, num_experts)
        self._sym.order_current_stream()
        self._c.barrier_on_stream(device=self.device.index)
        self._buffer[: layout.send_offset(0)].zero_()  # [signal0 | signal1] come first
        self._workspace.zero_()
        self._sym.clear_abort()
        self._parity = 0
        self._refused = None
        self._c.barrier_on_stream(device=self.device.index)

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """BF16 ``[E_loc, R*N_ll, H]`` view of the zero-copy send area of the next call.

        Strides ``(R*N_ll*M, M, 1)`` with ``M = H + H/64`` elements (DeepEP's) rounded up to 8: fill it with the
        expert outputs and call ``low_latency_combine(..., zero_copy=True)`` next.
        """
        n_ll, hidden, num_experts = handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts
        layout = self._layout("get_next_low_latency_combine_buffer", n_ll, hidden, num_experts)
        e_loc, slots = layout.num_local_experts, self.num_ranks * n_ll
        row = layout.combine_send_row_bytes // 2  # in BF16 elements
        start = layout.send_offset(self._parity)
        area = self._buffer[start:start + e_loc * slots * row * 2].view(torch.bfloat16)
        return area.as_strided((e_loc, slots, hidden), (slots * row, row, 1))

    def local_buffer(self) -> torch.Tensor:
        """uint8 ``[num_rdma_bytes]`` view of this rank's symmetric buffer (valid until :meth:`destroy`)."""
        expect(self._alive, "local_buffer: the low-latency runtime was destroyed")
        return self._buffer

    def check_error(self) -> None:
        """Raise ``DeepEPTimeoutError`` if a kernel of this rank reported a timed-out wait, ``DeepEPInputError`` if
        a dispatch met a bad expert id, ``DeepEPError`` if the parity guard refused an op (no device sync).

        The report is cleared, so later calls can go on once the caller has recovered (after a timeout the
        signal words are in an unknown state: call ``clean_low_latency_buffer`` on every rank, or destroy). After a
        refusal, low-latency calls raise the same ``DeepEPError`` until ``clean_low_latency_buffer``.
        """
        report = self._take_report()
        if report is None:
            return
        status, rank, peer, what, expected, observed, channel = report
        if status == MAILBOX_REFUSED:
            self._refused = _parity_refusal(rank, expected)
            raise DeepEPError(self._refused)
        if status == MAILBOX_BAD_INPUT:  # the send kernel met an id outside [-1, E): it selected nothing
            raise DeepEPInputError(
                f"low_latency_dispatch: topk_idx entries must be in [-1, num_experts={observed}) (-1 = unused "
                f"slot), got topk_idx[{peer}, {channel}] = {expected} on rank {rank} (reported by the send kernel "
                "of an earlier call, which ignored it)")
        self._sym.clear_abort()
        raise DeepEPTimeoutError(
            f"low-latency kernel on rank {rank} waited more than {self.timeout_s:g} s for rank {peer}: "
            f"{wait_message(what)} (expected {expected}, last seen {observed}). The peer died, "
            "hung or did not make the same call; call clean_low_latency_buffer() on every rank or destroy the "
            "Buffer (DEEPEP_PLUGIN_TIMEOUT_S sets the timeout)")


def _record_on_current_stream(args: dict[str, Any]) -> None:
    """A receive kernel ran on another stream than its send kernel: keep the call's tensors (allocated on the send's
    stream) from being reused until the receive kernel is done with them."""
    stream = torch.cuda.current_stream()
    for value in args.values():
        if isinstance(value, torch.Tensor):
            value.record_stream(stream)


def _parity_refusal(rank: int, parity: int) -> str:
    """What the parity guard's report means, and what to do."""
    return (
        f"the low-latency kernels on rank {rank} refused an op that would have used buffer half {parity}, the half "
        "of the op just before it, and every low-latency op after it (they did no work; their outputs are "
        "unspecified). The half is chosen on the host when a call is issued or captured, alternating, so this "
        "happens when a CUDA graph holding an odd number of low-latency ops (dispatch and combine count one each, "
        "a receive hook belongs to its op) is replayed twice in a row or between eager calls, or when an odd number "
        "of eager low-latency ops runs between replays. Capture low-latency ops in dispatch + combine pairs and keep "
        "eager calls between replays in pairs; call clean_low_latency_buffer() on every rank to use this Buffer's "
        "low-latency kernels again")
