"""The routing backend: the kernel runtimes a Buffer can use, and the reference backend for everything else.

Which runtime serves a call is decided by the selection table (``selection.py``), asked once per kind of call
(op, device, and dtype for combine) and remembered. Where a call on CUDA tensors gets no kernel, the reason is
logged once per Buffer and reason (``backend="auto"``) or raised as :class:`~deepep_plugin.errors.DeepEPFallbackError`
(``backend="cuda"`` or ``DEEPEP_PLUGIN_STRICT=1``).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from ..config import Config
from ..errors import DeepEPFallbackError
from .base import (
    CombineResult,
    DispatchLayout,
    DispatchResult,
    Handle,
    LowLatencyDispatchResult,
    LowLatencyHandle,
    Runtime,
)
from .selection import REFERENCE, Topology, choose, fallback_message, kernels_to_build, unavailable_reason

logger = logging.getLogger("deepep_plugin")


class CudaBackend:
    """Kernel runtimes plus the reference backend, behind the backend protocol (``base.Backend``).

    ``name`` is ``"cuda"`` when at least one kernel runtime was built for this Buffer, else ``"reference"``.
    """

    orders_streams = False

    def __init__(self, *, group: dist.ProcessGroup, rank: int, topology: Topology, num_qps_per_rank: int,
                 allow_nvlink_for_low_latency_mode: bool, timeout_s: float, reference: Runtime,
                 strict: bool) -> None:
        self.reference = reference
        self.topology = topology
        self.strict = strict
        self.intranode: Any = None
        self.internode: Any = None
        self.low_latency: Any = None
        self._routes: dict[tuple[str, bool, Optional[torch.dtype]], Runtime] = {}
        self._warned: set[str] = set()
        t = topology
        kinds = kernels_to_build(t)
        self.device = torch.device("cuda", torch.cuda.current_device()) if kinds else None
        for kind in kinds:
            if kind == "intranode":
                from .cuda_intranode import IntranodeRuntime

                self.intranode = IntranodeRuntime(group, rank, t.num_ranks, t.num_nvl_bytes, self.device, timeout_s)
            elif kind == "internode":
                from .cuda_internode import InternodeRuntime

                self.internode = InternodeRuntime(group, rank, t.num_ranks, t.num_ranks_per_node, t.num_nvl_bytes,
                                                  t.num_rdma_bytes, self.device, timeout_s, num_qps_per_rank)
            else:
                from .cuda_low_latency import LowLatencyRuntime

                self.low_latency = LowLatencyRuntime(group, rank, t.num_ranks, t.num_rdma_bytes, self.device,
                                                     timeout_s, num_qps_per_rank, allow_nvlink_for_low_latency_mode)
        self.name = "cuda" if self._kernels() else REFERENCE

    def _kernels(self) -> list[Any]:
        return [r for r in (self.intranode, self.internode, self.low_latency) if r is not None]

    def _unavailable(self, kind: str) -> str:
        return "" if getattr(self, kind) is not None else unavailable_reason(kind)

    # ------------------------------------------------------------------------------------------------------
    def runtime_for(self, op: str, cuda: bool, dtype: Optional[torch.dtype] = None) -> Runtime:
        """The runtime that runs ``op`` on CUDA (``cuda``) or CPU tensors (``dtype``: combine's x only)."""
        key = (op, cuda, dtype)
        runtime = self._routes.get(key)
        if runtime is not None:
            return runtime
        choice = choose(op, self.topology, cuda=cuda, dtype=dtype, unavailable=self._unavailable)
        if choice.falls_back:
            message = fallback_message(op, choice)
            if self.strict:
                raise DeepEPFallbackError(message + " (raised, not warned: backend='cuda' or DEEPEP_PLUGIN_STRICT=1)")
            if choice.reason not in self._warned:
                self._warned.add(choice.reason)
                logger.warning(message)
        runtime = self.reference if choice.runtime == REFERENCE else getattr(self, choice.runtime)
        self._routes[key] = runtime
        return runtime

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int) -> DispatchLayout:
        return self.runtime_for("layout", topk_idx.is_cuda).get_dispatch_layout(topk_idx, num_experts)

    def dispatch(self, x: torch.Tensor, x_scales: Optional[torch.Tensor], handle: Optional[Handle],
                 layout: Optional[DispatchLayout], topk_idx: Optional[torch.Tensor],
                 topk_weights: Optional[torch.Tensor], expert_alignment: int, num_worst_tokens: int,
                 config: Config) -> DispatchResult:
        return self.runtime_for("dispatch", x.is_cuda).dispatch(x, x_scales, handle, layout, topk_idx, topk_weights,
                                                                expert_alignment, num_worst_tokens, config)

    def combine(self, x: torch.Tensor, handle: Handle, topk_weights: Optional[torch.Tensor],
                bias0: Optional[torch.Tensor], bias1: Optional[torch.Tensor], config: Config) -> CombineResult:
        return self.runtime_for("combine", x.is_cuda, x.dtype).combine(x, handle, topk_weights, bias0, bias1, config)

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, **kwargs: Any) -> LowLatencyDispatchResult:
        return self.runtime_for("low_latency_dispatch", x.is_cuda).low_latency_dispatch(
            x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, **kwargs)

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                            handle: LowLatencyHandle, **kwargs: Any
                            ) -> tuple[torch.Tensor, Optional[Callable[[], None]]]:
        return self.runtime_for("low_latency_combine", x.is_cuda).low_latency_combine(x, topk_idx, topk_weights,
                                                                                      handle, **kwargs)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        runtime = self.low_latency if self.low_latency is not None else self.reference
        runtime.clean_low_latency_buffer(num_max_dispatch_tokens_per_rank, hidden, num_experts)

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        runtime = self.runtime_for("low_latency_combine", handle.src_info.is_cuda)
        return runtime.get_next_low_latency_combine_buffer(handle)

    def local_buffer(self, use_rdma_buffer: bool, device: torch.device) -> torch.Tensor:
        runtime = (self.low_latency or self.internode) if use_rdma_buffer else self.intranode
        if runtime is None:
            return self.reference.local_buffer(use_rdma_buffer, device)
        return runtime.local_buffer()

    def check_error(self) -> None:
        for runtime in self._kernels():
            runtime.check_error()

    def destroy(self) -> None:
        for runtime in self._kernels():
            runtime.destroy()
        self.intranode = self.internode = self.low_latency = None
        self._routes.clear()
        self.reference.destroy()
