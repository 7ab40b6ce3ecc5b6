"""A pool of GPU worker processes that stay alive across tests (the low-latency GPU tests' harness).

Starting a process, its CUDA context and its NVSHMEM world takes seconds; the pool starts ``world_size`` spawned
workers once (each joins a gloo process group and shares GPU ``rank % device_count``), and each test then asks
every worker to run one module-level function of ``ll_cases`` by name: ``pool.run("case_name", *args)``. A
worker failure is re-raised in the test with its traceback; a worker that does not answer in time fails the test
and the pool (its later tests fail at once instead of hanging).
"""

from __future__ import annotations

import os
import queue
import traceback
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dist_utils import free_port


def _worker(rank: int, world_size: int, port: int, commands: Any, results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        import ll_cases
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, traceback.format_exc()))
        return
    results.put((rank, None))
    while True:
        item = commands.get()
        if item is None:
            break
        name, args = item
        try:
            getattr(ll_cases, name)(rank, world_size, *args)
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
        port = free_port()
        self.procs = [ctx.Process(target=_worker, args=(r, world_size, port, self.commands[r], self.results))
                      for r in range(world_size)]
        for p in self.procs:
            p.start()
        self.broken = ""
        self._collect("start", start_timeout)

    def _collect(self, what: str, timeout: float) -> None:
        failures, answered = [], 0
        while answered < self.world_size:
            try:
                rank, tb = self.results.get(timeout=timeout)
            except queue.Empty:
                self.broken = f"{what}: {self.world_size - answered} worker(s) did not answer within {timeout} s"
                self.close(force=True)
                raise AssertionError(self.broken) from None
            answered += 1
            if tb is not None:
                failures.append((rank, tb))
        if failures:
            rank, tb = sorted(failures)[0]
            raise AssertionError(f"{what}: rank {rank} of {self.world_size} failed:\n{tb}")

    def run(self, name: str, *args: Any, timeout: float = 120.0) -> None:
        if self.broken:
            raise AssertionError(f"worker pool unusable since: {self.broken}")
        for q in self.commands:
            q.put((name, args))
        self._collect(name, timeout)

    def close(self, force: bool = False) -> None:
        if not force:
            for q in self.commands:
                q.put(None)
            for p in self.procs:
                p.join(timeout=30)
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join()
