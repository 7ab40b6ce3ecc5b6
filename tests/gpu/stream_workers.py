"""Per-process bodies of ``test_streams_cuda.py``: a Buffer's calls issued on different streams with no user
synchronisation between them, and two Buffers of one group used interleaved, on the intranode, internode (emulated
nodes) and low-latency kernels. Processes may share one GPU.

Each result must equal, bit for bit, the same calls made on one stream of one Buffer (the kernels are
deterministic). A sleep kernel holds back the first stream, so a call the library failed to order after the one
before it would start early and read counters that call has not written yet: wrong rows, or a timed-out wait.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
import torch.distributed as dist
from gpu_env import bits, layout_and_dispatch, take_device
from routing_cases import Case, make_case

import deepep_plugin as dp

MB = 1 << 20
_SLEEP_CYCLES = int(0.05 * 1.98e9)  # ~50 ms on an H200: far longer than any of these calls
_ITERS = 3
HIDDEN = 512
N_LL = 64  # make_case gives at most 39 tokens per rank


# ---------------------------------------------------------------------------------------------------------------
# Normal kernels (intranode, internode): layout + num_worst_tokens dispatch, then combine of the received rows.
# ---------------------------------------------------------------------------------------------------------------
def normal_buffer(kind: str, world: int) -> tuple[dp.Buffer, Optional[dp.Config]]:
    """A CUDA Buffer served by ``kind``'s kernels ("intranode", or "internode" with nodes of one rank)."""
    if kind == "intranode":
        size = max(dp.Buffer.get_dispatch_config(world).get_nvl_buffer_size_hint(HIDDEN * 2, world),
                   dp.Buffer.get_combine_config(world).get_nvl_buffer_size_hint(HIDDEN * 2, world))
        buf = dp.Buffer(dist.group.WORLD, size, 0, backend="cuda", explicitly_destroy=True)
        assert buf.runtime.intranode is not None, "the CUDA backend did not build the intranode runtime"
        return buf, None
    buf = dp.Buffer(dist.group.WORLD, 32 * MB, 32 * MB, backend="cuda", num_ranks_per_node=1,
                    explicitly_destroy=True)
    assert buf.runtime.internode is not None, "the CUDA backend did not build the internode runtime"
    return buf, dp.Config(8, 8, 256, 16, 128)


def on_device(case: Case, dev: torch.device) -> Case:
    """``case`` with its tensors on ``dev`` (copied before the timed streams start: a copy from pageable host memory
    would make the host wait for the sleep, and hide a missing order)."""
    return dataclasses.replace(case, x=case.x.to(dev), topk_idx=case.topk_idx.to(dev),
                               topk_weights=case.topk_weights.to(dev))


def cases_on(seed: int, rank: int, world: int, dev: torch.device) -> tuple[list[Case], int]:
    """``_ITERS`` routings of this rank (on ``dev``), and a ``num_worst_tokens`` that holds what any rank receives
    in any of them."""
    cases = [on_device(make_case("imbalanced", seed + i, rank, world, hidden=HIDDEN, num_topk=6), dev)
             for i in range(_ITERS)]
    worst = max(sum(make_case("imbalanced", seed + i, j, world, hidden=HIDDEN, num_topk=6).num_tokens
                    for j in range(world)) for i in range(_ITERS))
    return cases, worst


def worst_dispatch(buf: dp.Buffer, case: Case, worst: int, cfg: Optional[dp.Config]) -> tuple:
    """Layout and a num_worst_tokens dispatch (no host read): ``(recv_x, recv_topk_weights, handle)``."""
    recv_x, _, recv_w, _, handle, _ = layout_and_dispatch(buf, case.x, case.topk_idx, case.topk_weights,
                                                          case.num_experts, num_worst_tokens=worst, config=cfg)
    return recv_x, recv_w, handle


def combine_rows(buf: dp.Buffer, dispatched: tuple, cfg: Optional[dp.Config]) -> torch.Tensor:
    """Combine of the received rows themselves (as the expert outputs), weighted: ``combined_x``."""
    recv_x, recv_w, handle = dispatched
    return buf.combine(recv_x, handle, recv_w, config=cfg)[0]


def same_normal(got: tuple, want: tuple, where: str) -> None:
    """``((recv_x, recv_topk_weights, handle), combined_x)`` of two runs are bit-identical."""
    (g_x, g_w, _), g_c = got
    (w_x, w_w, _), w_c = want
    assert torch.equal(bits(g_x), bits(w_x)), f"{where}: recv_x differs from the same calls on one stream"
    assert torch.equal(bits(g_w), bits(w_w)), f"{where}: recv_topk_weights differ"
    assert torch.equal(bits(g_c), bits(w_c)), f"{where}: combined_x differs from the same calls on one stream"


def normal_streams_worker(rank: int, world: int, *, kind: str, seed: int) -> None:
    """Dispatch on stream A (behind a sleep), combine on stream B, several times: the same bits as on one stream.
    A is a side stream, or the default (legacy) stream every other time."""
    dev = take_device(rank)
    buf, cfg = normal_buffer(kind, world)
    cases, worst = cases_on(seed, rank, world, dev)
    want = []
    for case in cases:
        dispatched = worst_dispatch(buf, case, worst, cfg)
        want.append((dispatched, combine_rows(buf, dispatched, cfg)))
    torch.cuda.synchronize()
    dist.barrier()
    side, b = torch.cuda.Stream(), torch.cuda.Stream()
    got = []
    for i, case in enumerate(cases):
        a = side if i % 2 == 0 else torch.cuda.default_stream()
        with torch.cuda.stream(a):
            torch.cuda._sleep(_SLEEP_CYCLES)
            dispatched = worst_dispatch(buf, case, worst, cfg)
        with torch.cuda.stream(b):
            got.append((dispatched, combine_rows(buf, dispatched, cfg)))
    torch.cuda.synchronize()
    buf.runtime.check_error()
    for i, (g, w) in enumerate(zip(got, want)):
        same_normal(g, w, f"{kind} rank {rank}, iteration {i}")
    dist.barrier()
    buf.destroy()


def check_two_buffers(first: dp.Buffer, second: dp.Buffer, got: tuple, want: list,
                      same: Callable[[tuple, tuple, str], None], where: str) -> None:
    """After interleaved ops on two Buffers: no kernel error on either, and each Buffer's results `got[i]` equal what
    it gave alone (`want[i]`), compared with `same`."""
    torch.cuda.synchronize()
    first.runtime.check_error()
    second.runtime.check_error()
    same(got[0], want[0], f"{where}, first Buffer")
    same(got[1], want[1], f"{where}, second Buffer")


def destroy_two_buffers(first: dp.Buffer, second: dp.Buffer) -> None:
    """Every rank done with both Buffers, then both freed (the second first)."""
    dist.barrier()
    second.destroy()
    first.destroy()


def normal_two_buffers_worker(rank: int, world: int, *, kind: str, seed: int) -> None:
    """Two Buffers of one group, their dispatches and combines interleaved: each gives what one Buffer gives alone."""
    dev = take_device(rank)
    first, cfg = normal_buffer(kind, world)
    second, _ = normal_buffer(kind, world)
    cases, worst = cases_on(seed, rank, world, dev)
    want = []
    for case in cases[:2]:
        dispatched = worst_dispatch(first, case, worst, cfg)
        want.append((dispatched, combine_rows(first, dispatched, cfg)))
    for it in range(2):
        d1 = worst_dispatch(first, cases[0], worst, cfg)
        d2 = worst_dispatch(second, cases[1], worst, cfg)
        c2 = combine_rows(second, d2, cfg)
        c1 = combine_rows(first, d1, cfg)
        check_two_buffers(first, second, ((d1, c1), (d2, c2)), want, same_normal, f"{kind} rank {rank}, round {it}")
    destroy_two_buffers(first, second)


# ---------------------------------------------------------------------------------------------------------------
# Low-latency kernels: dispatch (BF16) and combine of the received rows, with and without receive hooks.
# ---------------------------------------------------------------------------------------------------------------
def ll_buffer(world: int, num_experts: int) -> dp.Buffer:
    """A low-latency CUDA Buffer sized for ``N_LL`` tokens of ``HIDDEN`` and ``num_experts``."""
    size = dp.Buffer.get_low_latency_rdma_size_hint(N_LL, HIDDEN, world, num_experts)
    buf = dp.Buffer(dist.group.WORLD, 0, size, low_latency_mode=True, num_qps_per_rank=num_experts // world,
                    backend="cuda", explicitly_destroy=True)
    assert buf.runtime.low_latency is not None, "the CUDA backend did not build the low-latency runtime"
    return buf


def ll_cases(seed: int, rank: int, world: int, dev: torch.device) -> list[Case]:
    """``_ITERS`` routings of this rank (top-4 of 4 experts per rank), on ``dev``."""
    return [on_device(make_case("random", seed + i, rank, world, hidden=HIDDEN, num_topk=4), dev)
            for i in range(_ITERS)]


def ll_dispatch(buf: dp.Buffer, case: Case, hook: bool) -> tuple:
    """``(recv_x, recv_count, handle, hook or None)`` of a BF16 low-latency dispatch."""
    recv, count, handle, _, recv_hook = buf.low_latency_dispatch(case.x, case.topk_idx, N_LL, case.num_experts,
                                                                 use_fp8=False, return_recv_hook=hook)
    return recv, count, handle, recv_hook


def ll_combine(buf: dp.Buffer, case: Case, dispatched: tuple, hook: bool) -> tuple:
    """``(combined_x, hook or None)``: the received rows sent back as the expert outputs."""
    recv, _, handle, _ = dispatched
    combined, _, recv_hook = buf.low_latency_combine(recv, case.topk_idx, case.topk_weights, handle,
                                                     return_recv_hook=hook)
    return combined, recv_hook


def ll_pair(buf: dp.Buffer, case: Case) -> tuple:
    """A dispatch and its combine without hooks: ``((recv_x, recv_count, handle, None), combined_x)``."""
    dispatched = ll_dispatch(buf, case, hook=False)
    return dispatched, ll_combine(buf, case, dispatched, hook=False)[0]


def same_ll(got: tuple, want: tuple, where: str) -> None:
    """Two ``ll_pair`` results agree: valid rows, counts, handle (rows past recv_count are unspecified) and the
    combined output, bit for bit."""
    same_ll_dispatch(got[0], want[0], where)
    assert torch.equal(bits(got[1]), bits(want[1])), f"{where}: combined_x differs from the same calls on one stream"


def same_ll_dispatch(got: tuple, want: tuple, where: str) -> None:
    """Two ``ll_dispatch`` results agree: valid rows, counts and handle, bit for bit."""
    g_recv, g_count, g_handle, _ = got
    w_recv, w_count, w_handle, _ = want
    counts = w_count.tolist()
    assert g_count.tolist() == counts, f"{where}: recv_count {g_count.tolist()} != {counts}"
    assert torch.equal(g_handle[1].cpu(), w_handle[1].cpu()), f"{where}: layout_range differs"
    for i, c in enumerate(counts):
        assert torch.equal(bits(g_recv[i, :c]), bits(w_recv[i, :c])), f"{where}: rows of local expert {i} differ"
        assert torch.equal(g_handle[0][i, :c].cpu(), w_handle[0][i, :c].cpu()), f"{where}: src_info of expert {i}"


def low_latency_streams_worker(rank: int, world: int, *, seed: int) -> None:
    """Dispatch on stream A (behind a sleep) and combine on stream B; then with hooks: dispatch on A, its hook on B,
    combine on C, its hook on A. The same bits as the calls on one stream, every iteration."""
    dev = take_device(rank)
    cases = ll_cases(seed, rank, world, dev)
    buf = ll_buffer(world, cases[0].num_experts)
    want = [ll_pair(buf, case) for case in cases]
    torch.cuda.synchronize()
    dist.barrier()
    a, b, c = torch.cuda.Stream(), torch.cuda.Stream(), torch.cuda.Stream()
    for hooks in (False, True):
        got = []
        for case in cases:
            with torch.cuda.stream(a):
                torch.cuda._sleep(_SLEEP_CYCLES)
                dispatched = ll_dispatch(buf, case, hook=hooks)
            if not hooks:
                with torch.cuda.stream(b):
                    combined, _ = ll_combine(buf, case, dispatched, hook=False)
            else:
                with torch.cuda.stream(b):
                    dispatched[3]()
                with torch.cuda.stream(c):
                    combined, combine_hook = ll_combine(buf, case, dispatched, hook=True)
                with torch.cuda.stream(a):
                    combine_hook()
            got.append((dispatched, combined))
        torch.cuda.synchronize()
        buf.runtime.check_error()
        for i, (g, w) in enumerate(zip(got, want)):
            same_ll(g, w, f"rank {rank}, {'hooks' if hooks else 'no hooks'}, iteration {i}")
        dist.barrier()
    buf.destroy()


def low_latency_two_buffers_worker(rank: int, world: int, *, seed: int) -> None:
    """Two low-latency Buffers of one group (two NVSHMEM symmetric buffers in one NVSHMEM world), their ops and
    hooks interleaved: each gives what one Buffer gives alone."""
    dev = take_device(rank)
    cases = ll_cases(seed, rank, world, dev)
    first = ll_buffer(world, cases[0].num_experts)
    second = ll_buffer(world, cases[0].num_experts)
    want = [ll_pair(first, case) for case in cases[:2]]
    for it in range(3):  # odd and even parities of each Buffer
        d1 = ll_dispatch(first, cases[0], hook=True)
        d2 = ll_dispatch(second, cases[1], hook=True)
        d2[3]()
        d1[3]()
        c2, h2 = ll_combine(second, cases[1], d2, hook=True)
        c1, _ = ll_combine(first, cases[0], d1, hook=False)
        h2()
        check_two_buffers(first, second, ((d1, c1), (d2, c2)), want, same_ll, f"rank {rank}, round {it}")
    destroy_two_buffers(first, second)
