"""Per-process bodies of the intranode GPU tests (module level, so ``spawn`` can pickle them).

Each function runs as ``fn(rank, world_size, **kwargs)`` inside ``tests.dist_utils.run_distributed`` with gloo;
every process uses GPU ``rank % device_count`` (the tests run 2 and 4 processes on one GPU).
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
from gpu_env import bits, take_device
from intranode_expected import expected_combine, expected_dispatch, layout, make_inputs

from deepep_plugin.backends.cuda_intranode import IntranodeRuntime
from deepep_plugin.config import Config
from deepep_plugin.errors import DeepEPBufferTooSmall, DeepEPTimeoutError


def _config(num_sms: int, queue_tokens: int) -> Config:
    return Config(num_sms, min(6, queue_tokens - 1), queue_tokens)


_TUNING_ENV = {"DEEPEP_PLUGIN_DISPATCH_LOCAL_SPLIT": "local_split", "DEEPEP_PLUGIN_COPY_DEPTH": "copy_depth",
               "DEEPEP_PLUGIN_EARLY_DISPATCH": "early_dispatch", "DEEPEP_PLUGIN_COMBINE_SHARE": "combine_share",
               "DEEPEP_PLUGIN_COMBINE_SMALL_ROUNDS": "combine_small_rounds"}


# Kernel waits give up after this (DEEPEP_PLUGIN_TEST_TIMEOUT_S raises it for runs under compute-sanitizer, whose
# instrumented kernels run far slower than the 20 s a peer normally needs at most).
_TIMEOUT_S = float(os.environ.get("DEEPEP_PLUGIN_TEST_TIMEOUT_S", "20"))


def _runtime(rank: int, R: int, cfg: Config, hidden_bytes: int, timeout_s: float = _TIMEOUT_S) -> IntranodeRuntime:
    nbytes = cfg.get_nvl_buffer_size_hint(hidden_bytes, R)
    rt = IntranodeRuntime(dist.group.WORLD, rank, R, nbytes, take_device(rank), timeout_s)
    tuning = rt._ext.dispatch_tuning()  # a test of a tuning must run it: the environment reached the extension
    for var, key in _TUNING_ENV.items():
        if os.environ.get(var):
            assert tuning[key] == int(os.environ[var]), f"{var}={os.environ[var]} but the kernels run {tuning}"
    return rt


def _expect_split(R: int, T: int, C: int, Q: int) -> int:
    """1 if a fresh dispatch of T tokens must run as a split launch here (runtime.cpp: dispatch_fresh), else 0."""
    early = os.environ.get("DEEPEP_PLUGIN_EARLY_DISPATCH") == "1"
    return int(early and R > 1 and T > 0 and -(-T // C) <= Q)


def _check_handle(handle, exp, where: str) -> None:
    names = ["rank_prefix_matrix", "channel_prefix_matrix", "recv_channel_prefix_matrix", "recv_src_idx",
             "is_token_in_rank", "send_head"]
    for name in names:
        got = getattr(handle, name).cpu()
        want = getattr(exp, name)
        assert torch.equal(got, want.to(got.dtype)), f"{where}: handle.{name} differs:\n{got}\nvs\n{want}"


def layout_worker(rank: int, R: int, *, seed: int, num_tokens: int, num_experts: int, topk: int) -> None:
    cfg = _config(8, 64)
    rt = _runtime(rank, R, cfg, 256)
    inp = make_inputs(seed, rank, R, num_tokens, 8, num_experts, topk)
    topk_idx = inp.topk_idx.clone()
    if topk_idx.numel() > 0:
        topk_idx[0, 0] = num_experts + 5  # out of range: ignored
    got = rt.get_dispatch_layout(topk_idx.cuda(), num_experts)
    want = layout(topk_idx, num_experts, R)
    assert got.num_tokens_per_rdma_rank is None
    assert torch.equal(got.num_tokens_per_rank.cpu(), want[0])
    assert torch.equal(got.num_tokens_per_expert.cpu(), want[1])
    assert torch.equal(got.is_token_in_rank.cpu(), want[2])
    rt.destroy()


def dispatch_combine_worker(rank: int, R: int, *, seed: int, num_tokens: int, hidden: int, num_experts: int,
                            topk: int, num_sms: int, queue_tokens: int, fp8: bool = False, alignment: int = 1,
                            repeats: int = 2) -> None:
    """Non-cached dispatch, cached dispatch and combine against the plain-torch expectation, `repeats` times
    on fresh inputs with one buffer (so the queues' counters carry over between calls)."""
    cfg = _config(num_sms, queue_tokens)
    C = cfg.num_channels
    rt = _runtime(rank, R, cfg, hidden * 2)
    splits = 0
    for it in range(repeats):
        s = seed + 101 * it
        inputs = [make_inputs(s, r, R, num_tokens, hidden, num_experts, topk) for r in range(R)]
        exp = expected_dispatch(inputs, rank, num_experts, C, alignment)
        own = inputs[rank]
        x = own.x.cuda()
        x_scales = None
        if fp8:
            S = hidden // 128
            x_send = (own.x.float() * 0.5).to(torch.float8_e4m3fn)
            all_scales = [torch.rand(inputs[r].x.size(0), S, generator=torch.Generator().manual_seed(s + 7 * r))
                          for r in range(R)]
            x = x_send.cuda()
            # Column-major scales: arbitrary strides must work.
            x_scales = all_scales[rank].t().contiguous().t().cuda()
        topk_idx, topk_weights = own.topk_idx.cuda(), own.topk_weights.cuda()
        lay = rt.get_dispatch_layout(topk_idx, num_experts)
        res = rt.dispatch(x, x_scales, None, lay, topk_idx, topk_weights, alignment, 0, cfg)
        where = f"rank {rank} of {R}, iteration {it}"
        splits += _expect_split(R, own.x.size(0), C, queue_tokens)
        assert rt.split_launches() == splits, f"{where}: {rt.split_launches()} split launches, expected {splits}"
        if fp8:
            want_x = torch.cat([(inputs[i].x.float() * 0.5).to(torch.float8_e4m3fn)[exp.recv_from[i]]
                                for i in range(R)])
            want_s = torch.cat([all_scales[i][exp.recv_from[i]] for i in range(R)])
            assert torch.equal(bits(res.recv_x), bits(want_x)), f"{where}: FP8 recv_x differs"
            assert res.recv_x_scales.is_contiguous()
            assert torch.equal(bits(res.recv_x_scales), bits(want_s)), f"{where}: recv_x_scales differ"
        else:
            assert res.recv_x_scales is None
            assert torch.equal(bits(res.recv_x), bits(exp.recv_x)), f"{where}: recv_x differs"
        assert torch.equal(res.recv_topk_idx.cpu(), exp.recv_topk_idx), f"{where}: recv_topk_idx differs"
        assert torch.equal(bits(res.recv_topk_weights), bits(exp.recv_topk_weights)), f"{where}: weights"
        assert res.num_recv_tokens_per_expert_list == exp.per_expert, (
            f"{where}: {res.num_recv_tokens_per_expert_list} vs {exp.per_expert}")
        _check_handle(res.handle, exp, where)

        # Cached dispatch with the same handle: same rows, no top-k.
        cached = rt.dispatch(x, x_scales, res.handle, None, None, None, 1, 0, cfg)
        assert cached.recv_topk_idx is None and cached.recv_topk_weights is None
        assert torch.equal(bits(cached.recv_x), bits(res.recv_x)), f"{where}: cached recv_x differs"
        if fp8:
            assert torch.equal(bits(cached.recv_x_scales), bits(res.recv_x_scales))
            continue

        # Combine: every rank sends back its own random rows (regenerated by every rank for the expectation).
        ys = [torch.randn(sum(int(t.numel()) for t in expected_dispatch(inputs, j, num_experts, C).recv_from),
                          hidden, generator=torch.Generator().manual_seed(s + 50 + j)).to(torch.bfloat16)
              for j in range(R)]
        ws = [torch.rand(ys[j].size(0), topk, generator=torch.Generator().manual_seed(s + 60 + j))
              for j in range(R)]
        recv_from_all = [expected_dispatch(inputs, j, num_experts, C).recv_from for j in range(R)]
        T = own.x.size(0)
        bias = [torch.randn(T, hidden, generator=torch.Generator().manual_seed(s + 70 + rank)).to(torch.bfloat16),
                torch.randn(T, hidden, generator=torch.Generator().manual_seed(s + 80 + rank)).to(torch.bfloat16)]
        for use_bias in (False, True):
            b = bias if use_bias else []
            out = rt.combine(ys[rank].cuda(), res.handle, ws[rank].cuda(), *(t.cuda() for t in b),
                             *([None] * (2 - len(b))), cfg)
            want, want_w = expected_combine(ys, ws, recv_from_all, rank, T, hidden, b)
            torch.testing.assert_close(out.combined_x.float().cpu(), want.to(torch.bfloat16).float(),
                                       rtol=1e-2, atol=1e-2, msg=f"{where}: combined_x differs")
            torch.testing.assert_close(out.combined_topk_weights.cpu(), want_w, rtol=1e-5, atol=1e-5)
        out = rt.combine(ys[rank].cuda(), res.handle, None, None, None, cfg)
        assert out.combined_topk_weights is None
        torch.cuda.synchronize()
        rt.check_error()
    rt.destroy()


def worst_tokens_graph_worker(rank: int, R: int, *, seed: int, num_tokens: int, hidden: int, num_experts: int,
                              topk: int, num_sms: int, queue_tokens: int, replays: int = 3) -> None:
    """Capture layout + num_worst_tokens dispatch + combine in one CUDA graph; replay it on new inputs."""
    cfg = _config(num_sms, queue_tokens)
    C = cfg.num_channels
    rt = _runtime(rank, R, cfg, hidden * 2)
    T = make_inputs(seed, rank, R, num_tokens, hidden, num_experts, topk).x.size(0)
    worst = sum(make_inputs(seed, r, R, num_tokens, hidden, num_experts, topk).x.size(0) for r in range(R))
    x = torch.zeros(T, hidden, dtype=torch.bfloat16, device="cuda")
    topk_idx = torch.full((T, topk), -1, dtype=torch.int64, device="cuda")
    topk_weights = torch.zeros(T, topk, dtype=torch.float32, device="cuda")

    def step():
        lay = rt.get_dispatch_layout(topk_idx, num_experts)
        res = rt.dispatch(x, None, None, lay, topk_idx, topk_weights, 1, worst, cfg)
        out = rt.combine(res.recv_x, res.handle, res.recv_topk_weights, None, None, cfg)
        return res, out

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside the graph (allocator, module load)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    dist.barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        res, out = step()
    dist.barrier()
    for it in range(replays):
        s = seed + 31 * it
        inputs = [make_inputs(s, r, R, num_tokens, hidden, num_experts, topk) for r in range(R)]
        exp = expected_dispatch(inputs, rank, num_experts, C)
        x.copy_(inputs[rank].x)
        topk_idx.copy_(inputs[rank].topk_idx)
        topk_weights.copy_(inputs[rank].topk_weights)
        graph.replay()
        torch.cuda.synchronize()
        rt.check_error()
        n = exp.recv_x.size(0)
        where = f"rank {rank} of {R}, replay {it}"
        assert res.recv_x.size(0) == worst
        _check_handle(res.handle._replace(recv_src_idx=res.handle.recv_src_idx[:n]), exp, where)
        bad = (res.recv_x[:n].cpu().view(torch.int16) != exp.recv_x.view(torch.int16)).any(1).nonzero().flatten()
        assert bad.numel() == 0, (f"{where}: {bad.numel()} of {n} recv_x rows differ, first {bad[:8].tolist()}, "
                                  f"last {bad[-4:].tolist()}; rank_prefix column {exp.rank_prefix_matrix[:, rank]}")
        assert torch.equal(res.recv_topk_idx[:n].cpu(), exp.recv_topk_idx), f"{where}: recv_topk_idx"
        assert bool((res.recv_topk_idx[n:] == -1).all()), f"{where}: rows beyond n must have top-k ids -1"
        # Padding as the reference and the internode kernels give it: zeros (after earlier replays wrote data there).
        assert not bool(res.recv_x[n:].view(torch.int16).any()), f"{where}: recv_x rows beyond n must be zero"
        assert not bool(res.recv_topk_weights[n:].any()), f"{where}: recv_topk_weights rows beyond n must be zero"
        assert torch.equal(bits(res.recv_topk_weights[:n]), bits(exp.recv_topk_weights))
        assert res.num_recv_tokens_per_expert_list == []
        _check_handle(res.handle._replace(recv_src_idx=res.handle.recv_src_idx[:n]), exp, where)
        recv_from_all = [expected_dispatch(inputs, j, num_experts, C).recv_from for j in range(R)]
        ys = [torch.cat([inputs[i].x[recv_from_all[j][i]] for i in range(R)]) for j in range(R)]
        ws = [expected_dispatch(inputs, j, num_experts, C).recv_topk_weights for j in range(R)]
        want, want_w = expected_combine(ys, ws, recv_from_all, rank, T, hidden, [])
        torch.testing.assert_close(out.combined_x.float().cpu(), want.to(torch.bfloat16).float(), rtol=1e-2,
                                   atol=1e-2)
        torch.testing.assert_close(out.combined_topk_weights.cpu(), want_w, rtol=1e-5, atol=1e-5)
        dist.barrier()
    rt.destroy()


def timeout_worker(rank: int, R: int, *, timeout_s: float) -> None:
    """Rank 0 dispatches alone; it must get DeepEPTimeoutError naming itself and the wait, within bounds."""
    cfg = _config(4, 32)
    rt = _runtime(rank, R, cfg, 256, timeout_s=timeout_s)
    if rank == 0:
        topk_idx = torch.tensor([[0, 1], [R, -1]], dtype=torch.int64, device="cuda")  # experts on ranks 0, 1
        x = torch.randn(2, 128, device="cuda").to(torch.bfloat16)
        lay = rt.get_dispatch_layout(topk_idx, 2 * R)
        start = time.monotonic()
        try:
            rt.dispatch(x, None, None, lay, topk_idx, torch.rand(2, 2, device="cuda"), 1, 0, cfg)
        except DeepEPTimeoutError as e:
            msg = str(e)
            assert "rank 0" in msg and "notify" in msg, msg
            assert "rank 1" in msg or "rank" in msg, msg
        else:
            raise AssertionError("dispatch without peers did not time out")
        elapsed = time.monotonic() - start
        assert elapsed < 3 * timeout_s + 5, f"timeout took {elapsed:.1f} s"
        # The buffer refuses further work with the same error; the CUDA context is still usable.
        try:
            rt.get_dispatch_layout(topk_idx, 2 * R)
        except DeepEPTimeoutError:
            pass
        else:
            raise AssertionError("a timed-out buffer must refuse further calls")
        assert float(torch.ones(4, device="cuda").sum()) == 4.0
    dist.barrier()
    rt.destroy()


def buffer_too_small_worker(rank: int, R: int) -> None:
    cfg = _config(4, 64)
    small = cfg.get_nvl_buffer_size_hint(256, R)  # sized for hidden 128 BF16
    rt = IntranodeRuntime(dist.group.WORLD, rank, R, small, take_device(rank), 10.0)
    x = torch.zeros(8, 4096, dtype=torch.bfloat16, device="cuda")
    topk_idx = torch.zeros(8, 2, dtype=torch.int64, device="cuda")
    lay = rt.get_dispatch_layout(topk_idx, 2 * R)
    try:
        rt.dispatch(x, None, None, lay, topk_idx, torch.ones(8, 2, device="cuda"), 1, 0, cfg)
    except DeepEPBufferTooSmall as e:
        assert "needs" in str(e), str(e)
    else:
        raise AssertionError("a too-small buffer was accepted")
    dist.barrier()
    rt.destroy()


def reference_match_worker(rank: int, R: int, *, seed: int, num_tokens: int, hidden: int, num_experts: int,
                           topk: int, num_sms: int) -> None:
    """The CUDA runtime and the reference backend (CPU, gloo) agree element by element on the same inputs:
    layout, BF16 and FP8 dispatch with the full handle, cached dispatch, and combine (FP32 tolerance)."""
    from deepep_plugin.backends.reference import ReferenceBackend

    cfg = _config(num_sms, 64)
    rt = _runtime(rank, R, cfg, hidden * 2)
    ref = ReferenceBackend(dist.group.WORLD, R)
    inp = make_inputs(seed, rank, R, num_tokens, hidden, num_experts, topk)
    scales = torch.rand(inp.x.size(0), hidden // 128, generator=torch.Generator().manual_seed(seed + rank))
    x_fp8 = inp.x.float().to(torch.float8_e4m3fn)
    lay_c = rt.get_dispatch_layout(inp.topk_idx.cuda(), num_experts)
    lay_r = ref.get_dispatch_layout(inp.topk_idx, num_experts)
    for a, b in zip(lay_c, lay_r):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a.cpu(), b), "layout differs from the reference"
    for fp8 in (False, True):
        xs = (x_fp8, scales) if fp8 else (inp.x, None)
        got = rt.dispatch(xs[0].cuda(), None if xs[1] is None else xs[1].cuda(), None, lay_c, inp.topk_idx.cuda(),
                          inp.topk_weights.cuda(), 2, 0, cfg)
        want = ref.dispatch(xs[0], xs[1], None, lay_r, inp.topk_idx, inp.topk_weights, 2, 0, cfg)
        where = f"rank {rank}, fp8={fp8}"
        assert torch.equal(bits(got.recv_x), bits(want.recv_x)), f"{where}: recv_x"
        if fp8:
            assert torch.equal(bits(got.recv_x_scales), bits(want.recv_x_scales)), f"{where}: scales"
        assert torch.equal(got.recv_topk_idx.cpu(), want.recv_topk_idx), f"{where}: recv_topk_idx"
        assert torch.equal(bits(got.recv_topk_weights), bits(want.recv_topk_weights)), f"{where}: weights"
        assert got.num_recv_tokens_per_expert_list == want.num_recv_tokens_per_expert_list, where
        for i, (a, b) in enumerate(zip(got.handle, want.handle)):
            assert torch.equal(a.cpu(), b.to(a.dtype)), f"{where}: handle[{i}] differs:\n{a}\nvs\n{b}"
        cached_c = rt.dispatch(xs[0].cuda(), None if xs[1] is None else xs[1].cuda(), got.handle, None, None,
                               None, 1, 0, cfg)
        assert torch.equal(bits(cached_c.recv_x), bits(want.recv_x)), f"{where}: cached recv_x"
    y = torch.randn(want.recv_x.size(0), hidden, generator=torch.Generator().manual_seed(seed + 9 + rank))
    y = y.to(torch.bfloat16)
    w = torch.rand(y.size(0), topk, generator=torch.Generator().manual_seed(seed + 19 + rank))
    bias = torch.randn(inp.x.size(0), hidden, generator=torch.Generator().manual_seed(seed + 29 + rank))
    bias = bias.to(torch.bfloat16)
    got = rt.combine(y.cuda(), got.handle, w.cuda(), bias.cuda(), None, cfg)
    want = ref.combine(y, want.handle, w, bias, None, cfg)
    torch.testing.assert_close(got.combined_x.cpu().float(), want.combined_x.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got.combined_topk_weights.cpu(), want.combined_topk_weights, rtol=1e-5, atol=1e-5)
    torch.cuda.synchronize()
    rt.check_error()
    rt.destroy()


def failed_output_allocation_worker(rank: int, R: int, *, seed: int, num_tokens: int, hidden: int,
                                    num_experts: int, topk: int, queue_tokens: int) -> None:
    """Rank 0's allocator under pressure while a fresh dispatch allocates its outputs (after the count read, with the
    senders' phase possibly already running: DEEPEP_PLUGIN_EARLY_DISPATCH):

    0. capped below recv_x's size: rank 0 raises the allocator's error, its kernel drops the rows it receives, the
       other ranks get their exact outputs;
    1. capped so that the allocator must free its cache (cudaFree, which waits for the device) and retry: the
       allocation succeeds, nothing waits on the host from the GPU, so nothing hangs;
    2. uncapped; combine after each successful round is exact everywhere.

    Then a count-reading dispatch is refused inside a CUDA-graph capture, before it enqueues anything."""
    from deepep_plugin.errors import DeepEPInputError

    cfg = _config(8, queue_tokens)
    rt = _runtime(rank, R, cfg, hidden * 2)
    dev = torch.cuda.current_device()
    total = torch.cuda.get_device_properties(dev).total_memory
    for it in range(3):
        inputs = [make_inputs(seed + it, r, R, num_tokens, hidden, num_experts, topk) for r in range(R)]
        exp = expected_dispatch(inputs, rank, num_experts, cfg.num_channels)
        own = inputs[rank]
        x, idx, wts = own.x.cuda(), own.topk_idx.cuda(), own.topk_weights.cuda()
        lay = rt.get_dispatch_layout(idx, num_experts)
        torch.cuda.synchronize()
        capped = it < 2 and rank == 0
        retries = torch.cuda.memory_stats(dev).get("num_alloc_retries", 0)
        if capped:
            need = exp.recv_x.numel() * 2
            assert need > (16 << 20), f"the case must need more than the caps leave, recv_x has {need} bytes"
            torch.cuda.empty_cache()
            if it == 0:
                headroom = 4 << 20
            else:  # a free 12 MiB segment in the cache, too small for recv_x: it must be released to make room
                before = torch.cuda.memory_reserved(dev)
                torch.empty(12 << 20, dtype=torch.uint8, device=dev)
                assert torch.cuda.memory_reserved(dev) == before + (12 << 20), "the 12 MiB block got no segment"
                headroom = need - (12 << 20) + (6 << 20)
            torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved(dev) + headroom) / total, dev)
        splits = rt.split_launches()
        try:
            res = rt.dispatch(x, None, None, lay, idx, wts, 1, 0, cfg)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            assert capped and it == 0 and "out of memory" in str(e).lower(), f"rank {rank}: unexpected error {e!r}"
            res = None
        finally:
            if capped:
                torch.cuda.set_per_process_memory_fraction(1.0, dev)
        where = f"rank {rank}, round {it}"
        assert (res is None) == (capped and it == 0), f"{where}: the allocation should fail only in round 0"
        assert rt.split_launches() - splits == _expect_split(R, own.x.size(0), cfg.num_channels, queue_tokens), where
        if capped and it == 1:
            assert torch.cuda.memory_stats(dev).get("num_alloc_retries", 0) > retries, (
                f"{where}: the allocator did not have to free its cache (the case does not test that path)")
        if res is not None:
            assert torch.equal(bits(res.recv_x), bits(exp.recv_x)), f"{where}: recv_x differs"
            assert res.num_recv_tokens_per_expert_list == exp.per_expert
            _check_handle(res.handle, exp, where)
        if it >= 1:  # combine is collective: every rank has a handle once no dispatch failed
            y = torch.ones(res.recv_x.size(0), hidden, dtype=torch.bfloat16, device="cuda")
            out = rt.combine(y, res.handle, None, None, None, cfg)
            holders = exp.is_token_in_rank.sum(1).float()  # each copy adds 1.0: exact in BF16
            assert torch.equal(out.combined_x.float().cpu(), holders[:, None].expand(-1, hidden)), (
                f"{where}: combine differs")
        torch.cuda.synchronize()
        rt.check_error()
        dist.barrier()
    # A fresh dispatch that reads the count cannot be captured: refused on every rank before anything is enqueued.
    inputs = make_inputs(seed, rank, R, num_tokens, hidden, num_experts, topk)
    x, idx, wts = inputs.x.cuda(), inputs.topk_idx.cuda(), inputs.topk_weights.cuda()
    lay = rt.get_dispatch_layout(idx, num_experts)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    refused = False
    with torch.cuda.stream(stream):
        graph.capture_begin()
        try:
            rt.dispatch(x, None, None, lay, idx, wts, 1, 0, cfg)
        except DeepEPInputError as e:
            refused = "num_worst_tokens" in str(e)
        finally:
            try:
                graph.capture_end()
            except RuntimeError:
                pass  # ending an empty capture may complain; the refusal is what is checked
    assert refused, f"rank {rank}: a count-reading dispatch was captured"
    torch.cuda.synchronize()
    dist.barrier()
    res = rt.dispatch(x, None, None, lay, idx, wts, 1, 0, cfg)  # the buffer is still in step on every rank
    torch.cuda.synchronize()
    rt.check_error()
    rt.destroy()
