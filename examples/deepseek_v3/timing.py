"""Time spent in dispatch and combine, forward and backward, without hidden synchronisation.

``CommTimer`` measures named regions. A forward region wraps the call (``with timer.region("dispatch")``). A
backward region is opened and closed by two identity autograd functions: ``timer.backward_end(x, key)`` on the
*input* of the communication op (its backward runs right after the op's backward) and
``timer.backward_start(y, key)`` on its *output* (its backward runs right before). On CUDA the marks are CUDA
events recorded on the current stream and read once per :meth:`CommTimer.collect`; on the CPU they are wall-clock
readings. Either way a region includes the time a rank waits for its slowest peer (as any collective timing does).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Dict, Iterator, List, Optional, Tuple

import torch


class _Mark(torch.autograd.Function):
    """Identity in the forward pass; calls ``timer._mark(key, opens)`` when its backward runs."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, timer: "CommTimer", key: str, opens: bool) -> torch.Tensor:  # type: ignore[override]
        ctx.timer, ctx.key, ctx.opens = timer, key, opens
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        ctx.timer._mark(ctx.key, ctx.opens)
        return grad, None, None, None


class CommTimer:
    """Accumulates seconds per region name (``"dispatch/fwd"``, ``"combine/bwd"``, ...) between collects.

    Args:
        device: where the timed work runs; CUDA devices are timed with CUDA events on the current stream.
        enabled: ``False`` turns every method into a no-op (``collect`` returns ``{}``).
    """

    def __init__(self, device: torch.device, enabled: bool = True) -> None:
        self.cuda = device.type == "cuda"
        self.enabled = enabled
        self._open: Dict[str, object] = {}
        self._spans: Dict[str, List[Tuple[object, object]]] = defaultdict(list)

    def _now(self) -> object:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _mark(self, key: str, opens: bool) -> None:
        if not self.enabled:
            return
        if opens:
            self._open[key] = self._now()
        elif key in self._open:
            self._spans[key].append((self._open.pop(key), self._now()))

    @contextlib.contextmanager
    def region(self, key: str) -> Iterator[None]:
        """Time the enclosed forward-pass code as region ``key``."""
        self._mark(key, True)
        try:
            yield
        finally:
            self._mark(key, False)

    def backward_start(self, y: torch.Tensor, key: str) -> torch.Tensor:
        """Identity on ``y`` (a communication op's output); its backward opens region ``key``."""
        if not (self.enabled and y.requires_grad):
            return y
        return _Mark.apply(y, self, key, True)

    def backward_end(self, x: torch.Tensor, key: str) -> torch.Tensor:
        """Identity on ``x`` (a communication op's input); its backward closes region ``key``."""
        if not (self.enabled and x.requires_grad):
            return x
        return _Mark.apply(x, self, key, False)

    def collect(self) -> Dict[str, float]:
        """Seconds per region since the last collect (synchronises the device once on CUDA), then reset."""
        if self.cuda and self._spans:
            torch.cuda.synchronize()
        out: Dict[str, float] = {}
        for key, spans in self._spans.items():
            if self.cuda:
                out[key] = sum(a.elapsed_time(b) for a, b in spans) / 1e3  # type: ignore[attr-defined]
            else:
                out[key] = sum(b - a for a, b in spans)  # type: ignore[operator]
        self._spans.clear()
        self._open.clear()
        return out


def maybe_timer(timer: Optional[CommTimer]) -> CommTimer:
    """``timer``, or a disabled one when ``None`` (so call sites need no ``if``)."""
    return timer if timer is not None else _DISABLED


_DISABLED = CommTimer(torch.device("cpu"), enabled=False)
