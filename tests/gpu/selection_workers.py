"""Per-process bodies of ``test_selection_cuda.py``: which runtime serves each call on the GPU, the fallback
warnings and strict errors, and a two-"node" Megatron MoE layer served by the internode kernels.

Nodes are emulated on one host: ``DEEPEP_PLUGIN_RANKS_PER_NODE`` (or ``num_ranks_per_node``) smaller than the
group makes several nodes of the ranks sharing the GPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Callable, Iterator, List, Tuple

import torch
import torch.distributed as dist

import deepep_plugin as dp
from deepep_plugin.errors import DeepEPFallbackError


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def warnings_logged() -> Iterator[List[str]]:
    handler = _Records()
    logger = logging.getLogger("deepep_plugin")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


@contextlib.contextmanager
def counting(cls: type, ops: Tuple[str, ...]) -> Iterator[List[str]]:
    """Record each call of ``cls.<op>`` (the runtime that really ran) while inside."""
    calls: List[str] = []
    saved = {op: cls.__dict__[op] for op in ops}

    def wrapped(op: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            calls.append(op)
            return original(self, *args, **kwargs)
        return method

    for op, original in saved.items():
        setattr(cls, op, wrapped(op, original))
    try:
        yield calls
    finally:
        for op, original in saved.items():
            setattr(cls, op, original)


def _routing(rank: int, world: int, tokens: int, hidden: int, num_experts: int, seed: int, dev: torch.device):
    g = torch.Generator().manual_seed(seed * 100 + rank)
    x = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(num_experts, generator=g)[:4] for _ in range(tokens)]).long()
    idx[torch.rand(tokens, 4, generator=g) < 0.1] = -1
    w = torch.rand(tokens, 4, generator=g)
    return x.to(dev), idx.to(dev), w.to(dev)


def _step(buf: dp.Buffer, x, idx, w, num_experts: int, combine_dtype: torch.dtype):
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, num_experts)
    recv_x, _, recv_w, _, handle, _ = buf.dispatch(x, None, per_rank, per_rdma, in_rank, per_expert, idx, w)
    combined, _, _ = buf.combine(recv_x.to(combine_dtype), handle)
    return combined


def fallback_worker(rank: int, world: int, *, how: str) -> None:
    """One node. ``how="auto"``: an FP32 combine on CUDA tensors warns once and matches the BF16-exact result;
    ``"strict"`` (``DEEPEP_PLUGIN_STRICT=1``) and ``"cuda"`` (``backend="cuda"``): it raises instead."""
    torch.cuda.set_device(rank % torch.cuda.device_count())
    dev = torch.device("cuda", torch.cuda.current_device())
    if how == "strict":
        os.environ["DEEPEP_PLUGIN_STRICT"] = "1"
    buf = dp.Buffer.sized_for(dist.group.WORLD, 256 * 2, backend="cuda" if how == "cuda" else None)
    assert buf.served_by("dispatch") == "intranode" and buf.served_by("combine", dtype=torch.bfloat16) == "intranode"
    x, idx, w = _routing(rank, world, 64, 256, 8 * world, 5, dev)
    bf16 = _step(buf, x, idx, w, 8 * world, torch.bfloat16)
    if how != "auto":
        try:
            _step(buf, x, idx, w, 8 * world, torch.float32)
        except DeepEPFallbackError as e:
            assert "float32 combine runs on the reference path" in str(e) and "cast x to BF16" in str(e), str(e)
        else:
            raise AssertionError(f"rank {rank}: an FP32 combine on CUDA tensors did not raise under {how}")
        return
    with warnings_logged() as messages:
        fp32 = [_step(buf, x, idx, w, 8 * world, torch.float32) for _ in range(2)]
    assert len(messages) == 1, messages
    assert "combine on CUDA tensors runs on the plain-PyTorch reference path" in messages[0], messages
    assert "float32 combine" in messages[0] and "cast x to BF16" in messages[0], messages
    for got in fp32:  # sums of BF16 rows in FP32 on both paths: the BF16-rounded FP32 sum is the kernel's result
        assert torch.equal(got.to(torch.bfloat16), bf16), f"rank {rank}: the reference combine differs"


def multinode_worker(rank: int, world: int, *, per_node: int) -> None:
    """Several emulated nodes: ``Buffer(group, nvl, 0)`` (what the adapters used to build) warns that it runs on
    the reference path; ``Buffer.sized_for`` gets RDMA bytes and its calls run on the internode kernels, with the
    same results."""
    from deepep_plugin.backends.cuda_internode import InternodeRuntime

    torch.cuda.set_device(rank % torch.cuda.device_count())
    dev = torch.device("cuda", torch.cuda.current_device())
    num_experts = 8 * world
    x, idx, w = _routing(rank, world, 48, 512, num_experts, 9, dev)
    sized = dp.Buffer.sized_for(dist.group.WORLD, 512 * 2, num_ranks_per_node=per_node)
    assert sized.num_nodes == world // per_node > 1 and sized.num_rdma_bytes > 0
    assert sized.served_by("dispatch") == "internode", sized.served_by("dispatch")
    with counting(InternodeRuntime, ("get_dispatch_layout", "dispatch", "combine")) as calls:
        want = _step(sized, x, idx, w, num_experts, torch.bfloat16)
    assert calls == ["get_dispatch_layout", "dispatch", "combine"], calls
    nvl_only = dp.Buffer(dist.group.WORLD, sized.num_nvl_bytes, 0, num_ranks_per_node=per_node)
    with warnings_logged() as messages:
        got = _step(nvl_only, x, idx, w, num_experts, torch.bfloat16)
    assert any("num_rdma_bytes=0" in m and "Buffer.sized_for" in m for m in messages), messages
    assert len(messages) == 1, messages  # one per Buffer and reason, not one per op
    assert torch.equal(got, want), f"rank {rank}: the reference path and the internode kernels differ"


def megatron_two_node_worker(rank: int, world: int, *, mode: str, seed: int, device: str = "cuda",
                             plugin_backend: str = "cuda") -> None:
    """A BF16 Megatron MoE layer over an EP group of two emulated nodes, built through the Megatron adapter
    (which sizes its Buffer with ``Buffer.sized_for``): on the GPU every dispatch and combine runs on the internode
    kernels (``plugin_backend="cuda"`` is strict, so no call may fall back); the result matches Megatron's alltoall."""
    import megatron_cuda_workers as mw
    import megatron_shims as shims

    from deepep_plugin.integrations import megatron as dpm

    os.environ["DEEPEP_PLUGIN_RANKS_PER_NODE"] = str(world // 2)
    dev = mw.setup_device(rank, device)
    os.environ["DEEPEP_PLUGIN_BACKEND"] = plugin_backend
    shims.init_megatron_parallel(world)
    case = mw.Case(mode=mode, dtype="bfloat16", hidden=128)
    ref = mw.build_layer(case, "alltoall", dev, seed=seed)
    g = torch.Generator().manual_seed(seed * 100 + rank)
    x = torch.randn(16 + 7 * rank, 3, case.hidden, generator=g).to(dev, case.torch_dtype)
    want = mw.step(ref, x, seed)
    runtime_cls: type
    if device == "cuda":
        from deepep_plugin.backends.cuda_internode import InternodeRuntime as runtime_cls
    else:
        from deepep_plugin.backends.reference import ReferenceBackend as runtime_cls
    built: List[dp.Buffer] = []
    original_sized_for = dp.Buffer.sized_for.__func__  # type: ignore[attr-defined]

    def sized_for(cls: type, *args: Any, **kwargs: Any) -> dp.Buffer:
        buf = original_sized_for(cls, *args, **kwargs)
        built.append(buf)
        return buf

    dp.Buffer.sized_for = classmethod(sized_for)  # type: ignore[method-assign]
    try:
        with counting(runtime_cls, ("dispatch", "combine")) as calls:
            dpm.enable(None, mode=mode)
            try:
                layer = mw.build_layer(case, "flex", dev, state_dict=ref.state_dict())
                got = mw.step(layer, x, seed)
            finally:
                dpm.disable()
    finally:
        dp.Buffer.sized_for = classmethod(original_sized_for)  # type: ignore[method-assign]
    if dev.type == "cuda":
        torch.cuda.synchronize()
    assert built, f"rank {rank}: the adapter built no Buffer through Buffer.sized_for"
    for buf in built:
        assert buf.num_nodes == 2 and buf.num_rdma_bytes > 0, (buf.num_nodes, buf.num_rdma_bytes)
        if device == "cuda":
            assert buf.served_by("dispatch") == "internode" and buf.runtime.internode is not None
    # forward dispatch + combine, backward combine (of dispatch) + cached dispatch (of combine)
    assert calls.count("dispatch") >= 2 and calls.count("combine") >= 2, (rank, calls)
    mw.assert_steps_match(got, want, rank, "bfloat16")


def residency_worker(rank: int, world: int, *, mps_percentage: str) -> None:
    """A config asking for more SMs than this process may use is refused up front on every rank (no hang, no
    timeout naming a peer): the GPU's own count, or MPS's CUDA_MPS_ACTIVE_THREAD_PERCENTAGE of it."""
    from deepep_plugin.errors import DeepEPInputError

    if mps_percentage:
        os.environ["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = mps_percentage
    torch.cuda.set_device(rank % torch.cuda.device_count())
    dev = torch.device("cuda", torch.cuda.current_device())
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    too_many = 24 if mps_percentage else (sms + 2) // 2 * 2 + 2
    buf = dp.Buffer.sized_for(dist.group.WORLD, 256 * 2, num_sms=too_many)
    x, idx, w = _routing(rank, world, 32, 256, 8 * world, 3, dev)
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, 8 * world)
    try:
        buf.dispatch(x, None, per_rank, per_rdma, in_rank, per_expert, idx, w, config=dp.Config(too_many))
    except DeepEPInputError as e:
        assert f"num_sms={too_many} needs all its blocks resident" in str(e), str(e)
        assert ("MPS" in str(e)) == bool(mps_percentage), str(e)
    else:
        raise AssertionError(f"rank {rank}: num_sms={too_many} was not refused")
    dp.Buffer.set_num_sms(12)  # within both limits
    _step(buf, x, idx, w, 8 * world, torch.bfloat16)  # a fitting config still runs: nothing was left half-done
