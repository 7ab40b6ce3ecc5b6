"""Per-rank bodies of the low-latency GPU tests (run by every worker of ``ll_pool``).

Each ``case_*(rank, world_size, *, seed, ...)`` (keyword arguments after the first two) checks one behaviour
against the plain-PyTorch expectation of ``ll_expected`` and raises ``AssertionError`` with a precise message on
any difference. Runtimes: one shared runtime per worker for most cases (creating NVSHMEM buffers is collective and
slow), fresh ones where the case is about creation, teardown, timeouts or the NVSHMEM-put path.
"""

from __future__ import annotations

import os
import time
from typing import Optional

import ll_expected as ex
import torch
import torch.distributed as dist

from deepep_plugin.backends.cuda_low_latency import FORCE_PUTS_ENV, LowLatencyRuntime, required_rdma_bytes
from deepep_plugin.errors import DeepEPTimeoutError

#: Largest configuration the shared runtime serves (N_ll, hidden, experts per rank).
SHARED = (128, 7168, 16)
_shared: Optional[LowLatencyRuntime] = None


def _make_runtime(rank: int, world: int, nbytes: int, timeout_s: float = 20.0) -> LowLatencyRuntime:
    return LowLatencyRuntime(dist.group.WORLD, rank, world, nbytes, torch.device("cuda", torch.cuda.current_device()),
                             timeout_s, 24, True)


def runtime(rank: int, world: int) -> LowLatencyRuntime:
    global _shared
    if _shared is None:
        n, h, e_loc = SHARED
        _shared = _make_runtime(rank, world, required_rdma_bytes(n, h, world, e_loc * world))
    return _shared


def shutdown(rank: int, world: int) -> None:
    global _shared
    if _shared is not None:
        _shared.destroy()
        _shared = None


def num_tokens_of(rank: int, world: int, n_ll: int, pattern: str) -> int:
    """Imbalanced token counts; the last rank of a 3+ group (or of any group with ``zero_last``) has none."""
    if rank == world - 1 and (world >= 3 or pattern == "zero_last"):
        return 0
    return max(1, n_ll - 5 * rank)


def all_inputs(seed: int, world: int, n_ll: int, hidden: int, num_experts: int, topk: int, pattern: str) -> list:
    gen_pattern = "random" if pattern == "zero_last" else pattern
    return [ex.make_inputs(seed, j, world, num_tokens_of(j, world, n_ll, pattern), hidden, num_experts, topk,
                           gen_pattern) for j in range(world)]


def _dispatch(rt: LowLatencyRuntime, inp: ex.RankInputs, n_ll: int, num_experts: int, use_fp8: bool = False,
              round_scale: bool = False, use_ue8m0: bool = False, hook: bool = False, stats=None, wait_stats=None):
    x, idx = inp.x.cuda(), inp.topk_idx.cuda()
    res = rt.low_latency_dispatch(x, idx, n_ll, num_experts, cumulative_local_expert_recv_stats=stats,
                                  dispatch_wait_recv_cost_stats=wait_stats, use_fp8=use_fp8, round_scale=round_scale,
                                  use_ue8m0=use_ue8m0, return_recv_hook=hook)
    if hook:
        assert res.hook is not None, "return_recv_hook=True must return a hook"
        res.hook()
    else:
        assert res.hook is None, "return_recv_hook=False must return no hook"
    return res


def check_dispatch(rank: int, res, inputs: list, num_experts: int, use_fp8: bool, round_scale: bool,
                   use_ue8m0: bool) -> ex.ExpectedDispatch:
    torch.cuda.synchronize()
    want = ex.expected_layout(rank, inputs, num_experts)
    got_count = res.recv_count.cpu()
    assert torch.equal(got_count, want.recv_count), f"recv_count {got_count.tolist()} != {want.recv_count.tolist()}"
    got_range = res.handle.layout_range.cpu()
    assert torch.equal(got_range, want.layout_range), \
        f"layout_range {got_range.tolist()} != {want.layout_range.tolist()}"
    src_info = res.handle.src_info.cpu()
    recv_x = res.recv_x.cpu()
    scales = res.recv_x_scales.cpu() if res.recv_x_scales is not None else None
    for i, rows in enumerate(want.rows):
        n = len(rows)
        assert src_info[i, :n].tolist() == [t for _, t in rows], f"src_info of local expert {i}"
        data, sc = ex.expected_payload(inputs, rows, use_fp8, round_scale, use_ue8m0)
        if use_fp8:
            got = recv_x[i, :n].view(torch.uint8)
            bad = (got != data.view(torch.uint8)).sum().item()
            assert bad == 0, f"local expert {i}: {bad} FP8 bytes differ from deepep_plugin.fp8.per_token_cast_to_fp8"
            assert scales is not None and torch.equal(scales[i, :n], sc), f"local expert {i}: FP8 scales differ"
        else:
            same = torch.equal(recv_x[i, :n].view(torch.int16), data.view(torch.int16))
            assert same, f"local expert {i}: rows differ"
    return want


# ---------------------------------------------------------------------------------------------------------
def case_dispatch(rank: int, world: int, *, seed: int, n_ll: int, hidden: int, e_loc: int, topk: int,
                  use_fp8: bool = False, round_scale: bool = False, use_ue8m0: bool = False, pattern: str = "random",
                  hook: bool = False) -> None:
    num_experts = e_loc * world
    inputs = all_inputs(seed, world, n_ll, hidden, num_experts, topk, pattern)
    rt = runtime(rank, world)
    res = _dispatch(rt, inputs[rank], n_ll, num_experts, use_fp8, round_scale, use_ue8m0, hook)
    rn = world * n_ll
    assert tuple(res.recv_x.shape) == (e_loc, rn, hidden)
    assert res.recv_x.dtype == (torch.float8_e4m3fn if use_fp8 else torch.bfloat16)
    if use_fp8:
        s = (hidden // 128 + 3) // 4 if use_ue8m0 else hidden // 128
        assert tuple(res.recv_x_scales.shape) == (e_loc, rn, s)
        assert res.recv_x_scales.stride() == (s * rn, 1, rn), "scales must be the transposed view of [E_loc, S, R*N]"
    check_dispatch(rank, res, inputs, num_experts, use_fp8, round_scale, use_ue8m0)


def _expert_outputs(rank: int, want: ex.ExpectedDispatch, inputs: list, e_loc: int, n_ll: int, world: int,
                    hidden: int, out: torch.Tensor) -> None:
    """Fill ``out [E_loc, R*N, H]`` (any strides) with the stand-in expert's outputs, NaN in unused rows."""
    out.fill_(float("nan"))
    for i, rows in enumerate(want.rows):
        if rows:
            x_rows = torch.stack([inputs[j].x[t] for j, t in rows])
            e = torch.full((len(rows),), rank * e_loc + i, dtype=torch.int64)
            out[i, :len(rows)] = ex.expert_output(x_rows, e).cuda()


def case_combine(rank: int, world: int, *, seed: int, n_ll: int, hidden: int, e_loc: int, topk: int,
                 pattern: str = "random", zero_copy: bool = False, use_out: bool = False, hook: bool = False) -> None:
    num_experts = e_loc * world
    inputs = all_inputs(seed, world, n_ll, hidden, num_experts, topk, pattern)
    rt = runtime(rank, world)
    res = _dispatch(rt, inputs[rank], n_ll, num_experts)
    want = check_dispatch(rank, res, inputs, num_experts, False, False, False)
    y = torch.empty(e_loc, world * n_ll, hidden, dtype=torch.bfloat16, device="cuda")
    if zero_copy:
        buf = rt.get_next_low_latency_combine_buffer(res.handle)
        m = hidden + hidden // 64
        assert buf.stride() == (world * n_ll * m, m, 1), f"zero-copy buffer strides {buf.stride()}"
        _expert_outputs(rank, want, inputs, e_loc, n_ll, world, hidden, buf)
    _expert_outputs(rank, want, inputs, e_loc, n_ll, world, hidden, y)
    if zero_copy:
        y.fill_(float("nan"))  # the kernel must read the zero-copy buffer, not x
    inp = inputs[rank]
    out = torch.full((inp.x.size(0), hidden), float("nan"), dtype=torch.bfloat16, device="cuda") if use_out else None
    combined, h = rt.low_latency_combine(y, inp.topk_idx.cuda(), inp.topk_weights.cuda(), res.handle,
                                         zero_copy=zero_copy, return_recv_hook=hook, out=out,
                                         combine_wait_recv_cost_stats=None)
    if hook:
        assert h is not None
        h()
    if use_out:
        assert combined.data_ptr() == out.data_ptr(), "combine must write and return out="
    expected = ex.expected_combine(inp)
    got = combined.cpu()
    diff = (got.view(torch.int16) != expected.view(torch.int16)).sum().item()
    assert diff == 0, f"combine: {diff} of {got.numel()} BF16 values differ (max |err| " \
                      f"{(got.float() - expected.float()).abs().max().item():.3g})"


def case_stats(rank: int, world: int, *, seed: int) -> None:
    n_ll, hidden, e_loc, topk = 32, 1024, 4, 4
    num_experts = e_loc * world
    rt = runtime(rank, world)
    stats = torch.full((e_loc,), 5, dtype=torch.int32, device="cuda")
    wait = torch.zeros(world, dtype=torch.int64, device="cuda")
    total = torch.full((e_loc,), 5, dtype=torch.int32)
    for call in range(2):
        inputs = all_inputs(seed + call, world, n_ll, hidden, num_experts, topk, "random")
        res = _dispatch(rt, inputs[rank], n_ll, num_experts, stats=stats, wait_stats=wait)
        total += ex.expected_layout(rank, inputs, num_experts).recv_count
        torch.cuda.synchronize()
        assert torch.equal(stats.cpu(), total), f"call {call}: cumulative stats {stats.tolist()} != {total.tolist()}"
        del res
    assert (wait.cpu() > 0).all(), f"dispatch_wait_recv_cost_stats must grow for every source, got {wait.tolist()}"


def case_hook_send_does_not_wait(rank: int, world: int, *, seed: int) -> None:
    """Rank 0's send kernel completes while the other ranks have not even launched theirs: nothing waits for a
    peer between send and hook, so the caller's compute owns every SM in between."""
    n_ll, hidden, e_loc, topk = 16, 2048, 4, 4
    num_experts = e_loc * world
    inputs = all_inputs(seed, world, n_ll, hidden, num_experts, topk, "random")
    rt = runtime(rank, world)
    if rank == 0:
        res = rt.low_latency_dispatch(inputs[0].x.cuda(), inputs[0].topk_idx.cuda(), n_ll, num_experts,
                                      cumulative_local_expert_recv_stats=None, dispatch_wait_recv_cost_stats=None,
                                      use_fp8=True, round_scale=False, use_ue8m0=False, return_recv_hook=True)
        torch.cuda.synchronize()  # would time out if the send kernel waited for the peers
        rt.check_error()
        dist.barrier()  # only now may the others send
    else:
        dist.barrier()
        res = rt.low_latency_dispatch(inputs[rank].x.cuda(), inputs[rank].topk_idx.cuda(), n_ll, num_experts,
                                      cumulative_local_expert_recv_stats=None, dispatch_wait_recv_cost_stats=None,
                                      use_fp8=True, round_scale=False, use_ue8m0=False, return_recv_hook=True)
    res.hook()
    check_dispatch(rank, res, inputs, num_experts, True, False, False)
    rt.check_error()


def case_hook_overlap_timing(rank: int, world: int, *, seed: int) -> None:
    """Compute placed between send and hook costs no extra wall time: send + compute + hook takes about as long
    as the compute alone plus the two short launches, not compute plus a full dispatch."""
    n_ll, hidden, e_loc, topk = 128, 7168, 16, 8
    num_experts = e_loc * world
    inputs = all_inputs(seed, world, n_ll, hidden, num_experts, topk, "random")
    rt = runtime(rank, world)
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    x, idx = inputs[rank].x.cuda(), inputs[rank].topk_idx.cuda()

    def compute() -> None:
        for _ in range(8):
            torch.matmul(a, a)

    def timed(fn) -> float:
        dist.barrier()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def dispatch_then_compute() -> None:
        _dispatch(rt, inputs[rank], n_ll, num_experts, use_fp8=True)
        compute()

    def overlapped() -> None:
        res = rt.low_latency_dispatch(x, idx, n_ll, num_experts, cumulative_local_expert_recv_stats=None,
                                      dispatch_wait_recv_cost_stats=None, use_fp8=True, round_scale=False,
                                      use_ue8m0=False, return_recv_hook=True)
        compute()
        res.hook()

    for _ in range(3):
        timed(compute), timed(dispatch_then_compute), timed(overlapped)
    t_compute = min(timed(compute) for _ in range(5))
    t_serial = min(timed(dispatch_then_compute) for _ in range(5))
    t_overlap = min(timed(overlapped) for _ in range(5))
    assert t_overlap < t_serial, f"overlap {t_overlap * 1e6:.0f} us not below serial {t_serial * 1e6:.0f} us"
    print(f"rank {rank}: compute {t_compute * 1e6:.0f} us, dispatch+compute {t_serial * 1e6:.0f} us, "
          f"send+compute+hook {t_overlap * 1e6:.0f} us", flush=True)


def case_cuda_graph(rank: int, world: int, *, seed: int) -> None:
    """Dispatch and combine captured in one CUDA graph; replays see fresh inputs copied into the static ones."""
    n_ll, hidden, e_loc, topk = 32, 2048, 4, 6
    num_experts = e_loc * world
    rt = runtime(rank, world)
    t_me = num_tokens_of(rank, world, n_ll, "random")
    static_x = torch.zeros(t_me, hidden, dtype=torch.bfloat16, device="cuda")
    static_idx = torch.full((t_me, topk), -1, dtype=torch.int64, device="cuda")
    static_w = torch.zeros(t_me, topk, dtype=torch.float32, device="cuda")
    scale = torch.ones(1, device="cuda")

    def step():
        res = rt.low_latency_dispatch(static_x, static_idx, n_ll, num_experts, cumulative_local_expert_recv_stats=None,
                                      dispatch_wait_recv_cost_stats=None, use_fp8=False, round_scale=False,
                                      use_ue8m0=False, return_recv_hook=False)
        y = (res.recv_x.float() * scale).to(torch.bfloat16)  # an "expert" inside the graph: identity
        out, _ = rt.low_latency_combine(y, static_idx, static_w, res.handle, zero_copy=False, return_recv_hook=False,
                                        out=None, combine_wait_recv_cost_stats=None)
        return res, out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    dist.barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        res, out = step()
    torch.cuda.synchronize()
    dist.barrier()
    for replay in range(3):
        inputs = all_inputs(seed + replay, world, n_ll, hidden, num_experts, topk, "random")
        inp = inputs[rank]
        static_x.copy_(inp.x)
        static_idx.copy_(inp.topk_idx)
        static_w.copy_(inp.topk_weights)
        graph.replay()
        check_dispatch(rank, res, inputs, num_experts, False, False, False)
        acc = torch.zeros(t_me, hidden)
        for k in range(topk):
            valid = inp.topk_idx[:, k] >= 0
            contrib = inp.x.float() * inp.topk_weights[:, k:k + 1]
            acc = acc + torch.where(valid[:, None], contrib, torch.zeros_like(contrib))
        got = out.cpu()
        assert torch.equal(got.view(torch.int16), acc.to(torch.bfloat16).view(torch.int16)), \
            f"replay {replay}: combined output differs"
        dist.barrier()
    rt.check_error()


def case_timeout(rank: int, world: int, *, seed: int) -> None:
    """A peer that never calls dispatch: rank 0's receive gives up after timeout_s, the error names both ranks,
    and after clean_low_latency_buffer the buffer works again."""
    n_ll, hidden, e_loc, topk = 16, 1024, 2, 2
    num_experts = e_loc * world
    rt = _make_runtime(rank, world, required_rdma_bytes(n_ll, hidden, world, num_experts), timeout_s=1.0)
    try:
        inputs = all_inputs(seed, world, n_ll, hidden, num_experts, topk, "random")
        if rank == 0:
            t0 = time.perf_counter()
            rt.low_latency_dispatch(inputs[0].x.cuda(), inputs[0].topk_idx.cuda(), n_ll, num_experts,
                                    cumulative_local_expert_recv_stats=None, dispatch_wait_recv_cost_stats=None,
                                    use_fp8=False, round_scale=False, use_ue8m0=False, return_recv_hook=False)
            torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
            assert elapsed < 30, f"the timed-out dispatch took {elapsed:.1f} s"
            try:
                rt.check_error()
            except DeepEPTimeoutError as e:
                msg = str(e)
                assert "rank 0" in msg and "for rank" in msg and "dispatch receive" in msg, msg
            else:
                raise AssertionError("check_error() did not raise after a timed-out wait")
            rt.check_error()  # the report was consumed
        dist.barrier()
        rt.clean_low_latency_buffer(n_ll, hidden, num_experts)
        torch.cuda.synchronize()
        dist.barrier()
        inputs = all_inputs(seed + 1, world, n_ll, hidden, num_experts, topk, "random")
        res = _dispatch(rt, inputs[rank], n_ll, num_experts)
        check_dispatch(rank, res, inputs, num_experts, False, False, False)
        rt.check_error()
    finally:
        rt.destroy()


def case_create_destroy(rank: int, world: int, *, seed: int) -> None:
    """Create and destroy a low-latency runtime several times in one process; each works."""
    n_ll, hidden, e_loc, topk = 16, 2048, 3, 3
    num_experts = e_loc * world
    for round_ in range(3):
        rt = _make_runtime(rank, world, required_rdma_bytes(n_ll, hidden, world, num_experts) + 4096 * round_)
        inputs = all_inputs(seed + round_, world, n_ll, hidden, num_experts, topk, "random")
        res = _dispatch(rt, inputs[rank], n_ll, num_experts, use_fp8=True)
        check_dispatch(rank, res, inputs, num_experts, True, False, False)
        rt.destroy()
        rt.destroy()  # idempotent


def case_nvshmem_puts(rank: int, world: int, *, seed: int) -> None:
    """The code path for peers NVSHMEM cannot map (RDMA): NVSHMEM puts and atomics instead of stores."""
    n_ll, hidden, e_loc, topk = 24, 1536, 4, 5
    num_experts = e_loc * world
    os.environ[FORCE_PUTS_ENV] = "1"
    try:
        rt = _make_runtime(rank, world, required_rdma_bytes(n_ll, hidden, world, num_experts))
    finally:
        del os.environ[FORCE_PUTS_ENV]
    try:
        inputs = all_inputs(seed, world, n_ll, hidden, num_experts, topk, "random")
        for use_fp8 in (True, False):
            res = _dispatch(rt, inputs[rank], n_ll, num_experts, use_fp8=use_fp8, round_scale=use_fp8)
            want = check_dispatch(rank, res, inputs, num_experts, use_fp8, use_fp8, False)
        y = torch.empty(e_loc, world * n_ll, hidden, dtype=torch.bfloat16, device="cuda")
        _expert_outputs(rank, want, inputs, e_loc, n_ll, world, hidden, y)
        inp = inputs[rank]
        combined, _ = rt.low_latency_combine(y, inp.topk_idx.cuda(), inp.topk_weights.cuda(), res.handle,
                                             zero_copy=False, return_recv_hook=False, out=None,
                                             combine_wait_recv_cost_stats=None)
        assert torch.equal(combined.cpu().view(torch.int16), ex.expected_combine(inp).view(torch.int16))
        rt.check_error()
    finally:
        rt.destroy()
