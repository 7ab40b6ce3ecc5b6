"""What the benchmarks share: CUDA-event timing, a free local port, and one spawned process per rank."""

from __future__ import annotations

import os
import socket
import statistics
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _median_of(timed: Callable[[], float], fn: Callable[[], Any], warmup: int, iters: int,
               before: Optional[Callable[[], Any]]) -> float:
    """Median of ``timed()`` (one timed call of ``fn``) over ``iters`` samples after ``warmup`` plain calls;
    ``before`` runs ahead of every sample, untimed."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if before is not None:
            before()
        times.append(timed())
    return statistics.median(times)


def median_ms(fn: Callable[[], Any], warmup: int, iters: int, before: Optional[Callable[[], Any]] = None) -> float:
    """Median milliseconds of ``fn`` between two CUDA events on the current stream, after ``warmup`` calls.

    ``before`` (e.g. a barrier) runs ahead of every timed call, outside the timed region.
    """
    def timed() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    return _median_of(timed, fn, warmup, iters, before)


def host_us(fn: Callable[[], Any], warmup: int, iters: int, before: Optional[Callable[[], Any]] = None) -> float:
    """Median host microseconds spent inside one call of ``fn`` (the Python call's wall time; work it enqueues
    on the GPU is not waited for), after ``warmup`` calls; ``before`` runs ahead of each call, untimed."""
    import time

    def timed() -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6

    result = _median_of(timed, fn, warmup, iters, before)
    torch.cuda.synchronize()
    return result


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker: Callable[..., None], world: int, args: Any, name: str) -> Any:
    """Run ``worker(rank, world, port, args, queue)`` in ``world`` spawned processes; return what rank 0 puts.

    Raises ``SystemExit`` naming the benchmark when a process fails or rank 0 reports nothing.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs) or queue.empty():
        raise SystemExit(f"{name} benchmark: a worker failed (exit codes {[p.exitcode for p in procs]})")
    return queue.get()


def init_rank(rank: int, world: int, port: int) -> torch.device:
    """In a spawned rank: join the gloo group on 127.0.0.1:``port`` and take GPU ``rank % GPUs`` (ranks may share)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group("gloo", rank=rank, world_size=world)
    return torch.device("cuda", torch.cuda.current_device())
