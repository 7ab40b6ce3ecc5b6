"""Run a function on several processes that form a ``torch.distributed`` group (the tests' harness).

``run_distributed(fn, world_size, *args)`` starts ``world_size`` processes, each calling
``fn(rank, world_size, *args)`` after ``init_process_group`` (gloo by default), and re-raises in the caller the
first worker failure with its traceback. Workers that do not finish within ``timeout`` seconds are killed and the
test fails (a hang is reported, never waited out). CPU tests fork (fast); GPU tests must pass
``start_method="spawn"`` (CUDA cannot be used after fork).
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, backend: str, fn: Callable[..., Any], args: tuple,
            errors: Any) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        fn(rank, world_size, *args)
    except BaseException:  # noqa: BLE001 - reported to the parent
        errors.put((rank, traceback.format_exc()))
        os._exit(1)
    try:
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001
        errors.put((rank, traceback.format_exc()))
        os._exit(1)


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo",
                    start_method: str | None = None, timeout: float = 240.0) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; raise if any of them fails or hangs.

    ``start_method`` defaults to fork, or spawn once CUDA is initialised in this process (fork would break it).
    """
    if start_method is None:
        start_method = "spawn" if torch.cuda.is_initialized() else "fork"
    ctx = mp.get_context(start_method)
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, backend, fn, args, errors), daemon=False)
             for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    failed: list[tuple[int, str]] = []
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline and errors.empty():
        time.sleep(0.02)
    if not errors.empty():
        time.sleep(0.5)  # let the other ranks report their own failure, if any
    while not errors.empty():
        failed.append(errors.get())
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    if failed:
        rank, tb = failed[0]
        raise AssertionError(f"rank {rank} of {world_size} failed:\n{tb}")
    if hung:
        raise AssertionError(f"ranks {hung} of {world_size} did not finish within {timeout} s")
    bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise AssertionError(f"workers exited with non-zero codes (rank, code): {bad}")
