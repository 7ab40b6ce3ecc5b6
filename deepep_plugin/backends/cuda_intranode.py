"""Intranode (NVLink) CUDA kernels behind the backend contract: layout, dispatch and combine.

``IntranodeRuntime`` owns one rank's side of the NVLink buffers: at construction it allocates this rank's
buffer with ``cudaMalloc``, exchanges CUDA IPC handles with ``dist.all_gather_object`` over ``group`` (gloo
works) and opens every peer's buffer. The compiled module ``deepep_plugin._intranode_C`` launches the kernels
(``csrc/intranode``); this module allocates the outputs, checks what the kernels need and turns the kernels'
error mailbox into Python exceptions.

Every method enqueues work on the *current* CUDA stream. Only the non-cached dispatch without
``num_worst_tokens`` waits on the host (for the receive count, with a timeout); everything else is free of host
synchronisation and can be captured in a CUDA graph.

Kernel protocol, buffer layout and tuning constants: ``csrc/intranode/buffer_layout.h`` and the comments at
the top of ``notify.cu``, ``dispatch.cu`` and ``combine.cu``.
"""

from __future__ import annotations

import atexit
import weakref
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..config import NUM_MAX_NVL_PEERS, Config
from ..errors import DeepEPBufferTooSmall, DeepEPInputError, DeepEPTimeoutError, expect
from .base import CombineResult, DispatchLayout, DispatchResult, IntranodeHandle

#: Channels the kernels support (``num_sms / 2``); the buffer's control block is sized for this many.
MAX_CHANNELS = 128
#: Local experts per rank the notify step supports (DeepEP's ``NUM_MAX_LOCAL_EXPERTS``).
MAX_LOCAL_EXPERTS = 1024

_MAILBOX_TIMEOUT = 1
_MAILBOX_OVERFLOW = 2


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


def is_available() -> bool:
    """True when the extension is built and a CUDA device is visible."""
    if not torch.cuda.is_available():
        return False
    try:
        load_extension()
    except ImportError:
        return False
    return True


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

    def __init__(self, group: dist.ProcessGroup, rank: int, num_ranks: int, num_nvl_bytes: int,
                 device: torch.device, timeout_s: float) -> None:
        expect(1 <= num_ranks <= NUM_MAX_NVL_PEERS,
               f"intranode kernels need 1..{NUM_MAX_NVL_PEERS} ranks in one node, got num_ranks={num_ranks}")
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
                extra rows were dropped, nothing was written out of bounds).
        """
        if self._broken is not None:
            raise DeepEPTimeoutError(self._broken)
        if self._destroyed:
            return
        status, rank, peer, channel, _what, what_name, detail, observed = self._rt.read_mailbox()
        if status == _MAILBOX_TIMEOUT:
            where = f"channel {channel}, " if channel >= 0 else ""
            self._broken = (
                f"rank {rank}: timed out after {self.timeout_s:g} s in {what_name} "
                f"(waiting for rank {peer}, {where}counter expected {detail}, last seen {observed}). "
                "A peer died, hung, or did not make the same call; this buffer is unusable now (destroy it)")
            raise DeepEPTimeoutError(self._broken)
        if status == _MAILBOX_OVERFLOW:
            raise DeepEPInputError(
                f"dispatch: num_worst_tokens={observed} is smaller than the number of tokens rank {rank} "
                f"received (at least {detail}); the extra rows were dropped")

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
        """``get_dispatch_layout`` on the GPU (spec 3.1).

        Args:
            topk_idx: ``[T, K]`` int64 CUDA, global expert ids; entries outside ``[0, num_experts)`` are ignored.
            num_experts: ``E``, a multiple of ``num_ranks``.
        Returns:
            ``DispatchLayout(num_tokens_per_rank [R] int32, None, num_tokens_per_expert [E] int32,
            is_token_in_rank [T, R] bool)``, all on ``topk_idx``'s device.
        """
        self._check_alive()
        expect(num_experts % self.num_ranks == 0,
               f"num_experts ({num_experts}) must be a multiple of the number of ranks ({self.num_ranks})")
        dev = topk_idx.device
        num_tokens_per_rank = torch.zeros(self.num_ranks, dtype=torch.int32, device=dev)
        num_tokens_per_expert = torch.zeros(num_experts, dtype=torch.int32, device=dev)
        is_token_in_rank = torch.empty(topk_idx.size(0), self.num_ranks, dtype=torch.bool, device=dev)
        self._rt.layout(topk_idx.contiguous(), num_experts, num_tokens_per_rank, num_tokens_per_expert,
                        is_token_in_rank)
        return DispatchLayout(num_tokens_per_rank, None, num_tokens_per_expert, is_token_in_rank)

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
            recv_topk_weights [n, K] float32 | None, num_recv_tokens_per_expert_list, handle)``.
        """
        self._check_alive()
        R = self.num_ranks
        C = config.num_channels
        Q = config.num_max_nvl_chunked_recv_tokens
        expect(C <= MAX_CHANNELS, f"config.num_sms must be at most {2 * MAX_CHANNELS}, got {config.num_sms}")
        T, H = x.shape
        row_bytes = H * x.element_size()
        expect(row_bytes % 16 == 0, f"x: hidden * element_size must be a multiple of 16 bytes, got {row_bytes}")
        S = x_scales.size(1) if x_scales is not None else 0
        K = topk_idx.size(1) if topk_idx is not None else 0
        expect(K <= 32, f"topk_idx: at most 32 top-k slots, got {K}")
        if x_scales is not None:
            expect(x_scales.element_size() == 4, f"x_scales must be float32 or int32, got {x_scales.dtype}")
        slot = int(self._ext.Runtime.dispatch_slot_bytes(row_bytes, S, K))
        self._check_size("dispatch", C, Q, slot)
        dev = x.device
        if handle is None:
            expect(layout is not None, "dispatch: layout (or a handle) is required")
            assert layout is not None
            num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank = layout
            E = num_tokens_per_expert.numel()
            expect(E % R == 0, f"num_experts ({E}) must be a multiple of the number of ranks ({R})")
            E_loc = E // R
            num_local_experts = E_loc
            expect(E_loc <= MAX_LOCAL_EXPERTS, f"at most {MAX_LOCAL_EXPERTS} experts per rank, got {E_loc}")
            worst = num_worst_tokens > 0
            rank_prefix_matrix = torch.empty(R, R, dtype=torch.int32, device=dev)
            channel_prefix_matrix = torch.empty(R, C, dtype=torch.int32, device=dev)
            recv_channel_prefix_matrix = torch.empty(R, C, dtype=torch.int32, device=dev)
            self._rt.notify(num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank, rank_prefix_matrix,
                            channel_prefix_matrix, recv_channel_prefix_matrix, C, E_loc, max(expert_alignment, 1),
                            not worst, self.timeout_s)
            if worst:
                rows, per_expert = num_worst_tokens, []
            else:
                rows, per_expert = self._wait_recv_counts(E_loc)
            recv_src_idx = torch.empty(rows, dtype=torch.int32, device=dev)
            send_head = torch.empty(T, R, dtype=torch.int32, device=dev)
            recv_topk_idx = torch.empty(rows, K, dtype=torch.int64, device=dev) if topk_idx is not None else None
            recv_topk_weights = (torch.empty(rows, K, dtype=torch.float32, device=dev)
                                 if topk_idx is not None else None)
        else:
            expect(topk_idx is None and topk_weights is None, "cached dispatch: topk_idx/topk_weights must be None")
            expect(handle.channel_prefix_matrix.size(1) == C,
                   f"cached dispatch: the handle was made with num_sms={2 * handle.channel_prefix_matrix.size(1)}, "
                   f"config has num_sms={config.num_sms}")
            rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix = handle[:3]
            is_token_in_rank = handle.is_token_in_rank
            expect(is_token_in_rank.size(0) == T,
                   f"cached dispatch: x has {T} tokens, the handle was made for {is_token_in_rank.size(0)}")
            rows = num_worst_tokens if num_worst_tokens > 0 else handle.recv_src_idx.size(0)
            worst = num_worst_tokens > 0
            per_expert = []
            num_local_experts = 1  # top-k ids are not sent in cached mode
            recv_src_idx, send_head, recv_topk_idx, recv_topk_weights = None, None, None, None
        recv_x = torch.empty(rows, H, dtype=x.dtype, device=dev)
        recv_x_scales = torch.empty(rows, S, dtype=x_scales.dtype, device=dev) if x_scales is not None else None
        self._rt.dispatch(x, x_scales, topk_idx, topk_weights, is_token_in_rank, rank_prefix_matrix,
                          recv_channel_prefix_matrix, recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights,
                          recv_src_idx, send_head, C, Q, num_local_experts,
                          worst, self.timeout_s)
        if handle is None:
            assert recv_src_idx is not None and send_head is not None
            handle = IntranodeHandle(rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix,
                                     recv_src_idx, is_token_in_rank, send_head)
        return DispatchResult(recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, per_expert, handle)

    def combine(self, x: torch.Tensor, handle: IntranodeHandle, topk_weights: Optional[torch.Tensor],
                bias0: Optional[torch.Tensor], bias1: Optional[torch.Tensor], config: Config) -> CombineResult:
        """Sum each token's copies back on its source rank (FP32 accumulation, rounded to BF16).

        Args:
            x: ``[n, H]`` BF16 CUDA, contiguous: one row per row ``dispatch`` returned, in that order.
            handle: the non-cached dispatch's handle (its channel count is used).
            topk_weights: ``[n, K]`` float32 or None.
            bias0, bias1: ``[T, H]`` BF16 or None.
            config: ``num_max_nvl_chunked_recv_tokens`` (queue depth) is used.
        Returns:
            ``CombineResult(combined_x [T, H] BF16, combined_topk_weights [T, K] float32 | None)`` with
            ``combined_x[t] = bias0[t] + bias1[t] + sum of the copies of t``.
        """
        self._check_alive()
        expect(x.dtype == torch.bfloat16, f"combine: x must be bfloat16, got {x.dtype}")
        rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, _, _, send_head = handle
        C = channel_prefix_matrix.size(1)
        Q = config.num_max_nvl_chunked_recv_tokens
        T, H = send_head.size(0), x.size(1)
        expect(H % 8 == 0, f"combine: hidden must be a multiple of 8, got {H}")
        K = topk_weights.size(1) if topk_weights is not None else 0
        slot = int(self._ext.Runtime.combine_slot_bytes(2 * H, K))
        self._check_size("combine", C, Q, slot)
        combined_x = torch.empty(T, H, dtype=x.dtype, device=x.device)
        combined_w = (torch.empty(T, K, dtype=torch.float32, device=x.device) if topk_weights is not None else None)
        self._rt.combine(x.contiguous(), topk_weights, bias0, bias1, rank_prefix_matrix, channel_prefix_matrix,
                         recv_channel_prefix_matrix, send_head, combined_x, combined_w, C, Q, self.timeout_s)
        return CombineResult(combined_x, combined_w)

    # ------------------------------------------------------------------------------------------------------
    def _check_alive(self) -> None:
        if self._destroyed:
            raise DeepEPInputError("this intranode buffer was destroyed")
        self.check_error()

    def _check_size(self, what: str, C: int, Q: int, slot_bytes: int) -> None:
        # The buffer is split into one fixed region per source rank (csrc/intranode/buffer_layout.h); each
        # holds C queues of Q messages.
        region = self.num_nvl_bytes // self.num_ranks // 16 * 16
        if C * Q * slot_bytes > region:
            needed = self.num_ranks * (C * Q * slot_bytes + 15)
            raise DeepEPBufferTooSmall(
                f"{what}: the NVL buffer has {self.num_nvl_bytes} bytes but this call needs {needed} "
                f"({self.num_ranks} ranks x {C} channels x {Q} queue slots x {slot_bytes} bytes per message); "
                "size it with Config.get_nvl_buffer_size_hint or lower num_sms / num_max_nvl_chunked_recv_tokens")

    def _wait_recv_counts(self, num_local_experts: int) -> tuple[int, list[int]]:
        # The kernel's own waits time out after timeout_s and report which peer; wait longer on the host so
        # that report (the more precise one) arrives first.
        host_timeout = 2.0 * self.timeout_s + 1.0
        status, n_recv, per_expert = self._rt.wait_recv_counts(num_local_experts, host_timeout)
        if status == 2:
            self.check_error()
        if status != 0:
            self._broken = (
                f"rank {self.rank}: timed out after {host_timeout:g} s waiting on the host for the dispatch "
                "receive count (the notify kernel did not finish: a peer did not call dispatch, or the GPU is "
                "blocked by other work); this buffer is unusable now (destroy it)")
            raise DeepEPTimeoutError(self._broken)
        return int(n_recv), [int(v) for v in per_expert]
