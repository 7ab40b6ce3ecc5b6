"""Buffer's input checks cost little when the inputs are right: a fresh dispatch given the tensors of the last
``get_dispatch_layout`` does not check them again, and a handle whose tensors passed a call of the same kind (also
rebuilt around them, as the autograd ops do) is not checked again; the errors still come when anything differs
(``test_errors.py``)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from dist_utils import run_distributed
from routing_cases import make_case

import deepep_plugin as dp
import deepep_plugin.buffer as dp_buffer


def _fast_paths(rank: int, world_size: int) -> None:
    me = make_case("random", 91, rank, world_size, hidden=256)
    size = dp.Buffer.get_dispatch_config(world_size).get_nvl_buffer_size_hint(512, world_size)
    buf = dp.Buffer(dist.group.WORLD, size, 0)
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(me.topk_idx, me.num_experts)

    checked: list[str] = []
    channel_reads: list[int] = []
    real_check, real_channels = dp_buffer._check_tensor, dp_buffer.handle_num_channels

    def check(t, name, **kwargs):
        checked.append(name)
        return real_check(t, name, **kwargs)

    def channels(handle):
        channel_reads.append(1)
        return real_channels(handle)

    dp_buffer._check_tensor, dp_buffer.handle_num_channels = check, channels
    try:
        _, _, _, _, handle, _ = buf.dispatch(me.x, None, per_rank, per_rdma, in_rank, per_expert, me.topk_idx,
                                             me.topk_weights)
        assert not {"num_tokens_per_rank", "is_token_in_rank", "num_tokens_per_expert"} & set(checked), checked
        buf.dispatch(me.x, handle=handle)
        first = len(channel_reads)
        assert first > 0, "the first cached dispatch must check its handle"
        buf.dispatch(me.x, handle=handle)
        buf.dispatch(me.x, handle=type(handle)(*handle))  # the same tensors in a new tuple
        assert len(channel_reads) == first, "a handle checked once was checked again"
        other = [t.clone() for t in handle]
        buf.dispatch(me.x, handle=type(handle)(*other))  # other tensors: checked
        assert len(channel_reads) > first, "a handle of other tensors skipped its checks"
        checked.clear()
        buf.dispatch(me.x, None, per_rank.clone(), per_rdma, in_rank, per_expert, me.topk_idx, me.topk_weights)
        assert "num_tokens_per_rank" in checked, "a tensor the layout did not make skipped its checks"
    finally:
        dp_buffer._check_tensor, dp_buffer.handle_num_channels = real_check, real_channels


def test_checks_made_once_are_not_made_again() -> None:
    run_distributed(_fast_paths, 2)


def test_no_tensor_is_kept_alive_by_the_checks() -> None:
    run_distributed(_lifetimes, 1)


def _lifetimes(rank: int, world_size: int) -> None:
    import gc
    import weakref

    me = make_case("random", 92, rank, world_size, hidden=256)
    size = dp.Buffer.get_dispatch_config(world_size).get_nvl_buffer_size_hint(512, world_size)
    buf = dp.Buffer(dist.group.WORLD, size, 0)
    layout = buf.get_dispatch_layout(me.topk_idx, me.num_experts)
    handle = buf.dispatch(me.x, None, layout[0], layout[1], layout[3], layout[2], me.topk_idx, me.topk_weights)[4]
    buf.dispatch(me.x, handle=handle)
    buf.combine(torch.zeros(handle.recv_src_idx.size(0), 256, dtype=torch.bfloat16), handle)
    refs = [weakref.ref(t) for t in (*layout[:4:2], layout[3], *handle)]
    del layout, handle
    gc.collect()
    assert all(r() is None for r in refs), "the Buffer keeps a layout or handle tensor alive"


def _ordered_runtime_calls(rank: int, world_size: int) -> None:
    """A runtime that orders its own streams (the intranode kernels) takes the inlined common call: the same
    arguments reach it and the same results come back as through ``_run``; a call with ``async_finish`` or a
    ``previous_event`` still goes through ``_run`` and gets its event."""
    from deepep_plugin.events import EventOverlap

    me = make_case("imbalanced", 92, rank, world_size, hidden=256)
    size = dp.Buffer.get_dispatch_config(world_size).get_nvl_buffer_size_hint(512, world_size)
    buf = dp.Buffer(dist.group.WORLD, size, 0)
    reference = buf.runtime.reference
    calls: list[str] = []
    real_run = buf._run

    class Ordered:  # the reference's results, announced as a stream-ordering runtime
        orders_streams = True

        def __getattr__(self, name: str):
            return getattr(reference, name)

        def dispatch(self, *args, **kwargs):
            calls.append("dispatch")
            return reference.dispatch(*args, **kwargs)

        def combine(self, *args, **kwargs):
            calls.append("combine")
            return reference.combine(*args, **kwargs)

    def run(*args, **kwargs):
        calls.append("_run")
        return real_run(*args, **kwargs)

    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(me.topk_idx, me.num_experts)
    want_x, want_idx, want_w, want_counts, handle, _ = buf.dispatch(
        me.x, None, per_rank, per_rdma, in_rank, per_expert, me.topk_idx, me.topk_weights)
    want_comb, want_cw, _ = buf.combine(want_x, handle, topk_weights=want_w)
    want_cached = buf.dispatch(me.x, handle=handle)[0]

    real_for, real_resident = buf.runtime.runtime_for, buf._check_resident
    buf.runtime.runtime_for = lambda op, cuda, dtype=None: Ordered()
    buf._check_resident, buf._run = (lambda *a: None), run
    try:
        got_x, got_idx, got_w, got_counts, got_handle, event = buf.dispatch(
            me.x, None, per_rank, per_rdma, in_rank, per_expert, me.topk_idx, me.topk_weights)
        assert isinstance(event, EventOverlap) and event.event is None
        assert torch.equal(got_x, want_x) and torch.equal(got_idx, want_idx) and torch.equal(got_w, want_w)
        assert got_counts == want_counts
        assert torch.equal(buf.dispatch(me.x, handle=got_handle)[0], want_cached)
        comb, cw, event = buf.combine(got_x, got_handle, topk_weights=got_w)
        assert event.event is None and torch.equal(comb, want_comb) and torch.equal(cw, want_cw)
        assert calls == ["dispatch", "dispatch", "combine"], calls
        calls.clear()
        _, _, event = buf.combine(got_x, got_handle, topk_weights=got_w, async_finish=True)
        assert event.event is not None
        _, _, _, _, _, event = buf.dispatch(me.x, handle=got_handle, async_finish=True)
        assert event.event is not None
        buf.dispatch(me.x, handle=got_handle, previous_event=event)
        buf.combine(got_x, got_handle, topk_weights=got_w, previous_event=event)
        assert calls == ["_run", "combine", "_run", "dispatch", "_run", "dispatch", "_run", "combine"], calls
    finally:
        buf.runtime.runtime_for, buf._check_resident, buf._run = real_for, real_resident, real_run


def test_a_stream_ordering_runtime_takes_the_inlined_call_with_the_same_results() -> None:
    run_distributed(_ordered_runtime_calls, 2)
