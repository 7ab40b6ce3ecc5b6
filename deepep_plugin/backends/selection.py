"""Which runtime serves which call: the one table every other part of the library asks.

A call is described by its op, the Buffer's topology (node layout, mode, buffer sizes), whether its tensors are
on the GPU and, for combine, their dtype. :func:`choose` maps that to one of four runtimes:

==============  =====================================================  ================================
runtime         serves                                                 extension
==============  =====================================================  ================================
``intranode``   layout, dispatch, combine (BF16) of a one-node group   ``deepep_plugin._intranode_C``
``internode``   layout, dispatch, combine (BF16) of a multi-node group ``deepep_plugin._nvshmem_C``
``low_latency`` low-latency dispatch and combine                       ``deepep_plugin._nvshmem_C``
``reference``   everything, in plain PyTorch over torch.distributed    none
==============  =====================================================  ================================

Tensors on the CPU always go to ``reference`` (it is the CPU implementation). A call on CUDA tensors that no
kernel serves also goes there, but never silently: :func:`choose` returns why and how to fix it, and the backend
logs that once per Buffer and reason, or raises it in strict mode (``backend="cuda"`` or
``DEEPEP_PLUGIN_STRICT=1``). ``deepep-plugin doctor --ranks R --ranks-per-node G`` prints this table for a
group on this machine.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable, NamedTuple, Optional

import torch

#: The ops a Buffer routes, in the order ``doctor`` prints them.
NORMAL_OPS = ("layout", "dispatch", "combine")
LOW_LATENCY_OPS = ("low_latency_dispatch", "low_latency_combine")
OPS = NORMAL_OPS + LOW_LATENCY_OPS

#: Kernel runtimes: name -> (module, class). Each class declares ``extension`` and ``unavailable_reason()``.
KERNEL_RUNTIMES = {
    "intranode": ("deepep_plugin.backends.cuda_intranode", "IntranodeRuntime"),
    "internode": ("deepep_plugin.backends.cuda_internode", "InternodeRuntime"),
    "low_latency": ("deepep_plugin.backends.cuda_low_latency", "LowLatencyRuntime"),
}
REFERENCE = "reference"

STRICT_ENV = "DEEPEP_PLUGIN_STRICT"


class Topology(NamedTuple):
    """What of a Buffer decides where its calls run."""

    num_ranks: int
    num_ranks_per_node: int
    low_latency_mode: bool
    num_nvl_bytes: int
    num_rdma_bytes: int

    @property
    def num_nodes(self) -> int:
        return max(self.num_ranks // max(self.num_ranks_per_node, 1), 1)


class Choice(NamedTuple):
    """The runtime of one kind of call; ``reason``/``fix`` say why a CUDA call does not get a kernel."""

    runtime: str
    reason: str = ""
    fix: str = ""

    @property
    def falls_back(self) -> bool:
        return bool(self.reason)


def runtime_class(name: str) -> Any:
    module, cls = KERNEL_RUNTIMES[name]
    return getattr(importlib.import_module(module), cls)


def unavailable_reason(name: str) -> str:
    """Why kernel runtime ``name`` cannot run on this machine ("" when it can): no CUDA, or its extension not
    built."""
    return runtime_class(name).unavailable_reason()


def build_note() -> str:
    """What setup.py recorded about this install's kernels (``deepep_plugin/_build_info.py``), as a clause to
    append to a "not built" reason; "" when it recorded nothing."""
    try:
        from .. import _build_info  # type: ignore[attr-defined]
    except ImportError:
        return ""
    reason = getattr(_build_info, "NOT_BUILT_REASON", None)
    return f" (at install time: {reason})" if reason else ""


def extension_unavailable(what: str, extension: str) -> str:
    """Why the kernels ``what`` of ``deepep_plugin.<extension>`` cannot run here ("" when they can): no CUDA, the
    extension not built (with what the install recorded), or built but not loading."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        importlib.import_module(f"deepep_plugin.{extension}")
    except ModuleNotFoundError:
        return (f"the {what} (deepep_plugin.{extension}) are not built{build_note()}; build on a machine with CUDA "
                "torch and nvcc: pip install --no-build-isolation .")
    except ImportError as e:
        return f"the {what} (deepep_plugin.{extension}) are built but do not load: {e}"
    return ""


_SIZED_FOR = "build the Buffer with Buffer.sized_for(group, hidden_bytes)"


def kernel_for(op: str, topo: Topology) -> tuple[Optional[str], str, str]:
    """The kernel runtime that serves ``op`` for ``topo`` whatever the build and dtype, or ``(None, reason, fix)``."""
    if op in LOW_LATENCY_OPS:
        if not topo.low_latency_mode:
            return None, "the Buffer was built without low_latency_mode", "pass low_latency_mode=True"
        if topo.num_rdma_bytes == 0:
            return None, "the Buffer has num_rdma_bytes=0", (
                "build it with Buffer.sized_for(group, hidden_bytes, low_latency_mode=True, "
                "num_max_dispatch_tokens_per_rank=..., num_experts=...)")
        return "low_latency", "", ""
    if op not in NORMAL_OPS:
        raise KeyError(f"unknown op {op!r}; expected one of {OPS}")
    if topo.num_nodes == 1:
        if topo.num_nvl_bytes == 0:
            return None, "the Buffer has num_nvl_bytes=0", _SIZED_FOR
        return "intranode", "", ""
    if topo.low_latency_mode:
        return None, (f"the group spans {topo.num_nodes} nodes and the Buffer is in low_latency_mode, which has no "
                      "internode normal kernels"), ("use a second Buffer without low_latency_mode for normal "
                                                    "dispatch and combine: " + _SIZED_FOR)
    if topo.num_rdma_bytes == 0:
        return None, f"the group spans {topo.num_nodes} nodes but the Buffer has num_rdma_bytes=0", _SIZED_FOR
    return "internode", "", ""


def choose(op: str, topo: Topology, *, cuda: bool, dtype: Optional[torch.dtype] = None,
           unavailable: Callable[[str], str] = unavailable_reason) -> Choice:
    """The runtime that serves ``op`` on tensors on the GPU (``cuda``) or the CPU, of ``dtype`` (combine's x)."""
    if not cuda:
        return Choice(REFERENCE)
    kernel, reason, fix = kernel_for(op, topo)
    if kernel is None:
        return Choice(REFERENCE, reason, fix)
    why = unavailable(kernel)
    if why:
        return Choice(REFERENCE, why, "build the kernels: pip install --no-build-isolation . on a machine with "
                                      "CUDA torch and nvcc (deepep-plugin doctor says what is missing)")
    if op == "combine" and dtype is not None and dtype != torch.bfloat16:
        name = str(dtype).replace("torch.", "")
        return Choice(REFERENCE, f"{name} combine runs on the reference path (the combine kernels reduce BF16)",
                      "cast x to BF16 before combine")
    return Choice(kernel)


def kernels_to_build(topo: Topology, unavailable: Callable[[str], str] = unavailable_reason) -> list[str]:
    """The kernel runtimes a Buffer of ``topo`` constructs: those some op would run on, where they can run."""
    names: list[str] = []
    for op in OPS:
        kernel, _, _ = kernel_for(op, topo)
        if kernel is not None and kernel not in names and not unavailable(kernel):
            names.append(kernel)
    return names


def strict_from_env() -> bool:
    return os.environ.get(STRICT_ENV, "0") not in ("", "0")


def fallback_message(op: str, choice: Choice) -> str:
    return (f"deepep_plugin: {op} on CUDA tensors runs on the plain-PyTorch reference path (much slower than the "
            f"kernels): {choice.reason}. Fix: {choice.fix}.")
