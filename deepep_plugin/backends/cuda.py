"""The CUDA backend: a thin router over the compiled runtimes.

* ``IntranodeRuntime`` (``cuda_intranode.py``, extension ``_intranode_C``): layout, normal dispatch and combine
  over NVLink (CUDA IPC) for groups inside one node;
* ``InternodeRuntime`` (``cuda_internode.py``, kernels in ``_low_latency_C``): layout, normal dispatch and
  combine for groups spanning several nodes (network hop once per node, then NVLink), over NVSHMEM;
* ``LowLatencyRuntime`` (``cuda_low_latency.py``, extension ``_low_latency_C``): the low-latency kernels over
  NVSHMEM.

Paths no kernel covers (tensors on the CPU, combine of a dtype other than BF16, an internode Buffer without
``num_rdma_bytes``) go to the reference backend given as ``fallback``: the same semantics, so a caller never
sees the difference but in speed.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from ..config import Config
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


class CudaBackend:
    name = "cuda"

    def __init__(self, *, group: dist.ProcessGroup, rank: int, num_ranks: int, num_ranks_per_node: int,
                 num_nvl_bytes: int, num_rdma_bytes: int, low_latency_mode: bool, num_qps_per_rank: int,
                 allow_nvlink_for_low_latency_mode: bool, timeout_s: float, fallback: Any) -> None:
        self.fallback = fallback
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.intranode: Any = None
        self.internode: Any = None
        self.low_latency: Any = None
        if num_nvl_bytes > 0 and num_ranks <= num_ranks_per_node:
            from .cuda_intranode import IntranodeRuntime

            self.intranode = IntranodeRuntime(group, rank, num_ranks, num_nvl_bytes, self.device, timeout_s)
        if num_rdma_bytes > 0 and num_ranks > num_ranks_per_node and not low_latency_mode:
            from .cuda_internode import InternodeRuntime

            self.internode = InternodeRuntime(group, rank, num_ranks, num_ranks_per_node, num_nvl_bytes,
                                              num_rdma_bytes, self.device, timeout_s, num_qps_per_rank)
        if low_latency_mode:
            from .cuda_low_latency import LowLatencyRuntime

            self.low_latency = LowLatencyRuntime(group, rank, num_ranks, num_rdma_bytes, self.device, timeout_s,
                                                 num_qps_per_rank, allow_nvlink_for_low_latency_mode)

    def _normal(self, t: Optional[torch.Tensor]) -> Any:
        """The runtime for a normal-kernel call on tensor ``t``."""
        kernels = self.intranode if self.intranode is not None else self.internode
        if kernels is not None and t is not None and t.is_cuda:
            return kernels
        return self.fallback

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int) -> DispatchLayout:
        return self._normal(topk_idx).get_dispatch_layout(topk_idx, num_experts)

    def dispatch(self, x: torch.Tensor, x_scales: Optional[torch.Tensor], handle: Optional[Handle],
                 layout: Optional[DispatchLayout], topk_idx: Optional[torch.Tensor],
                 topk_weights: Optional[torch.Tensor], expert_alignment: int, num_worst_tokens: int,
                 config: Config) -> DispatchResult:
        runtime = self._normal(x)
        if handle is not None and not isinstance(handle, IntranodeHandle if runtime is self.intranode
                                                  else InternodeHandle):
            runtime = self.fallback
        return runtime.dispatch(x, x_scales, handle, layout, topk_idx, topk_weights, expert_alignment,
                                num_worst_tokens, config)

    def combine(self, x: torch.Tensor, handle: Handle, topk_weights: Optional[torch.Tensor],
                bias0: Optional[torch.Tensor], bias1: Optional[torch.Tensor], config: Config) -> CombineResult:
        runtime = self._normal(x)
        if not isinstance(handle, IntranodeHandle if runtime is self.intranode else InternodeHandle):
            runtime = self.fallback
        if runtime is not self.fallback and x.dtype != torch.bfloat16:
            runtime = self.fallback  # the combine kernels reduce BF16; other dtypes take the reference path
        return runtime.combine(x, handle, topk_weights, bias0, bias1, config)

    def _ll(self, t: torch.Tensor) -> Any:
        return self.low_latency if self.low_latency is not None and t.is_cuda else self.fallback

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, **kwargs: Any) -> LowLatencyDispatchResult:
        return self._ll(x).low_latency_dispatch(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                                                **kwargs)

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                            handle: LowLatencyHandle, **kwargs: Any
                            ) -> tuple[torch.Tensor, Optional[Callable[[], None]]]:
        return self._ll(x).low_latency_combine(x, topk_idx, topk_weights, handle, **kwargs)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        runtime = self.low_latency if self.low_latency is not None else self.fallback
        runtime.clean_low_latency_buffer(num_max_dispatch_tokens_per_rank, hidden, num_experts)

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        return self._ll(handle.src_info).get_next_low_latency_combine_buffer(handle)

    def local_buffer(self, use_rdma_buffer: bool, device: torch.device) -> torch.Tensor:
        runtime = (self.low_latency or self.internode) if use_rdma_buffer else self.intranode
        if runtime is None:
            return self.fallback.local_buffer(use_rdma_buffer, device)
        return runtime.local_buffer()

    def check_error(self) -> None:
        for runtime in (self.intranode, self.internode, self.low_latency):
            if runtime is not None:
                runtime.check_error()

    def destroy(self) -> None:
        for runtime in (self.intranode, self.internode, self.low_latency):
            if runtime is not None:
                runtime.destroy()
        self.intranode = self.internode = self.low_latency = None
        self.fallback.destroy()
