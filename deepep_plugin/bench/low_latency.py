"""``python -m deepep_plugin.bench low-latency``: latency of the low-latency kernels.

Starts ``--ranks`` processes (ranks share the GPUs there are, round robin), each with a low-latency runtime, and
for every token count (1..256 per rank, ``N_ll`` = the token count) measures, as the median of CUDA-event timings
after warm-up, with all ranks aligned by a barrier before each sample:

* ``dispatch`` (FP8 cast in the kernel), ``combine`` (BF16, weighted), ``dispatch+combine``;
* the same split by the receive hook: ``send`` (dispatch or combine with ``return_recv_hook=True``) and ``recv``
  (the hook, called once every rank's send has finished, so it measures the receive work, not the wait);
* ``host dispatch`` / ``host combine``: host microseconds inside one call (send and receive launched, nothing
  waited for; the calls make no host read).

Routing: top-``K`` of ``E`` experts uniformly at random (DeepSeek-V3 decoding shape by default: hidden 7168,
top-8 of 288). Prints one table (microseconds; the slowest rank's median) and writes it as JSON with ``--json``.
When ranks share one GPU, the GPU time-slices between their processes and the numbers measure that, not the
kernels: ``--turns`` then times each rank's send and receive kernels while the other ranks are idle (dispatch is
reported as send + recv, so without the overlap of the transfer). Run one rank per GPU for real figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Callable

import torch
import torch.distributed as dist

from .. import spawn
from .common import host_us, rank_device

DEFAULT_TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
COLUMNS = ["dispatch", "combine", "dispatch+combine", "dispatch send", "dispatch recv", "combine send",
           "combine recv", "host dispatch", "host combine"]


def _median_us(fn: Callable[[], None], iters: int, warmup: int, after_start: Callable[[], None] | None = None,
               prepare: Callable[[], None] | None = None) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for i in range(warmup + iters):
        if prepare is not None:
            prepare()
        torch.cuda.synchronize()
        dist.barrier()
        start.record()
        fn()
        end.record()
        if after_start is not None:
            after_start()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) * 1000.0)
    return statistics.median(times)


def _measure(rt, t: int, args: argparse.Namespace, gen: torch.Generator) -> dict:
    """Medians (us) of every column for ``t`` tokens per rank."""
    x = torch.randn(t, args.hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
    scores = torch.rand(t, args.experts, device="cuda", generator=gen)
    idx = scores.topk(args.topk, dim=1).indices
    w = torch.rand(t, args.topk, device="cuda", generator=gen)
    kw = dict(cumulative_local_expert_recv_stats=None, dispatch_wait_recv_cost_stats=None, use_fp8=True,
              round_scale=False, use_ue8m0=False)
    state: dict = {}

    def dispatch(hook: bool = False) -> None:
        state["d"] = rt.low_latency_dispatch(x, idx, t, args.experts, return_recv_hook=hook, **kw)

    def combine(hook: bool = False) -> None:
        d = state["d"]
        state["y"] = state.get("y") if state.get("y") is not None else torch.randn(
            d.recv_x.shape, device="cuda").to(torch.bfloat16)
        state["c"] = rt.low_latency_combine(state["y"], idx, w, d.handle, zero_copy=False, return_recv_hook=hook,
                                            out=None, combine_wait_recv_cost_stats=None)

    def both() -> None:
        dispatch()
        combine()

    def peers_sent() -> None:  # every rank's send kernel has finished
        torch.cuda.synchronize()
        dist.barrier()

    def in_turns(fn: Callable[[], None], then: Callable[[], None], prepare: Callable[[], None] | None = None) -> float:
        """Median of ``fn`` timed while the other ranks' kernels are idle (they take turns); ``then`` finishes
        the operation afterwards on all ranks together."""
        times = []
        for i in range(args.warmup + args.iters):
            if prepare is not None:
                prepare()
            for turn in range(dist.get_world_size()):
                torch.cuda.synchronize()
                dist.barrier()
                if turn == dist.get_rank():
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    end.synchronize()
                    if i >= args.warmup:
                        times.append(start.elapsed_time(end) * 1000.0)
            then()
            torch.cuda.synchronize()
        return statistics.median(times)

    row = {}
    # Host microseconds inside one runtime call (send + receive launched, nothing waited for), ranks in step.
    row["host dispatch"] = host_us(dispatch, 1, args.iters, before=peers_sent)
    row["host combine"] = host_us(combine, 1, args.iters, before=peers_sent)
    if args.turns:
        row["dispatch send"] = in_turns(lambda: dispatch(True), lambda: state["d"].hook())
        row["dispatch recv"] = in_turns(lambda: state["d"].hook(), lambda: None,
                                        prepare=lambda: (dispatch(True), peers_sent()))
        dispatch()
        row["combine send"] = in_turns(lambda: combine(True), lambda: state["c"][1]())
        row["combine recv"] = in_turns(lambda: state["c"][1](), lambda: None,
                                       prepare=lambda: (combine(True), peers_sent()))
        row["dispatch"] = row["dispatch send"] + row["dispatch recv"]
        row["combine"] = row["combine send"] + row["combine recv"]
        row["dispatch+combine"] = row["dispatch"] + row["combine"]
        return row
    row["dispatch"] = _median_us(dispatch, args.iters, args.warmup)
    row["combine"] = _median_us(combine, args.iters, args.warmup)
    row["dispatch+combine"] = _median_us(both, args.iters, args.warmup)
    row["dispatch send"] = _median_us(lambda: dispatch(True), args.iters, args.warmup,
                                      after_start=lambda: (peers_sent(), state["d"].hook()))
    row["dispatch recv"] = _median_us(lambda: state["d"].hook(), args.iters, args.warmup,
                                      prepare=lambda: (dispatch(True), peers_sent()))
    dispatch()
    row["combine send"] = _median_us(lambda: combine(True), args.iters, args.warmup,
                                     after_start=lambda: (peers_sent(), state["c"][1]()))
    row["combine recv"] = _median_us(lambda: state["c"][1](), args.iters, args.warmup,
                                     prepare=lambda: (combine(True), peers_sent()))
    return row


def _worker(rank: int, world: int, args: argparse.Namespace) -> dict:
    """One rank (GPU and gloo group set up by the spawn helper): its medians, per token count."""
    from ..backends.cuda_low_latency import LowLatencyRuntime, required_rdma_bytes

    max_tokens = max(args.tokens)
    num_bytes = required_rdma_bytes(max_tokens, args.hidden, world, args.experts)
    rt = LowLatencyRuntime(dist.group.WORLD, rank, world, num_bytes, rank_device(), 30.0, 24, True)
    table = {}
    gen = torch.Generator(device="cuda").manual_seed(rank)
    for t in args.tokens:
        table[t] = _measure(rt, t, args, gen)
        rt.check_error()
    rt.destroy()
    return table


def main(argv: list[str]) -> None:
    """Run the benchmark; ``argv`` are the command-line arguments after ``low-latency``."""
    p = argparse.ArgumentParser(prog="python -m deepep_plugin.bench low-latency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--experts", type=int, default=288)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--tokens", type=int, nargs="+", default=DEFAULT_TOKENS)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", type=str, default="")
    p.add_argument("--turns", action="store_true",
                   help="time each rank's send and receive kernels while the other ranks are idle (for ranks that "
                        "share a GPU); dispatch = send + recv, without the transfer overlap")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("low-latency benchmark: CUDA is not available")
    from ..backends.cuda_low_latency import _extension

    _extension()  # fail early if the kernels are not built
    try:
        results = spawn.run(_worker, args.ranks, (args,), backend="gloo", gpus=True, start_method="spawn",
                            timeout=1800)
    except spawn.RankError as e:
        raise SystemExit(f"low-latency benchmark: {e}") from None
    tables = dict(enumerate(results))
    shared = args.ranks > torch.cuda.device_count() and not args.turns
    mode = " [kernels timed in turns: dispatch = send + recv]" if args.turns else ""
    print(f"low-latency: {args.ranks} ranks on {torch.cuda.device_count()} GPU(s) ({torch.cuda.get_device_name()}), "
          f"hidden {args.hidden}, top-{args.topk} of {args.experts} experts, FP8 dispatch, BF16 combine; "
          "median us, slowest rank" + (" [ranks share a GPU: time-sliced, not kernel figures]" if shared else "")
          + mode)
    print(f"{'tokens':>7} " + " ".join(f"{c:>17}" for c in COLUMNS))
    result = {}
    for t in args.tokens:
        row = {c: max(tables[r][t][c] for r in tables) for c in COLUMNS}
        result[t] = row
        print(f"{t:>7} " + " ".join(f"{row[c]:>17.1f}" for c in COLUMNS))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ranks": args.ranks, "hidden": args.hidden, "experts": args.experts, "topk": args.topk,
                       "shared_gpu": shared, "turns": args.turns, "us": result, "per_rank": tables}, f, indent=1)
