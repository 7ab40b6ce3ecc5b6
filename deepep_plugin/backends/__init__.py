"""Backends behind ``Buffer``: ``reference`` (PyTorch over torch.distributed) and ``cuda`` (the kernel runtimes,
with the reference for what no kernel serves). ``selection.py`` holds the rules: which runtime serves which call.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..errors import DeepEPError, DeepEPInputError
from .selection import LOW_LATENCY_OPS, NORMAL_OPS, Topology, kernel_for, strict_from_env, unavailable_reason

BACKENDS = ("auto", "reference", "cuda")


def cuda_extensions_available() -> bool:
    """True when CUDA is usable and every kernel extension is built."""
    return not any(unavailable_reason(kind) for kind in ("intranode", "internode", "low_latency"))


def create_backend(kind: str, *, group: dist.ProcessGroup, rank: int, topology: Topology, num_qps_per_rank: int,
                   allow_nvlink_for_low_latency_mode: bool, timeout_s: float) -> Any:
    """Build the backend named ``kind`` (``auto``, ``reference`` or ``cuda``) for one ``Buffer``.

    ``cuda`` refuses, here, a Buffer whose mode needs kernels this machine cannot run, and later any call that
    would fall back to the reference path (as ``DEEPEP_PLUGIN_STRICT=1`` does for ``auto``).
    """
    from .reference import ReferenceBackend

    if kind not in BACKENDS:
        raise DeepEPInputError(f"backend must be one of {BACKENDS}, got {kind!r} (argument backend= or "
                               "DEEPEP_PLUGIN_BACKEND)")
    reference = ReferenceBackend(group, topology.num_ranks_per_node, topology.num_nvl_bytes, topology.num_rdma_bytes,
                                 timeout_s)
    if kind == "reference":
        return reference
    if kind == "cuda":
        ops = LOW_LATENCY_OPS if topology.low_latency_mode else NORMAL_OPS
        for op in ops:
            kernel = kernel_for(op, topology)[0]
            why = unavailable_reason(kernel) if kernel is not None else ""
            if why:
                raise DeepEPError(f"backend='cuda' was requested but {why}")
    if not torch.cuda.is_available():
        return reference  # no CUDA tensors can exist, so no call can miss a kernel
    from .cuda import CudaBackend

    return CudaBackend(group=group, rank=rank, topology=topology, num_qps_per_rank=num_qps_per_rank,
                       allow_nvlink_for_low_latency_mode=allow_nvlink_for_low_latency_mode, timeout_s=timeout_s,
                       reference=reference, strict=kind == "cuda" or strict_from_env())
