"""deepep_plugin: expert-parallel dispatch/combine for Mixture-of-Experts models.

A DeepEP-V1-compatible API (``Buffer``, ``Config``, ``EventOverlap``, ``EventHandle``, ``topk_idx_t``) over two
backends: CUDA kernels (NVLink intranode, NVSHMEM internode and low-latency) and a PyTorch reference over
torch.distributed that runs anywhere. See README.md.
"""

from . import autograd, fp8, layout, permute, routing
from .backends.base import InternodeHandle, IntranodeHandle, LowLatencyHandle
from .buffer import Buffer, topk_idx_t
from .config import Config, get_timeout_s, set_timeout_s
from .errors import DeepEPBufferTooSmall, DeepEPError, DeepEPFallbackError, DeepEPInputError, DeepEPTimeoutError
from .events import EventHandle, EventOverlap

__version__ = "0.1.0"

__all__ = [
    "Buffer",
    "Config",
    "DeepEPBufferTooSmall",
    "DeepEPError",
    "DeepEPFallbackError",
    "DeepEPInputError",
    "DeepEPTimeoutError",
    "EventHandle",
    "EventOverlap",
    "InternodeHandle",
    "IntranodeHandle",
    "LowLatencyHandle",
    "autograd",
    "fp8",
    "get_timeout_s",
    "layout",
    "permute",
    "routing",
    "set_timeout_s",
    "topk_idx_t",
]


def _integrations_from_source_tree() -> None:
    """In a source checkout, ``integrations/`` (installed as ``deepep_plugin.integrations``) lies beside this package:
    make it importable under that name when nothing installed provides it (a run straight from the tree)."""
    import importlib.util
    import os
    import sys

    name = __name__ + ".integrations"
    tree = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "integrations")
    init = os.path.join(tree, "__init__.py")
    if name in sys.modules or not os.path.isfile(init) or importlib.util.find_spec(name) is not None:
        return
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[tree])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


_integrations_from_source_tree()
