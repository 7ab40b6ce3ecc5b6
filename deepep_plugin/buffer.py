"""``Buffer``: the DeepEP-V1-compatible public surface.

Code written for ``deep_ep.Buffer`` runs unchanged: same constructor, methods, defaults and return tuples
(``docs/deepep_v1_interface.md``). Differences, all on the side of safety:

* every argument is validated up front and a bad one raises :class:`~deepep_plugin.errors.DeepEPInputError`
  (a ``ValueError`` *and* an ``AssertionError``) naming the argument and what was expected;
* waits on peers time out (``DEEPEP_PLUGIN_TIMEOUT_S``) with :class:`~deepep_plugin.errors.DeepEPTimeoutError`;
* more shapes: any hidden size whose row is a multiple of 16 bytes, top-k up to 32 (normal, one node) / 16
  (normal across nodes, low-latency), any EP size up to one node (not only 2/4/8);
* keyword-only extras: ``backend=`` (``"auto"``, ``"reference"`` or ``"cuda"``; default from
  ``DEEPEP_PLUGIN_BACKEND``) and ``num_ranks_per_node=`` (the node size: ranks per host, at most 8, unless
  given; smaller values emulate several nodes on one host);
* :meth:`Buffer.sized_for` builds a Buffer sized for a group and a row width (NVL and, where needed, RDMA bytes);
* no silent slow path: a call on CUDA tensors that no kernel serves logs why, once per Buffer and reason, or
  raises under ``backend="cuda"`` / ``DEEPEP_PLUGIN_STRICT=1`` (``backends/selection.py`` holds the rules).
"""

from __future__ import annotations

import itertools
import os
import weakref
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from .backends.base import (
    Backend,
    DispatchLayout,
    Handle,
    InternodeHandle,
    IntranodeHandle,
    LowLatencyHandle,
    handle_channel_matrix,
    handle_num_channels,
    handle_recv_count,
)
from .config import Config, combine_config, dispatch_config, get_timeout_s
from .errors import DeepEPBufferTooSmall, DeepEPError, DeepEPInputError, expect
from .events import EventHandle, EventOverlap
from .limits import (
    MAX_LOCAL_EXPERTS,
    MAX_NORMAL_RANKS,
    MAX_NVL_PEERS,
    MAX_TOPK_INTERNODE,
    MAX_TOPK_INTRANODE,
    MAX_TOPK_LOW_LATENCY,
    TOPK_IDX_BYTES,
)

#: dtype of top-k expert indices (DeepEP's default build).
topk_idx_t = torch.int64


_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_FP8_DTYPES = tuple(d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d)

XType = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


def _check_tensor(t: Any, name: str, *, dtype: Any = None, ndim: Optional[int] = None,
                  shape: Optional[Sequence[Optional[int]]] = None, device: Optional[torch.device] = None,
                  contiguous: bool = False) -> None:
    """Raise ``DeepEPInputError`` naming ``name`` unless ``t`` is a tensor as described (messages are built only
    on failure: this runs several times per call on the hot path)."""
    if not isinstance(t, torch.Tensor):
        raise DeepEPInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtype is not None and not (t.dtype in dtype if isinstance(dtype, tuple) else t.dtype == dtype):
        allowed = dtype if isinstance(dtype, tuple) else (dtype,)
        raise DeepEPInputError(f"{name} must have dtype {' or '.join(map(str, allowed))}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise DeepEPInputError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if shape is not None:
        dims = t.shape
        if len(dims) != len(shape) or not _dims_match(dims, shape):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise DeepEPInputError(f"{name} must have shape {want}, got {list(dims)}")
    if device is not None and t.device != device:
        raise DeepEPInputError(f"{name} must be on {device} (where x is), got {t.device}")
    if contiguous and not t.is_contiguous():
        raise DeepEPInputError(f"{name} must be contiguous")


def _dims_match(dims: Sequence[int], shape: Sequence[Optional[int]]) -> bool:
    """``dims`` equals ``shape`` (same length) where ``shape`` is not None. Unrolled for 1 and 2 dims: the hot
    path's checks are those, and a generator costs more than the comparisons."""
    if len(shape) == 1:
        return shape[0] is None or shape[0] == dims[0]
    if len(shape) == 2:
        return (shape[0] is None or shape[0] == dims[0]) and (shape[1] is None or shape[1] == dims[1])
    return all(s is None or s == d for s, d in zip(shape, dims))


def _check_topk_values(topk_idx: torch.Tensor, num_experts: int, name: str = "topk_idx") -> None:
    """Entries must lie in ``[-1, num_experts)``, checked on the host.

    Used for CPU tensors and for CUDA tensors that no kernel serves (the reference path, which reads the GPU
    anyway), never while a CUDA graph is captured, and not at all with ``DEEPEP_PLUGIN_CHECK_VALUES=0``. The CUDA
    kernels check on the GPU instead (get_dispatch_layout's kernel, the internode count read, the low-latency
    send kernel) and report a bad id through their mailbox, with no host read; out-of-range ids select nothing.
    """
    if topk_idx.numel() == 0:
        return
    if topk_idx.is_cuda and (torch.cuda.is_current_stream_capturing()
                             or os.environ.get("DEEPEP_PLUGIN_CHECK_VALUES", "1") == "0"):
        return
    lo, hi = (int(v) for v in torch.aminmax(topk_idx))
    expect(lo >= -1 and hi < num_experts,
           f"{name} entries must be in [-1, num_experts={num_experts}) (-1 = unused slot), got values in [{lo}, {hi}]")


def _is_cuda_tensor(x: XType) -> bool:
    return (x[0] if isinstance(x, tuple) else x).is_cuda


# Every Buffer gets an int at construction, by which the torch.library ops of deepep_plugin.autograd name it (a
# custom op takes only tensors and plain values). Weak references: the registry keeps no Buffer alive.
_OP_KEYS = itertools.count(1)
_BY_OP_KEY: "dict[int, weakref.ref[Buffer]]" = {}


def _register_op_key(buffer: "Buffer") -> int:
    key = next(_OP_KEYS)
    _BY_OP_KEY[key] = weakref.ref(buffer, lambda _ref, k=key: _BY_OP_KEY.pop(k, None))
    return key


def buffer_of_key(key: int) -> "Optional[Buffer]":
    """The live Buffer whose ``_op_key`` is ``key``, else None."""
    ref = _BY_OP_KEY.get(key)
    return ref() if ref is not None else None


def _resolve_ranks_per_node(group: dist.ProcessGroup, rank: int, group_size: int, given: Optional[int]) -> int:
    """The node size: ``given``, else ``DEEPEP_PLUGIN_RANKS_PER_NODE``, else the ranks of the group on this host
    (collective over ``group`` in that case); checked, and capped at the group size."""
    if given is None and "DEEPEP_PLUGIN_RANKS_PER_NODE" in os.environ:
        given = int(os.environ["DEEPEP_PLUGIN_RANKS_PER_NODE"])
    if given is None:
        given = _ranks_per_host(group, rank, group_size)
    expect(isinstance(given, int) and 1 <= given <= MAX_NVL_PEERS,
           f"Buffer: num_ranks_per_node must be in [1, {MAX_NVL_PEERS}], got {given!r}")
    per_node = min(given, group_size)
    expect(group_size % per_node == 0,
           f"Buffer: the group size ({group_size}) must be at most num_ranks_per_node ({given}) or a multiple of it")
    return per_node


def _ranks_per_host(group: dist.ProcessGroup, rank: int, group_size: int) -> int:
    """Ranks of ``group`` on this host (by host name), capped at ``MAX_NVL_PEERS``; collective over ``group``.

    Raises when hosts hold different numbers of ranks (the node size must be uniform: pass num_ranks_per_node).
    """
    import socket

    names: list[Any] = [None] * group_size
    dist.all_gather_object(names, socket.gethostname(), group=group)
    counts = {name: names.count(name) for name in names}
    expect(len(set(counts.values())) == 1,
           f"Buffer: the hosts hold different numbers of ranks of the group ({counts}); pass num_ranks_per_node")
    return min(counts[names[rank]], MAX_NVL_PEERS)


class Buffer:
    """The communication buffer of an expert-parallel group (DeepEP V1's ``Buffer``).

    Args:
        group: the EP process group (``rank = group.rank()``, ``R = group.size()``). ``None`` uses ``comm``.
        num_nvl_bytes: bytes of the NVLink buffer of the normal kernels (size it with
            ``Config.get_nvl_buffer_size_hint``).
        num_rdma_bytes: bytes of the NVSHMEM buffer (internode normal kernels, all low-latency kernels; size it
            with ``get_low_latency_rdma_size_hint`` / ``Config.get_rdma_buffer_size_hint``).
        low_latency_mode: enable the low-latency kernels.
        num_qps_per_rank: RDMA queue pairs per peer (NVSHMEM IBGDA).
        allow_nvlink_for_low_latency_mode: let low-latency traffic use NVLink between peers of one node.
        allow_mnnvl: allow multi-node NVLink detection.
        use_fabric: allocate with fabric handles (not supported: raises).
        explicitly_destroy: release resources only in :meth:`destroy`.
        enable_shrink: rank masking for low-latency mode (not supported: raises).
        comm: an mpi4py communicator, used only when ``group`` is ``None``; it must describe the same ranks as
            the default ``torch.distributed`` group, which carries the traffic.
        backend: ``"auto"`` (CUDA kernels where they apply, else the reference), ``"reference"`` or ``"cuda"``.
        num_ranks_per_node: ranks per node: default ``DEEPEP_PLUGIN_RANKS_PER_NODE`` if set, else the ranks of
            ``group`` on this host, at most 8 (more ranks on one host form nodes of 8); smaller values emulate
            several nodes on one host.
    """

    num_sms: int = 20

    def __init__(self, group: Optional[dist.ProcessGroup], num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False, use_fabric: bool = False,
                 explicitly_destroy: bool = False, enable_shrink: bool = False, comm: Any = None, *,
                 backend: Optional[str] = None, num_ranks_per_node: Optional[int] = None) -> None:
        if group is None:
            if comm is None:
                raise DeepEPInputError("Buffer: pass a torch.distributed process group as group (or an mpi4py comm)")
            expect(dist.is_initialized(), "Buffer: with comm=... torch.distributed must be initialised too "
                                          "(it carries the traffic)")
            expect(comm.Get_size() == dist.get_world_size() and comm.Get_rank() == dist.get_rank(),
                   "Buffer: comm must have the same ranks as the default torch.distributed group")
            group = dist.group.WORLD
        self.group = group
        self.rank = dist.get_rank(group)
        self.group_size = dist.get_world_size(group)
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.explicitly_destroy = explicitly_destroy
        self.enable_shrink = enable_shrink
        self.num_qps_per_rank = num_qps_per_rank
        self.runtime: Any = None

        for name, value in (("num_nvl_bytes", num_nvl_bytes), ("num_rdma_bytes", num_rdma_bytes)):
            expect(isinstance(value, int) and value >= 0, f"Buffer: {name} must be a non-negative int, got {value!r}")
            expect(value % 128 == 0, f"Buffer: {name} must be a multiple of 128, got {value}")
        self.num_ranks_per_node = _resolve_ranks_per_node(group, self.rank, self.group_size, num_ranks_per_node)
        expect(low_latency_mode or self.group_size <= MAX_NORMAL_RANKS,
               f"Buffer: normal mode supports at most {MAX_NORMAL_RANKS} ranks, got {self.group_size}")
        expect(num_rdma_bytes == 0 or low_latency_mode or self.num_nodes > 1,
               "Buffer: num_rdma_bytes > 0 needs low_latency_mode=True or a group spanning several nodes")
        expect(not use_fabric, "Buffer: use_fabric=True is not supported by deepep_plugin (pass use_fabric=False)")
        expect(not enable_shrink,
               "Buffer: enable_shrink=True (rank masking) is not supported by deepep_plugin (pass False)")
        expect(num_qps_per_rank > 0, f"Buffer: num_qps_per_rank must be > 0, got {num_qps_per_rank}")

        from .backends import create_backend
        from .backends.selection import Topology

        topology = Topology(self.group_size, self.num_ranks_per_node, low_latency_mode, num_nvl_bytes, num_rdma_bytes)
        self.runtime: Optional[Backend] = create_backend(
            backend if backend is not None else os.environ.get("DEEPEP_PLUGIN_BACKEND", "auto"),
            group=group, rank=self.rank, topology=topology, num_qps_per_rank=num_qps_per_rank,
            allow_nvlink_for_low_latency_mode=allow_nvlink_for_low_latency_mode, timeout_s=get_timeout_s())
        self.backend_name: str = self.runtime.name
        if low_latency_mode:
            self.nvshmem_qp_depth = int(os.environ.get("NVSHMEM_QP_DEPTH", "1024"))
        self._comm_stream: Optional[torch.cuda.Stream] = None
        self._default_configs: dict[tuple[str, int], Config] = {}
        # Validation done once (spec: cheap when the inputs are right): per call site, the tensors of the last handle
        # that passed _check_handle (a handle rebuilt around the same tensors, as autograd does, counts as the same),
        # with its token count and channels; the tensors of the last get_dispatch_layout, which a fresh dispatch then
        # needs not check again. Weak references: nothing is kept alive (CUDA-graph pools, autograd) by the checks.
        self._handle_ok: dict[str, tuple[type, Any, Any, Optional[int], Optional[int]]] = {}
        self._layout_ok: Optional[tuple[Any, Any, Any, int]] = None
        self._op_key = _register_op_key(self)
        self._usable_sms: Optional[tuple[int, str]] = None  # (count, why): see _check_resident

    @classmethod
    def sized_for(cls, group: Optional[dist.ProcessGroup], hidden_bytes: int, *, num_sms: Optional[int] = None,
                  num_max_dispatch_tokens_per_rank: Optional[int] = None, num_experts: Optional[int] = None,
                  **buffer_kwargs: Any) -> "Buffer":
        """A Buffer for ``group`` with room for rows of ``hidden_bytes`` bytes: the way to make one.

        Args:
            group: the EP process group (collective: every rank calls this together).
            hidden_bytes: bytes of one token row, ``hidden * max(element_size, 2)`` so that BF16 and FP8 rows
                share the buffer (low-latency sizing reads ``hidden = hidden_bytes // 2``).
            num_sms: the SM count the dispatch and combine configs are sized for (default ``Buffer.num_sms``);
                a larger count needs more bytes.
            num_max_dispatch_tokens_per_rank, num_experts: with ``low_latency_mode=True``, size the RDMA buffer of
                the low-latency kernels for these (both required in that mode).
            buffer_kwargs: any other ``Buffer`` argument (``low_latency_mode``, ``num_qps_per_rank``,
                ``explicitly_destroy``, ``backend``, ``num_ranks_per_node``, ...), but not the byte counts.

        NVL bytes cover both the default dispatch and combine configs of the group at ``num_sms``. RDMA bytes are
        given only to a group that spans nodes (the internode kernels' hint, same configs) or, in low-latency mode,
        the low-latency size hint; a one-node normal Buffer gets none.
        """
        for name in ("num_nvl_bytes", "num_rdma_bytes"):
            expect(name not in buffer_kwargs, f"Buffer.sized_for: {name} is computed here; call Buffer(...) to set it")
        expect(isinstance(hidden_bytes, int) and hidden_bytes > 0,
               f"Buffer.sized_for: hidden_bytes must be a positive int, got {hidden_bytes!r}")
        sms = Buffer.num_sms if num_sms is None else num_sms
        expect(isinstance(sms, int) and sms > 0 and sms % 2 == 0,
               f"Buffer.sized_for: num_sms must be a positive even int, got {sms!r}")
        if group is None:
            expect(buffer_kwargs.get("comm") is not None and dist.is_initialized(),
                   "Buffer.sized_for: pass a torch.distributed process group as group")
            group = dist.group.WORLD
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        per_node = _resolve_ranks_per_node(group, rank, size, buffer_kwargs.pop("num_ranks_per_node", None))
        configs = (dispatch_config(size, sms), combine_config(size, sms))
        nvl = max(c.get_nvl_buffer_size_hint(hidden_bytes, size) for c in configs)
        rdma = 0
        if size > per_node:
            rdma = max(c.get_rdma_buffer_size_hint(hidden_bytes, size, num_ranks_per_node=per_node)
                       for c in configs)
        if buffer_kwargs.get("low_latency_mode", False):
            expect(num_max_dispatch_tokens_per_rank is not None and num_experts is not None,
                   "Buffer.sized_for: low_latency_mode=True needs num_max_dispatch_tokens_per_rank and num_experts")
            assert num_max_dispatch_tokens_per_rank is not None and num_experts is not None
            rdma = max(rdma, cls.get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden_bytes // 2,
                                                                size, num_experts))
        return cls(group, nvl, rdma, num_ranks_per_node=per_node, **buffer_kwargs)

    # ------------------------------------------------------------------------------------------------------
    # Static helpers (DeepEP's)
    # ------------------------------------------------------------------------------------------------------
    @property
    def num_nodes(self) -> int:
        return self.group_size // self.num_ranks_per_node

    @staticmethod
    def is_sm90_compiled() -> bool:
        """True when the CUDA kernels were built for sm_90 (FP8 and TMA paths)."""
        from .backends import cuda_extensions_available

        return cuda_extensions_available()

    def served_by(self, op: str, *, cuda: bool = True, dtype: Optional[torch.dtype] = None) -> str:
        """Which runtime runs ``op`` (``layout``, ``dispatch``, ``combine``, ``low_latency_dispatch``,
        ``low_latency_combine``) on CUDA or CPU tensors (``dtype``: combine's x): ``intranode``, ``internode``,
        ``low_latency`` or ``reference``. Asking does what the call would: warn, or raise in strict mode."""
        return self._alive().runtime_for(op, cuda, dtype).name

    @classmethod
    def set_num_sms(cls, new_num_sms: int) -> None:
        """Set the SMs the normal kernels may use (even; shared by all buffers)."""
        expect(isinstance(new_num_sms, int) and new_num_sms > 0 and new_num_sms % 2 == 0,
               f"Buffer.set_num_sms: new_num_sms must be a positive even int, got {new_num_sms!r}")
        cls.num_sms = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        """An ``EventOverlap`` recorded on the current stream (to pass as ``previous_event``)."""
        return EventOverlap(EventHandle())

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        """Bytes of RDMA buffer the low-latency kernels need: DeepEP's formula (``num_ranks`` is not used), with each
        combine row rounded up to 16 bytes as the kernels lay it out (no change for DeepEP's hidden sizes, which are
        multiples of 512)."""
        expect(hidden % 128 == 0, f"get_low_latency_rdma_size_hint: hidden must be a multiple of 128, got {hidden}")
        num_scales = hidden // 128
        n = num_max_dispatch_tokens_per_rank
        dispatch_msg = 16 + max(2 * hidden, hidden + 4 * num_scales)
        combine_msg = (4 * num_scales + 2 * hidden + 15) // 16 * 16
        send = max(n * dispatch_msg, num_experts * n * combine_msg)
        recv = max(num_experts * n * dispatch_msg, num_experts * n * combine_msg)
        signal = (4 * num_experts + 127) // 128 * 128
        total = 2 * send + 2 * recv + 2 * signal
        return (total + 128) // 128 * 128

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """The default dispatch ``Config`` for ``num_ranks`` (DeepEP's table; ``num_sms = Buffer.num_sms``)."""
        return dispatch_config(num_ranks, Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """The default combine ``Config`` for ``num_ranks`` (DeepEP's table; ``num_sms = Buffer.num_sms``)."""
        return combine_config(num_ranks, Buffer.num_sms)

    @staticmethod
    def _unpack_bias(bias: Any) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        if bias is None:
            return None, None
        if isinstance(bias, torch.Tensor):
            return bias, None
        expect(isinstance(bias, (tuple, list)) and len(bias) == 2,
               "bias must be None, a tensor or a tuple of two tensors")
        return bias[0], bias[1]

    # ------------------------------------------------------------------------------------------------------
    # Resources
    # ------------------------------------------------------------------------------------------------------
    def _alive(self) -> Backend:
        if self.runtime is None:
            raise DeepEPError("Buffer: this buffer was destroyed")
        self.runtime.check_error()
        return self.runtime

    def get_comm_stream(self) -> torch.cuda.Stream:
        """The stream the normal kernels run on (CUDA only)."""
        expect(torch.cuda.is_available(), "get_comm_stream: CUDA is not available on this machine")
        if self._comm_stream is None:
            self._comm_stream = torch.cuda.Stream(priority=-1)
        return self._comm_stream

    def get_local_buffer_tensor(self, dtype: torch.dtype, size: Optional[torch.Size] = None, offset: int = 0,
                                use_rdma_buffer: bool = False) -> torch.Tensor:
        """A view of this rank's NVL (or RDMA) buffer as ``dtype``, starting ``offset`` **bytes** in (as DeepEP)."""
        runtime = self._alive()
        raw = runtime.local_buffer(use_rdma_buffer, self._default_device())
        expect(0 <= offset < raw.numel(),
               f"get_local_buffer_tensor: offset must be in [0, {raw.numel()}), got {offset}")
        element = torch.empty(0, dtype=dtype).element_size()
        usable = (raw.numel() - offset) // element * element
        view = raw[offset: offset + usable].view(dtype)
        if size is not None:
            expect(torch.Size(size).numel() <= view.numel(),
                   f"get_local_buffer_tensor: size {tuple(size)} does not fit in the buffer")
            view = view[: torch.Size(size).numel()].view(size)
        return view

    def _default_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend_name == "cuda" else \
            torch.device("cpu")

    def destroy(self) -> None:
        """Release the buffer's resources (collective). Only for ``explicitly_destroy=True`` buffers, as DeepEP."""
        expect(self.explicitly_destroy, "Buffer.destroy: only buffers created with explicitly_destroy=True are "
                                        "destroyed by hand; others are released when they are garbage collected")
        if self.runtime is not None:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            dist.barrier(group=self.group)
            self.runtime.destroy()
            self.runtime = None
        self._handle_ok.clear()
        self._layout_ok = None

    def __del__(self) -> None:
        runtime = getattr(self, "runtime", None)
        if runtime is None:
            return
        if self.explicitly_destroy:
            import warnings

            warnings.warn("deepep_plugin.Buffer created with explicitly_destroy=True was not destroyed", stacklevel=1)
            return
        try:
            runtime.destroy()
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass

    # ------------------------------------------------------------------------------------------------------
    # Streams and events (DeepEP's model, spec 1.5)
    # ------------------------------------------------------------------------------------------------------
    def _run(self, fn: Callable[[], Any], cuda: bool, previous_event: Optional[EventOverlap], async_finish: bool,
             allocate_on_comm_stream: bool, inputs: Sequence[Optional[torch.Tensor]],
             ordered: bool = False) -> Tuple[Any, EventOverlap]:
        """Run ``fn`` with DeepEP's stream model (spec 1.5).

        ``ordered``: the runtime orders its own calls across streams (the intranode kernels), so a call without
        ``previous_event``, ``async_finish`` or ``allocate_on_comm_stream`` runs on the current stream with no
        stream or event bookkeeping at all: the same order as "comm stream waits, kernels, current stream waits",
        for none of its cost.
        """
        if allocate_on_comm_stream and (previous_event is None or not async_finish):
            raise DeepEPInputError("allocate_on_comm_stream=True requires previous_event and async_finish=True")
        if not cuda:
            result = fn()
            return result, EventOverlap(EventHandle() if async_finish else None)
        if ordered and previous_event is None and not async_finish:
            return fn(), EventOverlap(None)
        compute = torch.cuda.current_stream()
        comm = self.get_comm_stream()
        if previous_event is not None and previous_event.event is not None:
            previous_event.event.stream_wait(comm)
        else:
            comm.wait_stream(compute)
        if allocate_on_comm_stream:
            with torch.cuda.stream(comm):
                result = fn()
        else:
            result = self._launch_on(comm, fn)
        outputs = _tensors_in(result)
        live_inputs = [t for t in inputs if isinstance(t, torch.Tensor) and t.is_cuda]
        if async_finish:
            event = EventHandle(comm)
            for t in live_inputs + outputs:
                t.record_stream(comm)
            if allocate_on_comm_stream:
                for t in outputs:
                    t.record_stream(compute)
            return result, EventOverlap(event, tuple(live_inputs + outputs))
        compute.wait_stream(comm)
        return result, EventOverlap(None)

    @staticmethod
    def _launch_on(comm: "torch.cuda.Stream", fn: Callable[[], Any]) -> Any:
        """Run ``fn`` with ``comm`` current (its outputs are allocated there) and record its outputs on the stream
        that was current, which uses them."""
        compute = torch.cuda.current_stream()
        with torch.cuda.stream(comm):
            result = fn()
        for t in _tensors_in(result):
            t.record_stream(compute)
        return result

    def _config(self, config: Optional[Config], kind: str) -> Config:
        """``config`` checked, or the default ``Config`` of ``kind`` ("dispatch"/"combine") for ``Buffer.num_sms``
        (built once per SM count; never handed out, so nothing can change it)."""
        if config is not None:
            if not isinstance(config, Config):
                raise DeepEPInputError(f"{kind}: config must be a deepep_plugin.Config, got {type(config)}")
            return config
        key = (kind, Buffer.num_sms)
        cached = self._default_configs.get(key)
        if cached is None:
            make = dispatch_config if kind == "dispatch" else combine_config
            cached = self._default_configs[key] = make(self.group_size, Buffer.num_sms)
        return cached

    # ------------------------------------------------------------------------------------------------------
    # Normal kernels
    # ------------------------------------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int,
                            previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                            allocate_on_comm_stream: bool = False
                            ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor, EventOverlap]:
        """Count, per rank, node and expert, the tokens of a routing.

        Args:
            topk_idx: ``[T, K]`` ``topk_idx_t`` (int64), contiguous; ``-1`` marks an unused slot. Any other
                value outside ``[0, num_experts)`` is an error: on CPU it raises here; on the GPU it is counted
                nowhere and reported without a host read (``DeepEPInputError`` at the next dispatch's count read
                or the next call, naming the entry and its value).
            num_experts: ``E``, a positive multiple of the group size.

        Returns:
            ``(num_tokens_per_rank [R] int32, num_tokens_per_rdma_rank [N] int32 or None within one node,
            num_tokens_per_expert [E] int32, is_token_in_rank [T, R] bool, EventOverlap)``, on ``topk_idx``'s
            device. No host read on the GPU.
        """
        runtime = self.runtime
        if runtime is None:
            raise DeepEPError("Buffer: this buffer was destroyed")
        self._check_num_experts(num_experts)
        _check_tensor(topk_idx, "topk_idx", dtype=topk_idx_t, ndim=2, contiguous=True)
        target = runtime.runtime_for("layout", topk_idx.is_cuda)
        if not target.orders_streams:
            runtime.check_error()
            if target is runtime.reference:  # the kernels check on the GPU, with no host read
                _check_topk_values(topk_idx, num_experts)
        layout, event = self._run(lambda: target.get_dispatch_layout(topk_idx, num_experts), topk_idx.is_cuda,
                                  previous_event, async_finish, allocate_on_comm_stream, [topk_idx],
                                  target.orders_streams)
        if layout.num_tokens_per_rdma_rank is None:
            self._layout_ok = (weakref.ref(layout.num_tokens_per_rank), weakref.ref(layout.num_tokens_per_expert),
                               weakref.ref(layout.is_token_in_rank), num_experts)
        return (layout.num_tokens_per_rank, layout.num_tokens_per_rdma_rank, layout.num_tokens_per_expert,
                layout.is_token_in_rank, event)

    def _check_num_experts(self, num_experts: int) -> None:
        if not isinstance(num_experts, int) or num_experts <= 0:
            raise DeepEPInputError(f"num_experts must be a positive int, got {num_experts!r}")
        if num_experts % self.group_size != 0:
            raise DeepEPInputError(f"num_experts ({num_experts}) must be divisible by the group size "
                                   f"({self.group_size})")
        if num_experts // self.group_size > MAX_LOCAL_EXPERTS:
            raise DeepEPInputError(f"num_experts / group size must be at most {MAX_LOCAL_EXPERTS}, got "
                                   f"{num_experts // self.group_size}")

    def _split_x(self, x: XType, what: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if isinstance(x, torch.Tensor):
            if x.dtype not in _FLOAT_DTYPES or x.dim() != 2 or not x.is_contiguous():
                _check_tensor(x, "x", dtype=_FLOAT_DTYPES, ndim=2, contiguous=True)
            if x.shape[1] * x.element_size() % 16 != 0:
                raise DeepEPInputError(f"{what}: a row of x must be a multiple of 16 bytes (hidden {x.size(1)} x "
                                       f"{x.element_size()} bytes)")
            return x, None
        if not isinstance(x, (tuple, list)) or len(x) != 2:
            if not isinstance(x, (tuple, list)):
                _check_tensor(x, "x")
            raise DeepEPInputError(f"{what}: x must be a tensor or a tuple (x_fp8, x_scales), got {len(x)} items")
        data, scales = x
        _check_tensor(data, "x[0] (FP8 data)", dtype=_FP8_DTYPES, ndim=2, contiguous=True)
        hidden = data.size(1)
        if hidden % 128 != 0:
            raise DeepEPInputError(f"{what}: FP8 x must have a hidden size that is a multiple of 128, got {hidden}")
        _check_tensor(scales, "x[1] (scales)", dtype=(torch.float32, torch.int32), ndim=2, device=data.device)
        num_scales = hidden // 128 if scales.dtype == torch.float32 else (hidden // 128 + 3) // 4
        if scales.size(0) != data.size(0) or scales.size(1) != num_scales:
            raise DeepEPInputError(
                f"{what}: x[1] (scales) must have shape [{data.size(0)}, {num_scales}] "
                f"({'hidden/128 float32' if scales.dtype == torch.float32 else 'hidden/512 packed UE8M0 int32'}),"
                f" got {list(scales.shape)}")
        return data, scales

    def _check_handle(self, handle: Any, num_tokens: Optional[int], config: Optional[Config], what: str) -> Handle:
        channels = config.num_channels if config is not None else None
        ok = self._handle_ok.get(what)
        if (ok is not None and type(handle) is ok[0] and ok[1]() is handle.is_token_in_rank
                and ok[2]() is handle_channel_matrix(handle) and ok[3] == num_tokens and ok[4] == channels):
            return handle  # its tensors passed the previous call of this kind, with the same token count and channels
        if not isinstance(handle, (IntranodeHandle, InternodeHandle)):
            raise DeepEPInputError(f"{what}: handle must be the handle a dispatch returned, passed on unchanged "
                                   f"(an IntranodeHandle or InternodeHandle), got {type(handle).__name__}")
        intranode = self.num_ranks_per_node == self.group_size
        in_rank = handle.is_token_in_rank
        if isinstance(handle, IntranodeHandle) != intranode:
            raise DeepEPInputError(
                f"{what}: handle is an {'internode' if intranode else 'intranode'} handle, but this buffer spans "
                f"{self.num_nodes} node(s)")
        if in_rank.size(1) != self.group_size:
            raise DeepEPInputError(f"{what}: handle was made for a group of {in_rank.size(1)} ranks, this buffer's "
                                   f"group has {self.group_size}")
        if num_tokens is not None and in_rank.size(0) != num_tokens:
            raise DeepEPInputError(f"{what}: handle was made for {in_rank.size(0)} tokens, x has {num_tokens}")
        if config is not None and handle_num_channels(handle) != channels:
            raise DeepEPInputError(f"{what}: handle was made with num_sms={2 * handle_num_channels(handle)}, config "
                                   f"has num_sms={config.num_sms}")
        self._handle_ok[what] = (type(handle), weakref.ref(in_rank), weakref.ref(handle_channel_matrix(handle)),
                                 num_tokens, channels)
        return handle

    def _check_resident(self, what: str, num_sms: int, device: torch.device) -> None:
        """Refuse ``num_sms`` blocks of the intranode kernels that cannot all be resident here
        (``backends/residency.py``); the usable SM count is read once per Buffer."""
        usable = self._usable_sms
        if usable is None:
            from .backends.residency import usable_sms

            count = torch.cuda.get_device_properties(device).multi_processor_count
            usable = self._usable_sms = usable_sms(count)
        if num_sms > usable[0]:
            from .backends.residency import check_resident

            check_resident(what, num_sms, usable)

    def _check_nvl_bytes(self, what: str, needed: int) -> None:
        if needed > self.num_nvl_bytes and self.num_ranks_per_node == self.group_size:
            raise DeepEPBufferTooSmall(
                f"{what}: num_nvl_bytes={self.num_nvl_bytes} is too small for this call; it needs at least "
                f"{needed} bytes (size it with Config.get_nvl_buffer_size_hint(hidden_bytes, num_ranks))")

    def dispatch(self, x: XType, handle: Optional[Any] = None,
                 num_tokens_per_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
                 is_token_in_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_expert: Optional[torch.Tensor] = None,
                 topk_idx: Optional[torch.Tensor] = None, topk_weights: Optional[torch.Tensor] = None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, config: Optional[Config] = None,
                 previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False) -> Tuple[XType, Optional[torch.Tensor],
                                                                 Optional[torch.Tensor], Optional[list],
                                                                 Optional[Handle], EventOverlap]:
        """Send each token to every rank that holds one of its experts.

        Args:
            x: ``[T, H]`` BF16/FP16/FP32, or the FP8 tuple ``(x_e4m3 [T, H] float8_e4m3fn, scales)`` with scales
                ``[T, H/128]`` float32 (any strides) or ``[T, H/512]`` int32 (packed UE8M0).
            handle: a handle from an earlier dispatch: cached mode (same routing, no layout work, no host sync).
            num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert: the outputs of
                :meth:`get_dispatch_layout` (non-cached mode).
            topk_idx: ``[T, K]`` int64 (optional, non-cached only); topk_weights: ``[T, K]`` float32.
            expert_alignment: round each per-expert receive count up to a multiple of this.
            num_worst_tokens: if > 0, outputs have exactly this many rows and no host sync happens. Rows past the
                received count are padding on every backend: data, scales and top-k weights 0, top-k ids -1 (the
                handle marks them too), so expert code may run over all rows; its gradients there vanish.
            config: defaults to ``Buffer.get_dispatch_config(R)``.
            previous_event, async_finish, allocate_on_comm_stream: stream control as in DeepEP.

        Returns:
            ``(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event)``:
            ``recv_x`` ``[n_recv, H]`` (or the FP8 tuple with row-major scales), rows grouped by source rank then
            source token index; ``recv_topk_idx`` ``[n_recv, K]`` int64 local expert ids or -1;
            ``recv_topk_weights`` ``[n_recv, K]`` float32, 0 where the id is -1; the per-local-expert receive
            counts as a list (``[]`` with ``num_worst_tokens``). Cached mode returns
            ``(recv_x, None, None, None, None, event)``. On the GPU only a fresh dispatch without
            ``num_worst_tokens`` reads from it (the receive counts, once).
        """
        runtime = self.runtime
        if runtime is None:
            raise DeepEPError("Buffer: this buffer was destroyed")
        data, scales = self._split_x(x, "dispatch")
        num_tokens, hidden = data.shape
        dev = data.device
        config = self._config(config, "dispatch")
        target = runtime.runtime_for("dispatch", data.is_cuda)
        if not isinstance(expert_alignment, int) or expert_alignment < 1:
            raise DeepEPInputError(f"dispatch: expert_alignment must be an int >= 1, got {expert_alignment!r}")
        if not isinstance(num_worst_tokens, int) or num_worst_tokens < 0:
            raise DeepEPInputError(f"dispatch: num_worst_tokens must be an int >= 0, got {num_worst_tokens!r}")
        num_topk = topk_idx.shape[1] if isinstance(topk_idx, torch.Tensor) and topk_idx.dim() == 2 else 0
        layout = None
        r = self.group_size
        if handle is not None:
            handle = self._check_handle(handle, num_tokens, config, "dispatch")
            if topk_idx is not None or topk_weights is not None:
                raise DeepEPInputError("dispatch: with a cached handle, topk_idx and topk_weights must be None")
            if handle.is_token_in_rank.device != dev:
                raise DeepEPInputError(f"dispatch: handle is on {handle.is_token_in_rank.device}, x on {dev}")
            if num_worst_tokens and handle_recv_count(handle) > num_worst_tokens:
                raise DeepEPInputError(f"dispatch: num_worst_tokens={num_worst_tokens} is smaller than the "
                                       f"{handle_recv_count(handle)} tokens the handle receives")
        else:
            ok = self._layout_ok
            if (ok is not None and num_tokens_per_rank is ok[0]() and num_tokens_per_expert is ok[1]()
                    and is_token_in_rank is ok[2]() and is_token_in_rank.shape[0] == num_tokens
                    and num_tokens_per_expert.numel() == ok[3] and num_tokens_per_rank.numel() == r
                    and is_token_in_rank.device == dev):
                num_experts = ok[3]  # the tensors of the last get_dispatch_layout, checked when it made them
            else:
                _check_tensor(num_tokens_per_rank, "num_tokens_per_rank", dtype=torch.int32, shape=[r], device=dev)
                _check_tensor(is_token_in_rank, "is_token_in_rank", dtype=torch.bool, shape=[num_tokens, r],
                              device=dev)
                _check_tensor(num_tokens_per_expert, "num_tokens_per_expert", dtype=torch.int32, ndim=1, device=dev)
                assert num_tokens_per_expert is not None
                num_experts = num_tokens_per_expert.numel()
                self._check_num_experts(num_experts)
            if self.num_ranks_per_node != r:
                _check_tensor(num_tokens_per_rdma_rank, "num_tokens_per_rdma_rank", dtype=torch.int32,
                              shape=[self.num_nodes], device=dev)
            if topk_idx is None:
                if topk_weights is not None:
                    raise DeepEPInputError("dispatch: topk_weights given without topk_idx")
                if num_worst_tokens and self.num_ranks_per_node == r:
                    raise DeepEPInputError("dispatch: num_worst_tokens needs topk_idx and topk_weights")
            else:
                _check_tensor(topk_idx, "topk_idx", dtype=topk_idx_t, shape=[num_tokens, None], device=dev,
                              contiguous=True)
                max_topk = MAX_TOPK_INTRANODE if self.num_ranks_per_node == r else MAX_TOPK_INTERNODE
                if not 1 <= num_topk <= max_topk:
                    raise DeepEPInputError(f"dispatch: top-k must be in [1, {max_topk}] for a group of "
                                           f"{self.num_nodes} node(s), got {num_topk}")
                _check_tensor(topk_weights, "topk_weights", dtype=torch.float32, shape=[num_tokens, num_topk],
                              device=dev, contiguous=True)
                if num_worst_tokens == 0 and target is runtime.reference:  # kernels check on the GPU
                    _check_topk_values(topk_idx, num_experts)
            layout = DispatchLayout(num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert,
                                    is_token_in_rank)
            self._check_nvl_bytes("dispatch", r * (r + num_experts // r) * 4)
        c, q = config.num_channels, config.num_max_nvl_chunked_recv_tokens
        num_scales = scales.shape[1] if scales is not None else 0
        self._check_nvl_bytes("dispatch", r * r * 4 + c * r * 16 + c * r * q * (
            hidden * data.element_size() + 4 + num_topk * (TOPK_IDX_BYTES + 4) + 4 * num_scales))

        ordered = target.orders_streams
        if not ordered:
            runtime.check_error()
        else:
            self._check_resident("dispatch", config.num_sms, dev)

        if ordered and previous_event is None and not async_finish and not allocate_on_comm_stream:
            # The common call (_run's first case, inlined: no closure, no list of inputs).
            result = target.dispatch(data, scales, handle, layout, topk_idx, topk_weights, expert_alignment,
                                     num_worst_tokens, config)
            event = EventOverlap(None)
        else:
            def run() -> Any:
                return target.dispatch(data, scales, handle, layout, topk_idx, topk_weights, expert_alignment,
                                       num_worst_tokens, config)

            result, event = self._run(run, dev.type == "cuda", previous_event, async_finish,
                                      allocate_on_comm_stream, [data, scales, topk_idx, topk_weights,
                                                                is_token_in_rank], ordered)
        recv_x = result.recv_x if result.recv_x_scales is None else (result.recv_x, result.recv_x_scales)
        if handle is not None:
            return recv_x, None, None, None, None, event
        counts = result.num_recv_tokens_per_expert_list
        return recv_x, result.recv_topk_idx, result.recv_topk_weights, counts, result.handle, event

    def combine(self, x: torch.Tensor, handle: Any, topk_weights: Optional[torch.Tensor] = None,
                bias: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor], None] = None,
                config: Optional[Config] = None, previous_event: Optional[EventOverlap] = None,
                async_finish: bool = False, allocate_on_comm_stream: bool = False
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor], EventOverlap]:
        """Send each received row back to its source and sum the copies there (unweighted).

        Args:
            x: ``[n_recv, H]`` (or ``[num_worst_tokens, H]``) BF16 (the CUDA kernels) or FP16/FP32 (reference),
                contiguous, rows in the order dispatch produced.
            handle: the handle of the non-cached dispatch.
            topk_weights: ``[n_recv, K]`` float32, summed the same way (optional).
            bias: ``None``, a ``[T, H]`` tensor or a pair of them (same dtype as x), added to the result.
            config: defaults to ``Buffer.get_combine_config(R)``.

        Returns:
            ``(combined_x [T, H] x.dtype, combined_topk_weights [T, K] float32 or None, event)``, accumulated in
            FP32: ``combined_x[t] = bias0[t] + bias1[t] + sum over ranks j that received t of x_j[row of t]``.
            No host read.
        """
        runtime = self.runtime
        if runtime is None:
            raise DeepEPError("Buffer: this buffer was destroyed")
        config = self._config(config, "combine")
        if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES or x.dim() != 2 or not x.is_contiguous():
            _check_tensor(x, "x", dtype=_FLOAT_DTYPES, ndim=2, contiguous=True)
        handle = self._check_handle(handle, None, None, "combine")
        dev = x.device
        n_recv = handle_recv_count(handle)
        x_rows, hidden = x.shape
        if x_rows < n_recv:
            raise DeepEPInputError(f"combine: x must have at least the {n_recv} rows dispatch received, "
                                   f"got {x_rows}")
        num_tokens = handle.is_token_in_rank.shape[0]
        if hidden * x.element_size() % 16 != 0:
            raise DeepEPInputError(f"combine: a row of x must be a multiple of 16 bytes (hidden {hidden} x "
                                   f"{x.element_size()} bytes)")
        num_topk = 0
        if topk_weights is not None:
            _check_tensor(topk_weights, "topk_weights", dtype=torch.float32, ndim=2, device=dev, contiguous=True)
            w_rows, num_topk = topk_weights.shape
            if w_rows != x_rows:
                raise DeepEPInputError(f"combine: topk_weights must have {x_rows} rows (as x), got {w_rows}")
        bias0, bias1 = self._unpack_bias(bias)
        if bias0 is not None:
            _check_tensor(bias0, "bias[0]", dtype=x.dtype, shape=[num_tokens, hidden], device=dev, contiguous=True)
        if bias1 is not None:
            _check_tensor(bias1, "bias[1]", dtype=x.dtype, shape=[num_tokens, hidden], device=dev, contiguous=True)
        c, q, r = config.num_channels, config.num_max_nvl_chunked_recv_tokens, self.group_size
        self._check_nvl_bytes("combine", c * r * 8 + c * r * q * (hidden * x.element_size() + 4 + 4 * num_topk))

        target = runtime.runtime_for("combine", x.is_cuda, x.dtype)
        ordered = target.orders_streams
        if not ordered:
            runtime.check_error()
        else:
            self._check_resident("combine", config.num_sms, dev)

        if ordered and previous_event is None and not async_finish and not allocate_on_comm_stream:
            # The common call (_run's first case, inlined: no closure, no list of inputs).
            result = target.combine(x, handle, topk_weights, bias0, bias1, config)
            return result.combined_x, result.combined_topk_weights, EventOverlap(None)

        def run() -> Any:
            return target.combine(x, handle, topk_weights, bias0, bias1, config)

        result, event = self._run(run, dev.type == "cuda", previous_event, async_finish, allocate_on_comm_stream,
                                  [x, topk_weights, bias0, bias1], ordered)
        return result.combined_x, result.combined_topk_weights, event

    def internode_dispatch(self, *args: Any, **kwargs: Any) -> Any:
        """Same as :meth:`dispatch` (DeepEP exposes it; ``dispatch`` routes to it for several nodes)."""
        expect(self.num_nodes > 1, "internode_dispatch: this buffer spans one node; call dispatch")
        return self.dispatch(*args, **kwargs)

    def internode_combine(self, *args: Any, **kwargs: Any) -> Any:
        """Same as :meth:`combine` for buffers spanning several nodes."""
        expect(self.num_nodes > 1, "internode_combine: this buffer spans one node; call combine")
        return self.combine(*args, **kwargs)

    # ------------------------------------------------------------------------------------------------------
    # Low-latency kernels
    # ------------------------------------------------------------------------------------------------------
    def _check_low_latency(self, what: str, num_max_dispatch_tokens_per_rank: int, hidden: int,
                           num_experts: int) -> None:
        expect(self.low_latency_mode, f"{what}: this Buffer was created without low_latency_mode=True")
        expect(isinstance(num_max_dispatch_tokens_per_rank, int) and num_max_dispatch_tokens_per_rank > 0,
               f"{what}: num_max_dispatch_tokens_per_rank must be a positive int, "
               f"got {num_max_dispatch_tokens_per_rank!r}")
        expect(hidden % 128 == 0, f"{what}: hidden must be a multiple of 128, got {hidden}")
        self._check_num_experts(num_experts)
        needed = self.get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, self.group_size,
                                                     num_experts)
        if needed > self.num_rdma_bytes:
            raise DeepEPBufferTooSmall(
                f"{what}: num_rdma_bytes={self.num_rdma_bytes} is too small; it needs at least {needed} bytes "
                f"(Buffer.get_low_latency_rdma_size_hint({num_max_dispatch_tokens_per_rank}, {hidden}, "
                f"{self.group_size}, {num_experts}))")

    @staticmethod
    def _check_low_latency_handle(handle: Any, what: str) -> None:
        if not isinstance(handle, LowLatencyHandle):
            raise DeepEPInputError(f"{what}: handle must be the handle low_latency_dispatch returned, passed on "
                                   f"unchanged (a LowLatencyHandle), got {type(handle).__name__}")

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Reset the low-latency signalling state (collective; needed after using the buffer in normal mode)."""
        runtime = self._alive()
        self._check_low_latency("clean_low_latency_buffer", num_max_dispatch_tokens_per_rank, hidden, num_experts)
        runtime.clean_low_latency_buffer(num_max_dispatch_tokens_per_rank, hidden, num_experts)

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                             dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
                             return_recv_hook: bool = False) -> Tuple[XType, torch.Tensor, tuple, EventOverlap,
                                                                      Optional[Callable[[], None]]]:
        """Send each token to the ranks of its experts, into fixed-size per-expert slots (decoding).

        Args:
            x: ``[T, H]`` BF16, contiguous, ``T <= num_max_dispatch_tokens_per_rank``, ``H % 128 == 0``.
            topk_idx: ``[T, K]`` int64, ``-1`` for unused slots, ``K <= 16``.
            num_max_dispatch_tokens_per_rank: ``N_ll``, the same on every rank.
            num_experts: ``E``, a multiple of the group size.
            cumulative_local_expert_recv_stats: optional ``[E_loc]`` int32; receive counts are added to it.
            dispatch_wait_recv_cost_stats: optional ``[R]`` int64; time spent waiting per source is added.
            use_fp8, round_scale, use_ue8m0: cast to FP8 e4m3 with per-128-channel scales (power-of-two with
                ``round_scale``; packed UE8M0 int32 with ``use_ue8m0``, which needs ``round_scale``).
            async_finish: return an event instead of making the current stream wait.
            return_recv_hook: only send now; the returned ``hook()`` completes the receive.

        Returns:
            ``(recv_x, recv_count, handle, event, hook)``: ``recv_x`` ``[E_loc, R*N_ll, H]`` BF16 or the tuple
            ``(float8_e4m3fn [E_loc, R*N_ll, H], scales [E_loc, R*N_ll, H/128] float32 or [.., H/512] int32)``
            (scales a transposed view, token dimension fastest); ``recv_count`` ``[E_loc]`` int32 valid rows per
            local expert; ``handle`` a ``LowLatencyHandle`` ``(src_info, layout_range, N_ll, H, E)``; ``hook`` or
            ``None``.
        """
        runtime = self._alive()
        _check_tensor(x, "x", dtype=torch.bfloat16, ndim=2, contiguous=True)
        num_tokens, hidden = x.shape
        self._check_low_latency("low_latency_dispatch", num_max_dispatch_tokens_per_rank, hidden, num_experts)
        expect(num_tokens <= num_max_dispatch_tokens_per_rank,
               f"low_latency_dispatch: x has {num_tokens} tokens, more than num_max_dispatch_tokens_per_rank="
               f"{num_max_dispatch_tokens_per_rank}")
        _check_tensor(topk_idx, "topk_idx", dtype=topk_idx_t, shape=[num_tokens, None], device=x.device,
                      contiguous=True)
        expect(1 <= topk_idx.size(1) <= MAX_TOPK_LOW_LATENCY,
               f"low_latency_dispatch: top-k must be in [1, {MAX_TOPK_LOW_LATENCY}], got {topk_idx.size(1)}")
        target = runtime.runtime_for("low_latency_dispatch", x.is_cuda)
        if target is runtime.reference:
            _check_topk_values(topk_idx, num_experts)  # the low-latency kernels check on the GPU instead
        local = num_experts // self.group_size
        if cumulative_local_expert_recv_stats is not None:
            _check_tensor(cumulative_local_expert_recv_stats, "cumulative_local_expert_recv_stats",
                          dtype=torch.int32, shape=[local], device=x.device, contiguous=True)
        if dispatch_wait_recv_cost_stats is not None:
            _check_tensor(dispatch_wait_recv_cost_stats, "dispatch_wait_recv_cost_stats", dtype=torch.int64,
                          shape=[self.group_size], device=x.device, contiguous=True)
        expect(not use_ue8m0 or round_scale, "low_latency_dispatch: use_ue8m0=True requires round_scale=True")
        expect(not (async_finish and return_recv_hook),
               "low_latency_dispatch: async_finish and return_recv_hook cannot both be True")

        def run() -> Any:
            return runtime.low_latency_dispatch(
                x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                cumulative_local_expert_recv_stats=cumulative_local_expert_recv_stats,
                dispatch_wait_recv_cost_stats=dispatch_wait_recv_cost_stats, use_fp8=use_fp8,
                round_scale=round_scale, use_ue8m0=use_ue8m0, return_recv_hook=return_recv_hook)

        if return_recv_hook:
            result, event = run(), EventOverlap(None)
        else:
            result, event = self._run(run, x.is_cuda, None, async_finish, False,
                                      [x, topk_idx, cumulative_local_expert_recv_stats])
        recv_x = result.recv_x if result.recv_x_scales is None else (result.recv_x, result.recv_x_scales)
        return recv_x, result.recv_count, result.handle, event, result.hook

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                            handle: LowLatencyHandle, use_logfmt: bool = False, zero_copy: bool = False,
                            async_finish: bool = False, return_recv_hook: bool = False,
                            out: Optional[torch.Tensor] = None,
                            combine_wait_recv_cost_stats: Optional[torch.Tensor] = None
                            ) -> Tuple[torch.Tensor, EventOverlap, Optional[Callable[[], None]]]:
        """Send expert outputs back and reduce them with the top-k weights (decoding).

        Args:
            x: ``[E_loc, R*N_ll, H]`` BF16, contiguous (only each expert's valid rows are read).
            topk_idx: ``[T, K]`` int64 and topk_weights ``[T, K]`` float32: those of the matching dispatch.
            handle: from :meth:`low_latency_dispatch`.
            use_logfmt: DeepEP's internal log format (not supported: raises).
            zero_copy: the outputs were written into :meth:`get_next_low_latency_combine_buffer`.
            out: optional ``[T, H]`` BF16 contiguous result tensor.
            combine_wait_recv_cost_stats: optional ``[R]`` int64.

        Returns:
            ``(combined_x [T, H] BF16, event, hook)``: ``combined_x[t] = sum_k w[t, k] * y(topk_idx[t, k], t)``
            in FP32, rounded to BF16.
        """
        runtime = self._alive()
        self._check_low_latency_handle(handle, "low_latency_combine")
        n_ll, hidden, num_experts = handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts
        self._check_low_latency("low_latency_combine", n_ll, hidden, num_experts)
        local = num_experts // self.group_size
        _check_tensor(x, "x", dtype=torch.bfloat16, shape=[local, self.group_size * n_ll, hidden], contiguous=True)
        _check_tensor(topk_idx, "topk_idx", dtype=topk_idx_t, ndim=2, device=x.device, contiguous=True)
        num_tokens, num_topk = topk_idx.shape
        expect(num_tokens <= n_ll, f"low_latency_combine: topk_idx has {num_tokens} tokens, more than "
                                   f"num_max_dispatch_tokens_per_rank={n_ll}")
        expect(1 <= num_topk <= MAX_TOPK_LOW_LATENCY,
               f"low_latency_combine: top-k must be in [1, {MAX_TOPK_LOW_LATENCY}], got {num_topk}")
        _check_tensor(topk_weights, "topk_weights", dtype=torch.float32, shape=[num_tokens, num_topk],
                      device=x.device, contiguous=True)
        expect(not use_logfmt, "low_latency_combine: use_logfmt=True is not supported by deepep_plugin "
                               "(pass use_logfmt=False; combine is BF16)")
        expect(not (async_finish and return_recv_hook),
               "low_latency_combine: async_finish and return_recv_hook cannot both be True")
        if out is not None:
            _check_tensor(out, "out", dtype=torch.bfloat16, shape=[num_tokens, hidden], device=x.device,
                          contiguous=True)
        if combine_wait_recv_cost_stats is not None:
            _check_tensor(combine_wait_recv_cost_stats, "combine_wait_recv_cost_stats", dtype=torch.int64,
                          shape=[self.group_size], device=x.device, contiguous=True)

        def run() -> Any:
            return runtime.low_latency_combine(x, topk_idx, topk_weights, handle, zero_copy=zero_copy,
                                               return_recv_hook=return_recv_hook, out=out,
                                               combine_wait_recv_cost_stats=combine_wait_recv_cost_stats)

        if return_recv_hook:
            (combined, hook), event = run(), EventOverlap(None)
        else:
            (combined, hook), event = self._run(run, x.is_cuda, None, async_finish, False,
                                                [x, topk_idx, topk_weights, out])
        return combined, event, hook

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """BF16 ``[E_loc, R*N_ll, H]`` view (row stride ``H + H/64`` rounded up to 8 elements) of the send buffer
        the next low-latency call uses; fill it and call ``low_latency_combine(..., zero_copy=True)``."""
        runtime = self._alive()
        self._check_low_latency_handle(handle, "get_next_low_latency_combine_buffer")
        self._check_low_latency("get_next_low_latency_combine_buffer", handle.num_max_dispatch_tokens_per_rank,
                                handle.hidden, handle.num_experts)
        return runtime.get_next_low_latency_combine_buffer(handle)


def _tensors_in(obj: Any) -> list[torch.Tensor]:
    """Every CUDA tensor inside a (nested) result."""
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.is_cuda else []
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _tensors_in(item)]
    return []
