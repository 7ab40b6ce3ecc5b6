"""``python -m deepep_plugin.bench compare``: deepep_plugin beside DeepEP V1, same GPUs, same processes, same inputs.

What a training step runs per MoE layer (``get_dispatch_layout`` + a fresh dispatch + combine forward, a cached
dispatch + combine backward), and every op alone, timed for both libraries in one run:

* **runahead**: CUDA events around each call, calls issued back to back so the host runs ahead of the GPU where
  it can (DeepEP's own tests time this way); **synced**: a barrier and a device sync before each call;
* **kernel time** per call from the profiler (every GPU activity the call started: per kernel the median duration
  times its launches per call, summed);
* **host microseconds** per call (wall time of the Python call in the runahead loop);
* **GPU work items** per call (kernels, memsets, copies) and **host syncs** per call: synchronising runtime calls
  seen by the profiler, plus one where the call waited on the GPU without one (a poll of mapped memory: a call
  issued behind a 20 ms sleep kernel that returns only after it).

Outputs (recv_x, FP8 data and scales, recv_topk_idx/weights, per-expert counts, combined x and weights, the
layout) are compared bit for bit with DeepEP's when ``import deep_ep`` works, else with the reference backend on
CPU copies (bit for bit too, except combined rows: within BF16 rounding, as the reference may sum in another order).

Every timing of a run (all configurations, all rounds) is taken before the first profiler pass: a process that
has run the profiler keeps CUPTI attached and launches more slowly from then on (``tools/profiler_aftereffect.py``).

Several processes on one GPU run concurrently only under MPS: the tool starts the MPS daemon (and stops it) when
ranks share a GPU and none is running. Results: ``--json`` (``{"rows": [...]}``, one row per library, configuration
and timing; while running, each configuration's rows are appended to ``<json>.partial`` as they are measured),
``--plot`` (PNG) and a section appended to ``--results``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from typing import Any, Callable, Optional

OPS = ("layout", "dispatch_fresh", "dispatch_fresh_fp8", "dispatch_cached", "dispatch_cached_fp8", "combine",
       "fwd_step", "bwd_step")
#: Runtime API calls that make the host wait for the GPU.
_SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
               "cuStreamSynchronize", "cuCtxSynchronize", "cuEventSynchronize", "cuMemcpyDtoH_v2", "cuMemcpy")
#: Blocks per SM of the normal kernels (1024 threads each): ranks x SMs must fit on the GPU at once.
_MIN_SLACK_SMS = 4


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m deepep_plugin.bench compare", description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=str, default="2,4,8", help="comma-separated EP sizes (processes)")
    p.add_argument("--tokens", type=str, default="128,256,512,1024,4096,8192")
    p.add_argument("--sms", type=str, default="8,12,16,24")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--num-experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20, help="timed calls per op (runahead)")
    p.add_argument("--synced-iters", type=int, default=8)
    p.add_argument("--profile-iters", type=int, default=5)
    p.add_argument("--rounds", type=int, default=1,
                   help="measure each configuration this many times, the libraries taking turns; report medians")
    p.add_argument("--no-profile", action="store_true", help="skip kernel times, launches and syncs")
    p.add_argument("--trace-notify", type=int, default=0, metavar="N",
                   help="also trace N forward steps: per notify kernel its launch, start and end on every rank, "
                        "and print how far apart the ranks launched and started it (0: off)")
    p.add_argument("--trace-dir", type=str, default="", metavar="DIR",
                   help="also profile N forward steps (--trace-notify's N, else 10) and write each rank's host calls "
                        "and GPU work on the shared host clock to DIR/<lib>_R<ranks>_T<tokens>_S<sms>_r<rank>.json")
    p.add_argument("--host-stamps", type=int, default=0, metavar="N",
                   help="also run N forward steps back to back, unprofiled, with host clock stamps between the calls "
                        "(and, for deepep_plugin, inside its fresh dispatch: notify enqueued, count seen, outputs "
                        "allocated, dispatch enqueued) and print each rank's median segments (0: off)")
    p.add_argument("--no-deepep", action="store_true", help="do not run DeepEP even if importable")
    p.add_argument("--timeout", type=float, default=30.0, help="deepep_plugin's wait timeout (s)")
    p.add_argument("--json", type=str, default="benchmarks/results/intranode_vs_deepep.json")
    p.add_argument("--plot", type=str, default="benchmarks/results/intranode_vs_deepep.png")
    p.add_argument("--results", type=str, default="benchmarks/RESULTS.md", help="'' to skip")
    p.add_argument("--command", type=str, default="", help="the command line to record in the results")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------
# Timing helpers (run inside a rank)
# ----------------------------------------------------------------------------------------------------------
def _synced(fn: Callable[[], Any], iters: int, barrier: Callable[[], None]) -> float:
    import torch

    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        barrier()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3)
    return statistics.median(times)


def _blocks_host(fn: Callable[[], Any], barrier: Callable[[], None]) -> bool:
    """True when ``fn`` returned only after the GPU drained a 20 ms sleep queued before it."""
    import torch

    torch.cuda.synchronize()
    barrier()
    torch.cuda._sleep(int(2e7 * 1.98))  # ~20 ms at 1.98 GHz
    t0 = time.perf_counter()
    fn()
    waited = time.perf_counter() - t0
    torch.cuda.synchronize()
    return waited > 0.010


def _profile(ops: dict[str, Callable[[], Any]], iters: int, barrier: Callable[[], None]) -> dict[str, dict]:
    """Per op: GPU us per call (all activities), GPU work items per call and synchronising calls per call."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.cuda.synchronize()
    barrier()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for name, fn in ops.items():
            torch.cuda.synchronize()
            barrier()
            with record_function(f"compare::{name}"):
                for _ in range(iters):
                    fn()
                torch.cuda.synchronize()
    events = prof.events()
    windows = {e.name[len("compare::"):]: (e.time_range.start, e.time_range.end) for e in events
               if e.name.startswith("compare::") and e.device_type == DeviceType.CPU}
    out: dict[str, dict] = {}
    for name, (lo, hi) in windows.items():
        # GPU activities started in the window, less the window's own annotation (profilers mirror record_function
        # ranges onto the GPU timeline as one long "kernel").
        gpu = [e for e in events if e.device_type == DeviceType.CUDA and lo <= e.time_range.start <= hi
               and not e.name.startswith("compare::")]
        syncs = [e for e in events if e.device_type == DeviceType.CPU and e.name in _SYNC_CALLS
                 and lo <= e.time_range.start <= hi]
        durations: dict[str, list[float]] = {}
        for e in gpu:
            durations.setdefault(e.name, []).append(e.time_range.elapsed_us())
        # Per kernel: median duration x launches per call (robust to the odd call that waited on a late peer).
        kernels = {k: statistics.median(v) * len(v) / iters for k, v in durations.items()}
        out[name] = {"kernel_us": sum(kernels.values()),
                     "launches": len(gpu) / iters,
                     "api_syncs": max(len(syncs) - 1, 0) / iters,  # minus the window's own synchronize
                     "kernels": kernels}
    return out


_LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def _raw_events(fn: Callable[[], Any], iters: int, barrier: Callable[[], None]) -> list[Any]:
    """The profiler's raw events of ``iters`` back-to-back calls of ``fn`` (after a sync and a barrier): absolute times
    on the host clock, and the correlation ids that tie a launch to its GPU work."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    barrier()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return list(prof.profiler.kineto_results.events())


def _notify_trace(fn: Callable[[], Any], iters: int, barrier: Callable[[], None]) -> list[tuple[float, float, float]]:
    """(launch, start, end) in us of the host clock for each notify kernel of ``iters`` back-to-back calls.

    The profiler puts CPU and GPU times on the host's clock, which every process of a machine shares, so the lists
    of two ranks can be compared: a notify that starts far later on one rank makes the others wait in it."""
    from torch.autograd import DeviceType

    raw = _raw_events(fn, iters, barrier)
    launch_at = {e.correlation_id(): e.start_ns() / 1e3 for e in raw if e.name() in _LAUNCH_CALLS}
    out = []
    for e in raw:
        if e.device_type() == DeviceType.CUDA and "notify" in e.name() and "cached" not in e.name():
            start = e.start_ns() / 1e3
            out.append((launch_at.get(e.correlation_id(), float("nan")), start, start + e.duration_ns() / 1e3))
    return sorted(out, key=lambda t: t[1])


def timeline_records(events: Any) -> dict[str, list[list[Any]]]:
    """The ``{"cpu": [...], "gpu": [...]}`` of a step timeline from the profiler's raw events: the ``step::*`` host
    ranges, the launch and sync calls, and every GPU activity but the mirrors of the ``step::*`` ranges, each as
    ``[name, start_us, dur_us, correlation_id]`` sorted by start. Uses only the event methods every supported torch
    has (name, start_ns, duration_ns, correlation_id, device_type: torch 2.11's have no ``activity_type``)."""
    from torch.autograd import DeviceType

    cpu, gpu = [], []
    for e in events:
        item = [e.name(), e.start_ns() / 1e3, e.duration_ns() / 1e3, e.correlation_id()]
        if e.device_type() == DeviceType.CUDA:
            # Not the GPU mirrors of the step::* ranges: their ids come from another counter than the launches'.
            if not e.name().startswith("step::"):
                gpu.append(item)
        elif e.name().startswith("step::") or e.name() in _LAUNCH_CALLS or e.name() in _SYNC_CALLS:
            cpu.append(item)
    return {"cpu": sorted(cpu, key=lambda t: t[1]), "gpu": sorted(gpu, key=lambda t: t[1])}


def _step_timeline(fn: Callable[[], Any], iters: int, barrier: Callable[[], None], path: str) -> None:
    """Profile ``iters`` back-to-back calls of ``fn`` and write their :func:`timeline_records` to ``path`` (times on
    the host clock every process shares). Host times are taken under the profiler, which records every ATen op:
    they run longer than unprofiled calls, the more so the more ops a library's Python issues."""
    records = timeline_records(_raw_events(fn, iters, barrier))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(records, f)


def notify_skew(traces: list[list[tuple[float, float, float]]]) -> dict[str, float]:
    """Medians over the calls of: the spread of the ranks' launches and starts of the notify kernel, its duration,
    and the queueing delay between launch and start (the mean of ranks), all in us."""
    n = min(len(t) for t in traces)
    if n == 0:
        return {}

    def med(values: list[float]) -> float:
        return statistics.median(values)

    launch = [max(t[i][0] for t in traces) - min(t[i][0] for t in traces) for i in range(n)]
    start = [max(t[i][1] for t in traces) - min(t[i][1] for t in traces) for i in range(n)]
    end = [max(t[i][2] for t in traces) - min(t[i][2] for t in traces) for i in range(n)]
    queue = [statistics.mean(t[i][1] - t[i][0] for t in traces) for i in range(n)]
    dur = [statistics.mean(t[i][2] - t[i][1] for t in traces) for i in range(n)]
    late = [max(range(len(traces)), key=lambda r: traces[r][i][1]) for i in range(n)]
    return {"calls": n, "launch_spread_us": med(launch), "start_spread_us": med(start), "end_spread_us": med(end),
            "queue_us": med(queue), "duration_us": med(dur),
            "late_rank_share": max(late.count(r) for r in range(len(traces))) / n}


# ----------------------------------------------------------------------------------------------------------
# One library on one configuration
# ----------------------------------------------------------------------------------------------------------
class _Inputs:
    def __init__(self, rank: int, tokens: int, args: argparse.Namespace, dev: Any) -> None:
        import torch

        from deepep_plugin.fp8 import per_token_cast_to_fp8

        g = torch.Generator(device=dev).manual_seed(20261202 + 1000 * rank + tokens)
        H, E, K = args.hidden, args.num_experts, args.topk
        self.x = torch.randn(tokens, H, device=dev, generator=g).to(torch.bfloat16)
        scores = torch.rand(tokens, E, device=dev, generator=g) + 0.1
        self.topk_idx = scores.topk(K, dim=1, sorted=False).indices.to(torch.int64)
        if tokens > 8:  # a few unused slots, as DeepEP's tests have
            rows = torch.randint(0, tokens, (tokens // 8,), device=dev, generator=g)
            cols = torch.randint(0, K, (tokens // 8,), device=dev, generator=g)
            self.topk_idx[rows, cols] = -1
        self.topk_weights = torch.rand(tokens, K, device=dev, generator=g)
        self.x_fp8 = per_token_cast_to_fp8(self.x)


def _clone(obj: Any) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_clone(o) for o in obj) if not hasattr(obj, "_fields") else [_clone(o) for o in obj]
    return obj


def _median_rounds(rounds: list[dict]) -> dict:
    """Per op, the median over measuring rounds of every number (per kernel for kernel times; a round without a
    number, as when its profiler failed, counts as the first round's); flags and the notify trace from the first."""
    out: dict[str, dict] = {}
    for op, first in rounds[0].items():
        merged: dict[str, Any] = {}
        for key, value in first.items():
            if isinstance(value, bool) or not isinstance(value, (int, float, dict)):
                merged[key] = value
            elif isinstance(value, dict):
                merged[key] = {k: statistics.median(r[op].get(key, value).get(k, v) for r in rounds)
                               for k, v in value.items()}
            else:
                merged[key] = statistics.median(r[op].get(key, value) for r in rounds)
        out[op] = merged
    return out


def _ops(lib: Any, buf: Any, inp: _Inputs, num_sms: int, world: int, args: argparse.Namespace,
         with_outputs: bool) -> tuple[dict[str, Callable[[], Any]], dict, Callable[[], Any]]:
    """The ops of ``lib`` on ``inp`` (each a closure over one layout and one handle), the first outputs of every op
    (when ``with_outputs``) and the forward step with ``step::*`` ranges for the timeline."""
    import torch

    lib.Buffer.set_num_sms(num_sms)
    dcfg, ccfg = lib.Buffer.get_dispatch_config(world), lib.Buffer.get_combine_config(world)
    E = args.num_experts
    x, x_fp8, idx, w = inp.x, inp.x_fp8, inp.topk_idx, inp.topk_weights
    layout = buf.get_dispatch_layout(idx, E)
    per_rank, per_rdma, per_expert, in_rank, _ = layout

    def fresh(xx: Any) -> Any:
        return buf.dispatch(xx, None, per_rank, per_rdma, in_rank, per_expert, idx, w, config=dcfg)

    recv_x, recv_idx, recv_w, counts, handle, _ = fresh(x)

    def fwd() -> Any:
        a, b, c, d, _ = buf.get_dispatch_layout(idx, E)
        rx, _, rw, _, h, _ = buf.dispatch(x, None, a, b, d, c, idx, w, config=dcfg)
        return buf.combine(rx, h, topk_weights=rw, config=ccfg)

    def bwd() -> Any:
        rx = buf.dispatch(x, handle, config=dcfg)[0]
        return buf.combine(rx, handle, config=ccfg)

    def fwd_marked() -> Any:
        from torch.profiler import record_function

        with record_function("step::layout"):
            a, b, c, d, _ = buf.get_dispatch_layout(idx, E)
        with record_function("step::dispatch"):
            rx, _, rw, _, h, _ = buf.dispatch(x, None, a, b, d, c, idx, w, config=dcfg)
        with record_function("step::combine"):
            return buf.combine(rx, h, topk_weights=rw, config=ccfg)

    ops: dict[str, Callable[[], Any]] = {
        "layout": lambda: buf.get_dispatch_layout(idx, E),
        "dispatch_fresh": lambda: fresh(x),
        "dispatch_fresh_fp8": lambda: fresh(x_fp8),
        "dispatch_cached": lambda: buf.dispatch(x, handle, config=dcfg),
        "dispatch_cached_fp8": lambda: buf.dispatch(x_fp8, handle, config=dcfg),
        "combine": lambda: buf.combine(recv_x, handle, topk_weights=recv_w, config=ccfg),
        "fwd_step": fwd,
        "bwd_step": bwd,
    }
    outputs: dict = {}
    if with_outputs:
        recv_fp8 = fresh(x_fp8)
        outputs = {
            "layout": [per_rank, per_expert, in_rank],
            "dispatch_fresh": [recv_x, recv_idx, recv_w, torch.tensor(counts, dtype=torch.int64)],
            "dispatch_fresh_fp8": [recv_fp8[0][0], recv_fp8[0][1], recv_fp8[1], recv_fp8[2],
                                   torch.tensor(recv_fp8[3], dtype=torch.int64)],
            "dispatch_cached": [ops["dispatch_cached"]()[0]],
            "dispatch_cached_fp8": list(ops["dispatch_cached_fp8"]()[0]),
            "combine": list(ops["combine"]()[:2]),
            "fwd_step": list(fwd()[:2]),
        }
        outputs = {k: _clone(v) for k, v in outputs.items()}
    return ops, outputs, fwd_marked


def _measure_times(lib: Any, buf: Any, inp: _Inputs, num_sms: int, world: int, args: argparse.Namespace,
                   barrier: Callable[[], None]) -> tuple[dict, dict]:
    """Time every op of ``lib`` on ``inp`` (runahead, synced, whether it blocks the host); return (metrics, the
    first outputs of every op)."""
    import torch

    from .common import runahead_us

    ops, outputs, _ = _ops(lib, buf, inp, num_sms, world, args, with_outputs=True)
    metrics: dict[str, Any] = {}
    for name, fn in ops.items():
        torch.cuda.synchronize()
        barrier()
        for _ in range(args.warmup):
            fn()
        torch.cuda.synchronize()
        barrier()
        gpu, host = runahead_us(fn, args.iters)
        metrics[name] = {"runahead_us": gpu, "host_us": host,
                         "synced_us": _synced(fn, args.synced_iters, barrier),
                         "blocks_host": _blocks_host(fn, barrier)}
    if args.host_stamps:
        metrics["fwd_step"]["stamps"] = _host_stamps(lib, buf, inp, world, args, barrier)
    return metrics, outputs


def _host_stamps(lib: Any, buf: Any, inp: _Inputs, world: int, args: argparse.Namespace,
                 barrier: Callable[[], None]) -> dict[str, float]:
    """Median host us of each segment of ``args.host_stamps`` forward steps issued back to back (no profiler):
    ``period`` (step start to the next step's start), ``layout``, ``dispatch``, ``combine`` (each call's host time)
    and, for deepep_plugin, the fresh dispatch's parts from its runtime's stamps (runtime.cpp: fresh_stamps):
    ``d_py_pre`` (Python before the C++ call), ``d_pre`` (to notify enqueued), ``d_wait`` (the count read),
    ``d_alloc``, ``d_launch`` (dispatch enqueued), ``d_post`` (to the C++ return), ``d_py_post``. deepep_plugin's
    ``period`` also holds the read of those stamps after each step (one small extension call)."""
    import torch

    n = args.host_stamps
    dcfg, ccfg = lib.Buffer.get_dispatch_config(world), lib.Buffer.get_combine_config(world)
    rt = getattr(getattr(buf, "runtime", None), "intranode", None)
    rt = getattr(rt, "_rt", None)
    x, idx, w, E = inp.x, inp.topk_idx, inp.topk_weights, args.num_experts
    clock = time.perf_counter_ns
    rows: list[list[int]] = []
    torch.cuda.synchronize()
    barrier()
    for _ in range(n + 1):
        t0 = clock()
        a, b, c, d, _ = buf.get_dispatch_layout(idx, E)
        t1 = clock()
        rx, _, rw, _, h, _ = buf.dispatch(x, None, a, b, d, c, idx, w, config=dcfg)
        t2 = clock()
        buf.combine(rx, h, topk_weights=rw, config=ccfg)
        t3 = clock()
        rows.append([t0, t1, t2, t3] + (list(rt.fresh_stamps()) if rt is not None else []))
    torch.cuda.synchronize()
    seg: dict[str, list[float]] = {}

    def put(name: str, ns: int) -> None:
        seg.setdefault(name, []).append(ns / 1e3)

    for i in range(n):
        t0, t1, t2, t3 = rows[i][:4]
        put("period", rows[i + 1][0] - t0)
        put("layout", t1 - t0)
        put("dispatch", t2 - t1)
        put("combine", t3 - t2)
        if rt is not None:
            s = rows[i][4:]
            put("d_py_pre", s[0] - t1)
            for k, name in enumerate(("d_pre", "d_wait", "d_alloc", "d_launch", "d_post")):
                put(name, s[k + 1] - s[k])
            put("d_py_post", t2 - s[5])
    out = {k: statistics.median(v) for k, v in seg.items()}
    # Host us per call of combine and cached dispatch at each layer, calls issued back to back: Buffer (L0) and,
    # for deepep_plugin, its backend (L1) and the extension's call itself (L2: argument conversion, allocation,
    # launch), so the Python layers' share of a call's host time shows beside the C++ part.
    rx, _, rw, _, h, _ = buf.dispatch(x, None, a, b, d, c, idx, w, config=dcfg)
    layers: dict[str, Callable[[], Any]] = {
        "combine_L0": lambda: buf.combine(rx, h, topk_weights=rw, config=ccfg),
        "cached_L0": lambda: buf.dispatch(x, h, config=dcfg),
    }
    if rt is not None:
        be = buf.runtime.intranode
        C, Q, cq = dcfg.num_channels, dcfg.num_max_nvl_chunked_recv_tokens, ccfg.num_max_nvl_chunked_recv_tokens
        layers.update({
            "combine_L1": lambda: be.combine(rx, h, rw, None, None, ccfg),
            "combine_L2": lambda: rt.combine(rx, rw, None, None, h.rank_prefix_matrix, h.channel_prefix_matrix,
                                             h.recv_channel_prefix_matrix, h.send_head, cq, be.timeout_s),
            "cached_L1": lambda: be.dispatch(x, None, h, None, None, None, 1, 0, dcfg),
            "cached_L2": lambda: rt.dispatch_cached(x, None, h.is_token_in_rank, h.rank_prefix_matrix,
                                                    h.recv_channel_prefix_matrix, h.recv_src_idx.size(0), C, Q,
                                                    be.timeout_s),
        })
    for name, fn in layers.items():
        torch.cuda.synchronize()
        barrier()
        times = []
        for _ in range(n):
            t0 = clock()
            fn()
            times.append((clock() - t0) / 1e3)
        out[name] = statistics.median(times)
    torch.cuda.synchronize()
    barrier()
    return out


def _measure_kernels(lib: Any, buf: Any, inp: _Inputs, num_sms: int, world: int, args: argparse.Namespace,
                     barrier: Callable[[], None], trace: bool) -> dict:
    """Under the profiler: per op, kernel time, launches and synchronising calls; with ``trace``, the notify trace
    of the forward step and its timeline file. Run only after every timing of the run: a process that has run the
    profiler keeps CUPTI's callbacks (PyTorch does not tear CUPTI down by default), which slows every later launch."""
    import torch

    ops, _, fwd_marked = _ops(lib, buf, inp, num_sms, world, args, with_outputs=False)
    metrics: dict[str, dict] = {name: {} for name in ops}
    if not args.no_profile:
        try:
            prof = _profile(ops, args.profile_iters, barrier)
        except Exception as e:  # noqa: BLE001 - the profiler is optional (CUPTI may be unavailable)
            print(f"compare: profiler failed ({e}); kernel times left out", flush=True)
            prof = {}
        for name, p in prof.items():
            metrics[name].update(p)
    if args.trace_notify and trace:
        metrics["fwd_step"]["notify_trace"] = _notify_trace(ops["fwd_step"], args.trace_notify, barrier)
    if args.trace_dir and trace:
        tag = f"{lib.__name__}_R{world}_T{inp.x.size(0)}_S{num_sms}_r{torch.distributed.get_rank()}"
        try:
            _step_timeline(fwd_marked, args.trace_notify or 10, barrier, os.path.join(args.trace_dir, tag + ".json"))
        except Exception as e:  # noqa: BLE001 - the profiler is optional (CUPTI may be unavailable)
            print(f"compare: step timeline failed ({e}); none written for {tag}", flush=True)
    return metrics


def _host_syncs(m: dict) -> float:
    """Host syncs per call: the synchronising runtime calls the profiler saw, else one where the call waited."""
    api = m.get("api_syncs")
    return (api if api else 0.0) + (1.0 if m["blocks_host"] and not api else 0.0)


def _fill_row(row: dict, m: dict, timing: str) -> None:
    for op in OPS:
        row[f"{op}_us"] = m[op][f"{timing}_us"]
        row[f"host_{op}_us"] = m[op]["host_us"]
        row[f"syncs_{op}"] = _host_syncs(m[op])
        if "stamps" in m[op]:
            row[f"stamps_{op}"] = m[op]["stamps"]
        if "kernel_us" in m[op]:
            row[f"kernel_{op}_us"] = m[op]["kernel_us"]
            row[f"launches_{op}"] = m[op]["launches"]
            row[f"kernels_{op}"] = m[op]["kernels"]


def _bits_equal(a: Any, b: Any) -> bool:
    import torch

    if a is None or b is None:
        return a is None and b is None
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))


def _close(a: Any, b: Any) -> bool:
    import torch

    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(torch.allclose(a.cpu().float(), b.cpu().float(), rtol=1e-2, atol=1e-2))


def _reference_outputs(inp: _Inputs, world: int, args: argparse.Namespace, ref_buf: Any, num_sms: int) -> dict:
    """The same ops through the reference backend on CPU copies of the inputs (when DeepEP is absent)."""
    import deepep_plugin

    deepep_plugin.Buffer.set_num_sms(num_sms)
    dcfg = deepep_plugin.Buffer.get_dispatch_config(world)
    ccfg = deepep_plugin.Buffer.get_combine_config(world)
    x, idx, w = inp.x.cpu(), inp.topk_idx.cpu(), inp.topk_weights.cpu()
    fp8 = (inp.x_fp8[0].cpu(), inp.x_fp8[1].cpu())
    a, b, c, d, _ = ref_buf.get_dispatch_layout(idx, args.num_experts)
    rx, ri, rw, cnt, h, _ = ref_buf.dispatch(x, None, a, b, d, c, idx, w, config=dcfg)
    f = ref_buf.dispatch(fp8, None, a, b, d, c, idx, w, config=dcfg)
    comb = ref_buf.combine(rx, h, topk_weights=rw, config=ccfg)
    import torch

    return {"layout": [a, c, d], "dispatch_fresh": [rx, ri, rw, torch.tensor(cnt, dtype=torch.int64)],
            "dispatch_fresh_fp8": [f[0][0], f[0][1], f[1], f[2], torch.tensor(f[3], dtype=torch.int64)],
            "dispatch_cached": [rx], "dispatch_cached_fp8": [f[0][0], f[0][1]], "combine": list(comb[:2]),
            "fwd_step": list(comb[:2])}


def _worker(rank: int, world: int, args: argparse.Namespace) -> Optional[list[dict]]:
    import torch
    import torch.distributed as dist

    import deepep_plugin

    from .common import rank_device

    dev = rank_device()
    group = dist.group.WORLD
    os.environ["DEEPEP_PLUGIN_TIMEOUT_S"] = str(args.timeout)
    libs: list[tuple[str, Any]] = [("deepep_plugin", deepep_plugin)]
    if not args.no_deepep:
        try:
            import deep_ep  # type: ignore[import-not-found]

            libs.append(("deep_ep", deep_ep))
        except ImportError:
            pass
    sms_list = [s for s in (int(v) for v in args.sms.split(",")) if _fits(s, world)]
    if not sms_list:
        raise SystemExit(f"compare: none of --sms {args.sms} fits {world} ranks on {torch.cuda.device_count()} "
                         "GPU(s) (every rank's blocks must be resident at once); use fewer SMs")
    hidden_bytes = args.hidden * 2
    buffers = {}
    for name, lib in libs:
        nvl = max(lib.Config(max(sms_list), 24, 256, 6, 128).get_nvl_buffer_size_hint(hidden_bytes, world),
                  lib.Config(max(sms_list), 10, 256, 6, 128).get_nvl_buffer_size_hint(hidden_bytes, world))
        kwargs = {"backend": "cuda"} if name == "deepep_plugin" else {}
        buffers[name] = lib.Buffer(group, nvl, 0, **kwargs)
    ref_buf = None
    if len(libs) == 1:
        cpu_group = dist.new_group(list(range(world)), backend="gloo")
        ref_buf = deepep_plugin.Buffer(cpu_group, buffers["deepep_plugin"].num_nvl_bytes, 0, backend="reference")

    def barrier() -> None:
        dist.barrier(group=group)

    date = datetime.datetime.now().strftime("%Y-%m-%dT%H:%M")
    device = torch.cuda.get_device_name(dev)
    gpus = min(torch.cuda.device_count(), world)
    rows: list[dict] = []
    # Every timing of the run comes first, every profiler pass after: a process that has run the profiler launches
    # more slowly from then on (_measure_kernels), and timing after it would charge that to whichever library is
    # timed later. Inputs are made again for the second pass from the same seeds.
    configs: list[tuple[int, int, dict, list[tuple[str, str, dict]]]] = []
    for tokens in (int(v) for v in args.tokens.split(",")):
        inp = _Inputs(rank, tokens, args, dev)
        for sms in sms_list:
            outputs: dict[str, dict] = {}
            rounds: dict[str, list[dict]] = {name: [] for name, _ in libs}
            for _ in range(args.rounds):  # the libraries take turns, so a slow spell of the machine hits both
                for name, lib in libs:
                    m, out = _measure_times(lib, buffers[name], inp, sms, world, args, barrier)
                    rounds[name].append(m)
                    outputs.setdefault(name, out)
            measured = {name: _median_rounds(ms) for name, ms in rounds.items()}
            if len(libs) > 1:
                oracle, oracle_name = outputs["deep_ep"], "deep_ep"
            else:
                oracle, oracle_name = _reference_outputs(inp, world, args, ref_buf, sms), "reference"
            mine = outputs["deepep_plugin"]
            # Against DeepEP every output is compared bit for bit. Against the reference, sums of more than two
            # copies may round differently (another FP32 order), so combined rows get the BF16 tolerance there.
            loose = ("combine", "fwd_step") if oracle_name == "reference" else ()
            equal_by_op = {op: len(mine[op]) == len(oracle[op]) and all(
                _close(a, b) if op in loose else _bits_equal(a.cpu() if a is not None else None,
                                                            b.cpu() if b is not None else None)
                for a, b in zip(mine[op], oracle[op])) for op in mine}
            config_rows: list[tuple[str, str, dict]] = []
            for name, _ in libs:
                for timing in ("runahead", "synced"):
                    row = {"lib": name, "ranks": world, "gpus": gpus, "tokens": tokens, "hidden": args.hidden,
                           "topk": args.topk, "experts": args.num_experts, "num_sms": sms, "timing": timing,
                           "device": device, "date": date, "rank": rank}
                    _fill_row(row, measured[name], timing)
                    if name == "deepep_plugin":
                        row["outputs_equal"] = all(equal_by_op.values())
                        row["outputs_equal_by_op"] = equal_by_op
                        row["compared_with"] = oracle_name
                    rows.append(row)
                    config_rows.append((name, timing, row))
            configs.append((tokens, sms, measured, config_rows))
            # Every configuration's merged rows also go to a JSON-lines file at once, so a run cut short (a time
            # limit) keeps what it measured: `<--json>.partial`, one {"rows": [...]} per configuration (times
            # only: kernel times come in the profiler pass after all of them).
            fresh_rows: list[Any] = [None] * world
            dist.all_gather_object(fresh_rows, [row for _, _, row in config_rows])
            if args.host_stamps:
                for name, _ in libs:
                    st = measured[name]["fwd_step"].get("stamps", {})
                    print(f"host-stamps R={world} T={tokens} SMs={sms} {name} rank {rank}: "
                          + "  ".join(f"{k} {v:.1f}" for k, v in st.items()), flush=True)
            if rank == 0:
                print(_progress_line(world, tokens, sms, measured), flush=True)
                with open(args.json + ".partial", "a") as f:
                    f.write(json.dumps({"rows": _merge_ranks(fresh_rows)}) + "\n")
            del outputs, mine, oracle
            torch.cuda.empty_cache()
        del inp
    if not args.no_profile or args.trace_notify or args.trace_dir:
        inputs: dict[int, _Inputs] = {}
        for tokens, sms, measured, config_rows in configs:
            if tokens not in inputs:
                inputs.clear()
                inputs[tokens] = _Inputs(rank, tokens, args, dev)
            kernel_rounds: dict[str, list[dict]] = {name: [] for name, _ in libs}
            for r in range(args.rounds):
                for name, lib in libs:
                    kernel_rounds[name].append(_measure_kernels(lib, buffers[name], inputs[tokens], sms, world,
                                                                args, barrier, trace=r == 0))
            for name, _ in libs:
                for op, m in _median_rounds(kernel_rounds[name]).items():
                    measured[name][op].update(m)
                if args.trace_notify:
                    traces: list[Any] = [None] * world
                    dist.all_gather_object(traces, measured[name]["fwd_step"].pop("notify_trace", []))
                    if rank == 0:
                        skew = notify_skew(traces)
                        print(f"notify-trace R={world} T={tokens} SMs={sms} {name}: " +
                              "  ".join(f"{k} {v:.1f}" for k, v in skew.items()), flush=True)
            for name, timing, row in config_rows:
                _fill_row(row, measured[name], timing)
            torch.cuda.empty_cache()
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, rows)
    barrier()
    return _merge_ranks(gathered) if rank == 0 else None


def _fits(num_sms: int, world: int) -> bool:
    """Whether every rank's normal-kernel blocks can be resident together on the GPUs there are."""
    import torch

    return _fits_count(num_sms, world, max(torch.cuda.device_count(), 1),
                       torch.cuda.get_device_properties(0).multi_processor_count)


def _fits_count(num_sms: int, world: int, gpus: int, sms_per_gpu: int) -> bool:
    """``num_sms`` blocks (one 1024-thread block per SM) for each of the ranks sharing a GPU fit on it, with a few
    SMs to spare; one rank per GPU always fits. Kernels whose blocks cannot all be resident would wait forever."""
    ranks_per_gpu = -(-world // gpus)
    return ranks_per_gpu == 1 or ranks_per_gpu * num_sms <= sms_per_gpu - _MIN_SLACK_SMS


def _progress_line(world: int, tokens: int, sms: int, measured: dict) -> str:
    parts = [f"R={world} T={tokens} SMs={sms}"]
    for op in ("fwd_step", "bwd_step", "dispatch_cached", "dispatch_cached_fp8", "combine"):
        mine = measured["deepep_plugin"][op]["runahead_us"]
        if "deep_ep" in measured:
            theirs = measured["deep_ep"][op]["runahead_us"]
            parts.append(f"{op} {mine:.0f}/{theirs:.0f}us ({mine / theirs:.2f}x)")
        else:
            parts.append(f"{op} {mine:.0f}us")
    return "  ".join(parts)


def _merge_ranks(gathered: list[list[dict]]) -> list[dict]:
    """One row per (lib, configuration, timing): times are the slowest rank's, host costs the mean of ranks."""
    merged: dict[tuple, dict] = {}
    for rank_rows in gathered:
        for row in rank_rows:
            key = (row["lib"], row["ranks"], row["tokens"], row["num_sms"], row["timing"])
            if key not in merged:
                merged[key] = {k: v for k, v in row.items() if k != "rank"}
                merged[key]["_n"] = 1
                continue
            m = merged[key]
            m["_n"] += 1
            for k, v in row.items():
                if k.startswith("host_"):
                    m[k] += v
                elif k.endswith("_us") and not k.startswith("kernels_"):
                    m[k] = max(m[k], v)
                elif k.startswith("syncs_") or k.startswith("launches_"):
                    m[k] = max(m[k], v)
                elif k == "outputs_equal":
                    m[k] = m[k] and v
                elif k == "outputs_equal_by_op":
                    m[k] = {op: m[k][op] and v[op] for op in m[k]}
    out = []
    for m in merged.values():
        n = m.pop("_n")
        for k in list(m):
            if k.startswith("host_"):
                m[k] /= n
        out.append(m)
    return out


# ----------------------------------------------------------------------------------------------------------
# MPS and the driver
# ----------------------------------------------------------------------------------------------------------
def _gpu_count() -> int:
    """GPUs on this machine without creating a CUDA context here (MPS may start after this)."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
        return sum(1 for line in out.splitlines() if line.startswith("GPU "))
    except (OSError, subprocess.SubprocessError):
        return 0


class _Mps:
    """Start the MPS control daemon for the run when ranks share a GPU and none is running; stop it after."""

    def __init__(self) -> None:
        self.started = False
        self.pipe: Optional[str] = None

    def _running(self) -> bool:
        try:
            r = subprocess.run(["nvidia-cuda-mps-control"], input="get_server_list\n", capture_output=True,
                               text=True, timeout=10)
            return r.returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False

    def start(self) -> None:
        if shutil.which("nvidia-cuda-mps-control") is None:
            print("compare: nvidia-cuda-mps-control not found; ranks sharing a GPU run time-sliced", flush=True)
            return
        if os.environ.get("CUDA_MPS_PIPE_DIRECTORY") and self._running():
            print("compare: using the running MPS daemon", flush=True)
            return
        self.pipe = tempfile.mkdtemp(prefix="mps_pipe_")
        log = tempfile.mkdtemp(prefix="mps_log_")
        os.environ.update(CUDA_MPS_PIPE_DIRECTORY=self.pipe, CUDA_MPS_LOG_DIRECTORY=log)
        r = subprocess.run(["nvidia-cuda-mps-control", "-d"], capture_output=True, text=True)
        self.started = r.returncode == 0
        print(f"compare: MPS daemon {'started' if self.started else 'failed to start: ' + r.stderr}", flush=True)

    def stop(self) -> None:
        if self.started:
            subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", capture_output=True, text=True)
            self.started = False
            print("compare: MPS daemon stopped", flush=True)


# ----------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------
def _pair(rows: list[dict], ranks: int, tokens: int, sms: int, timing: str) -> tuple[Optional[dict], Optional[dict]]:
    find = {r["lib"]: r for r in rows if (r["ranks"], r["tokens"], r["num_sms"], r["timing"]) ==
            (ranks, tokens, sms, timing)}
    return find.get("deepep_plugin"), find.get("deep_ep")


def markdown(rows: list[dict], command: str) -> str:
    """The RESULTS.md section: per rank count, runahead times and ratios (plugin / DeepEP) at every SM count."""
    if not rows:
        return ""
    r0 = rows[0]
    lines = [f"## deepep_plugin beside DeepEP V1, intranode, {r0['device']} ({r0['date']})", "",
             f"Command: `{command}`. Hidden {r0['hidden']}, top-{r0['topk']} of {r0['experts']} experts, "
             f"{r0['gpus']} GPU(s); CUDA events around calls issued back to back (runahead); ratio = "
             "deepep_plugin / DeepEP (below 1: faster); host = us of host time per call; times are the slowest "
             "rank's. Machine-readable: `benchmarks/results/intranode_vs_deepep.json`.", ""]
    for ranks in sorted({r["ranks"] for r in rows}):
        lines += [f"### {ranks} ranks", "",
                  "| tokens | SMs | fwd step us (ratio) | bwd step us (ratio) | fresh disp. | cached disp. | "
                  "cached FP8 | combine | layout | host cached / combine us (DeepEP) | equal |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for tokens in sorted({r["tokens"] for r in rows if r["ranks"] == ranks}):
            for sms in sorted({r["num_sms"] for r in rows if r["ranks"] == ranks}):
                mine, theirs = _pair(rows, ranks, tokens, sms, "runahead")
                if mine is None:
                    continue

                def cell(op: str, mine: dict = mine, theirs: Optional[dict] = theirs) -> str:
                    v = mine[f"{op}_us"]
                    if theirs is None:
                        return f"{v:.0f}"
                    return f"{v:.0f} ({v / theirs[f'{op}_us']:.2f}x)"

                host = f"{mine['host_dispatch_cached_us']:.0f} / {mine['host_combine_us']:.0f}"
                if theirs is not None:
                    host += f" ({theirs['host_dispatch_cached_us']:.0f} / {theirs['host_combine_us']:.0f})"
                lines.append(f"| {tokens} | {sms} | {cell('fwd_step')} | {cell('bwd_step')} | "
                             f"{cell('dispatch_fresh')} | {cell('dispatch_cached')} | {cell('dispatch_cached_fp8')} | "
                             f"{cell('combine')} | {cell('layout')} | {host} | {mine['outputs_equal']} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    """Forward- and backward-step time against tokens, both libraries, at the largest SM count of each EP size."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("compare: matplotlib missing, no plot", flush=True)
        return
    rank_list = sorted({r["ranks"] for r in rows})
    fig, axes = plt.subplots(1, len(rank_list), figsize=(6 * len(rank_list), 4.5), squeeze=False)
    for ax, ranks in zip(axes[0], rank_list):
        sms = max(r["num_sms"] for r in rows if r["ranks"] == ranks)
        for lib, style in (("deepep_plugin", "-o"), ("deep_ep", "--s")):
            for op in ("fwd_step", "bwd_step"):
                pts = sorted((r["tokens"], r[f"{op}_us"]) for r in rows if r["lib"] == lib and r["ranks"] == ranks
                             and r["num_sms"] == sms and r["timing"] == "runahead")
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{lib} {op}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens per rank")
        ax.set_ylabel("us per step (runahead)")
        ax.set_title(f"{ranks} ranks, {sms} SMs")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str]) -> None:
    args = _parse(argv)
    from .common import spawn_ranks

    gpus = _gpu_count()
    if gpus == 0:
        raise SystemExit("compare: needs CUDA GPUs (nvidia-smi lists none)")
    mps = _Mps()
    rows: list[dict] = []
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    if os.path.exists(args.json + ".partial"):
        os.remove(args.json + ".partial")
    try:
        rank_list = [int(v) for v in args.ranks.split(",")]
        if any(r > gpus for r in rank_list):
            mps.start()
        for world in rank_list:
            rows += spawn_ranks(_worker, world, args, "compare")
    finally:
        mps.stop()
    command = args.command or "python -m deepep_plugin.bench compare " + " ".join(argv)
    with open(args.json, "w") as f:
        json.dump({"command": command, "rows": rows}, f, indent=1)
    if os.path.exists(args.json + ".partial"):
        os.remove(args.json + ".partial")
    plot(rows, args.plot)
    section = markdown(rows, command)
    print(section)
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + section)
    print(f"compare: {len(rows)} rows -> {args.json}, plot {args.plot}", flush=True)
