"""Intranode (NVLink) CUDA kernels behind the backend contract: layout, dispatch and combine.

``IntranodeRuntime`` owns one rank's side of the NVLink buffers: at construction it allocates this rank's
buffer with ``cudaMalloc``, exchanges CUDA IPC handles with ``dist.all_gather_object`` over ``group`` (gloo
works) and opens every peer's buffer. The compiled module ``deepep_plugin._intranode_C`` (``csrc/intranode``)
does the per-call work; this module builds the handles and turns the kernels' error mailbox into Python
exceptions.

Every method is one call into the extension, which checks what the kernels need, allocates the outputs and enqueues
the kernels on the *current* CUDA stream. Calls are ordered among themselves across streams (the extension makes a
call's stream wait for the previous call's when they differ). Only the non-cached dispatch without
``num_worst_tokens`` waits on the host (for the receive count, with a timeout); everything else is free of host
synchronisation and can be captured in a CUDA graph. A bad expert id in ``get_dispatch_layout``'s ``topk_idx`` is
reported by its kernel through the mailbox and raised at the next count read or call.

Kernel protocol, buffer layout and tuning constants: ``csrc/intranode/buffer_layout.h`` and the comments at
the top of ``notify.cu``, ``dispatch.cu`` and ``combine.cu``.
"""

from __future__ import annotations

import atexit
import weakref
from typing import Any, NoReturn, Optional

import torch
import torch.distributed as dist

from ..config import Config
from ..errors import DeepEPError, DeepEPInputError, DeepEPTimeoutError, expect
from ..limits import MAILBOX_BAD_INPUT, MAILBOX_OVERFLOW, MAILBOX_TIMEOUT, MAX_NVL_PEERS
from .base import CombineResult, DispatchLayout, DispatchResult, IntranodeHandle


def load_extension() -> Any:
    """Import ``deepep_plugin._intranode_C``; raise ``ImportError`` saying how to build it when absent."""
    try:
        from .. import _intranode_C  # type: ignore[attr-defined]
    except ImportError as e:
        raise ImportError(
            "deepep_plugin._intranode_C is not built: on a machine with a CUDA build of torch and nvcc run "
            "`DEEPEP_PLUGIN_EXTENSIONS=intranode python setup.py build_ext --inplace` (or pip install "
            f"--no-build-isolation .); original error: {e}"
        ) from e
    return _intranode_C


class IntranodeRuntime:
    """NVLink buffers of one rank and the intranode kernels (see the module docstring).

    Args:
        group: the EP process group (all ranks in one node; any backend that supports ``all_gather_object``).
        rank: this process's rank in ``group``.
        num_ranks: ``group``'s size, 1..8.
        num_nvl_bytes: bytes of this rank's NVLink buffer; dispatch/combine need at least
            ``Config.get_nvl_buffer_size_hint(hidden * max(element_size, 2), num_ranks)`` for their config.
        device: the CUDA device of this rank.
        timeout_s: seconds any wait on a peer may last before ``DeepEPTimeoutError`` (settable later through
            the ``timeout_s`` attribute).

    Collective: every rank of ``group`` must construct it together.
    """

    name = "intranode"
    extension = "_intranode_C"
    #: Calls are ordered across streams by the extension, and each call reads the mailbox itself, so Buffer runs
    #: them on the current stream with no event bookkeeping and no separate error check.
    orders_streams = True

    @classmethod
    def unavailable_reason(cls) -> str:
        """Why these kernels cannot run here ("" when they can)."""
        from .selection import extension_unavailable

        return extension_unavailable("intranode kernels", cls.extension)

    def __init__(self, group: dist.ProcessGroup, rank: int, num_ranks: int, num_nvl_bytes: int,
                 device: torch.device, timeout_s: float) -> None:
        expect(1 <= num_ranks <= MAX_NVL_PEERS,
               f"intranode kernels need 1..{MAX_NVL_PEERS} ranks in one node, got num_ranks={num_ranks}")
        expect(0 <= rank < num_ranks, f"rank must be in [0, {num_ranks}), got {rank}")
        expect(num_nvl_bytes > 0, f"num_nvl_bytes must be positive, got {num_nvl_bytes}")
        ext = load_extension()
        device = torch.device(device)
        expect(device.type == "cuda", f"device must be a CUDA device, got {device}")
        self.rank = rank
        self.num_ranks = num_ranks
        self.num_nvl_bytes = num_nvl_bytes
        self.device = device
        self.timeout_s = float(timeout_s)
        self._ext = ext
        self._rt = ext.Runtime(rank, num_ranks, num_nvl_bytes, device.index if device.index is not None
                               else torch.cuda.current_device())
        handles: list[Any] = [None] * num_ranks
        dist.all_gather_object(handles, self._rt.ipc_handle(), group=group)
        self._rt.open_peers(handles)
        self._broken: Optional[str] = None
        self._destroyed = False
        ref = weakref.ref(self)
        atexit.register(lambda: (lambda rt: rt.destroy() if rt is not None else None)(ref()))

    # ------------------------------------------------------------------------------------------------------
    def local_buffer(self) -> torch.Tensor:
        """This rank's NVLink buffer as a uint8 CUDA tensor ``[num_nvl_bytes]`` (valid until ``destroy``)."""
        self._check_alive()
        return self._rt.local_buffer()

    def check_error(self) -> None:
        """Raise what a kernel reported through the mailbox, without synchronising the device.

        Raises:
            DeepEPTimeoutError: a wait timed out (names rank, peer, channel and the wait); the buffer is
                unusable afterwards (its queues are in an unknown state): destroy it.
            DeepEPInputError: a ``num_worst_tokens`` dispatch received more rows than it had room for (the
                extra rows were dropped, nothing was written out of bounds), or ``get_dispatch_layout`` met an
                expert id outside ``[-1, num_experts)`` (it selected nothing; the buffer stays usable).
        """
        if self._broken is not None:
            raise DeepEPTimeoutError(self._broken)
        if self._destroyed:
            return
        status, rank, peer, channel, _what, what_name, detail, observed = self._rt.read_mailbox()
        if status == MAILBOX_TIMEOUT:
            where = f"channel {channel}, " if channel >= 0 else ""
            self._broken = (
                f"rank {rank}: timed out after {self.timeout_s:g} s in {what_name} "
                f"(waiting for rank {peer}, {where}counter expected {detail}, last seen {observed}). "
                "A peer died, hung, or did not make the same call; or, if every rank made it, not all of the "
                "kernel's num_sms blocks could be resident at once (another persistent kernel on the GPU, or an MPS "
                "limit: CUDA_MPS_ACTIVE_THREAD_PERCENTAGE). This buffer is unusable now (destroy it)")
            raise DeepEPTimeoutError(self._broken)
        if status == MAILBOX_OVERFLOW:
            raise DeepEPInputError(
                f"dispatch: num_worst_tokens={observed} is smaller than the number of tokens rank {rank} "
                f"received (at least {detail}); the extra rows were dropped")
        if status == MAILBOX_BAD_INPUT:
            raise DeepEPInputError(
                f"topk_idx entries must be in [-1, num_experts={observed}) (-1 = unused slot), got "
                f"topk_idx[{peer}, {channel}] = {detail} on rank {rank} (get_dispatch_layout ignored it)")

    def destroy(self) -> None:
        """Release the buffers (idempotent). Waits for this device's work first."""
        if self._destroyed:
            return
        self._destroyed = True
        try:
            torch.cuda.synchronize(self.device)
        except Exception:  # noqa: BLE001 - at interpreter exit the CUDA context may already be gone
            pass
        self._rt.destroy()

    # ------------------------------------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int) -> DispatchLayout:
        """``get_dispatch_layout`` on the GPU (spec 3.1): one kernel, no host read.

        Args:
            topk_idx: ``[T, K]`` int64 CUDA, contiguous, global expert ids; ``-1`` = unused slot. Other entries
                outside ``[0, num_experts)`` select nothing and are reported: the first one raises
                ``DeepEPInputError`` (naming the token, the slot and the value) at the next dispatch's count read
                or at the next call.
            num_experts: ``E``, a multiple of ``num_ranks``.
        Returns:
            ``DispatchLayout(num_tokens_per_rank [R] int32, None, num_tokens_per_expert [E] int32,
            is_token_in_rank [T, R] bool)``, all on ``topk_idx``'s device.
        """
        if self._broken is not None or self._destroyed:
            self._check_alive()
        try:
            per_rank, per_expert, in_rank = self._rt.layout(topk_idx, num_experts)
        except self._ext.MailboxPending:
            self._raise_report()
        return DispatchLayout(per_rank, None, per_expert, in_rank)

    def dispatch(self, x: torch.Tensor, x_scales: Optional[torch.Tensor], handle: Optional[IntranodeHandle],
                 layout: Optional[DispatchLayout], topk_idx: Optional[torch.Tensor],
                 topk_weights: Optional[torch.Tensor], expert_alignment: int, num_worst_tokens: int,
                 config: Config) -> DispatchResult:
        """Send every token to each rank that owns one of its experts (non-cached when ``handle`` is None).

        Args:
            x: ``[T, H]`` CUDA, contiguous, ``H * element_size % 16 == 0`` (BF16, or FP8 with ``x_scales``).
            x_scales: ``[T, S]`` float32 or int32, any strides, or None.
            handle: a previous dispatch's handle (cached mode: same layout, no host sync, no top-k), or None.
            layout: ``get_dispatch_layout``'s result (non-cached mode).
            topk_idx / topk_weights: ``[T, K]`` int64 / float32, or None (both or neither).
            expert_alignment: each entry of the per-expert list is rounded up to a multiple of it.
            num_worst_tokens: if > 0, outputs have exactly this many rows and nothing waits on the host.
            config: ``num_sms`` (2 per channel) and ``num_max_nvl_chunked_recv_tokens`` (queue depth) are used.
        Returns:
            ``DispatchResult(recv_x [n, H], recv_x_scales [n, S] | None, recv_topk_idx [n, K] int64 | None,
            recv_topk_weights [n, K] float32 | None, num_recv_tokens_per_expert_list, handle)``. Only a fresh
            dispatch without ``num_worst_tokens`` reads from the GPU (the receive counts, once).
        """
        if self._broken is not None or self._destroyed:
            self._check_alive()
        C = config.num_channels
        Q = config.num_max_nvl_chunked_recv_tokens
        try:
            if handle is None:
                if layout is None:
                    raise DeepEPInputError("dispatch: layout (or a handle) is required")
                out = self._rt.dispatch_fresh(x, x_scales, topk_idx, topk_weights, layout[0], layout[2], layout[3],
                                              C, Q, expert_alignment if expert_alignment > 1 else 1,
                                              num_worst_tokens, self.timeout_s)
                status = out[10]
                if status:
                    self._after_fresh_dispatch(status)
                handle = IntranodeHandle(out[5], out[6], out[7], out[8], layout[3], out[9])
                return DispatchResult(out[0], out[1], out[2], out[3],
                                      out[4] if num_worst_tokens <= 0 else [], handle)
            if topk_idx is not None or topk_weights is not None:
                raise DeepEPInputError("cached dispatch: topk_idx/topk_weights must be None")
            rows = num_worst_tokens if num_worst_tokens > 0 else handle.recv_src_idx.shape[0]
            recv_x, recv_scales = self._rt.dispatch_cached(
                x, x_scales, handle.is_token_in_rank, handle.rank_prefix_matrix, handle.recv_channel_prefix_matrix,
                rows, C, Q, self.timeout_s)
            return DispatchResult(recv_x, recv_scales, None, None, [], handle)
        except self._ext.MailboxPending:
            self._raise_report()

    def combine(self, x: torch.Tensor, handle: IntranodeHandle, topk_weights: Optional[torch.Tensor],
                bias0: Optional[torch.Tensor], bias1: Optional[torch.Tensor], config: Config) -> CombineResult:
        """Sum each token's copies back on its source rank (FP32 accumulation, rounded to BF16).

        Args:
            x: ``[n, H]`` BF16 CUDA: one row per row ``dispatch`` returned, in that order.
            handle: the non-cached dispatch's handle (its channel count is used).
            topk_weights: ``[n, K]`` float32 or None.
            bias0, bias1: ``[T, H]`` BF16 or None.
            config: ``num_max_nvl_chunked_recv_tokens`` (queue depth) is used.
        Returns:
            ``CombineResult(combined_x [T, H] BF16, combined_topk_weights [T, K] float32 | None)`` with
            ``combined_x[t] = bias0[t] + bias1[t] + sum of the copies of t``. No host read.
        """
        if self._broken is not None or self._destroyed:
            self._check_alive()
        try:
            combined_x, combined_w = self._rt.combine(
                x, topk_weights, bias0, bias1, handle.rank_prefix_matrix, handle.channel_prefix_matrix,
                handle.recv_channel_prefix_matrix, handle.send_head, config.num_max_nvl_chunked_recv_tokens,
                self.timeout_s)
        except self._ext.MailboxPending:
            self._raise_report()
        return CombineResult(combined_x, combined_w)

    def host_waits(self) -> int:
        """How many times this runtime waited on the host for the GPU (the fresh dispatches' count reads)."""
        return int(self._rt.host_waits())

    def split_launches(self) -> int:
        """How many fresh dispatches ran as a split launch (``DEEPEP_PLUGIN_EARLY_DISPATCH=1``, csrc/intranode/
        dispatch.cu): the senders enqueued before the count read, the rest after."""
        return int(self._rt.split_launches())

    # ------------------------------------------------------------------------------------------------------
    def _check_alive(self) -> None:
        if self._destroyed:
            raise DeepEPInputError("this intranode buffer was destroyed")
        self.check_error()

    def _raise_report(self) -> NoReturn:
        """Raise the mailbox's report. A timeout refuses a call before it enqueues anything; another report (a bad
        id, an overflow) is raised after the call enqueued its work, so the peers' matching calls complete (the
        call's outputs are dropped) and the buffer stays usable."""
        self.check_error()
        raise DeepEPError(f"rank {self.rank}: the intranode kernels' mailbox held a report that vanished")

    def _after_fresh_dispatch(self, status: int) -> None:
        """Raise for a fresh dispatch's ``status`` (csrc/intranode/runtime.cpp: dispatch_fresh)."""
        if status == 3:  # enqueued; a report (a bad id in the layout's topk_idx, an overflow) waits in the mailbox
            self.check_error()
            return
        if status == 2:  # a kernel of this rank timed out: nothing was dispatched
            self.check_error()
        host_timeout = 2.0 * self.timeout_s + 1.0
        self._broken = (
            f"rank {self.rank}: timed out after {host_timeout:g} s waiting on the host for the dispatch "
            "receive count (the notify kernel did not finish: a peer did not call dispatch, or the GPU is "
            "blocked by other work); this buffer is unusable now (destroy it)")
        raise DeepEPTimeoutError(self._broken)
