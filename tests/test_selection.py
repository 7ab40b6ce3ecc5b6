"""The selection table (which runtime serves which call), the routing backend's warnings and strict mode, and
``Buffer.sized_for``: every silent fallback the library used to take is named, warned once, or raised."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed

import deepep_plugin as dp
from deepep_plugin.backends.cuda import CudaBackend
from deepep_plugin.backends.selection import Topology, choose, kernels_to_build
from deepep_plugin.cli import serving_table
from deepep_plugin.errors import DeepEPFallbackError, DeepEPInputError

ONE_NODE = Topology(8, 8, False, 1 << 20, 0)
TWO_NODES = Topology(16, 8, False, 1 << 20, 1 << 20)
BUILT = {"intranode": "", "internode": "", "low_latency": ""}


def built(**missing: str):
    state = dict(BUILT, **missing)
    return lambda kind: state[kind]


def test_cpu_tensors_always_take_the_reference_quietly() -> None:
    for topo in (ONE_NODE, TWO_NODES):
        for op in ("layout", "dispatch", "combine"):
            assert choose(op, topo, cuda=False, unavailable=built()) == ("reference", "", "")


def test_kernels_serve_what_they_cover() -> None:
    assert choose("dispatch", ONE_NODE, cuda=True, unavailable=built()).runtime == "intranode"
    assert choose("combine", ONE_NODE, cuda=True, dtype=torch.bfloat16, unavailable=built()).runtime == "intranode"
    assert choose("layout", TWO_NODES, cuda=True, unavailable=built()).runtime == "internode"
    ll = Topology(16, 8, True, 0, 1 << 20)
    assert choose("low_latency_dispatch", ll, cuda=True, unavailable=built()).runtime == "low_latency"


def test_multi_node_without_rdma_bytes_is_named() -> None:
    # Buffer(group, nvl_bytes, 0) on a group spanning nodes: what the adapters used to build.
    choice = choose("dispatch", Topology(16, 8, False, 1 << 20, 0), cuda=True, unavailable=built())
    assert choice.runtime == "reference" and "num_rdma_bytes=0" in choice.reason
    assert "Buffer.sized_for" in choice.fix


def test_extension_checks_match_where_kernels_live() -> None:
    # Only _intranode_C built: a multi-node Buffer used to fail with ImportError; now it is named.
    only_intranode = built(internode="the NVSHMEM kernels (deepep_plugin._nvshmem_C) are not built",
                           low_latency="the NVSHMEM kernels (deepep_plugin._nvshmem_C) are not built")
    choice = choose("dispatch", TWO_NODES, cuda=True, unavailable=only_intranode)
    assert choice.runtime == "reference" and "_nvshmem_C" in choice.reason and "pip install" in choice.fix
    assert choose("dispatch", ONE_NODE, cuda=True, unavailable=only_intranode).runtime == "intranode"
    # Only _nvshmem_C built: a multi-node Buffer used to run the reference silently; now it gets its kernels.
    only_nvshmem = built(intranode="the intranode kernels (deepep_plugin._intranode_C) are not built")
    assert choose("dispatch", TWO_NODES, cuda=True, unavailable=only_nvshmem).runtime == "internode"
    assert kernels_to_build(TWO_NODES, only_nvshmem) == ["internode"]
    assert kernels_to_build(ONE_NODE, only_nvshmem) == []


def test_fp32_combine_is_named() -> None:
    for topo in (ONE_NODE, TWO_NODES):
        choice = choose("combine", topo, cuda=True, dtype=torch.float32, unavailable=built())
        assert choice.runtime == "reference" and "float32 combine" in choice.reason
        assert "cast x to BF16" in choice.fix


def test_low_latency_buffer_spanning_nodes_names_its_normal_ops() -> None:
    choice = choose("dispatch", Topology(16, 8, True, 1 << 20, 1 << 20), cuda=True, unavailable=built())
    assert choice.runtime == "reference" and "low_latency_mode" in choice.reason


class _Reference:
    name = "reference"
    orders_streams = False

    @property
    def reference(self) -> "_Reference":
        return self


def _router(strict: bool) -> CudaBackend:
    # On a machine without CUDA no kernel runtime is built, so every CUDA call would fall back: the routing
    # mechanics (warn once per reason, strict raises) are the same as on a GPU.
    return CudaBackend(group=None, rank=0, topology=Topology(16, 8, False, 1 << 20, 0), num_qps_per_rank=1,
                       allow_nvlink_for_low_latency_mode=True, timeout_s=1.0, reference=_Reference(), strict=strict)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where no kernel runtime is built")
def test_router_warns_once_per_reason(caplog: pytest.LogCaptureFixture) -> None:
    router = _router(strict=False)
    with caplog.at_level(logging.WARNING, logger="deepep_plugin"):
        for _ in range(3):
            assert router.runtime_for("dispatch", True) is router.reference
            assert router.runtime_for("layout", True) is router.reference
        assert router.runtime_for("combine", False, torch.float32) is router.reference  # CPU: no warning
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1, messages
    assert "dispatch on CUDA tensors runs on the plain-PyTorch reference path" in messages[0]
    assert "num_rdma_bytes=0" in messages[0] and "Buffer.sized_for" in messages[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where no kernel runtime is built")
def test_router_raises_in_strict_mode() -> None:
    router = _router(strict=True)
    with pytest.raises(DeepEPFallbackError, match="num_rdma_bytes=0.*DEEPEP_PLUGIN_STRICT"):
        router.runtime_for("dispatch", True)
    assert router.runtime_for("dispatch", False) is router.reference  # CPU tensors are not a fallback


def test_doctor_table_names_every_call() -> None:
    rows = serving_table(16, 8, unavailable=built())
    served = {(mode, call): runtime for mode, call, runtime, _ in rows}
    assert served[("normal", "dispatch")] == "internode"
    assert served[("normal", "combine (bfloat16)")] == "internode"
    assert served[("normal", "combine (float32)")] == "reference"
    assert served[("low-latency", "low_latency_dispatch")] == "low_latency"
    assert all(why for _, call, runtime, why in rows if runtime == "reference")
    rows = serving_table(4, 8, unavailable=built())
    assert {r[2] for r in rows if r[0] == "normal" and "float32" not in r[1]} == {"intranode"}


def _sized(rank: int, world_size: int) -> None:
    group = dist.group.WORLD
    one = dp.Buffer.sized_for(group, 7168 * 2, num_ranks_per_node=world_size)
    assert one.num_nodes == 1 and one.num_rdma_bytes == 0 and one.num_nvl_bytes > 0
    configs = (dp.Buffer.get_dispatch_config(world_size), dp.Buffer.get_combine_config(world_size))
    assert one.num_nvl_bytes == max(c.get_nvl_buffer_size_hint(7168 * 2, world_size) for c in configs)
    two = dp.Buffer.sized_for(group, 7168 * 2, num_ranks_per_node=world_size // 2)
    assert two.num_nodes == 2 and two.num_rdma_bytes > 0
    assert two.num_rdma_bytes >= max(c.get_rdma_buffer_size_hint(7168 * 2, world_size, num_ranks_per_node=2)
                                     for c in configs)
    wider = dp.Buffer.sized_for(group, 7168 * 2, num_sms=48, num_ranks_per_node=world_size)
    assert wider.num_nvl_bytes > one.num_nvl_bytes
    ll = dp.Buffer.sized_for(group, 7168 * 2, low_latency_mode=True, num_max_dispatch_tokens_per_rank=128,
                             num_experts=16, num_ranks_per_node=world_size)
    assert ll.num_rdma_bytes == dp.Buffer.get_low_latency_rdma_size_hint(128, 7168, world_size, 16)
    with pytest.raises(DeepEPInputError, match="num_max_dispatch_tokens_per_rank and num_experts"):
        dp.Buffer.sized_for(group, 7168 * 2, low_latency_mode=True, num_ranks_per_node=world_size)
    with pytest.raises(DeepEPInputError, match="num_nvl_bytes is computed here"):
        dp.Buffer.sized_for(group, 7168 * 2, num_nvl_bytes=1 << 20)
    with pytest.raises(DeepEPInputError, match="hidden_bytes"):
        dp.Buffer.sized_for(group, 0)


def test_sized_for_gives_rdma_bytes_only_across_nodes() -> None:
    run_distributed(_sized, 4)


def test_handles_are_told_apart_by_class() -> None:
    run_distributed(_handle_by_class, 2)


def _handle_by_class(rank: int, world_size: int) -> None:
    buf = dp.Buffer.sized_for(dist.group.WORLD, 64 * 2)
    idx = torch.tensor([[0, 1], [1, -1]], dtype=torch.int64)
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, 2)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    w = torch.ones(2, 2)
    _, _, _, _, handle, _ = buf.dispatch(x, None, per_rank, per_rdma, in_rank, per_expert, idx, w)
    assert isinstance(handle, dp.IntranodeHandle)
    with pytest.raises(DeepEPInputError, match="passed on unchanged"):
        buf.dispatch(x, tuple(handle))
    recv = buf.dispatch(x, handle)[0]
    buf.combine(recv.float(), handle)  # CPU: no warning, the reference path is the CPU path
