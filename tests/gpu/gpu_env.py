"""What the GPU test modules share: whether a compiled extension can run here, and how they start their ranks."""

from __future__ import annotations

import importlib

import torch

#: ``run_distributed`` settings of every GPU test: gloo (NCCL refuses ranks sharing a GPU), spawned processes
#: (CUDA cannot be forked), and room for the extension's first load in each of them.
SPAWN = {"backend": "gloo", "start_method": "spawn", "timeout": 300.0}


def missing_kernels(name: str) -> str:
    """Why ``deepep_plugin.<name>`` (``_intranode_C`` or ``_nvshmem_C``) cannot run here; ``""`` when it can."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    try:
        importlib.import_module(f"deepep_plugin.{name}")
    except ImportError:
        return f"needs the compiled deepep_plugin.{name} (python setup.py build_ext --inplace)"
    return ""


def take_device(rank: int) -> torch.device:
    """In a worker: the GPU of ``rank`` (ranks share the GPUs there are, ``rank % count``), made current."""
    torch.cuda.set_device(rank % torch.cuda.device_count())
    return torch.device("cuda", torch.cuda.current_device())


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a tensor on the CPU (compare floats bit for bit, NaN-safe)."""
    return t.contiguous().view(torch.uint8).cpu()


def layout_and_dispatch(buf, x, topk_idx, topk_weights, num_experts: int, **kwargs):
    """``buf.get_dispatch_layout`` then a fresh ``buf.dispatch`` with it; returns dispatch's 6-tuple."""
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, num_experts)
    return buf.dispatch(x, None, per_rank, per_rdma, in_rank, per_expert, topk_idx, topk_weights, **kwargs)
