"""Backends behind ``Buffer``: ``reference`` (PyTorch over torch.distributed) and ``cuda`` (compiled kernels).

``create_backend("auto", ...)`` picks the CUDA kernels where they apply (CUDA available, extensions built, the
group inside one node for the normal kernels) and the reference backend otherwise.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
import torch.distributed as dist

from ..errors import DeepEPError, DeepEPInputError

BACKENDS = ("auto", "reference", "cuda")


def _extension(name: str) -> Any:
    try:
        return importlib.import_module(f"deepep_plugin.{name}")
    except ImportError:
        return None


def cuda_extensions_available(low_latency: bool = False) -> bool:
    """True when CUDA is usable and the kernel extension(s) are built."""
    if not torch.cuda.is_available():
        return False
    return _extension("_low_latency_C" if low_latency else "_intranode_C") is not None


def cuda_unavailable_reason(low_latency_mode: bool) -> str:
    if not torch.cuda.is_available():
        return "CUDA is not available"
    missing = [n for n in (["_intranode_C"] + (["_low_latency_C"] if low_latency_mode else []))
               if _extension(n) is None]
    if missing:
        return (f"the compiled extension(s) {', '.join(missing)} are not built (install on a machine with CUDA "
                "torch and nvcc: pip install --no-build-isolation .)")
    return ""


def create_backend(kind: str, *, group: dist.ProcessGroup, rank: int, num_ranks: int, num_ranks_per_node: int,
                   num_nvl_bytes: int, num_rdma_bytes: int, low_latency_mode: bool, num_qps_per_rank: int,
                   allow_nvlink_for_low_latency_mode: bool, timeout_s: float) -> Any:
    """Build the backend named ``kind`` (``auto``, ``reference`` or ``cuda``) for one ``Buffer``."""
    from .reference import ReferenceBackend

    if kind not in BACKENDS:
        raise DeepEPInputError(f"backend must be one of {BACKENDS}, got {kind!r} (argument backend= or "
                               "DEEPEP_PLUGIN_BACKEND)")
    reference = ReferenceBackend(group, num_ranks_per_node, num_nvl_bytes, num_rdma_bytes)
    if kind == "reference":
        return reference
    reason = cuda_unavailable_reason(low_latency_mode)
    if reason:
        if kind == "cuda":
            raise DeepEPError(f"backend='cuda' was requested but {reason}")
        return reference
    from .cuda import CudaBackend

    return CudaBackend(group=group, rank=rank, num_ranks=num_ranks, num_ranks_per_node=num_ranks_per_node,
                       num_nvl_bytes=num_nvl_bytes, num_rdma_bytes=num_rdma_bytes,
                       low_latency_mode=low_latency_mode, num_qps_per_rank=num_qps_per_rank,
                       allow_nvlink_for_low_latency_mode=allow_nvlink_for_low_latency_mode, timeout_s=timeout_s,
                       fallback=reference)
