"""``EventHandle`` and ``EventOverlap``: stream/event plumbing with DeepEP V1's semantics.

On CUDA an ``EventHandle`` wraps a ``torch.cuda.Event`` recorded on the current stream; on CPU (the reference
backend over gloo) work is synchronous, so the handle holds no event and waiting on it is a no-op.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch


class EventHandle:
    """An event recorded on the current CUDA stream at construction (nothing on a machine without CUDA).

    Args:
        stream: record on this stream instead of the current one (``None``: current stream).
    """

    def __init__(self, stream: Optional["torch.cuda.Stream"] = None) -> None:
        self.event: Optional[torch.cuda.Event] = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.event = torch.cuda.Event()
            self.event.record(stream if stream is not None else torch.cuda.current_stream())

    def current_stream_wait(self) -> None:
        """Make the current CUDA stream wait for this event (no-op without CUDA)."""
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def stream_wait(self, stream: "torch.cuda.Stream") -> None:
        """Make ``stream`` wait for this event (no-op without CUDA)."""
        if self.event is not None:
            stream.wait_event(self.event)

    def query(self) -> bool:
        """True when the work before the event has finished."""
        return True if self.event is None else self.event.query()


class EventOverlap:
    """An optional event plus tensors kept alive until the event is waited on or this object dies.

    Returned by every ``Buffer`` method. ``event`` is ``None`` unless ``async_finish=True`` was passed.
    Usable as a context manager: leaving the ``with`` block makes the current stream wait on the event
    (a no-op when there is none), so ``with buffer.capture(): ...`` is legal.
    """

    def __init__(self, event: Optional[EventHandle] = None, extra_tensors: Optional[Tuple[Any, ...]] = None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        """Make the current stream wait for the event; raises if there is none (as DeepEP)."""
        if self.event is None:
            raise AssertionError("EventOverlap.current_stream_wait: this EventOverlap holds no event "
                                 "(pass async_finish=True to get one)")
        self.event.current_stream_wait()

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        if self.event is not None:
            self.event.current_stream_wait()
