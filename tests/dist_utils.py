"""Run a function on several processes that form a ``torch.distributed`` group (the tests' harness).

``run_distributed(fn, world_size, *args, **kwargs)`` runs ``fn(rank, world_size, *args, **kwargs)`` on
``world_size`` processes of one gloo group (by default) through :mod:`deepep_plugin.spawn`, and turns the first
worker failure into an ``AssertionError`` carrying its rank and traceback. Workers that do not finish within
``timeout`` seconds are killed and the test fails (a hang is reported, never waited out). Arguments that do not
fit ``fn``'s signature fail at once, in the test process. CPU tests fork (fast); GPU tests pass
``start_method="spawn"`` (CUDA cannot be used after fork).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from deepep_plugin import spawn


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo",
                    start_method: Optional[str] = None, timeout: float = 240.0, **kwargs: Any) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` processes; raise ``AssertionError`` if
    any of them fails or hangs; return what each returned, in rank order.

    ``backend``, ``start_method`` and ``timeout`` are this harness's own, so a worker cannot take keyword
    arguments of those names. ``start_method`` defaults to fork, or spawn once CUDA is initialised in this process.
    """
    try:
        return spawn.run(fn, world_size, args, kwargs, backend=backend, threads=1, start_method=start_method,
                         timeout=timeout)
    except spawn.RankError as e:
        raise AssertionError(str(e)) from None
