"""The reference backend keeps the timeout promise: when a peer does not make the matching call, a wait gives up
within ``DEEPEP_PLUGIN_TIMEOUT_S`` with a ``DeepEPTimeoutError`` naming the op, this rank and the collective, and
the Buffer refuses every later call instead of hanging or returning wrong data."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed

import deepep_plugin as dp
from deepep_plugin.errors import DeepEPError, DeepEPTimeoutError

TIMEOUT_S = 1.5


def _normal(buf: dp.Buffer, rank: int):
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(6, 64, generator=g).to(torch.bfloat16)
    idx = torch.randint(0, 4, (6, 2), generator=g)
    w = torch.rand(6, 2, generator=g)
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, 4)
    return x, lambda: buf.dispatch(x, None, per_rank, per_rdma, in_rank, per_expert, idx, w)


def _worker(rank: int, world: int, op: str) -> None:
    dp.set_timeout_s(TIMEOUT_S)
    # A group of its own: the one left holding a collective that never completes is not the harness's world group.
    group = dist.new_group(list(range(world)), backend="gloo")
    if op.startswith("low_latency"):
        buf = dp.Buffer(group, 0, dp.Buffer.get_low_latency_rdma_size_hint(8, 128, world, 4),
                        low_latency_mode=True, backend="reference")
        x = torch.randn(4, 128).to(torch.bfloat16)
        idx = torch.randint(0, 4, (4, 2))
        w = torch.rand(4, 2)
        def call():
            return buf.low_latency_dispatch(x, idx, 8, 4, use_fp8=False)
        if op == "low_latency_combine":
            recv_x, _, handle, _, _ = call()
            def call():  # noqa: F811 - the call under test
                return buf.low_latency_combine(recv_x, idx, w, handle)
    else:
        buf = dp.Buffer.sized_for(group, 128, backend="reference")
        x, call = _normal(buf, rank)
        if op == "combine":
            recv_x, _, _, _, handle, _ = call()
            def call():  # noqa: F811
                return buf.combine(recv_x, handle)
    if rank == 1:  # the peer that never makes the call
        time.sleep(3 * TIMEOUT_S)
        return
    started = time.monotonic()
    with pytest.raises(DeepEPTimeoutError) as info:
        call()
    waited = time.monotonic() - started
    message = str(info.value)
    assert f"{op} on rank 0" in message and "DEEPEP_PLUGIN_TIMEOUT_S" in message, message
    assert "can no longer be used" in message, message
    assert TIMEOUT_S * 0.9 <= waited <= TIMEOUT_S + 2.0, waited
    with pytest.raises(DeepEPError, match="can no longer be used"):
        call()


@pytest.mark.parametrize("op", ["dispatch", "combine", "low_latency_dispatch", "low_latency_combine"])
def test_a_missing_peer_times_out_on_the_reference_path(op: str) -> None:
    run_distributed(_worker, 2, op, timeout=60)
