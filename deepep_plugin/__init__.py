"""deepep_plugin: expert-parallel dispatch/combine for Mixture-of-Experts models.

A DeepEP-V1-compatible API (``Buffer``, ``Config``, ``EventOverlap``, ``EventHandle``, ``topk_idx_t``) over two
backends: CUDA kernels (NVLink intranode, NVSHMEM low-latency) and a PyTorch reference over torch.distributed
that runs anywhere. See README.md.
"""

from . import autograd, fp8, layout, permute, routing
from .buffer import Buffer, topk_idx_t
from .config import Config, get_timeout_s, set_timeout_s
from .errors import DeepEPBufferTooSmall, DeepEPError, DeepEPInputError, DeepEPTimeoutError
from .events import EventHandle, EventOverlap

__version__ = "0.1.0"

__all__ = [
    "Buffer",
    "Config",
    "DeepEPBufferTooSmall",
    "DeepEPError",
    "DeepEPInputError",
    "DeepEPTimeoutError",
    "EventHandle",
    "EventOverlap",
    "autograd",
    "fp8",
    "get_timeout_s",
    "layout",
    "permute",
    "routing",
    "set_timeout_s",
    "topk_idx_t",
]
