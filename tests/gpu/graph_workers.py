"""Per-process bodies of ``test_graphs_cuda.py``: CUDA graphs holding a Buffer's calls, replayed several times and
mixed with eager calls and with other graphs of the same Buffer. Processes may share one GPU.

Low-latency: the buffer half (parity) of each op is chosen on the host, alternating, and baked into a graph when it
is captured. A graph of dispatch + combine pairs stays correct however often it is replayed among eager pairs. A
graph holding an odd number of ops replayed twice in a row, or an even one replayed after a lone eager op, makes two
consecutive ops use one half: the kernels refuse that op and every later one on every rank (nothing waits, nothing
hangs), the next call raises ``DeepEPError`` saying what happened and what to do, and
``clean_low_latency_buffer()`` makes the Buffer usable again.

Normal (intranode): the ``num_worst_tokens`` path keeps its state on the GPU (notify sequence, ring counters), so a
graph of it, another graph of other calls of the same Buffer, and eager calls mix freely; every replay gives the bits
of the same calls made eagerly on the same inputs.
"""

from __future__ import annotations

import time

import stream_workers as sw
import torch
import torch.distributed as dist
from gpu_env import bits, layout_and_dispatch, take_device
from routing_cases import Case

import deepep_plugin as dp

#: A refused op waits for no peer: the call that replays it must end well within the 10 s wait timeout.
REFUSED_WITHIN_S = 5.0


def _static(cases: list[Case], dev: torch.device) -> Case:
    """The static inputs of a graph: as many rows as the largest of ``cases``; rows past a case route nowhere."""
    t, c = max(case.num_tokens for case in cases), cases[0]
    return Case(t, c.hidden, c.num_experts, c.num_topk, torch.zeros(t, c.hidden, dtype=torch.bfloat16, device=dev),
                torch.full((t, c.num_topk), -1, dtype=torch.int64, device=dev),
                torch.zeros(t, c.num_topk, dtype=torch.float32, device=dev))


def _load(static: Case, case: Case) -> None:
    """Copy ``case`` into the static inputs (padding rows: zeros, routed nowhere)."""
    n = case.num_tokens
    static.x.zero_()
    static.topk_idx.fill_(-1)
    static.topk_weights.zero_()
    static.x[:n] = case.x
    static.topk_idx[:n] = case.topk_idx
    static.topk_weights[:n] = case.topk_weights


# ---------------------------------------------------------------------------------------------------------------
# Low-latency
# ---------------------------------------------------------------------------------------------------------------
def low_latency_pairs_graph_worker(rank: int, world: int, *, seed: int) -> None:
    """A graph of one dispatch + combine pair, replayed on new inputs, each replay followed by an eager pair on the
    same inputs (and every other one by a second eager pair): every replay gives the eager bits."""
    dev = take_device(rank)
    cases = sw.ll_cases(seed, rank, world, dev)
    buf = sw.ll_buffer(world, cases[0].num_experts)
    static = _static(cases, dev)
    _load(static, cases[0])
    sw.ll_pair(buf, static)  # warm-up, eager
    torch.cuda.synchronize()
    dist.barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = sw.ll_pair(buf, static)
    for it in range(2 * len(cases)):
        _load(static, cases[it % len(cases)])
        graph.replay()
        want = sw.ll_pair(buf, static)
        if it % 2:
            sw.ll_pair(buf, static)
        torch.cuda.synchronize()
        buf.runtime.check_error()
        sw.same_ll(captured, want, f"rank {rank}, replay {it}")
    dist.barrier()
    buf.destroy()


def low_latency_odd_graph_worker(rank: int, world: int, *, seed: int, scenario: str) -> None:
    """``scenario``: "replayed_twice" (a graph of one dispatch, replayed twice in a row) or "after_lone_eager_op"
    (a graph of a dispatch + combine pair, replayed after one eager dispatch). The op that reuses the previous op's
    buffer half is refused on every rank without waiting, the next calls raise a clear error, and after
    clean_low_latency_buffer() the Buffer gives the right results again."""
    assert scenario in ("replayed_twice", "after_lone_eager_op"), scenario
    dev = take_device(rank)
    cases = sw.ll_cases(seed, rank, world, dev)
    num_experts = cases[0].num_experts
    buf = sw.ll_buffer(world, num_experts)
    static = _static(cases, dev)
    _load(static, cases[0])
    want = sw.ll_pair(buf, static)  # warm-up and the expected bits; the host toggle is back at parity 0
    torch.cuda.synchronize()
    dist.barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        if scenario == "replayed_twice":
            captured = sw.ll_dispatch(buf, static, hook=False)
        else:
            captured = sw.ll_pair(buf, static)[0]
    if scenario == "replayed_twice":
        graph.replay()  # parity 0 after the warm-up's combine (1): fine
        torch.cuda.synchronize()
        buf.runtime.check_error()
        sw.same_ll_dispatch(captured, want[0], f"rank {rank}, first replay")
    else:
        lone = sw.ll_dispatch(buf, static, hook=False)  # parity 0 after 1: fine; the host toggle moves to 1
        torch.cuda.synchronize()
        sw.same_ll_dispatch(lone, want[0], f"rank {rank}, lone eager dispatch")
    dist.barrier()

    start = time.perf_counter()
    graph.replay()  # its dispatch has parity 0, like the op before it: refused
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    assert elapsed < REFUSED_WITHIN_S, f"rank {rank}: the refused replay took {elapsed:.1f} s (it waited for a peer?)"
    counts = captured[1].tolist()
    assert counts == [0] * len(counts), f"rank {rank}: the refused dispatch must receive nothing, got {counts}"

    for attempt in ("first", "second"):
        try:
            sw.ll_dispatch(buf, static, hook=False)
        except dp.errors.DeepEPError as e:
            message = str(e)
            assert f"rank {rank}" in message and "clean_low_latency_buffer" in message, message
            if attempt == "first":
                assert "odd number of low-latency ops" in message and "CUDA graph" in message, message
        else:
            raise AssertionError(f"rank {rank}: the {attempt} call after a refused op did not raise")

    dist.barrier()
    buf.clean_low_latency_buffer(sw.N_LL, sw.HIDDEN, num_experts)
    torch.cuda.synchronize()
    dist.barrier()
    again = sw.ll_pair(buf, static)
    torch.cuda.synchronize()
    buf.runtime.check_error()
    sw.same_ll(again, want, f"rank {rank}, after clean_low_latency_buffer")
    dist.barrier()
    buf.destroy()


# ---------------------------------------------------------------------------------------------------------------
# Normal kernels (intranode): num_worst_tokens in one graph, cached dispatch + combine in another, eager calls
# ---------------------------------------------------------------------------------------------------------------
def worst_tokens_graphs_worker(rank: int, world: int, *, seed: int) -> None:
    """Graph 1: layout + num_worst_tokens dispatch + combine on static inputs. Graph 2: a cached dispatch (of an
    eager dispatch's handle) + combine. Replayed in turn with eager calls of all kinds in between (the same ops on
    the same inputs, and a fresh dispatch that reads its counts on the host): every replay gives the eager bits."""
    dev = take_device(rank)
    buf, cfg = sw.normal_buffer("intranode", world)
    cases, worst = sw.cases_on(seed, rank, world, dev)
    static = _static(cases, dev)
    base = cases[0]
    fresh = layout_and_dispatch(buf, base.x, base.topk_idx, base.topk_weights, base.num_experts, config=cfg)
    handle = fresh[4]
    x2 = torch.zeros_like(base.x)

    def worst_step() -> tuple:
        dispatched = sw.worst_dispatch(buf, static, worst, cfg)
        return dispatched, sw.combine_rows(buf, dispatched, cfg)

    def cached_step() -> tuple:
        recv = buf.dispatch(x2, handle=handle, config=cfg)[0]
        return recv, buf.combine(recv, handle, config=cfg)[0]

    _load(static, base)
    worst_step(), cached_step()  # warm-up, eager
    torch.cuda.synchronize()
    dist.barrier()
    graphs = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(graphs[0]):
        captured_worst = worst_step()
    with torch.cuda.graph(graphs[1]):
        captured_cached = cached_step()
    for it, case in enumerate(cases * 2):
        where = f"rank {rank}, round {it}"
        _load(static, case)
        x2.copy_(base.x * (it + 2))
        graphs[0].replay()
        want_worst = worst_step()
        graphs[1].replay()
        want_cached = cached_step()
        other = cases[(it + 1) % len(cases)]  # eager, with the host read of a dispatch without num_worst_tokens
        out = layout_and_dispatch(buf, other.x, other.topk_idx, other.topk_weights, other.num_experts, config=cfg)
        buf.combine(out[0], out[4], out[2], config=cfg)
        torch.cuda.synchronize()
        buf.runtime.check_error()
        sw.same_normal(captured_worst, want_worst, f"{where}, num_worst_tokens graph")
        assert torch.equal(bits(captured_cached[0]), bits(want_cached[0])), f"{where}: cached graph recv_x"
        assert torch.equal(bits(captured_cached[1]), bits(want_cached[1])), f"{where}: cached graph combine"
    dist.barrier()
    buf.destroy()
