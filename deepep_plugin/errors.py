"""Exceptions raised by deepep_plugin.

Every error names the argument that was wrong and what was expected, so that a user never has to read a
kernel to find out why a call failed. ``DeepEPInputError`` derives from both ``ValueError`` and
``AssertionError``: code written for DeepEP (which asserts) and code that catches ``ValueError`` both keep
working.
"""

from __future__ import annotations


class DeepEPError(RuntimeError):
    """Base class of the errors deepep_plugin raises on its own."""


class DeepEPInputError(ValueError, AssertionError):
    """An argument has the wrong type, dtype, shape, device or value."""


class DeepEPBufferTooSmall(DeepEPInputError):
    """The communication buffer given to ``Buffer`` cannot hold what a call needs."""


class DeepEPTimeoutError(DeepEPError):
    """A wait on a peer rank ran out of time (a peer died, hung or did not make the same call)."""


class DeepEPFallbackError(DeepEPError):
    """A call on CUDA tensors that no kernel serves, in strict mode (``backend="cuda"`` or
    ``DEEPEP_PLUGIN_STRICT=1``); the message says why and how to fix it."""


def expect(cond: bool, message: str) -> None:
    """Raise :class:`DeepEPInputError` with ``message`` unless ``cond`` holds."""
    if not cond:
        raise DeepEPInputError(message)
