"""Streams: a Buffer orders its own calls across streams, and two Buffers of one group are independent.

A dispatch on one stream (held back by a sleep kernel) and its combine on another, with no user synchronisation, give
the bits of the same calls on one stream; so do a low-latency receive hook and combine on other streams than their
dispatch. Two Buffers of one group used interleaved each give what one Buffer gives alone. Intranode, internode
(2 emulated nodes of 1 rank) and low-latency kernels; 2 processes (they may share one GPU).
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_utils import run_distributed  # noqa: E402
from gpu_env import SPAWN, missing_kernels  # noqa: E402

pytestmark = pytest.mark.gpu

#: The extension each kind of kernel lives in.
EXTENSIONS = {"intranode": "_intranode_C", "internode": "_nvshmem_C", "low_latency": "_nvshmem_C"}


def _needs(kind: str) -> None:
    reason = missing_kernels(EXTENSIONS[kind])
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("kind", ["intranode", "internode"])
def test_dispatch_and_combine_on_different_streams(kind: str) -> None:
    _needs(kind)
    import stream_workers as w

    run_distributed(w.normal_streams_worker, 2, kind=kind, seed=71, **SPAWN)


def test_low_latency_combine_and_hooks_on_different_streams() -> None:
    _needs("low_latency")
    import stream_workers as w

    run_distributed(w.low_latency_streams_worker, 2, seed=72, **SPAWN)


@pytest.mark.parametrize("kind", ["intranode", "internode"])
def test_two_buffers_on_one_group_interleaved(kind: str) -> None:
    _needs(kind)
    import stream_workers as w

    run_distributed(w.normal_two_buffers_worker, 2, kind=kind, seed=73, **SPAWN)


def test_two_low_latency_buffers_on_one_group_interleaved() -> None:
    _needs("low_latency")
    import stream_workers as w

    run_distributed(w.low_latency_two_buffers_worker, 2, seed=74, **SPAWN)
