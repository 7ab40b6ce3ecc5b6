"""The NVSHMEM layer, Python side: the extension ``deepep_plugin._nvshmem_C``, the process's NVSHMEM world, and what
every NVSHMEM runtime of a rank owns (:class:`SymmetricRuntime`).

The extension is built from ``csrc/nvshmem`` (NVSHMEM start-up, symmetric memory, the error mailbox, the module),
``csrc/internode`` and ``csrc/low_latency`` (the kernels on it); ``cuda_internode.py`` and ``cuda_low_latency.py``
are its two runtimes. It is imported lazily: on a machine without it (CPU-only CI) these modules still import.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, ClassVar, Optional

import torch
import torch.distributed as dist

from ..errors import DeepEPError

#: The extension both NVSHMEM runtimes run on (``deepep_plugin.<EXTENSION>``).
EXTENSION = "_nvshmem_C"


def extension() -> Any:
    """Import ``deepep_plugin._nvshmem_C`` (``ImportError`` when it is not built or does not load)."""
    return importlib.import_module(f"deepep_plugin.{EXTENSION}")


def extension_if_built() -> Optional[Any]:
    """The extension, or None where it is not built (sizing functions then use their Python mirrors)."""
    try:
        return extension()
    except ImportError:
        return None


def unavailable_reason() -> str:
    """Why the NVSHMEM kernels cannot run here ("" when they can)."""
    from .selection import extension_unavailable

    return extension_unavailable("NVSHMEM kernels", EXTENSION)


def cuda_device(device: torch.device) -> torch.device:
    """``device`` with its index (the current CUDA device when it names none): the extension takes an index."""
    device = torch.device(device)
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def _has_rdma_devices() -> bool:
    """True when the host lists InfiniBand/RoCE devices (``/sys/class/infiniband``)."""
    try:
        return bool(os.listdir("/sys/class/infiniband"))
    except OSError:
        return False


def _nvshmem_environment(num_qps_per_rank: int, allow_nvlink: bool) -> None:
    """DeepEP V1's NVSHMEM settings; NVLink SHARP always off."""
    os.environ["NVSHMEM_DISABLE_P2P"] = "0" if allow_nvlink else "1"
    if _has_rdma_devices():  # without a NIC, asking for IBGDA only makes NVSHMEM print an init failure
        os.environ["NVSHMEM_IB_ENABLE_IBGDA"] = "1"
    os.environ["NVSHMEM_IBGDA_NUM_RC_PER_PE"] = str(num_qps_per_rank)
    os.environ["NVSHMEM_QP_DEPTH"] = os.environ.get("NVSHMEM_QP_DEPTH", "1024")
    os.environ["NVSHMEM_MAX_TEAMS"] = "7"
    os.environ["NVSHMEM_DISABLE_NVLS"] = "1"
    os.environ["NVSHMEM_CUMEM_GRANULARITY"] = str(2**29)
    os.environ.setdefault("NVSHMEM_DISABLE_MNNVL", "1")


def join_nvshmem_world(c: Any, group: dist.ProcessGroup, rank: int, num_ranks: int, device: torch.device,
                       num_qps_per_rank: int, allow_nvlink: bool) -> None:
    """Make this process PE ``rank`` of an NVSHMEM world of ``num_ranks`` (collective over ``group``).

    The first call initialises NVSHMEM (the unique id travels over ``group``; gloo works); later calls, from any
    runtime of the same process, check that the world is the same one (NVSHMEM cannot be re-initialised).
    """
    torch.cuda.set_device(device)
    _nvshmem_environment(num_qps_per_rank, allow_nvlink)
    states = [None] * num_ranks
    dist.all_gather_object(states, bool(c.world_initialized()), group=group)
    if any(states) and not all(states):
        raise DeepEPError("NVSHMEM: some ranks already joined an NVSHMEM world and others did not; create every "
                          "NVSHMEM-backed Buffer of the job on the same group")
    if not states[0]:
        uid = [c.get_unique_id() if rank == 0 else None]
        dist.broadcast_object_list(uid, src=dist.get_global_rank(group, 0), group=group)
        c.init_world(rank=rank, num_ranks=num_ranks, unique_id=uid[0], device=device.index)
    else:
        c.init_world(rank=rank, num_ranks=num_ranks, unique_id=b"", device=device.index)  # checks it is the same


class SymmetricRuntime:
    """What each NVSHMEM runtime of a rank owns: one ``SymmetricBuffer`` of the extension (the symmetric allocation,
    its peer table, the abort flag its kernels raise, the host-mapped error mailbox). Subclasses set ``_c``,
    ``device``, ``num_ranks`` and ``timeout_s``, join the world, then call :meth:`_open` (collective)."""

    #: The extension both runtimes run on. Buffer runs their calls on its comm stream and reads their mailbox through
    #: ``check_error`` first (``orders_streams`` False); the extension also orders each launch after the buffer's
    #: previous one when the stream changes (receive hooks, ``clean_low_latency_buffer``: ``SymmetricBuffer``).
    extension: ClassVar[str] = EXTENSION
    orders_streams = False

    @classmethod
    def unavailable_reason(cls) -> str:
        """Why these kernels cannot run here ("" when they can)."""
        return unavailable_reason()

    _c: Any
    device: torch.device
    num_ranks: int
    _alive: bool = False
    _sym: Any = None
    _timeout_s: float = 0.0

    @property
    def timeout_s(self) -> float:
        """Seconds any wait on a peer may last before the kernel gives up and reports (settable)."""
        return self._timeout_s

    @timeout_s.setter
    def timeout_s(self, seconds: float) -> None:
        self._timeout_s = float(seconds)
        if self._alive:
            self._sym.timeout_s = self._timeout_s

    def _open(self, nbytes: int) -> None:
        """Allocate ``nbytes`` of symmetric memory and the mailbox (collective)."""
        self._sym = self._c.SymmetricBuffer(num_bytes=nbytes, num_ranks=self.num_ranks, device=self.device.index,
                                            timeout_s=self._timeout_s)
        self._buffer: Optional[torch.Tensor] = self._sym.tensor()
        self._alive = True

    def _take_report(self) -> Optional[tuple[int, int, int, int, int, int, int]]:
        """The mailbox's report ``(status, rank, peer, what, expected, observed, channel)``, cleared; None when
        empty or after :meth:`destroy`. Reads host memory only (no device synchronisation)."""
        if not self._alive:
            return None
        return self._sym.take_report()

    def destroy(self) -> None:
        """Free the symmetric buffer and the mailbox (collective; idempotent). The NVSHMEM world is kept."""
        if not self._alive:
            return
        self._alive = False
        torch.cuda.synchronize(self.device)
        self._buffer = None
        self._sym.free()
