"""Per-process bodies of the host-sync GPU tests (``test_host_syncs.py``): what each call of the public ``Buffer``
reads from the GPU, on the CUDA backend's intranode kernels. Processes may share one GPU.

Two probes, both library-independent of how a read is made:
* ``torch.cuda.set_sync_debug_mode("error")`` makes any synchronising PyTorch op (``.item()``, ``.cpu()``, a
  data-dependent shape) raise;
* a call issued behind a 200 ms sleep kernel must return while the sleep still runs (``event.query()`` is false),
  unless it is the one call that may wait: a fresh dispatch without ``num_worst_tokens`` (the receive counts).
  That one is also counted by the runtime (``host_waits``): exactly one wait per such dispatch.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from gpu_env import bits, take_device
from routing_cases import make_case

import deepep_plugin as dp
from deepep_plugin.fp8 import per_token_cast_to_fp8

_SLEEP_CYCLES = int(0.2 * 1.98e9)  # ~200 ms on an H200; long enough that a host wait cannot go unnoticed


def waits_for_gpu(fn: Callable[[], Any], sleep_cycles: int = _SLEEP_CYCLES) -> bool:
    """Whether ``fn()`` waited for GPU work queued before it (a sleep kernel of ``sleep_cycles`` on the current
    stream; make it outlast ``fn``'s own host time)."""
    torch.cuda.synchronize()
    dist.barrier()
    torch.cuda._sleep(sleep_cycles)
    done = torch.cuda.Event()
    done.record()
    fn()
    blocked = done.query()
    torch.cuda.synchronize()
    return blocked


def _buffer(world_size: int, hidden: int) -> dp.Buffer:
    size = max(dp.Buffer.get_dispatch_config(world_size).get_nvl_buffer_size_hint(hidden * 2, world_size),
               dp.Buffer.get_combine_config(world_size).get_nvl_buffer_size_hint(hidden * 2, world_size))
    buf = dp.Buffer(dist.group.WORLD, size, 0, backend="cuda")
    assert buf.runtime.intranode is not None, "the CUDA backend did not build the intranode runtime"
    return buf


def host_sync_worker(rank: int, world_size: int, *, seed: int) -> None:
    dev = take_device(rank)
    case = make_case("imbalanced", seed, rank, world_size, hidden=256, num_topk=6)
    buf = _buffer(world_size, case.hidden)
    kernels = buf.runtime.intranode
    x, idx, w, E = case.x.to(dev), case.topk_idx.to(dev), case.topk_weights.to(dev), case.num_experts
    fp8 = per_token_cast_to_fp8(x)
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    recv_x, _, recv_w, _, handle, _ = buf.dispatch(x, None, per_rank, per_rdma, in_rank, per_expert, idx, w)
    worst = 2 * world_size * max(case.num_tokens, 1) + 8
    no_wait: dict[str, Callable[[], Any]] = {
        "layout": lambda: buf.get_dispatch_layout(idx, E),
        "cached dispatch": lambda: buf.dispatch(x, handle),
        "cached FP8 dispatch": lambda: buf.dispatch(fp8, handle),
        "combine": lambda: buf.combine(recv_x, handle, recv_w),
        "fresh dispatch, num_worst_tokens": lambda: buf.dispatch(x, None, per_rank, per_rdma, in_rank, per_expert,
                                                                 idx, w, num_worst_tokens=worst),
        "cached dispatch, num_worst_tokens": lambda: buf.dispatch(x, handle, num_worst_tokens=worst),
    }
    for name, fn in no_wait.items():
        waits = kernels.host_waits()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert kernels.host_waits() == waits, f"rank {rank}: {name} waited on the host for the GPU"
        assert not waits_for_gpu(fn), f"rank {rank}: {name} returned only after earlier GPU work finished (a host read)"

    def fresh() -> Any:
        return buf.dispatch(x, None, per_rank, per_rdma, in_rank, per_expert, idx, w)

    waits = kernels.host_waits()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fresh()  # the count read is a poll of mapped memory, not a PyTorch sync: no error
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert kernels.host_waits() == waits + 1, f"rank {rank}: a fresh dispatch should read the GPU exactly once"
    assert waits_for_gpu(fresh), f"rank {rank}: a fresh dispatch returned before its receive counts existed"


def bad_expert_id_worker(rank: int, world_size: int, *, seed: int) -> None:
    """An id outside [-1, E) on one rank: that rank's fresh dispatch raises (naming the entry); the peers' complete,
    and the buffer serves the next correct calls on every rank."""
    dev = take_device(rank)
    case = make_case("random", seed, rank, world_size, hidden=256, num_topk=4)
    buf = _buffer(world_size, case.hidden)
    x, idx, w, E = case.x.to(dev), case.topk_idx.to(dev), case.topk_weights.to(dev), case.num_experts
    bad = idx.clone()
    if rank == 0 and bad.numel():
        bad[bad.size(0) // 2, 1] = E + 3
    lay = buf.get_dispatch_layout(bad, E)
    call = lambda: buf.dispatch(x, None, lay[0], lay[1], lay[3], lay[2], bad, w)  # noqa: E731
    if rank == 0 and bad.numel():
        t = bad.size(0) // 2
        try:
            call()
        except dp.DeepEPInputError as e:
            assert f"topk_idx[{t}, 1] = {E + 3}" in str(e) and f"num_experts={E}" in str(e), str(e)
        else:
            raise AssertionError("a bad expert id went unreported")
    else:
        call()
    torch.cuda.synchronize()
    dist.barrier()
    # Good calls afterwards work everywhere and match the reference.
    ref = dp.Buffer(dist.group.WORLD, buf.num_nvl_bytes, 0, backend="reference")
    got = buf.dispatch(x, None, *_order(buf.get_dispatch_layout(idx, E)), idx, w)
    want = ref.dispatch(case.x, None, *_order(ref.get_dispatch_layout(case.topk_idx, E)), case.topk_idx,
                        case.topk_weights)
    assert torch.equal(bits(got[0]), bits(want[0])) and torch.equal(got[1].cpu(), want[1])
    combined = buf.combine(got[0], got[4])[0]
    expected = ref.combine(want[0], want[4])[0]
    assert torch.equal(bits(combined), bits(expected))


def _order(layout: tuple) -> tuple:
    """get_dispatch_layout's order -> dispatch's positional order (per_rank, per_rdma, in_rank, per_expert)."""
    return layout[0], layout[1], layout[3], layout[2]


def stream_order_worker(rank: int, world_size: int, *, seed: int) -> None:
    """Calls on different streams, with no user sync between them, are ordered by the library: cached dispatches
    on two streams (the first held back by a sleep), then a combine on a third, all equal to the same calls made
    on one stream."""
    dev = take_device(rank)
    case = make_case("imbalanced", seed, rank, world_size, hidden=512, num_topk=6)
    buf = _buffer(world_size, case.hidden)
    x, idx, w, E = case.x.to(dev), case.topk_idx.to(dev), case.topk_weights.to(dev), case.num_experts
    recv, _, _, _, handle, _ = buf.dispatch(x, None, *_order(buf.get_dispatch_layout(idx, E)), idx, w)
    want_a = buf.dispatch(x, handle)[0]
    want_b = buf.dispatch(x * 2, handle)[0]
    want_c = buf.combine(recv, handle)[0]
    torch.cuda.synchronize()
    dist.barrier()
    s1, s2, s3 = torch.cuda.Stream(), torch.cuda.Stream(), torch.cuda.Stream()
    x2 = x * 2
    torch.cuda.synchronize()
    with torch.cuda.stream(s1):
        torch.cuda._sleep(_SLEEP_CYCLES // 4)
        got_a = buf.dispatch(x, handle)[0]
    with torch.cuda.stream(s2):
        got_b = buf.dispatch(x2, handle)[0]
    with torch.cuda.stream(s3):
        got_c = buf.combine(recv, handle)[0]
    torch.cuda.synchronize()
    for name, got, want in (("first dispatch", got_a, want_a), ("second dispatch", got_b, want_b),
                            ("combine", got_c, want_c)):
        assert torch.equal(bits(got), bits(want)), f"rank {rank}: the {name} on its own stream differs"
