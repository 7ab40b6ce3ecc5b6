"""What the benchmarks share: CUDA-event timing and one spawned process per rank (:mod:`deepep_plugin.spawn`)."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Optional

import torch

from .. import spawn


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


def spawn_ranks(worker: Callable[..., Any], world: int, args: Any, name: str, timeout: Optional[float] = None) -> Any:
    """Run ``worker(rank, world, args)`` on ``world`` spawned ranks (one gloo group, GPU ``rank % GPUs``: ranks may
    share GPUs) and return what rank 0 returned.

    Raises ``SystemExit`` naming the benchmark, with the failed rank's traceback, when a rank fails or does not
    finish within ``timeout`` seconds, or when rank 0 returns nothing.
    """
    try:
        results = spawn.run(worker, world, (args,), backend="gloo", gpus=True, start_method="spawn", timeout=timeout)
    except spawn.RankError as e:
        raise SystemExit(f"{name} benchmark: {e}") from None
    if results[0] is None:
        raise SystemExit(f"{name} benchmark: rank 0 returned no result")
    return results[0]


def rank_device() -> torch.device:
    """In a rank started by :func:`spawn_ranks`: its GPU."""
    return torch.device("cuda", torch.cuda.current_device())


def runahead_us(fn: Callable[[], Any], iters: int) -> tuple[float, float]:
    """(median GPU us between CUDA events around each call, median host us per call), ``iters`` calls issued back
    to back so the host runs ahead of the GPU where it can (DeepEP's own tests time this way)."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    host = []
    for i in range(iters):
        starts[i].record()
        t0 = time.perf_counter()
        fn()
        host.append(time.perf_counter() - t0)
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)), statistics.median(host) * 1e6
