"""Start the ranks of a one-host ``torch.distributed`` job, one process per rank (tests, benchmarks, examples).

    results = spawn.run(fn, 4, args=(cfg,))          # [fn(0, 4, cfg), fn(1, 4, cfg), ...], in rank order

Every process gets ``MASTER_ADDR``/``MASTER_PORT`` (127.0.0.1 and a free port), ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``, then ``env`` (a mapping, or a function of the rank returning one). With ``gpus=True`` it makes GPU
``rank % device_count`` current (ranks share the GPUs there are). With ``backend`` (``"gloo"`` or ``"nccl"``) it
joins the default process group before ``fn(rank, world_size, *args, **kwargs)`` runs and leaves it (barrier,
destroy) after ``fn`` returns, unless ``fn`` already did; ``backend=None`` leaves the group to ``fn``.

What ``fn`` returns comes back to the caller, pickled (so plain values, not tensors shared between processes).
A rank that raises makes :func:`run` raise :class:`RankError` naming the rank, with the child's traceback; the
other ranks get ``grace`` seconds to report their own failure and are then killed (they are usually stuck in a
collective with the failed rank). ``timeout`` bounds the whole run: ranks still running then are killed and named.
A rank that dies without a word (a signal, ``os._exit``) is reported with its exit code.

The start method is ``fork`` unless this process has initialised CUDA (a forked child cannot use it), then
``spawn``; ``spawn`` needs ``fn`` and its arguments to be picklable (module-level functions).
"""

from __future__ import annotations

import inspect
import os
import pickle
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["RankError", "Ranks", "free_port", "run", "start"]

Env = Union[Mapping[str, str], Callable[[int], Mapping[str, str]], None]


class RankError(RuntimeError):
    """A rank failed, died or did not finish in time; ``rank`` is the first failed rank (``None`` for a timeout)
    and ``child_traceback`` its traceback (``""`` when it left none)."""

    def __init__(self, message: str, rank: Optional[int] = None, child_traceback: str = "") -> None:
        super().__init__(message)
        self.rank = rank
        self.child_traceback = child_traceback


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for ``MASTER_PORT``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class _Launch:
    """What every child needs besides ``fn`` and its arguments."""

    world_size: int
    port: int
    backend: Optional[str]
    gpus: bool
    threads: Optional[int]
    env: Env


def _child(rank: int, launch: _Launch, fn: Callable[..., Any], args: tuple, kwargs: dict, reports: Any) -> None:
    """Body of one rank: environment, device, process group, ``fn``; one report ``(rank, ok, payload)``."""
    world = launch.world_size
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(launch.port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    try:
        extra = launch.env(rank) if callable(launch.env) else launch.env
        os.environ.update({k: str(v) for k, v in (extra or {}).items()})
        if launch.threads is not None:
            torch.set_num_threads(launch.threads)
        device_id = None
        if launch.gpus:
            torch.cuda.set_device(rank % torch.cuda.device_count())
            device_id = torch.device("cuda", torch.cuda.current_device())
        if launch.backend is not None:
            extra_init = {"device_id": device_id} if launch.backend == "nccl" and device_id is not None else {}
            dist.init_process_group(launch.backend, rank=rank, world_size=world, **extra_init)
        value = fn(rank, world, *args, **kwargs)
        if launch.backend is not None and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        reports.put((rank, True, pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - everything, SystemExit included, goes to the parent
        reports.put((rank, False, traceback.format_exc()))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # not a normal exit: peers may be gone, and tearing down a process group could hang


class Ranks:
    """The processes of one :func:`start`; :meth:`wait` collects their results."""

    def __init__(self, procs: Sequence[Any], reports: Any) -> None:
        self.procs = list(procs)
        self.world_size = len(self.procs)
        self._reports = reports
        self._results: dict[int, Any] = {}
        self._failures: list[tuple[int, str]] = []

    def _drain(self) -> None:
        while not self._reports.empty():
            rank, ok, payload = self._reports.get()
            if ok:
                self._results[rank] = pickle.loads(payload)
            else:
                self._failures.append((rank, payload))

    def _poll(self) -> bool:
        """Take in the reports; note ranks that exited without one; True when every process has exited."""
        exited = {r: p.exitcode for r, p in enumerate(self.procs) if p.exitcode is not None}
        self._drain()  # after reading the exit codes: a rank seen exited has its report in the queue by now
        reported = set(self._results) | {r for r, _ in self._failures}
        for r, code in exited.items():
            if r not in reported:
                how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                self._failures.append((r, f"{how} before reporting (its stderr may say why)\n"))
        return len(exited) == self.world_size

    def _error(self) -> Optional[RankError]:
        if not self._failures:
            return None
        rank, tb = self._failures[0]
        others = sorted({r for r, _ in self._failures[1:]} - {rank})
        also = f" (ranks {others} failed too)" if others else ""
        return RankError(f"rank {rank} of {self.world_size} failed{also}:\n{tb}", rank, tb)

    def check(self) -> None:
        """Raise :class:`RankError` now if a rank has failed or died; never waits."""
        self._poll()
        error = self._error()
        if error is not None:
            raise error

    def wait(self, timeout: Optional[float] = None, grace: float = 0.5) -> list[Any]:
        """Wait for every rank to exit and return their results in rank order; on a failure or after
        ``timeout`` seconds, kill what still runs and raise :class:`RankError`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not self._poll() and not self._failures:
                if deadline is not None and time.monotonic() > deadline:
                    hung = [r for r, p in enumerate(self.procs) if p.exitcode is None]
                    raise RankError(f"ranks {hung} of {self.world_size} did not finish within {timeout} s")
                time.sleep(0.02)
            if self._failures:
                end = time.monotonic() + grace  # the other ranks may report their own failure
                while not self._poll() and time.monotonic() < end:
                    time.sleep(0.02)
                raise self._error()  # type: ignore[misc]
        finally:
            self.kill()
        return [self._results[r] for r in range(self.world_size)]

    def kill(self) -> None:
        """Kill the ranks still running and reap them all."""
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join()


def _default_start_method() -> str:
    return "spawn" if torch.cuda.is_initialized() else "fork"


def start(fn: Callable[..., Any], nprocs: int, args: Sequence[Any] = (), kwargs: Optional[Mapping[str, Any]] = None,
          *, backend: Optional[str] = "gloo", gpus: bool = False, threads: Optional[int] = None, env: Env = None,
          start_method: Optional[str] = None) -> Ranks:
    """Start ``nprocs`` ranks running ``fn(rank, nprocs, *args, **kwargs)`` (see the module docstring) and
    return at once; ``TypeError`` here, before any process starts, when the arguments do not fit ``fn``."""
    if nprocs < 1:
        raise ValueError(f"spawn: nprocs must be >= 1, got {nprocs}")
    args, kwargs = tuple(args), dict(kwargs or {})
    try:
        inspect.signature(fn).bind(0, nprocs, *args, **kwargs)
    except TypeError as e:
        raise TypeError(f"spawn: arguments do not fit {getattr(fn, '__qualname__', fn)}: {e}") from None
    except ValueError:  # no signature to check (a builtin)
        pass
    ctx = mp.get_context(start_method or _default_start_method())
    reports = ctx.SimpleQueue()
    launch = _Launch(nprocs, free_port(), backend, gpus, threads, env)
    procs = [ctx.Process(target=_child, args=(r, launch, fn, args, kwargs, reports), name=f"rank{r}")
             for r in range(nprocs)]
    for p in procs:
        p.start()
    return Ranks(procs, reports)


def run(fn: Callable[..., Any], nprocs: int, args: Sequence[Any] = (), kwargs: Optional[Mapping[str, Any]] = None,
        *, timeout: Optional[float] = None, grace: float = 0.5, **options: Any) -> list[Any]:
    """Run ``fn(rank, nprocs, *args, **kwargs)`` on ``nprocs`` ranks and return what each returned, in rank
    order; :class:`RankError` when one fails or ``timeout`` passes. ``options`` are :func:`start`'s."""
    return start(fn, nprocs, args, kwargs, **options).wait(timeout, grace)
