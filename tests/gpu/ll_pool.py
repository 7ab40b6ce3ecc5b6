"""A pool of GPU worker processes that stay alive across tests (the low-latency GPU tests' harness).

Starting a process, its CUDA context and its NVSHMEM world takes seconds; the pool starts ``world_size`` ranks
once through :func:`deepep_plugin.spawn.start` (spawned, one gloo group, GPU ``rank % device_count``), and each
test then asks every rank to run one module-level function of ``ll_cases`` by name:
``pool.run("case_name", seed=1, ...)``, checked against the function's signature before it is sent. A worker
failure is re-raised in the test with its traceback; a worker that does not answer in time, or dies, fails the
test and the pool (its later tests fail at once instead of hanging).
"""

from __future__ import annotations

import inspect
import queue
import time
import traceback
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

from deepep_plugin import spawn


def _serve(rank: int, world_size: int, commands: Any, results: Any) -> None:
    """One rank: import the cases, then run ``(name, args, kwargs)`` commands from its queue (``commands[rank]``)
    until ``None`` comes."""
    commands = commands[rank]
    try:
        import ll_cases
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, traceback.format_exc()))
        return
    results.put((rank, None))
    while True:
        item = commands.get()
        if item is None:
            break
        name, args, kwargs = item
        try:
            getattr(ll_cases, name)(rank, world_size, *args, **kwargs)
            results.put((rank, None))
        except BaseException:  # noqa: BLE001
            results.put((rank, traceback.format_exc()))
    try:
        ll_cases.shutdown(rank, world_size)
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001
        pass


class WorkerPool:
    def __init__(self, world_size: int, start_timeout: float = 180.0) -> None:
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.commands = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        self.broken = ""
        self.ranks = spawn.start(_serve, world_size, (self.commands, self.results), backend="gloo", gpus=True,
                                 threads=1, start_method="spawn")
        self._collect("start", start_timeout)

    def _fail(self, message: str) -> None:
        self.broken = message
        self.close(force=True)
        raise AssertionError(message)

    def _collect(self, what: str, timeout: float) -> None:
        failures, answered = [], 0
        deadline = time.monotonic() + timeout
        while answered < self.world_size:
            try:
                rank, tb = self.results.get(timeout=0.5)
            except queue.Empty:
                try:
                    self.ranks.check()  # a rank that died (or failed outside a case) will never answer
                except spawn.RankError as e:
                    self._fail(f"{what}: {e}")
                if time.monotonic() > deadline:
                    self._fail(f"{what}: {self.world_size - answered} worker(s) did not answer within {timeout} s")
                continue
            answered += 1
            if tb is not None:
                failures.append((rank, tb))
        if failures:
            rank, tb = sorted(failures)[0]
            raise AssertionError(f"{what}: rank {rank} of {self.world_size} failed:\n{tb}")

    def run(self, name: str, *args: Any, timeout: float = 120.0, **kwargs: Any) -> None:
        """Run ``ll_cases.<name>(rank, world_size, *args, **kwargs)`` on every rank; raise on any failure."""
        if self.broken:
            raise AssertionError(f"worker pool unusable since: {self.broken}")
        import ll_cases

        inspect.signature(getattr(ll_cases, name)).bind(0, self.world_size, *args, **kwargs)
        for q in self.commands:
            q.put((name, args, kwargs))
        self._collect(name, timeout)

    def close(self, force: bool = False) -> None:
        if not force:
            for q in self.commands:
                q.put(None)
            try:
                self.ranks.wait(timeout=30)
            except spawn.RankError:
                pass
        self.ranks.kill()
